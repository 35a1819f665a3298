"""One llama.cpp context with the capture callback, holding several sequences.

`Context` wraps a llama-cpp-python `Llama`: it replaces the `Llama`'s context by one with the
capture callback installed and `n_seq` sequences in their own KV streams (llama.cpp's
non-unified cache, `kv_unified=false`: each sequence's cells can be compacted without touching
another's), learns the model's attention layout, and decodes batches.

How captured rows are attributed. In a non-unified cache llama.cpp cuts a batch into ubatches of
sequences with consecutive ids and equal token counts, sequence after sequence
(llama_batch_allocr::split_equal); a batch of another shape would be reordered. `Context.decode`
only takes batches already in that shape (one ubatch), so row r of the graph's query tensor is
row r of the batch and each `Part`'s rows are known by index: nothing is inferred from the graph.
Mixed work (one sequence's prompt chunk, other sequences' next tokens) is decoded as separate
calls, which is how llama.cpp would split it anyway (scripts/bench_batching.py measures both).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals

from . import _shim, rpc
from .architectures import CacheLayout, spec_for
from .capture import AttentionLayout, Capture, SeqCapture, Segment
from .device import DeviceCache
from .errors import CacheFullError, LlamaKVError, ModelError, UnsupportedModelError
from .models import check_gguf, load_llama, resolve_model

# -sm values, as llama.cpp's
SPLIT_MODES = {"none": llama_cpp.LLAMA_SPLIT_MODE_NONE, "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
               "row": llama_cpp.LLAMA_SPLIT_MODE_ROW}


def meta_value(model, key: str) -> str | None:
    """A GGUF metadata value as llama.cpp gives it (scalars as text), None if absent."""
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


def gguf_fields(path: str, keys: Sequence[str]) -> dict:
    """Metadata values of the GGUF file, read once (arrays as lists; llama.cpp's API gives only
    scalars as text); a key absent or unreadable is None."""
    if not keys:
        return {}
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError):
        return dict.fromkeys(keys)
    return {k: (f.contents() if (f := reader.get_field(k)) is not None else None) for k in keys}


class CallbackSwitch:
    """Switches the capture callback on for the decode calls that need it and off otherwise
    (see csrc: llamakv_switch_callback). Where llama.cpp's layout is not as expected, the callback
    stays on for good (correct, only slower on a GPU)."""

    def __init__(self, ctx, capture: Capture):
        self.shim = capture.shim
        address = lambda obj: self.shim.ffi.cast("void *", ctypes.cast(obj, ctypes.c_void_p).value)  # noqa: E731
        self.ctx = address(ctx)
        self.cb = self.shim.ffi.cast("void *", capture.callback_address)
        self.ud = self.shim.ffi.cast("void *", capture.user_data_address)
        sym = getattr(llama_cpp.llama_cpp._lib, "_ZNK13llama_context9get_schedEv", None)
        self.get_sched = address(sym) if sym is not None else None
        self.slot = int(self.shim.lib.llamakv_find_callback_slot(self.ctx, self.cb, self.ud)) if sym else -1
        self.switchable = self.slot >= 0 and self.get_sched is not None
        self.on = True

    def set(self, on: bool) -> None:
        if on == self.on or not self.switchable:
            return
        null = self.shim.ffi.NULL
        self.shim.lib.llamakv_switch_callback(self.ctx, self.slot, self.get_sched,
                                             self.cb if on else null, self.ud if on else null)
        self.on = on


@dataclass
class Part:
    """One sequence's rows of a batch: `tokens` at positions pos0 .. (the sequence's next ones);
    the last `stats_rows` feed its query statistics, the last `window_rows` its recent queries;
    logits for every row (`all_logits`) or the last one only."""
    seq_id: int
    tokens: Sequence[int]
    pos0: int
    queries: SeqCapture | None = None
    stats_rows: int = 0
    window_rows: int = 0
    all_logits: bool = False


def open_llama(model: str | os.PathLike | None = None, *, n_ctx: int = 8192, n_gpu_layers: int = 0,
           n_threads: int | None = None, flash_attn: bool | str = False, n_batch: int = 512,
           type_k: int | None = None, type_v: int | None = None, seed: int = 0, verbose: bool = False,
           swa_full: bool = False, rpc_servers: str | Sequence[str] | None = None,
           split_mode: str = "layer", tensor_split: Sequence[float] | None = None,
           main_gpu: int = 0) -> llama_cpp.Llama:
    """Load a GGUF (path or registry name, see models.toml) as a `Llama`, refusing an
    architecture llamakv cannot compress before llama.cpp loads anything. `swa_full`: a
    sliding-window model's sliding cache as large as the context (llama-cpp-python's default)
    instead of the window plus a ubatch (llama-server's default, which llamakv follows: the
    sliding layers then hold a few hundred cells whatever the context). `flash_attn`: True, False
    or "auto" (llama.cpp decides per device when the Context makes its context).

    Several devices, as llama.cpp's --rpc, -sm, -ts, -mg: `rpc_servers` ("host:port,..." of
    llama.cpp rpc-servers, registered for this process, see rpc.py) come first, then the local
    GPUs; `split_mode` "layer" (whole layers, and their cache, per device), "row" (matrices split
    by rows, the cache on the main GPU) or "none" (the main GPU alone); `tensor_split` the share of
    each device (default: by free memory); `main_gpu` the device of "none" and "row"."""
    path = resolve_model(model)
    spec_for(check_gguf(path))  # refuses before llama.cpp loads anything
    if split_mode not in SPLIT_MODES:
        raise LlamaKVError(f"split mode {split_mode!r}: expected one of {', '.join(SPLIT_MODES)}")
    if rpc_servers:
        rpc.add_servers(rpc_servers)
    kwargs = dict(n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                  n_batch=n_batch, n_ubatch=n_batch, flash_attn=flash_attn is True, seed=seed,
                  verbose=verbose, swa_full=swa_full, split_mode=SPLIT_MODES[split_mode], main_gpu=main_gpu)
    if tensor_split:
        kwargs["tensor_split"] = [float(x) for x in tensor_split]
    # llama-cpp-python decodes on half the cores by default; llama.cpp uses them all
    n_threads = n_threads or os.cpu_count() or 1
    kwargs.update(n_threads=n_threads, n_threads_batch=n_threads)
    if type_k is not None:
        kwargs["type_k"] = type_k
    if type_v is not None:
        kwargs["type_v"] = type_v
    try:
        llama = load_llama(path, **kwargs)
    except ValueError as e:
        raise ModelError(f"llama.cpp could not load {path}: {e}") from e
    if flash_attn == "auto":  # llama-cpp-python maps only on/off: the Context's own context decides
        llama.context_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    return llama


class Context:
    """A `Llama`'s model with a llama.cpp context of `n_seq` sequences and the capture callback.

    The old context of the `Llama` is freed first (there is never a second KV cache); the model
    stays loaded once. `n_ctx_seq` cells per sequence (llama.cpp divides the context evenly).
    """

    def __init__(self, llama: llama_cpp.Llama, *, n_seq: int = 1, n_sink: int = 4):
        if n_seq < 1:
            raise ValueError(f"a context holds at least one sequence, got n_seq={n_seq}")
        self.llama = llama
        self.n_seq = int(n_seq)
        model = self.model = llama._model.model
        self.architecture = meta_value(model, "general.architecture") or "?"
        self.spec = spec_for(self.architecture, recurrent=bool(llama_cpp.llama_model_is_recurrent(model)),
                             hybrid=bool(llama_cpp.llama_model_is_hybrid(model)))
        self.n_layer = llama_cpp.llama_model_n_layer(model)
        self.n_head = llama_cpp.llama_model_n_head(model)
        self.n_head_kv = llama_cpp.llama_model_n_head_kv(model)
        key_len = meta_value(model, f"{self.architecture}.attention.key_length")
        self.head_dim = int(key_len) if key_len else llama_cpp.llama_model_n_embd(model) // self.n_head
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        n_swa = int(llama_cpp.llama_model_n_swa(model))
        pattern_key = f"{self.architecture}.attention.sliding_window_pattern"
        shared_key = f"{self.architecture}.attention.shared_kv_layers"
        meta = gguf_fields(llama.model_path, [k for k, wanted in ((pattern_key, n_swa), (shared_key, self.spec.shares_kv))
                                              if wanted])
        sliding = self.spec.sliding_layers(self.n_layer, n_swa, meta.get(pattern_key))
        kv_sources = self.spec.kv_sources(sliding, int(meta.get(shared_key) or 0))
        self.cache_layout = CacheLayout(tuple(sliding), n_swa, tuple(kv_sources))

        params = llama.context_params
        self.n_ubatch = int(params.n_ubatch)
        self.capture = Capture(n_layer=self.n_layer, n_head=self.n_head, head_dim=self.head_dim,
                               n_ubatch=self.n_ubatch, n_sink=n_sink, max_segments=self.n_seq)
        self._install_callback(params)
        self.ctx = llama._ctx.ctx
        self.switch = CallbackSwitch(self.ctx, self.capture)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self.ctx))
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self._batch = llama_cpp.llama_batch_init(self.n_ubatch, 0, 1)
        self.epoch = 0          # llama_decode calls so far: logits rows belong to the last one
        self.state_in, self.state_out = _shim.HostBuffer(), _shim.HostBuffer()  # reused by compressions
        self._ends_sentence: np.ndarray | None = None
        self._eog: list[int] | None = None
        self.layout = self._learn_layout()
        # the cache tensors where they lie, for compression on their device (device.py)
        self.device = DeviceCache(self)

    def _install_callback(self, params) -> None:
        llama = self.llama
        params.cb_eval = ctypes.cast(self.capture.callback_address, llama_cpp.ggml_backend_sched_eval_callback)
        params.cb_eval_user_data = self.capture.user_data_address
        params.n_seq_max = self.n_seq
        params.kv_unified = False
        llama._ctx.close()  # free the old KV cache before the new context allocates its own
        new_ctx = _internals.LlamaContext(model=llama._model, params=params, verbose=llama.verbose)
        llama._ctx = new_ctx
        llama._stack.enter_context(contextlib.closing(new_ctx))
        if getattr(llama, "_lora_adapter", None) is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llama._lora_adapter)
            scales = (ctypes.c_float * 1)(llama.lora_scale)
            llama_cpp.llama_set_adapters_lora(new_ctx.ctx, adapters, 1, scales)
        llama.n_tokens = 0

    def _learn_layout(self) -> AttentionLayout:
        """Decode one token with the callback only looking, to learn where each layer's pre-RoPE
        query is and how its logit is formed (capture.AttentionLayout); the token is removed
        again. Refuses a model whose scored layers llamakv cannot read."""
        bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.capture.begin_learning()
        self.switch.set(True)
        try:
            rc = self._llama_decode([Part(0, [max(bos, 0)], 0)])
        finally:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), 0, -1, -1)
        if rc != 0:
            self.capture.end_learning()
            raise LlamaKVError(f"llama_decode failed with code {rc} on a single token")
        layout = self.capture.end_learning()
        scored = self.scored_layers
        missing = [i for i in scored if layout.layers[i] is None]
        if missing:
            raise UnsupportedModelError(f"{self.architecture}: no attention node was found for layers {missing}")
        for i in scored:
            a = layout.layers[i]
            if (a.head_dim, a.n_head) != (self.head_dim, self.n_head):
                raise UnsupportedModelError(
                    f"{self.architecture}: layer {i}'s query has {a.n_head} heads of {a.head_dim}, "
                    f"not the model's {self.n_head} of {self.head_dim}")
            if a.max_bias != 0:
                raise UnsupportedModelError(f"{self.architecture}: ALiBi position biases are not supported")
        self.capture.layer_on[:] = 0
        self.capture.layer_on[list(scored)] = 1
        return layout

    @property
    def scored_layers(self) -> tuple[int, ...]:
        """The layers whose cache is compressed: all of them, or the global (full-attention)
        layers of a sliding-window model (the sliding cache keeps its window)."""
        return self.cache_layout.global_layers

    def new_queries(self, *, full_covariance: bool = False, window: int = 64) -> SeqCapture:
        """An empty store of captured queries for one sequence of this context."""
        return SeqCapture(self.capture.shim, n_layer=self.n_layer, n_head=self.n_head, head_dim=self.head_dim,
                          full_covariance=full_covariance, window=window)

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    # -- decoding --------------------------------------------------------------------------
    def _llama_decode(self, parts: Sequence[Part]) -> int:
        b = self._batch
        row = 0
        segments = []
        for p in parts:
            m = len(p.tokens)
            for i, tok in enumerate(p.tokens):
                b.token[row + i] = tok
                b.pos[row + i] = p.pos0 + i
                b.n_seq_id[row + i] = 1
                b.seq_id[row + i][0] = p.seq_id
                b.logits[row + i] = int(p.all_logits or i == m - 1)
            if p.queries is not None:
                segments.append(Segment(p.queries, row, m, p.pos0, p.stats_rows, p.window_rows))
            row += m
        b.n_tokens = row
        cap = self.capture
        wanted = cap.begin_ubatch(row, segments)
        self.switch.set(wanted or cap.probing or cap.learning)
        rc = llama_cpp.llama_decode(self.ctx, b)
        cap.end_ubatch(rc == 0)
        self.epoch += 1
        return rc

    def decode(self, parts: Sequence[Part]) -> int:
        """Decode one ubatch made of `parts` (see the module docstring for the shape it must
        have); returns the batch row of each part's first token. Raises CacheFullError when
        llama.cpp finds no free cells, LlamaKVError on other failures."""
        parts = list(parts)
        n = sum(len(p.tokens) for p in parts)
        if not parts or n == 0:
            raise ValueError("nothing to decode")
        if n > self.n_ubatch:
            raise ValueError(f"{n} tokens in one decode call, the ubatch holds {self.n_ubatch}")
        if len(parts) > 1:
            ids = [p.seq_id for p in parts]
            if ids != list(range(ids[0], ids[0] + len(ids))) or len({len(p.tokens) for p in parts}) != 1:
                raise ValueError("the sequences of one decode call must have consecutive ids, in order, "
                                 "and the same number of tokens (llama.cpp would split the batch otherwise)")
        rc = self._llama_decode(parts)
        if rc != 0:
            if rc == 1:
                raise CacheFullError("llama.cpp found no free KV slot for the batch")
            raise LlamaKVError(f"llama_decode failed with code {rc}")
        self.capture.check()  # the tokens are in the cache either way
        return rc

    @staticmethod
    def runs(seq_ids: Sequence[int]) -> list[list[int]]:
        """Indices of `seq_ids` (distinct) grouped into runs of consecutive ids, in order of id:
        the sequences whose next tokens llama.cpp decodes in one ubatch."""
        order = sorted(range(len(seq_ids)), key=lambda i: seq_ids[i])
        out: list[list[int]] = []
        for i in order:
            if out and seq_ids[out[-1][-1]] + 1 == seq_ids[i]:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def logits_ptr(self, row: int) -> int:
        """Address of the logits of batch row `row` of the last decode call."""
        return ctypes.cast(llama_cpp.llama_get_logits_ith(self.ctx, row), ctypes.c_void_p).value

    def logits(self, row: int) -> np.ndarray:
        """The logits of batch row `row` of the last decode call (a view, valid until the next)."""
        return np.ctypeslib.as_array(ctypes.cast(self.logits_ptr(row), ctypes.POINTER(ctypes.c_float)),
                                     shape=(self.n_vocab,))

    # -- tokens ----------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        toks = self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos and self.add_bos, special=special)
        if len(toks) >= 2 and toks[0] == toks[1] == self.llama.token_bos():
            toks = toks[1:]  # the chat template already wrote the BOS
        return toks

    def token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def grammar_ok(self, gbnf: str) -> bool:
        """Whether llama.cpp's grammar parser accepts `gbnf` (root rule "root")."""
        smp = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        if not smp:
            return False
        llama_cpp.llama_sampler_free(smp)
        return True

    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token of the vocabulary."""
        if self._eog is None:
            self._eog = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        return self._eog

    @property
    def chat_template(self) -> str | None:
        return self.llama.metadata.get("tokenizer.chat_template")

    def chat_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    tools: Sequence[dict] | None = None) -> str:
        """The model's own chat template applied to messages (and to OpenAI-shaped tools, for a
        template that renders them)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise LlamaKVError("this model has no chat template (tokenizer.chat_template)")
        tok = lambda t: self.llama._model.token_get_text(t) if t >= 0 else ""  # noqa: E731
        fmt = Jinja2ChatFormatter(template, eos_token=tok(self.llama.token_eos()),
                                  bos_token=tok(self.llama.token_bos()),
                                  add_generation_prompt=add_generation_prompt)
        return fmt(messages=list(messages), tools=list(tools) if tools else None).prompt

    def sentence_end_table(self) -> np.ndarray:
        """Per vocabulary token: does its text end a sentence (holds '.', '!', '?' or a newline)?"""
        if self._ends_sentence is None:
            self._ends_sentence = np.array([any(c in self.token_bytes(t) for c in (b".", b"!", b"?", b"\n"))
                                            for t in range(self.n_vocab)], dtype=bool)
        return self._ends_sentence

    def surprisal(self, logits_row: int, next_tokens: np.ndarray, out: np.ndarray) -> None:
        """out[i] = −log p(next_tokens[i]) under the logits of rows logits_row + i of the last
        decode call (nats), on all cores."""
        lib, ffi = _shim.load().lib, _shim.load().ffi
        nxt = np.ascontiguousarray(next_tokens, dtype=np.int32)
        base = self.logits_ptr(logits_row)
        step = max(1, -(-len(nxt) // (os.cpu_count() or 1)))

        def rows(a: int) -> None:
            lib.llamakv_surprisal(ffi.cast("float *", base + 4 * a * self.n_vocab), len(nxt[a:a + step]),
                                  self.n_vocab, _shim.ptr("int32_t *", nxt[a:]), _shim.ptr("float *", out[a:]))

        _shim.parallel_map(rows, range(0, len(nxt), step))

    def fingerprint(self) -> dict:
        """What identifies the model a state was saved from."""
        model = self.model
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(model, buf, len(buf))
        return {
            "architecture": self.architecture, "desc": buf.value.decode(),
            "n_params": int(llama_cpp.llama_model_n_params(model)),
            "size": int(llama_cpp.llama_model_size(model)),
            "n_layer": self.n_layer, "n_head": self.n_head, "n_head_kv": self.n_head_kv,
            "head_dim": self.head_dim, "n_vocab": self.n_vocab,
            "name": meta_value(model, "general.name"),
        }


ProgressFn = Callable[[int, int], None]
