"""A compressible KV-cache session on top of a llama-cpp-python `Llama`.

`KVSession` installs the capture callback on the `Llama`'s context, prefills text or tokens
(positions tracked here, not by `Llama`), compresses the cache with a press, generates from the
compressed cache and saves / loads the compressed sequence state.
"""
from __future__ import annotations

import codecs
import contextlib
import ctypes
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals

from .architectures import CacheLayout, spec_for
from .cache import LayerTensor, SeqState, SequenceCache, position_runs
from . import _shim
from ._shim import HostBuffer
from .capture import AttentionLayout, Capture
from .errors import CacheFullError, LlamaKVError, ModelError, StateError, UnsupportedModelError
from .models import check_gguf, load_llama, resolve_model
from .rope import hadamard
from .scoring import ExpectedAttention, ExpectedAttentionKeyDiff, Press, QuestionAware, ScoreInputs, aggregate

STATE_MAGIC = "llamakv-state"
STATE_VERSION = 2

ProgressFn = Callable[[int, int], None]


@dataclass
class Snapshot:
    llama_state: np.ndarray  # uint8: llama_state_seq_get_data
    captured: dict           # Capture.state_arrays(): query statistics, recent queries, rope
    next_pos: int
    n_cells: int
    positions: np.ndarray    # positions of the cells, sorted
    surprisal: np.ndarray    # per cell, in the order of positions (NaN: not known)
    sentence_end: np.ndarray # per cell: its token ends a sentence


@dataclass
class CompressionReport:
    method: str
    aggregation: str
    ratio: float
    cells_before: int
    cells_after: int
    evicted: int
    runs: int
    kv_bytes_before: int
    kv_bytes_after: int
    protected_cells: int
    compacted: bool
    capture_s: float
    state_read_s: float
    scoring_s: float
    eviction_s: float
    compaction_s: float
    n_kv_before: int
    question_tokens: int = 0  # a question decoded for the scoring only, then removed (not in the cells above)
    sliding_cells: int = 0    # cells of the sliding-window cache (iSWA models), kept as they are

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        mib = lambda b: b / 2**20  # noqa: E731
        return "\n".join([
            f"method        {self.method} (aggregation: {self.aggregation}), ratio {self.ratio:g}"
            + (f", guided by a {self.question_tokens}-token question" if self.question_tokens else ""),
            f"cells         {self.cells_before} -> {self.cells_after} ({self.evicted} evicted in {self.runs} runs)"
            + (f"; sliding-window cache: {self.sliding_cells} cells, kept" if self.sliding_cells else ""),
            f"KV bytes      {mib(self.kv_bytes_before):.2f} MiB -> {mib(self.kv_bytes_after):.2f} MiB",
            f"time          capture {self.capture_s * 1e3:.1f} ms, state read {self.state_read_s * 1e3:.1f} ms, "
            f"scoring {self.scoring_s * 1e3:.1f} ms, eviction {self.eviction_s * 1e3:.1f} ms, "
            f"compaction {self.compaction_s * 1e3:.1f} ms",
        ])

    @property
    def compression_s(self) -> float:
        """Time compress() took after the prefill: state read, scoring, eviction, compaction."""
        return self.state_read_s + self.scoring_s + self.eviction_s + self.compaction_s


def _meta(model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


def _gguf_fields(path: str, keys: Sequence[str]) -> dict:
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


class _CallbackSwitch:
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


class KVSession:
    """Prefill, compress and generate on one sequence of a `Llama`'s KV cache.

    Wrapping an existing `Llama` replaces its context by one with the capture callback (the old
    context is freed first, so there is never a second KV cache); the model stays loaded once.
    Use the session, not the `Llama`'s own generation methods, on the cache afterwards: after
    eviction `Llama`'s position and prefix bookkeeping no longer describes the cache.
    """

    def __init__(self, llama: llama_cpp.Llama, *, n_sink: int = 4, full_covariance: bool = False,
                 press: Press | None = None, aggregation: str = "mean", seq_id: int = 0,
                 stats_window: int | None = None, stats_sample: int | None = 2048, window: int = 64,
                 capture_generation: bool = False, recent: int = 64, track_surprisal: bool | None = None):
        self.llama = llama
        model = llama._model.model
        self.architecture = _meta(model, "general.architecture") or "?"
        self.spec = spec_for(self.architecture, recurrent=bool(llama_cpp.llama_model_is_recurrent(model)),
                             hybrid=bool(llama_cpp.llama_model_is_hybrid(model)))
        self.n_layer = llama_cpp.llama_model_n_layer(model)
        self.n_head = llama_cpp.llama_model_n_head(model)
        self.n_head_kv = llama_cpp.llama_model_n_head_kv(model)
        key_len = _meta(model, f"{self.architecture}.attention.key_length")
        self.head_dim = int(key_len) if key_len else llama_cpp.llama_model_n_embd(model) // self.n_head
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        n_swa = int(llama_cpp.llama_model_n_swa(model))
        pattern_key = f"{self.architecture}.attention.sliding_window_pattern"
        shared_key = f"{self.architecture}.attention.shared_kv_layers"
        meta = _gguf_fields(llama.model_path, [k for k, wanted in ((pattern_key, n_swa), (shared_key, self.spec.shares_kv))
                                               if wanted])
        sliding = self.spec.sliding_layers(self.n_layer, n_swa, meta.get(pattern_key))
        kv_sources = self.spec.kv_sources(sliding, int(meta.get(shared_key) or 0))
        self.cache_layout = CacheLayout(tuple(sliding), n_swa, tuple(kv_sources))
        self.n_sink = n_sink
        self.press = press or ExpectedAttentionKeyDiff(expected_attention=ExpectedAttention(full_covariance=full_covariance))
        self.aggregation = aggregation

        params = llama.context_params
        self.n_ubatch = int(params.n_ubatch)
        self.capture = Capture(
            n_layer=self.n_layer, n_head=self.n_head, head_dim=self.head_dim, n_ubatch=self.n_ubatch,
            n_sink=n_sink, full_covariance=full_covariance, window=window)
        # queries of the last `stats_window` tokens of each prefill call (None: all) enter the
        # statistics; when they are more than `stats_sample`, only those of about that many tokens:
        # whole ubatches spread evenly over them, the last one included. On a GPU every ubatch
        # captured costs a synchronisation per layer and the copies, whatever its number of rows.
        self.stats_window = stats_window
        self.stats_sample = stats_sample
        self.capture_generation = capture_generation
        self.recent = recent    # newest positions a bounded cache never evicts
        self._track_surprisal = track_surprisal
        self.reports: list[CompressionReport] = []  # every compression since the last reset
        self._install_callback(params)
        self.ctx = llama._ctx.ctx
        self._switch = _CallbackSwitch(self.ctx, self.capture)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.cache = SequenceCache(self.ctx, seq_id)
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self._batch = llama_cpp.llama_batch_init(self.n_ubatch, 0, 1)
        self.next_pos = 0       # position of the next token
        self.n_cells = 0        # cells this sequence holds
        self._pos_buf = np.zeros(self.n_ctx, dtype=np.int64)  # [:n_cells]: their positions, sorted
        self._surprisal = np.full(self.n_ctx, np.nan, dtype=np.float32)  # [:n_cells]: as _pos_buf
        self._sentence_end = np.zeros(self.n_ctx, dtype=bool)              # [:n_cells]: as _pos_buf
        self._ends_sentence: np.ndarray | None = None  # per vocabulary token, built when first needed
        self._has_logits = False
        self._capture_mark = 0.0  # capture time already reported
        self.last_report: CompressionReport | None = None
        self._state_in, self._state_out = HostBuffer(), HostBuffer()  # reused by compress()
        self.layout = self._learn_layout()

    def _learn_layout(self) -> AttentionLayout:
        """Decode one token with the callback only looking, to learn where each layer's pre-RoPE
        query is and how its logit is formed (capture.AttentionLayout); the token is removed
        again. Refuses a model whose scored layers llamakv cannot read."""
        bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        b = self._batch
        b.token[0], b.pos[0], b.n_seq_id[0], b.seq_id[0][0], b.logits[0] = max(bos, 0), 0, 1, self.cache.seq_id, 1
        b.n_tokens = 1
        self.capture.begin_learning()
        self._switch.set(True)
        try:
            rc = llama_cpp.llama_decode(self.ctx, b)
        finally:
            self.cache.clear()
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

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: str | os.PathLike | None = None, *, n_ctx: int = 8192,
                   n_gpu_layers: int = 0, n_threads: int | None = None, flash_attn: bool = False,
                   n_batch: int = 512, type_k: int | None = None, type_v: int | None = None,
                   seed: int = 0, verbose: bool = False, swa_full: bool = False, **session_kwargs) -> "KVSession":
        """Load a GGUF (path or registry name, see models.toml) and wrap it. `swa_full`: a
        sliding-window model's sliding cache as large as the context (llama-cpp-python's default)
        instead of the window plus a ubatch (llama-server's default, which llamakv follows: the
        sliding layers then hold a few hundred cells whatever the context)."""
        path = resolve_model(model)
        spec_for(check_gguf(path))  # refuses before llama.cpp loads anything
        kwargs = dict(n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                      n_batch=n_batch, n_ubatch=n_batch, flash_attn=flash_attn, seed=seed,
                      verbose=verbose, swa_full=swa_full)
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
        return cls(llama, **session_kwargs)

    @property
    def track_surprisal(self) -> bool:
        """Whether decoding computes each token's surprisal (llama.cpp's logits for every prompt
        token: the output layer over all of them), for presses that read it: as set, or when the
        session's press reads it (None, the default)."""
        if self._track_surprisal is None:
            return bool(getattr(self.press, "uses_surprisal", False))
        return self._track_surprisal

    @track_surprisal.setter
    def track_surprisal(self, on: bool | None) -> None:
        self._track_surprisal = on

    def _install_callback(self, params) -> None:
        llama = self.llama
        params.cb_eval = ctypes.cast(self.capture.callback_address,
                                     llama_cpp.ggml_backend_sched_eval_callback)
        params.cb_eval_user_data = self.capture.user_data_address
        llama._ctx.close()  # free the old KV cache before the new context allocates its own
        new_ctx = _internals.LlamaContext(model=llama._model, params=params, verbose=llama.verbose)
        llama._ctx = new_ctx
        llama._stack.enter_context(contextlib.closing(new_ctx))
        if getattr(llama, "_lora_adapter", None) is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llama._lora_adapter)
            scales = (ctypes.c_float * 1)(llama.lora_scale)
            llama_cpp.llama_set_adapters_lora(new_ctx.ctx, adapters, 1, scales)
        llama.n_tokens = 0

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- tokens ----------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        add_bos = self.n_cells == 0 and self.next_pos == 0 and llama_cpp.llama_vocab_get_add_bos(self.vocab)
        toks = self.llama.tokenize(text.encode("utf-8"), add_bos=bool(add_bos), special=special)
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

    def chat_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The model's own chat template applied to messages."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise LlamaKVError("this model has no chat template (tokenizer.chat_template)")
        tok = lambda t: self.llama._model.token_get_text(t) if t >= 0 else ""  # noqa: E731
        fmt = Jinja2ChatFormatter(template, eos_token=tok(self.llama.token_eos()),
                                  bos_token=tok(self.llama.token_bos()),
                                  add_generation_prompt=add_generation_prompt)
        return fmt(messages=list(messages)).prompt

    # -- decoding --------------------------------------------------------------------------
    @property
    def free_cells(self) -> int:
        return self.n_ctx - self.n_cells

    def _decode(self, tokens: Sequence[int], *, progress: ProgressFn | None = None, capture: bool = True,
                prompt: tuple[int, int] | None = None, stats_last: bool = False, stats: bool = True) -> None:
        """Decode tokens at the next positions, in ubatch-sized calls; logits of the last one.
        Queries are captured (see stats_window, stats_sample, window) unless `capture` is False.
        `prompt` = (tokens before these, tokens in all) when these are a chunk of a longer prompt;
        `stats_last`: the last ubatch feeds the statistics even if the sample would skip it;
        `stats` False: only the window of recent queries is captured."""
        n = len(tokens)
        before, total = prompt or (0, n)
        first = 0 if self.stats_window is None else max(0, total - self.stats_window)  # first token in the stats
        anchors = None  # prompt tokens whose ubatches are captured, when sampling
        if self.stats_sample is not None and total - first > self.stats_sample:
            k = max(1, math.ceil(self.stats_sample / self.n_ubatch))
            anchors = [total - 1 - j * (total - first) // k for j in range(k)]
        if n == 0:
            return
        if n > self.free_cells:
            raise CacheFullError(
                f"{n} tokens do not fit in the {self.free_cells} free cells of the KV cache "
                f"(n_ctx {self.n_ctx}, {self.n_cells} in use): raise -c / n_ctx, or compress first")
        b = self._batch
        cap = self.capture
        track = self.track_surprisal
        done = 0
        while done < n:
            chunk = tokens[done:done + self.n_ubatch]
            m = len(chunk)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = self.next_pos + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = self.cache.seq_id
                b.logits[i] = int(track)
            b.logits[m - 1] = int(track or done + m == n)
            # before the decode overwrites the logits
            first_surprisal = self._surprisal_of(chunk[0]) if track else None
            b.n_tokens = m
            a = before + done  # the ubatch holds prompt tokens a .. a + m - 1
            after = total - a - m
            rows = max(0, min(m, a + m - first)) if stats else 0
            if anchors is not None and not any(a <= x < a + m for x in anchors) and not (stats_last and done + m == n):
                rows = 0
            wanted = cap.begin_ubatch(self.next_pos, m, rows if capture else 0,
                                      cap.window_cap - after if capture else 0)
            self._switch.set(wanted or cap.probing)
            rc = llama_cpp.llama_decode(self.ctx, b)
            cap.end_ubatch(rc == 0)
            if rc != 0:
                if rc == 1:
                    raise CacheFullError("llama.cpp found no free KV slot for the batch")
                raise LlamaKVError(f"llama_decode failed with code {rc}")
            self._pos_buf[self.n_cells:self.n_cells + m] = np.arange(self.next_pos, self.next_pos + m)
            self._record_tokens(chunk, first_surprisal)
            self.next_pos += m
            self.n_cells += m
            self._has_logits = True
            cap.check()  # the tokens are in the cache either way
            done += m
            if progress:
                progress(done, n)

    def _surprisal_of(self, token: int) -> float:
        """−log p(token) under the logits of the last decoded token (NaN if there are none)."""
        if not self._has_logits:
            return math.nan
        out = np.empty(1, dtype=np.float32)
        row = ctypes.cast(llama_cpp.llama_get_logits_ith(self.ctx, -1), ctypes.c_void_p).value
        _shim.load().lib.llamakv_surprisal(_shim.load().ffi.cast("float *", row), 1, self.n_vocab,
                                           _shim.ptr("int32_t *", np.array([token], np.int32)), _shim.ptr("float *", out))
        return float(out[0])

    def _record_tokens(self, chunk: Sequence[int], first_surprisal: float | None) -> None:
        """Per-cell token data of a ubatch just decoded into cells n_cells ..: its surprisal from
        the ubatch's logits (every row an output; None: not tracked, NaN) and sentence ends."""
        m, at = len(chunk), self.n_cells
        out = self._surprisal[at:at + m]
        if first_surprisal is None:
            out[:] = np.nan
            self._sentence_end[at:at + m] = False
            return
        out[0] = first_surprisal
        nxt = np.asarray(chunk[1:], dtype=np.int32)
        logits = ctypes.cast(llama_cpp.llama_get_logits(self.ctx), ctypes.c_void_p).value
        lib, ffi = _shim.load().lib, _shim.load().ffi
        step = max(1, -(-len(nxt) // (os.cpu_count() or 1)))

        def rows(a: int) -> None:  # row r's logits predict token r + 1
            lib.llamakv_surprisal(ffi.cast("float *", logits + 4 * a * self.n_vocab), len(nxt[a:a + step]),
                                  self.n_vocab, _shim.ptr("int32_t *", nxt[a:]), _shim.ptr("float *", out[1 + a:]))

        _shim.parallel_map(rows, range(0, len(nxt), step))
        self._sentence_end[at:at + m] = self._sentence_end_table()[np.asarray(chunk)]

    def _sentence_end_table(self) -> np.ndarray:
        """Per vocabulary token: does its text end a sentence (holds '.', '!', '?' or a newline)?"""
        if self._ends_sentence is None:
            self._ends_sentence = np.array([any(c in self.token_bytes(t) for c in (b".", b"!", b"?", b"\n"))
                                            for t in range(self.n_vocab)], dtype=bool)
        return self._ends_sentence

    def prefill(self, prompt: str | Sequence[int], *, progress: ProgressFn | None = None,
                budget: int | None = None, target: int | None = None,
                question: str | Sequence[int] | None = None) -> int:
        """Append text (tokenized with special tokens) or token ids; returns the number of tokens.

        With a `budget` (cells, at most n_ctx) a prompt of any length streams through the cache:
        it is decoded in chunks (a ubatch, or budget - target tokens if fewer) and, whenever the
        next chunk would not fit, the cache is compressed down to `target` cells (default half the
        budget) with the session's press, keeping the sinks and the newest `recent` tokens; the
        query statistics accumulate over the whole prompt (the sample of `stats_sample` plus the
        chunk before each compression). Each compression's report is appended to `reports`.
        `question`: what will be asked after the prompt, if known: each compression is guided by
        it as in compress(); its tokens count against the budget while they are decoded."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise ValueError("empty prompt: nothing to prefill")
        if budget is None:
            self._decode(tokens, progress=progress)
            return len(tokens)
        budget, target = self._bounds(budget, target)
        question = self._question_tokens(question)
        room = budget - len(question)  # what the prompt's cells may fill before a compression
        if room - target < 1:
            raise ValueError(f"a {len(question)}-token question leaves no room between the target ({target}) "
                             f"and the budget ({budget}): lower the target or shorten the question")
        step = min(self.n_ubatch, room - target)
        done = 0
        while done < len(tokens):
            chunk = tokens[done:done + step]
            if self.n_cells + len(chunk) > room:
                # the cells kept now will be read by the queries of the rest of the prompt and of
                # the answer, within the model's context: averaged over the next 512 positions,
                # RoPE favours recent cells at every compression and old ones (a needle) are lost
                self.compress_to(target, n_future=len(tokens) - done + self.n_ctx_train, question=question)
            following = len(tokens[done + step:done + 2 * step])
            # the chunk before a compression always feeds the statistics: a sample spread over the
            # whole prompt may have none before the first compression
            self._decode(chunk, prompt=(done, len(tokens)),
                         stats_last=following > 0 and self.n_cells + len(chunk) + following > room)
            done += len(chunk)
            if progress:
                progress(done, len(tokens))
        return len(tokens)

    def _bounds(self, budget: int, target: int | None) -> tuple[int, int]:
        budget = int(budget)
        if not 0 < budget <= self.n_ctx:
            raise ValueError(f"the cache budget must be in (0, n_ctx = {self.n_ctx}], got {budget}")
        target = budget // 2 if target is None else int(target)
        if not self.n_sink + self.recent < target < budget:
            raise ValueError(f"the target size after compression must be in ({self.n_sink + self.recent}, "
                             f"{budget}) for a budget of {budget} cells, got {target}")
        return budget, target

    def compress_to(self, n_cells: int, *, press: Press | None = None, aggregation: str | None = None,
                    compact: bool = True, protect_recent: int | None = None, n_future: int = 0,
                    question: str | Sequence[int] | None = None) -> CompressionReport | None:
        """Compress down to `n_cells` cells, or as close as the protected cells allow (None if
        nothing is to go), keeping the sinks and the newest `protect_recent` positions (default
        `recent`). `n_future`, `question`: as in compress()."""
        protect = max(1, self.recent if protect_recent is None else protect_recent)
        pos = self._pos_buf[:self.n_cells]
        candidates = int(np.count_nonzero((pos >= self.n_sink) & (pos < self.next_pos - protect)))
        n_evict = min(self.n_cells - int(n_cells), candidates)
        if n_evict <= 0:
            return None
        ratio = min((n_evict + 0.5) / candidates, (candidates - 0.5) / candidates)
        return self.compress(ratio, press=press, aggregation=aggregation, compact=compact, protect_recent=protect,
                             n_future=n_future, question=question)

    @property
    def positions(self) -> np.ndarray:
        """Positions of the cells this sequence holds, sorted (a copy)."""
        return self._pos_buf[:self.n_cells].copy()

    def truncate(self, n_pos: int) -> None:
        """Forget positions >= n_pos (rewind a conversation to a common prefix): their cells are
        freed and the next token takes position n_pos. The query statistics keep what they saw."""
        if not 0 <= n_pos <= self.next_pos:
            raise ValueError(f"cannot truncate to position {n_pos}: the sequence is at {self.next_pos}")
        if n_pos == self.next_pos:
            return
        if not self.can_truncate(n_pos):
            raise StateError(f"the sliding-window cache no longer holds the {self.cache_layout.window} positions "
                             f"before {n_pos}: prefill from the start instead of truncating")
        self._drop_from(n_pos)

    def can_truncate(self, n_pos: int) -> bool:
        """Whether truncate(n_pos) leaves a cache that continues as a fresh prefill would: a
        sliding-window model's sliding cache holds only the last window of positions (llama.cpp
        reuses older cells), so it must still hold every position the token at n_pos attends to,
        n_pos - window + 1 on (llama_hparams::is_masked_swa; llama-server tests the same before
        reusing a prompt's prefix)."""
        if not self.cache_layout.iswa or n_pos >= self.next_pos or self.n_cells == 0:
            return True
        return self.cache.pos_min() <= max(0, n_pos - self.cache_layout.window + 1)

    def _drop_from(self, n_pos: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.cache.memory, self.cache.seq_id, n_pos, -1)
        self.n_cells = int(np.searchsorted(self._pos_buf[:self.n_cells], n_pos))
        self.next_pos = n_pos
        self._has_logits = False

    # -- compression -----------------------------------------------------------------------
    def score_inputs(self, state: np.ndarray | None = None, n_future: int = 0) -> ScoreInputs:
        """What presses score: the cells as llama.cpp holds them (the sequence state, read now
        unless given), the query statistics, the recent queries and the model's rope."""
        raw = self.cache.get_state() if state is None else state
        layers = self.scored_layers
        try:
            parsed = SeqState.parse(raw, 2 if self.cache_layout.iswa else 1)
        except ValueError as e:
            raise LlamaKVError(f"llamakv cannot read this cache's state layout: {e}") from e
        expected = len(self.cache_layout.global_cache_layers)
        if parsed.n_cells and len(parsed.k) != expected:
            raise LlamaKVError(f"the state's first cache holds {len(parsed.k)} layers, llamakv expected the "
                               f"{expected} {'global ' if self.cache_layout.iswa else ''}layers")
        if parsed.n_cells:
            parsed = self._unrotate_keys(parsed, layers).with_layers(self.cache_layout.rows_of(layers))
        # the capture's ring of recent queries itself, not a copy (33 MB for an 8B model): read
        # before the next decode call overwrites it
        slots = self.capture.recent_slots()
        rows = np.searchsorted(self._pos_buf[:self.n_cells], parsed.pos)  # each cell's row in _pos_buf
        attn = [self.layout.layers[i] for i in layers]
        sinks = np.full((len(layers), self.n_head), np.nan, dtype=np.float32)
        for j, a in enumerate(attn):
            if a.sinks is not None:
                sinks[j] = a.sinks
        every = len(layers) == self.n_layer
        return ScoreInputs(state=parsed, stats=self.capture.stats if every else self.capture.stats.subset(layers),
                           rope=lambda j: self.capture.rope(layers[j]),
                           next_pos=self.next_pos, n_head=self.n_head, n_head_kv=self.n_head_kv,
                           head_dim=self.head_dim, n_sink=self.n_sink,
                           window_q=self.capture.window if every else self.capture.window[list(layers)],
                           window_pos=self.capture.window_pos[slots].copy(), window_slots=slots,
                           n_future=n_future, surprisal=self._surprisal[rows], sentence_end=self._sentence_end[rows],
                           logit_scale=np.array([a.scale for a in attn]), softcap=np.array([a.softcap for a in attn]),
                           sink_logits=sinks if not np.isnan(sinks).all() else None)

    def _unrotate_keys(self, parsed: SeqState, layers: Sequence[int]) -> SeqState:
        """With a quantized K cache llama.cpp stores H k for an orthonormal Hadamard matrix H
        (q is rotated alike, so q.k is unchanged); the closed form needs k itself: those layers
        are scored from float32 rows of H (H k) = k."""
        for j, il in zip(self.cache_layout.rows_of(layers), layers):
            n = self.layout.layers[il].k_rot
            if not n or (parsed.k_float and j in parsed.k_float):
                continue
            lt = parsed.main.k[j]
            per_row = self.n_head_kv * self.head_dim
            keys = np.empty((parsed.n_cells, per_row), dtype=np.float32)
            if _shim.load().lib.llamakv_rows_to_float(_shim.ptr("uint8_t *", lt.data), lt.type, lt.row_bytes,
                                                      parsed.n_cells, per_row, _shim.ptr("float *", keys)):
                raise LlamaKVError(f"cannot read keys of ggml type {lt.type}")
            keys = (keys.reshape(-1, n) @ hadamard(n).astype(np.float32)).reshape(parsed.n_cells, per_row)
            parsed = parsed.with_keys(j, LayerTensor(0, lt.header, keys.view(np.uint8), False))
        return parsed

    def compress(self, ratio: float, *, press: Press | None = None, aggregation: str | None = None,
                 compact: bool = True, protect_recent: int = 1, n_future: int = 0,
                 question: str | Sequence[int] | None = None) -> CompressionReport:
        """Evict `ratio` of the compressible cells (all but the sinks and the `protect_recent`
        newest positions, e.g. a question already in the cache), those with the lowest
        aggregated score; then compact the cache so n_kv shrinks. `n_future`: future positions
        whose queries will read the cells, where known (a streamed prompt; 0: the press's own).

        `question` (text or token ids): what will be asked next, if known. It is decoded after
        the cells for the scoring only and removed again: the cells its queries attend to are
        kept next to the press's choice (scoring.QuestionAware), and the question is prefilled
        later where it belongs. Its tokens need free cells while they are decoded."""
        if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0) or math.isnan(ratio):
            raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
        press = press or self.press
        aggregation = aggregation or self.aggregation
        if self.n_cells == 0:
            raise LlamaKVError("nothing to compress: prefill a prompt first")
        if not self.capture.stats.count.any():
            raise LlamaKVError("no queries were captured: prefill with capture enabled before compressing")
        question = self._question_tokens(question)
        if question:
            return self._compress_with_question(question, ratio, press, aggregation, compact, protect_recent,
                                                n_future)
        n_kv_before = int(self.capture.n_kv.max())

        t0 = time.perf_counter()
        raw = self.cache.get_state(self._state_in)
        t1 = time.perf_counter()
        inputs = self.score_inputs(raw, n_future)
        pos = inputs.pos
        protected = (pos < self.n_sink) | (pos >= self.next_pos - max(1, protect_recent))
        candidates = np.flatnonzero(~protected)
        n_evict = int(math.floor(ratio * len(candidates)))
        n_keep = len(candidates) - n_evict
        inputs.keep_fraction = n_keep / max(len(candidates), 1)
        scores = press.score(inputs)
        cell_scores = aggregate(scores, aggregation, n_keep=n_keep)
        if scores.ndim == 1:
            aggregation = "mean"  # what the presses that combine per cell use, whatever was asked
        order = np.argsort(cell_scores[candidates], kind="stable")
        evict_rows = np.sort(candidates[order[:n_evict]])
        t2 = time.perf_counter()

        evicted = pos[evict_rows]
        runs = len(position_runs(evicted))
        # a sliding-window model's cells leave the global cache only: its state is edited (seq_rm
        # would free the sliding cache's cells of those positions too)
        compacted = (compact or self.cache_layout.iswa) and n_evict > 0
        if compacted:
            keep = np.ones(len(pos), dtype=bool)
            keep[evict_rows] = False
            edited = inputs.state.keep(np.flatnonzero(keep), self._state_out)
            t3 = time.perf_counter()
            self.cache.set_state(edited, fallback=raw)
        else:
            self.cache.evict(evicted)
            t3 = time.perf_counter()
        t4 = time.perf_counter()
        kept = np.ones(self.n_cells, dtype=bool)  # in the sorted order of _pos_buf
        kept[np.searchsorted(self._pos_buf[:self.n_cells], evicted)] = False
        self.n_cells -= len(evict_rows)
        for buf in (self._pos_buf, self._surprisal, self._sentence_end):
            buf[:self.n_cells] = buf[:len(kept)][kept]

        self.last_report = CompressionReport(
            method=press.name, aggregation=aggregation, ratio=float(ratio),
            cells_before=len(pos), cells_after=self.n_cells, evicted=len(evict_rows), runs=runs,
            kv_bytes_before=len(raw), kv_bytes_after=self.cache.state_size(),
            protected_cells=int(protected.sum()), compacted=compacted,
            capture_s=self.capture.capture_seconds - self._capture_mark, state_read_s=t1 - t0,
            scoring_s=t2 - t1, eviction_s=t3 - t2, compaction_s=t4 - t3, n_kv_before=n_kv_before,
            sliding_cells=sum(sec.n_cells for sec in inputs.state.sections[1:]))
        self._capture_mark = self.capture.capture_seconds
        self.reports.append(self.last_report)
        return self.last_report

    def _question_tokens(self, question: str | Sequence[int] | None) -> list[int]:
        if question is None:
            return []
        if not isinstance(question, str):
            return list(question)
        # never a BOS: the question follows the prompt, even when the prompt is not in yet
        tokens = self.llama.tokenize(question.encode("utf-8"), add_bos=False, special=True)
        if not tokens:
            raise ValueError("empty question")
        return tokens

    def _compress_with_question(self, question: list[int], ratio: float, press: Press, aggregation: str,
                                compact: bool, protect_recent: int, n_future: int) -> CompressionReport:
        if len(question) > self.free_cells:
            raise CacheFullError(f"the {len(question)}-token question does not fit in the {self.free_cells} "
                                 f"free cells it is decoded into while the cache is compressed")
        start, bytes_before = self.next_pos, self.cache.state_size()
        recent = self.capture.recent_queries()  # a copy: the question's queries take their place
        # the question's tokens may take the cells of the sliding cache's oldest positions: its
        # part of the state is put back afterwards
        sliding = self.cache.get_state(partial=True) if self.cache_layout.iswa else None
        try:
            self._decode(question, stats=False)
            n_question = min(len(question), self.capture.window_len)
            self.compress(ratio, press=QuestionAware(press, n_question), aggregation=aggregation, compact=compact,
                          protect_recent=max(1, protect_recent) + len(question), n_future=n_future)
        finally:
            self._drop_from(start)  # the logits are the question's now: generating needs a prompt again
            if sliding is not None:
                self.cache.set_state(sliding, partial=True)
            self.capture.set_recent_queries(*recent)
        r = replace(self.last_report, cells_before=self.last_report.cells_before - len(question),
                    cells_after=self.n_cells, kv_bytes_before=bytes_before, kv_bytes_after=self.cache.state_size(),
                    protected_cells=self.last_report.protected_cells - len(question),
                    question_tokens=len(question))
        self.last_report = self.reports[-1] = r
        return r

    # -- generation ------------------------------------------------------------------------
    def _sampler(self, temperature: float, top_k: int, top_p: float, seed: int):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(top_k))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(top_p, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def stream(self, prompt: str | Sequence[int] | None = None, *, max_tokens: int = 256,
               temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95, seed: int = 0,
               stop: Sequence[str] = (), budget: int | None = None, target: int | None = None,
               compress_every: int | None = None, query_buffer: int = 128) -> Iterator[str]:
        """Yield generated text pieces. With a prompt, it is prefilled first (through the budget,
        if given); without one, generation continues from the logits of the last decoded token.

        With a `budget`, generation never runs out of cache: when the cache is full, or every
        `compress_every` generated tokens, it is compressed to `target` cells (default half the
        budget) with statistics of the last `query_buffer` generated queries (the only tokens
        whose queries are captured while generating). This replaces llama.cpp's context shift."""
        if budget is not None:
            budget, target = self._bounds(budget, target)
        if prompt is not None:
            self.prefill(prompt, budget=budget, target=target)
        elif not self._has_logits:
            raise ValueError("nothing to continue from: give a prompt (after load(), the state "
                             "holds no logits)")
        sampler = self._sampler(temperature, top_k, top_p, seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        since = 0           # tokens generated since the last compression
        buffering = False   # the statistics hold only the current buffer of generated queries
        try:
            for _ in range(max_tokens):
                tok = llama_cpp.llama_sampler_sample(sampler, self.ctx, -1)
                if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
                    break
                piece = decoder.decode(self.token_bytes(tok))
                capture = self.capture_generation
                if budget is not None:
                    if self.n_cells + 1 > budget or (compress_every and since >= compress_every):
                        self.compress_to(target)
                        since, buffering = 0, False
                    until = budget - self.n_cells
                    if compress_every:
                        until = min(until, compress_every - since)
                    if until <= query_buffer:
                        if not buffering:
                            self.capture.stats.reset()
                            buffering = True
                        capture = True
                self._decode([tok], capture=capture)
                since += 1
                if stop:
                    text += piece
                    hit = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                    if hit >= 0:
                        tail = text[:hit][len(text) - len(piece):]
                        if tail:
                            yield tail
                        return
                if piece:
                    yield piece
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def generate(self, prompt: str | Sequence[int] | None = None, **kwargs) -> str:
        return "".join(self.stream(prompt, **kwargs))

    # -- state -----------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        model = self.llama._model.model
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(model, buf, len(buf))
        return {
            "architecture": self.architecture, "desc": buf.value.decode(),
            "n_params": int(llama_cpp.llama_model_n_params(model)),
            "size": int(llama_cpp.llama_model_size(model)),
            "n_layer": self.n_layer, "n_head": self.n_head, "n_head_kv": self.n_head_kv,
            "head_dim": self.head_dim, "n_vocab": int(llama_cpp.llama_vocab_n_tokens(self.vocab)),
            "name": _meta(model, "general.name"),
        }

    def snapshot(self) -> "Snapshot":
        """The sequence as it is now (cells and captured data), to restore() later: prefill once,
        then try several compressions."""
        captured = {k: v.copy() for k, v in self.capture.state_arrays().items()}
        n = self.n_cells
        return Snapshot(llama_state=self.cache.get_state(), captured=captured,
                        next_pos=self.next_pos, n_cells=n, positions=self.positions,
                        surprisal=self._surprisal[:n].copy(), sentence_end=self._sentence_end[:n].copy())

    def restore(self, snap: "Snapshot") -> None:
        """Put a snapshot back; if llama.cpp refuses it, the current cache is kept."""
        if snap.n_cells > self.n_ctx:
            raise StateError(f"the state holds {snap.n_cells} cells, more than n_ctx {self.n_ctx}")
        backup = self.cache.get_state() if self.n_cells else None
        self.cache.set_state(snap.llama_state, fallback=backup)
        self.capture.load_state_arrays(snap.captured)
        self._pos_buf[:len(snap.positions)] = snap.positions
        self._surprisal[:len(snap.positions)] = snap.surprisal
        self._sentence_end[:len(snap.positions)] = snap.sentence_end
        self.next_pos = snap.next_pos
        self.n_cells = snap.n_cells
        self._has_logits = False

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> int:
        """Write the compressed sequence (llama.cpp state + captured keys and statistics)
        atomically; `extra` (JSON) comes back from load(). Returns the file size."""
        path = Path(path)
        snap = self.snapshot()
        meta = {"magic": STATE_MAGIC, "version": STATE_VERSION, "model": self.fingerprint(),
                "next_pos": snap.next_pos, "n_cells": snap.n_cells, "extra": extra or {}}
        arrays = dict(meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                      llama_state=snap.llama_state, positions=snap.positions, surprisal=snap.surprisal,
                      sentence_end=snap.sentence_end, **snap.captured)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return path.stat().st_size

    def load(self, path: str | os.PathLike) -> dict:
        """Replace this sequence by a saved one; returns the `extra` given to save(). A state of
        another model is refused and the current cache is left as it was."""
        path = Path(path)
        if not path.is_file():
            raise StateError(f"no saved state at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            meta = json.loads(data["meta"].tobytes())
        except Exception as e:  # np.load and json raise many kinds on a damaged file
            raise StateError(f"{path} is not a llamakv state file: {e}") from e
        if not isinstance(meta, dict) or meta.get("magic") != STATE_MAGIC or meta.get("version") != STATE_VERSION:
            raise StateError(f"{path} is not a llamakv state file of version {STATE_VERSION}")
        mine = self.fingerprint()
        if meta["model"] != mine:
            diff = {k: (meta["model"].get(k), v) for k, v in mine.items() if meta["model"].get(k) != v}
            raise StateError(f"{path} was saved from another model (saved vs loaded: {diff})")
        cells = ("positions", "surprisal", "sentence_end")
        captured = {k: v for k, v in data.items() if k not in ("meta", "llama_state", *cells)}
        n = len(data["positions"])
        surprisal = data.get("surprisal", np.full(n, np.nan, np.float32))  # older states of version 2: unknown
        sentence_end = data.get("sentence_end", np.zeros(n, bool))
        if n != int(meta["n_cells"]) or len(surprisal) != n or len(sentence_end) != n:
            raise StateError(f"{path} is damaged: its per-cell arrays disagree on the number of cells")
        self.restore(Snapshot(llama_state=data["llama_state"], captured=captured,
                              next_pos=int(meta["next_pos"]), n_cells=n, positions=data["positions"],
                              surprisal=surprisal, sentence_end=sentence_end))
        return meta.get("extra", {})

    def reset(self) -> None:
        """Empty the sequence and forget everything captured."""
        self.cache.clear()
        self.capture.reset()
        self._capture_mark = 0.0
        self.next_pos = 0
        self.n_cells = 0
        self.reports = []
        self._has_logits = False
