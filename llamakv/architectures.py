"""What llamakv knows about each llama.cpp architecture: the model-spec table.

Most of what scoring needs is read off llama.cpp's own graph when a session starts (the shim
follows each attention node's query back to its ROPE node, see capture.AttentionLayout): where
the pre-RoPE query is (after the QK norm on Qwen3, Gemma 3 and OLMo 2; a view of the fused QKV
projection on Phi-3), the rope of every layer (mode, rotated dimensions, base: Gemma's sliding
layers have their own), the logit's scale (1/sqrt(head_dim), Gemma's f_attention_scale applied
to q after RoPE, Granite's attention multiplier), Gemma 2's logit soft cap and GPT-OSS's learned
attention sinks. What the graph does not show is which layers use the sliding-window cache:
that is llama.cpp's per-architecture pattern, kept here, and checked against the number of
layers in each section of the sequence state.

A sliding-window (iSWA) model has two caches: the global layers' cache grows with the context
and is the one compressed; the sliding layers' cache holds the last window of tokens whatever
llamakv does, so evicting inside it would free nothing and change the answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: whether llamakv compresses it and what about it is not in the graph."""
    name: str                  # general.architecture in the GGUF
    compressible: bool
    summary: str               # what is special about its attention, for `llamakv models list`
    swa_pattern: int = 0       # llama.cpp's default sliding pattern (0: no sliding layers): of every
                               # n layers the last is global, or the first with dense_first
    dense_first: bool = False
    swa_array_only: bool = False  # the pattern comes only from the GGUF's per-layer array
    shares_kv: bool = False    # `<arch>.attention.shared_kv_layers`: the last layers read earlier layers' cells
    tested: bool = True        # a random-weight model in its layout is in the test matrix
    reason: str = ""           # why it is refused

    def kv_sources(self, sliding: list[bool], n_shared: int) -> list[int]:
        """The layer whose cells each layer attends to: itself, or for the last `n_shared`
        layers of a model that shares KV (Gemma 3n, Gemma 4) the last earlier layer of the same
        kind, as llama.cpp's layer_reuse_cb does (llama_model::create_memory)."""
        n_layer = len(sliding)
        start = n_layer - n_shared if self.shares_kv and n_shared > 0 else n_layer
        return [il if il < start else start - (2 if sliding[il] else 1) for il in range(n_layer)]

    def sliding_layers(self, n_layer: int, n_swa: int, pattern_key=None) -> list[bool]:
        """Which layers attend through the sliding-window cache, as llama.cpp decides
        (llama_model_base::load_swa_pattern, llama_hparams::set_swa_pattern): the GGUF's
        `<arch>.attention.sliding_window_pattern` (a per-layer array, or a period) wins over
        the architecture's default; none when the model has no window."""
        if n_swa <= 0 or (self.swa_pattern == 0 and not self.swa_array_only):
            return [False] * n_layer
        if isinstance(pattern_key, (list, tuple)):
            return [bool(x) for x in pattern_key][:n_layer] + [False] * max(0, n_layer - len(pattern_key))
        if self.swa_array_only:
            raise UnsupportedModelError(f"{self.name}: the GGUF has no attention.sliding_window_pattern array")
        n = int(pattern_key) if pattern_key is not None else self.swa_pattern
        if self.dense_first:
            return [n == 0 or il % n != 0 for il in range(n_layer)]
        return [n == 0 or il % n < n - 1 for il in range(n_layer)]


def _ok(name: str, summary: str, **kw) -> ArchSpec:
    return ArchSpec(name, True, summary, **kw)


def _no(name: str, reason: str) -> ArchSpec:
    return ArchSpec(name, False, "", tested=False, reason=reason)


_RECURRENT = ("keeps a recurrent state per sequence besides (or instead of) a KV cache; llama.cpp cannot "
              "remove single positions from it (llama_memory_seq_rm of a range returns false), so its "
              "cells cannot be evicted")
_MLA = ("caches a compressed latent per token (multi-head latent attention) instead of per-head keys and "
        "values; the closed form needs the per-head keys, which this cache does not hold")

SPECS: dict[str, ArchSpec] = {s.name: s for s in [
    _ok("llama", "RoPE (NORM pairs), GQA"),
    _ok("qwen2", "RoPE (NEOX pairs), q/k/v biases"),
    _ok("qwen3", "per-head RMS norm of q and k before RoPE (the normed query is captured)"),
    _ok("qwen3moe", "as qwen3, with mixture-of-experts FFN"),
    _ok("mistral3", "llama-like attention (optional YaRN and temperature tuning)"),
    _ok("phi3", "fused QKV projection (the query is a strided view), NEOX rope; llama.cpp disables its window"),
    _ok("olmo2", "RMS norm over the whole q and k projections before RoPE; with a window (OLMo 3), "
        "3 of every 4 layers slide", swa_pattern=4),
    _ok("granite", "attention multiplier as the logit scale"),
    _ok("gemma2", "logit soft-capping (tanh), q scaled before RoPE; sliding window on every other layer",
        swa_pattern=2),
    _ok("gemma3", "QK norm, q scaled after RoPE (f_attention_scale), sliding layers with their own RoPE "
        "base; 5 of every 6 layers slide", swa_pattern=6),
    _ok("gemma4", "sliding and global layers of different head sizes, shared KV layers; only the global "
        "layers are compressed", swa_array_only=True, shares_kv=True),
    _ok("gpt-oss", "learned attention sinks in the softmax; sliding window on every other layer",
        swa_pattern=2),
    _ok("smollm3", "no RoPE on every fourth layer (NoPE layers: the query is used as it is)"),
    _ok("glm4", "partial rotary embedding (half the head dimensions rotate)"),
    _ok("cohere2", "sliding layers with RoPE, global layers without; 3 of every 4 layers slide",
        swa_pattern=4),
    _ok("exaone4", "QK norm; sliding layers with RoPE, global ones without", swa_pattern=4),
    _ok("stablelm", "partial rotary embedding"),
    _ok("starcoder2", "llama-like attention with biases"),
    _ok("qwen2moe", "as qwen2, with mixture-of-experts FFN"),
    _ok("olmoe", "QK norm over the projections, mixture-of-experts FFN"),
    _ok("granitemoe", "as granite, with mixture-of-experts FFN"),
    _ok("internlm2", "llama-like attention"),
    _ok("phi2", "fused QKV projection with bias, partial rotary embedding, parallel attention and FFN"),
    _ok("seed_oss", "llama-like attention with q/k/v biases"),
    _ok("ernie4_5", "llama-like attention"),
    _ok("apertus", "QK norm before RoPE"),
    _ok("arcee", "llama-like attention"),
    _no("hunyuan-dense", "normalises q and k after RoPE: the query the attention reads is not the rotated "
        "pre-RoPE query the closed form models"),
    _no("llama4", "normalises q and k after RoPE (L2 norm) on its RoPE layers: the query the attention reads "
        "is not the rotated pre-RoPE query the closed form models"),
    # refused: no per-head key cache that single cells can be evicted from
    *[_no(a, _RECURRENT) for a in ("mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "jamba",
                                    "falcon-h1", "granitehybrid", "nemotron_h", "nemotron_h_moe", "lfm2",
                                    "lfm2moe", "plamo2", "qwen3next", "qwen35", "qwen35moe", "kimi-linear")],
    *[_no(a, _MLA) for a in ("deepseek2", "deepseek2ocr", "deepseek32", "deepseek4", "minicpm3", "plm",
                              "glm-dsa", "kimi-k3", "mistral4")],
]}


def spec_for(architecture: str, *, recurrent: bool = False, hybrid: bool = False) -> ArchSpec:
    """The spec of a supported architecture; raises UnsupportedModelError with the reason
    otherwise. `recurrent` / `hybrid`: what llama.cpp says of the loaded model (a model of an
    unlisted architecture is refused with that reason when it applies)."""
    spec = SPECS.get(architecture)
    if spec is not None and spec.compressible:
        return spec
    if spec is not None:
        raise UnsupportedModelError(f"architecture {architecture!r} cannot be compressed: it {spec.reason}")
    if recurrent or hybrid:
        raise UnsupportedModelError(f"architecture {architecture!r} cannot be compressed: it {_RECURRENT}")
    raise UnsupportedModelError(
        f"architecture {architecture!r} is not supported yet: llamakv compresses the architectures it has "
        f"tested ({', '.join(supported())}); see `llamakv models list`")


def supported() -> list[str]:
    return sorted(n for n, s in SPECS.items() if s.compressible)


@dataclass(frozen=True)
class CacheLayout:
    """Which model layers are in which cache of a sequence state, in state order: the global
    (full-attention) cache first, then the sliding-window one if the model has one. A layer that
    reads another layer's cells (shared KV) has none of its own in the state."""
    sliding: tuple[bool, ...]                     # per model layer
    window: int = 0                               # n_swa
    kv_source: tuple[int, ...] = ()               # per model layer (default: itself)
    global_layers: tuple[int, ...] = field(init=False)
    sliding_layers: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        if not self.kv_source:
            object.__setattr__(self, "kv_source", tuple(range(len(self.sliding))))
        object.__setattr__(self, "global_layers", tuple(i for i, s in enumerate(self.sliding) if not s))
        object.__setattr__(self, "sliding_layers", tuple(i for i, s in enumerate(self.sliding) if s))

    @property
    def global_cache_layers(self) -> tuple[int, ...]:
        """The layers of the global cache's section, in order."""
        return tuple(i for i in self.global_layers if self.kv_source[i] == i)

    def rows_of(self, layers) -> list[int]:
        """For each of these global layers, the index in the global cache's section of the layer
        whose cells it attends to."""
        rows = {il: j for j, il in enumerate(self.global_cache_layers)}
        return [rows[self.kv_source[il]] for il in layers]

    @property
    def iswa(self) -> bool:
        return bool(self.sliding_layers)


def describe() -> str:
    """The architectures part of `llamakv models list`: those llamakv compresses and what is
    special about each, then the refused ones grouped by the reason."""
    ok = sorted((s for s in SPECS.values() if s.compressible), key=lambda s: s.name)
    w = max(len(s.name) for s in ok)
    lines = ["COMPRESSED ARCHITECTURES", *(f"  {s.name.ljust(w)}  {s.summary}" for s in ok), "REFUSED"]
    reasons: dict[str, list[str]] = {}
    for spec in SPECS.values():
        if not spec.compressible:
            reasons.setdefault(spec.reason, []).append(spec.name)
    for reason, names in reasons.items():
        lines.append(f"  {', '.join(sorted(names))}: it {reason}")
    lines.append("  any other architecture: not tested yet")
    return "\n".join(lines)
