"""Random-weight GGUF files in the real tensor layout of llama.cpp architectures, at tiny shapes.

For tests and timing only: the weights are noise, so are the answers. What is real is the file's
layout (tensor names and shapes, the hyper-parameter keys) as llama.cpp's loader of that
architecture requires it, so that llama.cpp builds that architecture's own graph (its sliding-window
layers, layers without RoPE, QK norms, attention sinks, experts...). The tokenizer is copied from a
real GGUF (SmolLM2 by default: 49152 tokens), so text can be tokenized.

    write_random_gguf(tmp_path / "g3.gguf", "gemma3")      # 6 layers: 5 sliding, 1 global
    layout("gemma3").swa_layers                             # (True, True, True, True, True, False)

`layout(arch)` gives what a test needs to know about the file and about how llama.cpp runs it
(`ArchLayout`); values that are llama.cpp's defaults rather than keys written cite its source
(vendor/llama.cpp/src/models/<arch>.cpp, src/llama-hparams.h).

An architecture name outside `ARCHITECTURES` is written with the llama layout under that name (a
file llama.cpp or llamakv should refuse). `shape` (a name in `SHAPES`) sizes the llama layout, for
timing large models; Q4_0 weights are then written as random blocks directly, without a
quantization pass, so an 8B shape takes seconds plus the disk write.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

QTYPES = ("f16", "f32", "q4_0")

SHAPES = {
    # name: layers, embd, heads, kv heads, ffn, head_dim (llama layout)
    "tiny": (2, 64, 4, 2, 128, 16),
    "smollm2-135m": (30, 576, 9, 3, 1536, 64),
    "llama-3.2-1b": (16, 2048, 32, 8, 8192, 64),
    "llama-3.1-8b": (32, 4096, 32, 8, 14336, 128),
    # Qwen3-8B's sizes (36 layers, 32/8 heads of 128, FFN 12288) written as a llama graph: for timing
    # (llamakv does not take the qwen3 architecture, whose QK-norm moves the query it reads)
    "qwen3-8b-like": (36, 4096, 32, 8, 12288, 128),
}

DEFAULT_LIKE = "smollm2-135m-instruct"


# ---------------------------------------------------------------------------------------------
# What the file is and how llama.cpp runs it
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchLayout:
    """Facts about a written file, per layer where llama.cpp allows them to vary."""
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]
    head_dim: tuple[int, ...]  # key = value head size of each layer
    n_rot: tuple[int, ...]  # rotated dimensions of each layer's heads, as llama.cpp passes them to RoPE
    n_ff: int
    n_vocab: int
    rope_type: str  # "norm" (consecutive pairs) or "neox" (halves); llama_model_rope_type
    rope_base: float  # global (full-attention) layers
    rope_base_swa: float  # what the graph uses on sliding layers (= rope_base where it ignores the swa key)
    swa_layers: tuple[bool, ...]
    n_swa: int  # window; 0 without sliding layers (what llama_model_n_swa reports)
    swa_type: str  # "none", "standard" or "chunked"
    nope_layers: tuple[bool, ...]  # layers whose Q and K get no RoPE
    kv_source: tuple[int, ...]  # the layer whose KV cells each layer reads (itself, or an earlier one)
    attn_scale: float  # what Q.K is multiplied by before the softmax
    attn_scale_on_q: bool  # llama.cpp multiplies Q by attn_scale before attention, not as kq_scale
    attn_softcap: float | None  # cap * tanh(Q.K / cap), on the product of the (on-Q scaled) Q and K
    final_softcap: float | None
    attn_sinks: bool
    qk_norm: str | None  # "head" (per head, before RoPE), "head_after_rope", "full" (whole projection,
    #                      before RoPE), "l2" (weightless RMS norm after RoPE, on RoPE layers)
    fused_qkv: bool
    qkv_bias: bool
    n_expert: int
    n_expert_used: int
    embd_multiplier: float  # token embeddings are multiplied by it
    residual_multiplier: float  # attention and FFN outputs are multiplied by it before the residual add
    logit_multiplier: float  # final logits are multiplied by it (before the final softcap)
    rope_freqs: tuple[float, ...] | None  # the rope_freqs tensor written (frequency divisors), if any
    notes: tuple[str, ...] = ()

    @property
    def has_swa(self) -> bool:
        return any(self.swa_layers)

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """The layers that own KV cells."""
        return tuple(i for i, src in enumerate(self.kv_source) if src == i)


# ---------------------------------------------------------------------------------------------
# Recipes: how each architecture's file is built
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Moe:
    n_expert: int = 4
    n_expert_used: int = 2
    n_ff_exp: int = 64
    n_ff_shexp: int = 0  # shared expert (0: none)
    shexp_gate: bool = False  # a per-token sigmoid gate on the shared expert (ffn_gate_inp_shexp)
    bias: bool = False  # router and expert biases
    every: int = 1  # MoE on layers with (i + 1) % every == 0, dense FFN elsewhere


@dataclass(frozen=True)
class _Recipe:
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_ff: int = 256
    n_rot: int | None = None  # None: the whole head
    n_ctx: int = 4096
    rope_base: float = 10000.0
    norm: str = "rms"  # "rms", "layer" (LayerNorm with bias), "layer_nobias"
    norm_eps: float = 1e-5
    layer_norms: tuple[str, ...] = ("attn_norm", "ffn_norm")
    qkv: str = "split"  # "split" or "fused" (attn_qkv)
    qkv_bias: bool = False
    wo_bias: bool = False
    qk_norm: str | None = None  # None, "head" ([head_dim] weights) or "full" ([n_head * head_dim])
    sinks: bool = False
    ffn: str = "gated"  # "gated", "gate_up" (fused [2 n_ff] ffn_up), "plain", "plain_bias"
    moe: _Moe | None = None
    output: str = "separate"  # "tied" (no output tensor), "separate", "separate_bias"
    swa_layers: tuple[bool, ...] = ()  # empty: no sliding window
    n_swa: int = 0
    swa_pattern_key: bool = False  # write the per-layer sliding_window_pattern array
    keys: dict = field(default_factory=dict)  # arch-specific keys: suffix after "<arch>." -> value
    global_keys: dict = field(default_factory=dict)  # keys without the arch prefix
    layer_fn: Callable | None = None  # replaces the generic per-layer tensors
    extra_fn: Callable | None = None  # extra non-layer tensors

    @property
    def rot(self) -> int:
        return self.head_dim if self.n_rot is None else self.n_rot


@dataclass(frozen=True)
class _T:
    """A tensor to write: its name, its shape in ggml order (ne, as llama.cpp's create_tensor takes
    it: the input dimension first) and how to fill it."""
    name: str
    ne: tuple[int, ...]
    init: object = "w"  # "w" (std 1/sqrt(ne[0])), "embd" (std 1), "ones", "bias", "sink", or an array


def _pattern(n_layer: int, n_pattern: int, dense_first: bool = False) -> tuple[bool, ...]:
    """llama_hparams::set_swa_pattern (src/llama-hparams.cpp): which layers slide for a pattern n."""
    if dense_first:
        return tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
    return tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))


# --- per-layer tensors -------------------------------------------------------------------------

def _norm(name: str, n: int, with_bias: bool) -> list[_T]:
    out = [_T(name + ".weight", (n,), "ones")]
    if with_bias:
        out.append(_T(name + ".bias", (n,), "bias"))
    return out


def _attention(r: _Recipe, p: str, head_dim: int, n_head_kv: int, kv: bool = True) -> list[_T]:
    nq, nk = r.n_head * head_dim, n_head_kv * head_dim
    out: list[_T] = []
    if r.qkv == "fused":
        out.append(_T(p + "attn_qkv.weight", (r.n_embd, nq + 2 * nk)))
        if r.qkv_bias:
            out.append(_T(p + "attn_qkv.bias", (nq + 2 * nk,), "bias"))
    else:
        for part, n in (("q", nq), ("k", nk), ("v", nk))[: 3 if kv else 1]:
            out.append(_T(f"{p}attn_{part}.weight", (r.n_embd, n)))
            if r.qkv_bias:
                out.append(_T(f"{p}attn_{part}.bias", (n,), "bias"))
    out.append(_T(p + "attn_output.weight", (nq, r.n_embd)))
    if r.wo_bias:
        out.append(_T(p + "attn_output.bias", (r.n_embd,), "bias"))
    if r.qk_norm == "head":
        out.append(_T(p + "attn_q_norm.weight", (head_dim,), "ones"))
        if kv:
            out.append(_T(p + "attn_k_norm.weight", (head_dim,), "ones"))
    elif r.qk_norm == "full":
        out += [_T(p + "attn_q_norm.weight", (nq,), "ones"), _T(p + "attn_k_norm.weight", (nk,), "ones")]
    if r.sinks:
        out.append(_T(p + "attn_sinks.weight", (r.n_head,), "sink"))
    return out


def _dense_ffn(r: _Recipe, p: str, n_ff: int) -> list[_T]:
    e = r.n_embd
    if r.ffn == "gated":
        return [_T(p + "ffn_gate.weight", (e, n_ff)), _T(p + "ffn_up.weight", (e, n_ff)),
                _T(p + "ffn_down.weight", (n_ff, e))]
    if r.ffn == "gate_up":
        return [_T(p + "ffn_up.weight", (e, 2 * n_ff)), _T(p + "ffn_down.weight", (n_ff, e))]
    out = [_T(p + "ffn_up.weight", (e, n_ff)), _T(p + "ffn_down.weight", (n_ff, e))]
    if r.ffn == "plain_bias":
        out += [_T(p + "ffn_up.bias", (n_ff,), "bias"), _T(p + "ffn_down.bias", (e,), "bias")]
    return out


def _moe_ffn(r: _Recipe, p: str) -> list[_T]:
    m, e = r.moe, r.n_embd
    out = [_T(p + "ffn_gate_inp.weight", (e, m.n_expert)),
           _T(p + "ffn_gate_exps.weight", (e, m.n_ff_exp, m.n_expert)),
           _T(p + "ffn_down_exps.weight", (m.n_ff_exp, e, m.n_expert)),
           _T(p + "ffn_up_exps.weight", (e, m.n_ff_exp, m.n_expert))]
    if m.bias:
        out += [_T(p + "ffn_gate_inp.bias", (m.n_expert,), "bias"),
                _T(p + "ffn_gate_exps.bias", (m.n_ff_exp, m.n_expert), "bias"),
                _T(p + "ffn_down_exps.bias", (e, m.n_expert), "bias"),
                _T(p + "ffn_up_exps.bias", (m.n_ff_exp, m.n_expert), "bias")]
    if m.n_ff_shexp:
        if m.shexp_gate:
            out.append(_T(p + "ffn_gate_inp_shexp.weight", (e,), "bias"))
        out += [_T(p + "ffn_gate_shexp.weight", (e, m.n_ff_shexp)),
                _T(p + "ffn_down_shexp.weight", (m.n_ff_shexp, e)),
                _T(p + "ffn_up_shexp.weight", (e, m.n_ff_shexp))]
    return out


def _is_moe_layer(r: _Recipe, i: int) -> bool:
    return r.moe is not None and (i + 1) % r.moe.every == 0


def _layer(r: _Recipe, i: int) -> list[_T]:
    """The generic transformer block: the first norm, attention, the other norms, the FFN."""
    p = f"blk.{i}."
    with_bias = r.norm == "layer"
    norms = [t for name in r.layer_norms for t in _norm(p + name, r.n_embd, with_bias)]
    first = [t for t in norms if t.name.startswith(p + "attn_norm.")]
    rest = [t for t in norms if t not in first]
    ffn = _moe_ffn(r, p) if _is_moe_layer(r, i) else _dense_ffn(r, p, r.n_ff)
    return first + _attention(r, p, r.head_dim, r.n_head_kv) + rest + ffn


# --- files -------------------------------------------------------------------------------------

def _tensors(r: _Recipe, n_vocab: int) -> list[_T]:
    out = [_T("token_embd.weight", (r.n_embd, n_vocab), "embd")]
    out += _norm("output_norm", r.n_embd, r.norm == "layer")
    if r.output != "tied":
        out.append(_T("output.weight", (r.n_embd, n_vocab)))
    if r.output == "separate_bias":
        out.append(_T("output.bias", (n_vocab,), "bias"))
    if r.extra_fn is not None:
        out += r.extra_fn(r)
    layer_fn = r.layer_fn or _layer
    for i in range(r.n_layer):
        out += layer_fn(r, i)
    return out


def _keys(r: _Recipe, n_vocab: int) -> dict[str, object]:
    """The "<arch>." keys: the common ones, then the recipe's own (which may override them)."""
    k: dict[str, object] = {
        "context_length": r.n_ctx, "embedding_length": r.n_embd, "block_count": r.n_layer,
        "feed_forward_length": r.n_ff, "attention.head_count": r.n_head,
        "attention.head_count_kv": r.n_head_kv, "rope.dimension_count": r.rot,
        "rope.freq_base": float(r.rope_base), "vocab_size": n_vocab,
    }
    eps_key = "layer_norm_rms_epsilon" if r.norm == "rms" else "layer_norm_epsilon"
    k["attention." + eps_key] = float(r.norm_eps)
    if r.head_dim * r.n_head != r.n_embd:
        k["attention.key_length"] = k["attention.value_length"] = r.head_dim
    if r.moe is not None:
        k.update({"expert_count": r.moe.n_expert, "expert_used_count": r.moe.n_expert_used,
                  "expert_feed_forward_length": r.moe.n_ff_exp})
        if r.moe.n_ff_shexp:
            k["expert_shared_feed_forward_length"] = r.moe.n_ff_shexp
    if r.swa_layers:
        k["attention.sliding_window"] = r.n_swa
        if r.swa_pattern_key:
            k["attention.sliding_window_pattern"] = list(r.swa_layers)
    k.update(r.keys)
    return k


# ---------------------------------------------------------------------------------------------
# The architectures
# ---------------------------------------------------------------------------------------------

_GEMMA4_HEAD_DIM_FULL = 64
_GEMMA4_N_KV_FULL = 1
# proportional RoPE on global layers (as Gemma 4's converter writes it): a quarter of the head's
# dimension pairs rotate, the others get a frequency divisor of 1e30 (no rotation)
_GEMMA4_ROPE_FREQS = tuple([1.0] * (_GEMMA4_HEAD_DIM_FULL // 8) + [1e30] * (_GEMMA4_HEAD_DIM_FULL * 3 // 8))


def _gemma4_layer(r: _Recipe, i: int) -> list[_T]:
    """models/gemma4.cpp: per-layer head size and KV head count (sliding vs. global layers); the
    last `shared_kv_layers` layers have no K/V projections (they read an earlier layer's cache)."""
    p = f"blk.{i}."
    swa = r.swa_layers[i]
    head_dim = r.head_dim if swa else _GEMMA4_HEAD_DIM_FULL
    n_kv = r.n_head_kv if swa else _GEMMA4_N_KV_FULL
    has_kv = i < r.n_layer - r.keys["attention.shared_kv_layers"]
    return (_norm(p + "attn_norm", r.n_embd, False)
            + _attention(r, p, head_dim, n_kv, kv=has_kv)
            + _norm(p + "post_attention_norm", r.n_embd, False) + _norm(p + "ffn_norm", r.n_embd, False)
            + _dense_ffn(r, p, r.n_ff) + _norm(p + "post_ffw_norm", r.n_embd, False))


def _gemma4_extra(r: _Recipe) -> list[_T]:
    return [_T("rope_freqs.weight", (_GEMMA4_HEAD_DIM_FULL // 2,), np.array(_GEMMA4_ROPE_FREQS, np.float32))]


_GEMMA4_SWA = (True, True, False, True, False)  # the last two layers share the KV of layers 1 and 2

# muP-style multipliers, the attention scale 1/head_dim rather than 1/sqrt(head_dim)
_GRANITE_SCALES = {"attention.scale": 1 / 32, "embedding_scale": 12.0, "residual_scale": 0.22,
                   "logit_scale": 8.0}
_LLAMA_TINY = dict(zip(("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "head_dim"), SHAPES["tiny"]))

RECIPES: dict[str, _Recipe] = {
    # the historical tiny llama of scripts/make_random_gguf.py (64 wide, heads of 16), tied output
    "llama": _Recipe(**_LLAMA_TINY, n_ctx=8192, output="tied"),
    # Q/K/V biases
    "qwen2": _Recipe(qkv_bias=True, rope_base=1e6, norm_eps=1e-6),
    # per-head QK norm; heads of 64 (Q is wider than the embedding: key_length written)
    "qwen3": _Recipe(head_dim=64, qk_norm="head", rope_base=1e6, norm_eps=1e-6, output="tied"),
    "qwen3moe": _Recipe(head_dim=64, qk_norm="head", rope_base=1e6, norm_eps=1e-6, moe=_Moe()),
    # attention and final logit softcaps, four norms a layer, sliding window on even layers
    "gemma2": _Recipe(head_dim=64, output="tied", norm_eps=1e-6,
                      layer_norms=("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"),
                      swa_layers=_pattern(2, 2), n_swa=128,
                      keys={"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    # QK norm, five sliding layers then a global one, a RoPE base of its own on sliding layers
    "gemma3": _Recipe(n_layer=6, head_dim=64, qk_norm="head", output="tied", norm_eps=1e-6, rope_base=1e6,
                      layer_norms=("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"),
                      swa_layers=_pattern(6, 6), n_swa=128, keys={"rope.freq_base_swa": 10000.0}),
    # per-layer head sizes and KV head counts, proportional RoPE on global layers, shared KV layers
    "gemma4": _Recipe(n_layer=5, head_dim=32, qk_norm="head", output="tied", norm_eps=1e-6, rope_base=1e6,
                      n_rot=_GEMMA4_HEAD_DIM_FULL, swa_layers=_GEMMA4_SWA, n_swa=128, swa_pattern_key=True,
                      layer_fn=_gemma4_layer, extra_fn=_gemma4_extra,
                      keys={"rope.freq_base_swa": 10000.0, "final_logit_softcapping": 30.0,
                            "attention.key_length": _GEMMA4_HEAD_DIM_FULL,
                            "attention.value_length": _GEMMA4_HEAD_DIM_FULL,
                            "attention.key_length_swa": 32, "attention.value_length_swa": 32,
                            "rope.dimension_count_swa": 32,
                            "attention.head_count_kv": [2 if s else _GEMMA4_N_KV_FULL for s in _GEMMA4_SWA],
                            "attention.shared_kv_layers": 2, "embedding_length_per_layer_input": 0}),
    "mistral3": _Recipe(rope_base=1e6),
    # fused attn_qkv, fused gate+up
    "phi3": _Recipe(qkv="fused", ffn="gate_up"),
    # attention sinks, sliding window on even layers, experts with biases, Q/K/V/O biases
    "gpt-oss": _Recipe(qkv_bias=True, wo_bias=True, sinks=True, rope_base=150000.0,
                       layer_norms=("attn_norm", "post_attention_norm"), moe=_Moe(bias=True),
                       swa_layers=_pattern(2, 2), n_swa=128),
    # OLMo 3's layout (OLMo 2 plus sliding layers, three in four, as an explicit per-layer pattern):
    # post-norms only, QK norm over the whole projection
    "olmo2": _Recipe(n_layer=4, qk_norm="full", layer_norms=("post_attention_norm", "post_ffw_norm"),
                     rope_base=500000.0, norm_eps=1e-6, swa_layers=(True, True, True, False), n_swa=128,
                     swa_pattern_key=True),
    # attention scale 1/head_dim, embedding, residual and logit multipliers
    "granite": _Recipe(output="tied", keys=_GRANITE_SCALES),
    # no RoPE on every 4th layer
    "smollm3": _Recipe(n_layer=4, output="tied", rope_base=5e6, norm_eps=1e-6),
    # partial RoPE (half the head), fused gate+up, Q/K/V biases, four norms a layer
    "glm4": _Recipe(n_rot=16, qkv_bias=True, ffn="gate_up",
                    layer_norms=("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")),
    # partial RoPE, fused QKV with bias, LayerNorm, parallel attention and FFN, GELU MLP with biases
    "phi2": _Recipe(n_head_kv=4, n_rot=16, norm="layer", qkv="fused", qkv_bias=True, wo_bias=True,
                    layer_norms=("attn_norm",), ffn="plain_bias", output="separate_bias"),
    # partial RoPE (a quarter), LayerNorm, Q/K/V biases
    "stablelm": _Recipe(n_head_kv=4, n_rot=8, norm="layer", qkv_bias=True),
    # sliding window three in four, no RoPE on global layers, LayerNorm without bias, parallel blocks
    "cohere2": _Recipe(n_layer=4, norm="layer_nobias", layer_norms=("attn_norm",), output="tied",
                       rope_base=50000.0, swa_layers=_pattern(4, 4), n_swa=128, keys={"logit_scale": 0.25}),
    # post-norms only, per-head QK norm
    "exaone4": _Recipe(qk_norm="head", layer_norms=("post_attention_norm", "post_ffw_norm"), output="tied",
                       rope_base=1e6),
    # LayerNorm with bias, biases everywhere, GELU MLP
    "starcoder2": _Recipe(norm="layer", qkv_bias=True, wo_bias=True, ffn="plain_bias", output="tied",
                          rope_base=100000.0),
    "internlm2": _Recipe(rope_base=1e6),
    # experts plus a sigmoid-gated shared expert, Q/K/V biases
    "qwen2moe": _Recipe(qkv_bias=True, rope_base=1e6, norm_eps=1e-6, moe=_Moe(n_ff_shexp=128, shexp_gate=True)),
    # experts (of feed_forward_length: models/olmoe.cpp reads no expert key), QK norm over the whole
    # projection (K's is [n_embd], hence MHA)
    "olmoe": _Recipe(n_head_kv=4, n_ff=64, qk_norm="full", moe=_Moe()),
    # granite's multipliers with experts (of feed_forward_length, models/granite-moe.cpp)
    "granitemoe": _Recipe(n_ff=64, output="tied", moe=_Moe(), keys=_GRANITE_SCALES),
    # post_attention_norm is the pre-FFN norm; Q/K/V biases; heads of 64
    "seed_oss": _Recipe(head_dim=64, qkv_bias=True, layer_norms=("attn_norm", "post_attention_norm"),
                        rope_base=1e7, norm_eps=1e-6),
    "ernie4_5": _Recipe(output="tied", rope_base=500000.0),
    # per-head QK norm, xIELU MLP (its parameters under keys without the architecture prefix)
    "apertus": _Recipe(qk_norm="head", ffn="plain", rope_base=12000000.0,
                       global_keys={"xielu.alpha_n": 0.8, "xielu.alpha_p": 0.8, "xielu.beta": 0.5,
                                    "xielu.eps": -1e-6}),
    # ReLU^2 MLP without gate
    "arcee": _Recipe(ffn="plain", output="tied"),
    # chunked attention three in four, no RoPE on the 4th, L2 QK norm, experts on odd layers
    "llama4": _Recipe(n_layer=4, rope_base=500000.0, swa_layers=_pattern(4, 4), n_swa=8192,
                      moe=_Moe(n_expert_used=1, n_ff_shexp=64, every=2), keys={"interleave_moe_layer_step": 2}),
    # per-head QK norm applied after RoPE
    "hunyuan-dense": _Recipe(qk_norm="head", output="tied", rope_base=10000.0),
}

ARCHITECTURES: tuple[str, ...] = tuple(RECIPES)


# ---------------------------------------------------------------------------------------------
# Facts: the generic ones from the recipe, then what each architecture's graph does differently
# ---------------------------------------------------------------------------------------------

def _base_facts(arch: str, r: _Recipe, n_vocab: int) -> dict:
    n = r.n_layer
    swa = r.swa_layers or (False,) * n
    return dict(
        arch=arch, n_layer=n, n_embd=r.n_embd, n_head=r.n_head, n_head_kv=(r.n_head_kv,) * n,
        head_dim=(r.head_dim,) * n, n_rot=(r.rot,) * n, n_ff=r.n_ff, n_vocab=n_vocab,
        rope_type="norm", rope_base=r.rope_base, rope_base_swa=r.rope_base, swa_layers=swa,
        n_swa=r.n_swa if any(swa) else 0, swa_type="standard" if any(swa) else "none",
        nope_layers=(False,) * n, kv_source=tuple(range(n)), attn_scale=1 / math.sqrt(r.head_dim),
        attn_scale_on_q=False, attn_softcap=None, final_softcap=None, attn_sinks=r.sinks,
        qk_norm=r.qk_norm, fused_qkv=r.qkv == "fused", qkv_bias=r.qkv_bias,
        n_expert=r.moe.n_expert if r.moe else 0, n_expert_used=r.moe.n_expert_used if r.moe else 0,
        embd_multiplier=1.0, residual_multiplier=1.0, logit_multiplier=1.0, rope_freqs=None, notes=())


def _neox(f: dict, r: _Recipe) -> dict:
    """llama_model_rope_type (src/llama-model.cpp) puts these architectures on NeoX RoPE."""
    return {"rope_type": "neox"}


def _facts_gemma(f: dict, r: _Recipe) -> dict:
    # models/gemma2.cpp, gemma3.cpp: f_attention_scale = 1/sqrt(key_length) (1/sqrt(n_embd/n_head)
    # for the 27B only), multiplied into Q before build_attn, which then gets kq_scale 1; embeddings
    # multiplied by sqrt(n_embd)
    out = {**_neox(f, r), "attn_scale_on_q": True, "embd_multiplier": math.sqrt(r.n_embd)}
    if "attn_logit_softcapping" in r.keys:
        out.update(attn_softcap=r.keys["attn_logit_softcapping"],
                   final_softcap=r.keys["final_logit_softcapping"])
    if "rope.freq_base_swa" in r.keys:  # else models/gemma2.cpp copies rope.freq_base
        out["rope_base_swa"] = r.keys["rope.freq_base_swa"]
    return out


def _facts_gemma4(f: dict, r: _Recipe) -> dict:
    n = r.n_layer
    first_shared = n - r.keys["attention.shared_kv_layers"]
    # src/llama-model.cpp (create_memory, gemma4's reuse): a shared layer reads the last layer of its
    # kind that owns KV: first_shared - 2 if sliding, first_shared - 1 if global
    src = tuple(i if i < first_shared else first_shared - (2 if r.swa_layers[i] else 1) for i in range(n))
    return {**_neox(f, r), "head_dim": tuple(r.head_dim if s else _GEMMA4_HEAD_DIM_FULL for s in r.swa_layers),
            "n_head_kv": tuple(r.keys["attention.head_count_kv"]),
            "n_rot": tuple(r.keys["rope.dimension_count_swa"] if s else r.rot for s in r.swa_layers),
            "rope_base_swa": r.keys["rope.freq_base_swa"], "kv_source": src,
            "attn_scale": 1.0,  # models/gemma4.cpp: f_attention_scale = 1 (Q and K are RMS-normed)
            "embd_multiplier": math.sqrt(r.n_embd), "final_softcap": r.keys["final_logit_softcapping"],
            "rope_freqs": _GEMMA4_ROPE_FREQS}


def _facts_granite(f: dict, r: _Recipe) -> dict:
    # models/granite.cpp: kq_scale = attention.scale; embeddings * embedding_scale (src/llama-graph.cpp,
    # build_inp_embd); attention and FFN outputs * residual_scale; logits / logit_scale
    k = r.keys
    return {"attn_scale": k["attention.scale"], "embd_multiplier": k["embedding_scale"],
            "residual_multiplier": k["residual_scale"], "logit_multiplier": 1 / k["logit_scale"]}


def _nope_every_4th(f: dict, r: _Recipe) -> dict:
    # models/smollm3.cpp, llama4.cpp: n_no_rope_layer_step = 4, no RoPE where (il + 1) % 4 == 0
    return {"nope_layers": tuple((i + 1) % 4 == 0 for i in range(r.n_layer))}


def _facts_phi(f: dict, r: _Recipe) -> dict:
    # models/phi2.cpp, phi3.cpp: Q *= 1/sqrt(head_dim) before build_attn (kq_scale 1)
    return {**_neox(f, r), "attn_scale_on_q": True}


def _facts_cohere2(f: dict, r: _Recipe) -> dict:
    # models/cohere2.cpp: RoPE (with the global freq_base) on sliding layers only; logits * logit_scale
    return {"nope_layers": tuple(not s for s in f["swa_layers"]), "logit_multiplier": r.keys["logit_scale"]}


def _facts_llama4(f: dict, r: _Recipe) -> dict:
    # models/llama4.cpp: chunked attention of 8192 whatever the sliding_window key says (it only
    # switches it off when 0), pattern 4; L2 norm of Q and K after RoPE, on RoPE layers only
    return {**_nope_every_4th(f, r), "swa_type": "chunked", "n_swa": 8192, "qk_norm": "l2"}


def _facts_hunyuan(f: dict, r: _Recipe) -> dict:
    return {**_neox(f, r), "qk_norm": "head_after_rope"}  # models/hunyuan-vl.cpp (the dense graph)


_FACTS: dict[str, Callable[[dict, _Recipe], dict]] = {
    "qwen2": _neox, "qwen3": _neox, "qwen3moe": _neox, "gemma2": _facts_gemma, "gemma3": _facts_gemma,
    "gemma4": _facts_gemma4, "phi3": _facts_phi, "phi2": _facts_phi, "gpt-oss": _neox, "olmo2": _neox,
    "granite": _facts_granite, "granitemoe": _facts_granite, "smollm3": _nope_every_4th, "stablelm": _neox,
    "cohere2": _facts_cohere2, "exaone4": _neox, "starcoder2": _neox, "qwen2moe": _neox, "olmoe": _neox,
    "seed_oss": _neox, "apertus": _neox, "llama4": _facts_llama4, "hunyuan-dense": _facts_hunyuan,
}

# what a test may trip over, per architecture (from the loader and graph in models/<arch>.cpp)
_NOTES: dict[str, tuple[str, ...]] = {
    "llama": ("the loader requires rope.dimension_count == head size",),
    "qwen3": ("Q and K RMS-normed per head before RoPE",),
    "qwen3moe": ("Q and K RMS-normed per head before RoPE", "softmax top-2 of 4 experts"),
    "gemma2": ("GELU FFN; four norms a layer (pre and post attention, pre and post FFN)",
               "no pattern key: the loader's default pattern 2 (layer 0 slides, layer 1 is global)",
               "attention softcap on Q.K after the on-Q scale; final logits softcapped at 30"),
    "gemma3": ("no pattern key: the loader's default pattern 6 (layer 5 is global)",
               "no final softcap unless its key is written (the loader sets 0)",
               "without rope.freq_base_swa the sliding base is llama-hparams.h's 10000, not freq_base"),
    "gemma4": ("sliding layers: heads of 32, 2 KV heads; global layers: heads of 64, 1 KV head",
               "global layers: RoPE over 64 dims with rope_freqs divisors: the first 8 pairs rotate, "
               "the other 24 (divisor 1e30) do not (proportional RoPE)",
               "V is RMS-normed without weight; Q and K per head (weights), before RoPE",
               "layers 3, 4 have no K/V weights and read the cache of layers 1, 2 (kv_source)",
               "sliding_window_pattern array and sliding_window, key/value_length_swa and "
               "embedding_length_per_layer_input are required keys"),
    "phi3": ("fused attn_qkv; fused ffn_up [2 n_ff] (SwiGLU); a sliding_window key is ignored",),
    "gpt-oss": ("sinks: one extra logit per head in the softmax (attn_sinks)",
                "experts: SwiGLU-OAI with biases, softmax-weight gating; post_attention_norm is the "
                "pre-FFN norm; the output tensor is required",
                "the head size is rope.dimension_count (n_rot), not key_length"),
    "olmo2": ("post-norms only (no attn_norm/ffn_norm); Q/K RMS-normed over the whole projection",
              "sliding layers are roped with the global freq_base (rope.freq_base_swa is not used)"),
    "granite": ("logits are divided by logit_scale (cohere2 multiplies by it)",),
    "granitemoe": ("logits are divided by logit_scale", "experts of feed_forward_length"),
    "smollm3": ("no RoPE on layer 3 (every 4th layer), hard-coded in the loader",),
    "glm4": ("partial RoPE: 16 of 32 dims, consecutive pairs (norm type); fused ffn_up [2 n_ff]",
             "four norms a layer"),
    "phi2": ("LayerNorm with bias, attention and FFN in parallel from one norm; partial RoPE 16/32",
             "fused attn_qkv with bias; GELU FFN with biases; output bias"),
    "stablelm": ("LayerNorm with bias; partial RoPE: 8 of 32 dims",),
    "cohere2": ("LayerNorm without bias, attention and FFN in parallel; tied output",
                "global layers have no RoPE; sliding layers use the global freq_base"),
    "exaone4": ("post-norms only; QK norm per head; the loader makes layers slide only at 64 layers",),
    "starcoder2": ("LayerNorm with bias; GELU FFN with biases; q/k/v/o biases",),
    "qwen2moe": ("experts plus a shared expert gated by sigmoid(ffn_gate_inp_shexp . x)",),
    "olmoe": ("Q/K RMS-normed over the whole projection; experts of feed_forward_length",),
    "seed_oss": ("post_attention_norm is the pre-FFN norm (no ffn_norm)",),
    "apertus": ("xIELU FFN; its xielu.* keys have no architecture prefix and are required",),
    "arcee": ("ReLU^2 FFN without gate",),
    "llama4": ("chunked attention: a token attends within its own 8192-token chunk (n_swa 8192)",
               "no RoPE on layer 3; there Q is scaled by the attention temperature (1 before 8191)",
               "MoE on odd layers: top-1 sigmoid routing plus a shared expert"),
    "hunyuan-dense": ("Q and K RMS-normed per head after RoPE",),
}


def _recipe(arch: str, shape: str | None) -> _Recipe:
    if shape is not None:
        if arch in RECIPES and arch != "llama":
            raise ValueError(f"shape {shape!r} sizes the llama layout only, not {arch}")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}: {', '.join(SHAPES)}")
        dims = dict(zip(("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "head_dim"), SHAPES[shape]))
        return replace(RECIPES["llama"], **dims)
    return RECIPES.get(arch, RECIPES["llama"])


def layout(arch: str, shape: str | None = None, n_vocab: int = 49152) -> ArchLayout:
    """What `write_random_gguf(path, arch, shape=shape)` writes and how llama.cpp will run it."""
    r = _recipe(arch, shape)
    facts = _base_facts(arch, r, n_vocab)
    if arch in _FACTS:
        facts.update(_FACTS[arch](facts, r))
    facts["notes"] = _NOTES.get(arch, ()) if arch in RECIPES else ("the llama layout under another name",)
    return ArchLayout(**facts)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

class _PackedOnce(list):
    """A tokenizer array (up to ~100k strings) that `_Writer` encodes once per process, not per file."""

    def __init__(self, values):
        super().__init__(values)
        self.encoded: dict = {}


class _Writer(GGUFWriter):
    """GGUFWriter, with `_PackedOnce` values encoded once (through GGUFWriter's own encoder): the
    tokenizer's ~100k strings are most of the time of writing a tiny file."""

    def _pack_val(self, val, vtype, add_vtype, *args, **kwargs):
        if not isinstance(val, _PackedOnce):
            return super()._pack_val(val, vtype, add_vtype, *args, **kwargs)
        key = (vtype, add_vtype, args, tuple(sorted(kwargs.items())))
        if key not in val.encoded:
            val.encoded[key] = super()._pack_val(val, vtype, add_vtype, *args, **kwargs)
        return val.encoded[key]


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(like: str) -> tuple[tuple[str, object, GGUFValueType], ...]:
    """The tokenizer.* fields of a GGUF (a path or a registry model name), read once."""
    from .models import resolve_model
    reader = GGUFReader(str(resolve_model(like)))
    fields = []
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            value = f.contents()
            fields.append((key, _PackedOnce(value) if isinstance(value, list) else value, f.types[0]))
    return tuple(fields)


def _copy_tokenizer(writer: GGUFWriter, like: str, skip: tuple[str, ...] = ()) -> int:
    """Copy the tokenizer fields (but those in `skip`); returns the vocabulary size."""
    n_vocab = 0
    for key, value, vtype in _tokenizer_fields(like):
        if key in skip:
            continue
        if vtype == GGUFValueType.ARRAY:
            writer.add_array(key, value)
            if key == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        elif vtype == GGUFValueType.STRING:
            writer.add_string(key, value)
        else:
            writer.add_key_value(key, value, vtype)
    return n_vocab


def _add_key(writer: GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


class _Filler:
    """Random contents for `_T`s, drawn in file order from one generator."""

    def __init__(self, seed: int, qtype: str):
        if qtype not in QTYPES:
            raise ValueError(f"unknown qtype {qtype!r}: {', '.join(QTYPES)}")
        self.rng = np.random.default_rng(seed)
        self.qtype = qtype

    def add(self, writer: GGUFWriter, t: _T) -> None:
        shape = tuple(reversed(t.ne))  # numpy order: the input dimension last
        if isinstance(t.init, np.ndarray):
            writer.add_tensor(t.name, t.init.reshape(shape).astype(np.float32))
        elif t.init == "ones":
            writer.add_tensor(t.name, np.ones(shape, dtype=np.float32))
        elif t.init in ("bias", "sink"):
            std = 0.02 if t.init == "bias" else 0.5
            writer.add_tensor(t.name, self.rng.standard_normal(shape, dtype=np.float32) * std)
        else:
            self._matrix(writer, t.name, shape, 1.0 if t.init == "embd" else 1.0 / math.sqrt(t.ne[0]))

    def _matrix(self, writer: GGUFWriter, name: str, shape: tuple[int, ...], std: float) -> None:
        if self.qtype == "q4_0" and shape[-1] % 32 == 0:
            # a block: f16 scale d, then 16 bytes of 4-bit values q; weight = (q - 8) * d, and
            # uniform q in 0..15 has a standard deviation of about 4.6
            blocks = self.rng.integers(0, 256, size=(*shape[:-1], shape[-1] // 32, 18), dtype=np.uint8)
            blocks[..., :2] = np.frombuffer(np.float16(std / 4.6).tobytes(), dtype=np.uint8)
            writer.add_tensor(name, blocks.reshape(*shape[:-1], -1), raw_dtype=GGMLQuantizationType.Q4_0)
            return
        dt = np.float32 if self.qtype == "f32" else np.float16
        writer.add_tensor(name, (self.rng.standard_normal(shape, dtype=np.float32) * std).astype(dt))


def write_random_gguf(path: str | os.PathLike, arch: str = "llama", *, shape: str | None = None,
                      qtype: str = "f16", seed: int = 0, like: str | os.PathLike | None = None,
                      progress: bool = False, chat_template: str | None = None) -> Path:
    """Write a random-weight GGUF of `arch` (in its real layout if in `ARCHITECTURES`, else the llama
    layout under that name) with the tokenizer of `like` (a GGUF path or a registry model name;
    SmolLM2 by default) and its chat template, or `chat_template` instead. `shape` sizes the llama
    layout (a name in `SHAPES`). Returns the path."""
    path = Path(path)
    r = _recipe(arch, shape)
    filler = _Filler(seed, qtype)
    w = _Writer(str(path), arch)
    # not the architecture: llama-vocab.cpp gives tokens Phi-3 attributes when general.name has "phi3"
    w.add_name(f"random-{shape or 'tiny'}")
    n_vocab = _copy_tokenizer(w, str(like or DEFAULT_LIKE), skip=("tokenizer.chat_template",) if chat_template else ())
    if chat_template:
        w.add_string("tokenizer.chat_template", chat_template)
    for key, value in _keys(r, n_vocab).items():
        _add_key(w, f"{arch}.{key}", value)
    for key, value in r.global_keys.items():
        _add_key(w, key, value)
    for t in _tensors(r, n_vocab):
        filler.add(w, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=progress)
    w.close()
    return path
