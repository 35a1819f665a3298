"""One sequence of a `Context`: its cells, positions, captured queries and decoding.

A `Sequence` owns what llamakv knows about one KV stream of the context: the positions of its
cells (sorted), per-cell token data (surprisal, sentence ends), the queries captured for it
(capture.SeqCapture) and the position of its next token. It decodes its own prompt chunks,
decides which rows of each chunk are captured (the statistics' sample and the window of recent
queries), and reads its cells for scoring. Compression lives in compressor.py, sampling in
generation.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence as Seq

import llama_cpp
import numpy as np

from . import _shim
from .cache import LayerTensor, SeqState, SequenceCache, with_streams
from .context import Context, Part, ProgressFn
from .device import DeviceCells, first_section_positions
from .errors import CacheFullError, LlamaKVError, StateError
from .rope import hadamard
from .scoring import ScoreInputs


@dataclass
class Snapshot:
    llama_state: np.ndarray  # uint8: llama_state_seq_get_data
    captured: dict           # SeqCapture.state_arrays(): query statistics, recent queries
    next_pos: int
    n_cells: int
    positions: np.ndarray    # positions of the cells, sorted
    surprisal: np.ndarray    # per cell, in the order of positions (NaN: not known)
    sentence_end: np.ndarray # per cell: its token ends a sentence


class Sequence:
    """Sequence `seq_id` of a context: decode into it, read its cells, rewind it.

    `stats_window`, `stats_sample`: the queries of the last `stats_window` tokens of each
    prompt (None: all) enter the statistics; when they are more than `stats_sample`, only those
    of about that many tokens: whole ubatches spread evenly over them, the last one included (on
    a GPU every ubatch captured costs a synchronisation per layer, whatever its number of rows).
    `capture_generation`: generated tokens' queries feed the statistics too.
    """

    def __init__(self, ctx: Context, seq_id: int = 0, *, full_covariance: bool = False, window: int = 64,
                 stats_window: int | None = None, stats_sample: int | None = 2048,
                 capture_generation: bool = False, track_surprisal: bool = False):
        if not 0 <= seq_id < ctx.n_seq:
            raise ValueError(f"sequence {seq_id} does not exist in a context of {ctx.n_seq}")
        self.ctx = ctx
        self.seq_id = seq_id
        self.cache = SequenceCache(ctx.ctx, seq_id)
        self.queries = ctx.new_queries(full_covariance=full_covariance, window=window)
        self.stats_window = stats_window
        self.stats_sample = stats_sample
        self.capture_generation = capture_generation
        self.track_surprisal = track_surprisal
        self.n_ctx = ctx.n_ctx_seq  # cells this sequence may hold
        self.next_pos = 0           # position of the next token
        self.n_cells = 0            # cells this sequence holds
        self._pos_buf = np.zeros(self.n_ctx, dtype=np.int64)            # [:n_cells]: positions, sorted
        self._surprisal = np.full(self.n_ctx, np.nan, dtype=np.float32) # [:n_cells]: as _pos_buf
        self._sentence_end = np.zeros(self.n_ctx, dtype=bool)           # [:n_cells]: as _pos_buf
        self._logits = (-1, 0)      # (context epoch, batch row) of this sequence's last logits
        self.reports: list = []     # compressor.CompressionReport of every compression since the last reset
        self.capture_mark = 0.0     # capture time already counted in a report
        # the cells are cells 0 .. n_cells - 1 of the sequence's stream, in the order of their
        # positions: llama.cpp fills a stream from its lowest free cell and compaction keeps the
        # order; an eviction without compaction leaves holes (device.py relies on it)
        self.cells_in_order = True

    # -- cells -----------------------------------------------------------------------------
    @property
    def free_cells(self) -> int:
        return self.n_ctx - self.n_cells

    @property
    def positions(self) -> np.ndarray:
        """Positions of the cells this sequence holds, sorted (a copy)."""
        return self._pos_buf[:self.n_cells].copy()

    def cell_positions(self) -> np.ndarray:
        """Positions of the cells, sorted (a view, valid until the next change)."""
        return self._pos_buf[:self.n_cells]

    @property
    def has_logits(self) -> bool:
        """Whether the context's logits of this sequence's last token are still there (another
        sequence's decode call replaces them)."""
        return self._logits[0] == self.ctx.epoch

    @property
    def logits_row(self) -> int:
        """Batch row of this sequence's last logits in the context's last decode call."""
        if not self.has_logits:
            raise LlamaKVError("this sequence's logits are gone: decode a token before sampling")
        return self._logits[1]

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Tokens of `text`, with a BOS where the model wants one and the sequence is empty."""
        return self.ctx.tokenize(text, add_bos=self.n_cells == 0 and self.next_pos == 0, special=special)

    @property
    def last_report(self):
        return self.reports[-1] if self.reports else None

    def keep_cells(self, kept: np.ndarray) -> None:
        """After an eviction: `kept` (bool, in the order of positions) marks the cells left."""
        n = int(kept.sum())
        for buf in (self._pos_buf, self._surprisal, self._sentence_end):
            buf[:n] = buf[:len(kept)][kept]
        self.n_cells = n

    def forget_logits(self) -> None:
        self._logits = (-1, 0)

    # -- decoding --------------------------------------------------------------------------
    def _anchors(self, total: int) -> tuple[int, list[int] | None]:
        """First prompt token in the statistics and, when sampling, the tokens whose ubatches
        are captured."""
        first = 0 if self.stats_window is None else max(0, total - self.stats_window)
        if self.stats_sample is not None and total - first > self.stats_sample:
            k = max(1, math.ceil(self.stats_sample / self.ctx.n_ubatch))
            return first, [total - 1 - j * (total - first) // k for j in range(k)]
        return first, None

    def part(self, tokens: Seq[int], *, stats_rows: int = 0, window_rows: int = 0) -> Part:
        """These tokens at the sequence's next positions, as a part of a decode call."""
        return Part(self.seq_id, tokens, self.next_pos, self.queries, stats_rows, window_rows,
                    all_logits=self.track_surprisal)

    def decoded(self, tokens: Seq[int], row: int, first_surprisal: float = math.nan) -> None:
        """Bookkeeping after the context decoded `tokens` into this sequence from batch row
        `row`: positions, per-cell token data, the logits' place."""
        m, at = len(tokens), self.n_cells
        self._pos_buf[at:at + m] = np.arange(self.next_pos, self.next_pos + m)
        out = self._surprisal[at:at + m]
        out[:] = np.nan
        out[0] = first_surprisal
        if self.track_surprisal and m > 1:  # row r's logits predict token r + 1
            self.ctx.surprisal(row, np.asarray(tokens[1:]), out[1:])
        self._sentence_end[at:at + m] = self.ctx.sentence_end_table()[np.asarray(tokens)]
        self.next_pos += m
        self.n_cells += m
        self._logits = (self.ctx.epoch, row + m - 1)

    def surprisal_of(self, token: int) -> float:
        """−log p(token) under this sequence's last logits (NaN if they are gone)."""
        if not self.has_logits:
            return math.nan
        out = np.empty(1, dtype=np.float32)
        self.ctx.surprisal(self.logits_row, np.array([token], np.int32), out)
        return float(out[0])

    def decode_steps(self, tokens: Seq[int], *, capture: bool = True, prompt: tuple[int, int] | None = None,
                     stats_last: bool = False, stats: bool = True) -> Iterator[int]:
        """Decode tokens at the next positions, one ubatch per step (yields the tokens done):
        a caller decoding other sequences between the steps stalls them a ubatch at a time.
        Queries are captured (see the class) unless `capture` is False. `prompt` = (tokens
        before these, tokens in all) when these are a chunk of a longer prompt; `stats_last`:
        the last ubatch feeds the statistics even if the sample would skip it; `stats` False:
        only the window of recent queries is captured."""
        n = len(tokens)
        if n == 0:
            return
        if n > self.free_cells:
            raise CacheFullError(
                f"{n} tokens do not fit in the {self.free_cells} free cells of the KV cache "
                f"(n_ctx {self.n_ctx} per sequence, {self.n_cells} in use): raise -c / n_ctx, or compress first")
        before, total = prompt or (0, n)
        first, anchors = self._anchors(total)
        cap_w = self.queries.window_cap
        done = 0
        while done < n:
            chunk = tokens[done:done + self.ctx.n_ubatch]
            m = len(chunk)
            a = before + done  # the ubatch holds prompt tokens a .. a + m - 1
            rows = max(0, min(m, a + m - first)) if stats else 0
            if anchors is not None and not any(a <= x < a + m for x in anchors) and not (stats_last and done + m == n):
                rows = 0
            first_surprisal = self.surprisal_of(chunk[0]) if self.track_surprisal else math.nan
            part = self.part(chunk, stats_rows=rows if capture else 0,
                             window_rows=cap_w - (total - a - m) if capture else 0)
            self.ctx.decode([part])
            self.decoded(chunk, 0, first_surprisal)
            done += m
            yield done

    def decode(self, tokens: Seq[int], *, progress: ProgressFn | None = None, **kw) -> None:
        """decode_steps() to the end; `progress(done, n)` after each ubatch."""
        for done in self.decode_steps(tokens, **kw):
            if progress:
                progress(done, len(tokens))

    # -- rewinding -------------------------------------------------------------------------
    def can_truncate(self, n_pos: int) -> bool:
        """Whether truncate(n_pos) leaves a cache that continues as a fresh prefill would: a
        sliding-window model's sliding cache holds only the last window of positions (llama.cpp
        reuses older cells), so it must still hold every position the token at n_pos attends to,
        n_pos - window + 1 on (llama_hparams::is_masked_swa; llama-server tests the same before
        reusing a prompt's prefix)."""
        layout = self.ctx.cache_layout
        if not layout.iswa or n_pos >= self.next_pos or self.n_cells == 0:
            return True
        return self.cache.pos_min() <= max(0, n_pos - layout.window + 1)

    def truncate(self, n_pos: int) -> None:
        """Forget positions >= n_pos (rewind a conversation to a common prefix): their cells are
        freed and the next token takes position n_pos. The query statistics keep what they saw."""
        if not 0 <= n_pos <= self.next_pos:
            raise ValueError(f"cannot truncate to position {n_pos}: the sequence is at {self.next_pos}")
        if n_pos == self.next_pos:
            return
        if not self.can_truncate(n_pos):
            raise StateError(f"the sliding-window cache no longer holds the {self.ctx.cache_layout.window} "
                             f"positions before {n_pos}: prefill from the start instead of truncating")
        self.drop_from(n_pos)

    def drop_from(self, n_pos: int) -> None:
        """Free the cells of positions >= n_pos, whatever the sliding cache then holds."""
        llama_cpp.llama_memory_seq_rm(self.cache.memory, self.seq_id, n_pos, -1)
        self.n_cells = int(np.searchsorted(self._pos_buf[:self.n_cells], n_pos))
        self.next_pos = n_pos
        self.forget_logits()

    def reset(self) -> None:
        """Empty the sequence and forget everything captured for it."""
        self.cache.clear()
        self.queries.reset()
        self.next_pos = 0
        self.n_cells = 0
        self.reports = []
        self.capture_mark = 0.0
        self.cells_in_order = True
        self.forget_logits()

    # -- scoring ---------------------------------------------------------------------------
    def score_inputs(self, state: np.ndarray | None = None, n_future: int = 0) -> ScoreInputs:
        """What presses score: the cells as llama.cpp holds them (the sequence state, read now
        unless given), the query statistics, the recent queries and the model's rope."""
        ctx = self.ctx
        raw = self.cache.get_state() if state is None else state
        layers = ctx.scored_layers
        try:
            parsed = SeqState.parse(raw, 2 if ctx.cache_layout.iswa else 1)
        except ValueError as e:
            raise LlamaKVError(f"llamakv cannot read this cache's state layout: {e}") from e
        expected = len(ctx.cache_layout.global_cache_layers)
        if parsed.n_cells and len(parsed.k) != expected:
            raise LlamaKVError(f"the state's first cache holds {len(parsed.k)} layers, llamakv expected the "
                               f"{expected} {'global ' if ctx.cache_layout.iswa else ''}layers")
        if parsed.n_cells:
            parsed = self._unrotate_keys(parsed, layers).with_layers(ctx.cache_layout.rows_of(layers))
        return self._score_inputs(parsed, None, parsed.pos, n_future)

    def device_score_inputs(self, n_future: int = 0) -> ScoreInputs:
        """score_inputs() for scoring the cells where they lie, on the device of the context's
        cache (nothing is read): cells 0 .. n_cells - 1 of the sequence's stream, which hold its
        positions in ascending order while `cells_in_order`."""
        if not self.cells_in_order:
            raise LlamaKVError("the sequence's cells are not in position order in its stream: score from its state")
        pos = self._pos_buf[:self.n_cells].astype(np.int32)
        return self._score_inputs(None, DeviceCells(self.ctx.device, self.seq_id, pos), pos, n_future)

    def _score_inputs(self, parsed: SeqState | None, device: DeviceCells | None, pos: np.ndarray,
                      n_future: int) -> ScoreInputs:
        ctx = self.ctx
        layers = ctx.scored_layers
        # the ring of recent queries itself, not a copy (33 MB for an 8B model): read before the
        # next decode call overwrites it
        q = self.queries
        slots = q.recent_slots()
        rows = np.searchsorted(self._pos_buf[:self.n_cells], pos)  # each cell's row in _pos_buf
        attn = [ctx.layout.layers[i] for i in layers]
        sinks = np.full((len(layers), ctx.n_head), np.nan, dtype=np.float32)
        for j, a in enumerate(attn):
            if a.sinks is not None:
                sinks[j] = a.sinks
        every = len(layers) == ctx.n_layer
        return ScoreInputs(state=parsed, stats=q.stats if every else q.stats.subset(layers),
                           rope=lambda j: ctx.capture.rope(layers[j]),
                           next_pos=self.next_pos, n_head=ctx.n_head, n_head_kv=ctx.n_head_kv,
                           head_dim=ctx.head_dim, n_sink=ctx.capture.n_sink,
                           window_q=q.window if every else q.window[list(layers)],
                           window_pos=q.window_pos[slots].copy(), window_slots=slots,
                           n_future=n_future, surprisal=self._surprisal[rows], sentence_end=self._sentence_end[rows],
                           logit_scale=np.array([a.scale for a in attn]), softcap=np.array([a.softcap for a in attn]),
                           sink_logits=sinks if not np.isnan(sinks).all() else None,
                           device=device, n_device_layers=len(layers))

    def _unrotate_keys(self, parsed: SeqState, layers: Seq[int]) -> SeqState:
        """With a quantized K cache llama.cpp stores H k for an orthonormal Hadamard matrix H
        (q is rotated alike, so q.k is unchanged); the closed form needs k itself: those layers
        are scored from float32 rows of H (H k) = k."""
        ctx = self.ctx
        for j, il in zip(ctx.cache_layout.rows_of(layers), layers):
            n = ctx.layout.layers[il].k_rot
            if not n or (parsed.k_float and j in parsed.k_float):
                continue
            lt = parsed.main.k[j]
            per_row = ctx.n_head_kv * ctx.head_dim
            keys = np.empty((parsed.n_cells, per_row), dtype=np.float32)
            if _shim.load().lib.llamakv_rows_to_float(_shim.ptr("uint8_t *", lt.data), lt.type, lt.row_bytes,
                                                      parsed.n_cells, per_row, _shim.ptr("float *", keys)):
                raise LlamaKVError(f"cannot read keys of ggml type {lt.type}")
            keys = (keys.reshape(-1, n) @ hadamard(n).astype(np.float32)).reshape(parsed.n_cells, per_row)
            parsed = parsed.with_keys(j, LayerTensor(0, lt.header, keys.view(np.uint8), False))
        return parsed

    # -- snapshots -------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The sequence as it is now (cells and captured queries), to restore() later, into this
        sequence or another of the same context."""
        captured = {k: v.copy() for k, v in self.queries.state_arrays().items()}
        n = self.n_cells
        return Snapshot(llama_state=self.cache.get_state(), captured=captured,
                        next_pos=self.next_pos, n_cells=n, positions=self.positions,
                        surprisal=self._surprisal[:n].copy(), sentence_end=self._sentence_end[:n].copy())

    def restore(self, snap: Snapshot) -> None:
        """Put a snapshot back; if llama.cpp refuses it, the current cache is kept."""
        if snap.n_cells > self.n_ctx:
            raise StateError(f"the state holds {snap.n_cells} cells, more than the {self.n_ctx} of a sequence")
        try:  # a state of a context with another number of sequences: its stream count adapted
            state = with_streams(snap.llama_state, self.ctx.n_seq)
        except ValueError as e:
            raise StateError(f"the saved sequence state has a layout llamakv does not know: {e}") from e
        backup = self.cache.get_state() if self.n_cells else None
        self.cache.set_state(state, fallback=backup)
        self.cells_in_order = bool(np.all(np.diff(first_section_positions(np.frombuffer(state, dtype=np.uint8))) > 0))
        self.queries.load_state_arrays(snap.captured)
        n = len(snap.positions)
        self._pos_buf[:n] = snap.positions
        self._surprisal[:n] = snap.surprisal
        self._sentence_end[:n] = snap.sentence_end
        self.next_pos = snap.next_pos
        self.n_cells = snap.n_cells
        self.forget_logits()
