"""Compression of one sequence and its policies.

`Compressor` holds the method (a press and its aggregation), the sinks and the recent positions a
bounded cache never evicts, and applies them to a `Sequence`:
- one-shot: `compress(seq, ratio)` evicts that share of the compressible cells, `compress_to`
  down to a number of cells;
- question-guided: with the question decoded after the cells for the scoring only
  (scoring.QuestionAware), removed again afterwards;
- bounded prefill: `prefill_steps(seq, tokens, budget=...)` streams a prompt of any length
  through a budget of cells, compressing whenever the next chunk would not fit;
- bounded generation: generation.py calls `compress_to` when the budget is reached.
Nothing here touches another sequence's cells: states are read and written per sequence.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Sequence as Seq

import numpy as np

from .cache import position_runs
from .device import compact as device_compact
from .errors import CacheFullError, DeviceError, LlamaKVError, StateError
from .scoring import ExpectedAttention, ExpectedAttentionKeyDiff, Press, QuestionAware, aggregate
from .sequence import Sequence


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
    device: str = ""          # where the cells were scored and compacted: the cache's device, "" for the host

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
            f"compaction {self.compaction_s * 1e3:.1f} ms" + (f" (on {self.device})" if self.device else ""),
        ])

    @property
    def compression_s(self) -> float:
        """Time compress() took after the prefill: state read, scoring, eviction, compaction."""
        return self.state_read_s + self.scoring_s + self.eviction_s + self.compaction_s


def check_ratio(ratio) -> float:
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0) or math.isnan(ratio):
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    return float(ratio)


@dataclass
class Compressor:
    """How cells are chosen: `press` and `aggregation` (per-head scores to one per cell), the
    first `n_sink` positions always kept, and the newest `recent` positions a bounded cache
    never evicts."""
    press: Press | None = None
    aggregation: str = "mean"
    n_sink: int = 4
    recent: int = 64
    full_covariance: bool = False
    # where compress() scores and compacts: None on the cache's device when it is a GPU (nothing of
    # the cache crosses the bus, device.py) and on the host otherwise; True on the cache's device
    # whatever it is (the CPU backend for a CPU cache); False on the host. The device path covers
    # Expected Attention and ea_keydiff; other presses, sliding-window models and question-guided
    # compression are scored on the host.
    device: bool | None = None

    def __post_init__(self):
        if self.press is None:
            self.press = ExpectedAttentionKeyDiff(expected_attention=ExpectedAttention(full_covariance=self.full_covariance))

    # -- one-shot --------------------------------------------------------------------------
    def compress(self, seq: Sequence, ratio: float, *, press: Press | None = None, aggregation: str | None = None,
                 compact: bool = True, protect_recent: int = 1, n_future: int = 0,
                 question: Seq[int] | None = None) -> CompressionReport:
        """Evict `ratio` of the compressible cells (all but the sinks and the `protect_recent`
        newest positions), those with the lowest aggregated score; then compact the sequence's
        cells so its attention width shrinks. `n_future`: future positions whose queries will
        read the cells, where known (0: the press's own). `question`: token ids of what will be
        asked next, decoded after the cells for the scoring only (see compress_with_question)."""
        ratio = check_ratio(ratio)
        press = press or self.press
        aggregation = aggregation or self.aggregation
        if seq.n_cells == 0:
            raise LlamaKVError("nothing to compress: prefill a prompt first")
        if not seq.queries.stats.count.any():
            raise LlamaKVError("no queries were captured: prefill with capture enabled before compressing")
        if question:
            return self.compress_with_question(seq, list(question), ratio, press=press, aggregation=aggregation,
                                               compact=compact, protect_recent=protect_recent, n_future=n_future)
        ctx = seq.ctx
        n_kv_before = int(ctx.capture.n_kv.max())
        on_device = self.on_device(seq, press)

        t0 = time.perf_counter()
        if on_device:
            raw, bytes_before = None, seq.cache.state_size()
            inputs = seq.device_score_inputs(n_future)
        else:
            raw = seq.cache.get_state(ctx.state_in)
            bytes_before = len(raw)
        t1 = time.perf_counter()
        if raw is not None:
            inputs = seq.score_inputs(raw, n_future)
        pos = inputs.pos
        protected = (pos < self.n_sink) | (pos >= seq.next_pos - max(1, protect_recent))
        candidates = np.flatnonzero(~protected)
        n_evict = int(math.floor(ratio * len(candidates)))
        n_keep = len(candidates) - n_evict
        inputs.keep_fraction = n_keep / max(len(candidates), 1)
        try:
            scores = press.score(inputs)
        except DeviceError as e:
            if not on_device:
                raise
            # nothing has changed yet: this compression goes the host path
            warnings.warn(f"{e}; compressing on the host instead", RuntimeWarning, stacklevel=2)
            return replace(self, device=False).compress(seq, ratio, press=press, aggregation=aggregation,
                                                        compact=compact, protect_recent=protect_recent,
                                                        n_future=n_future)
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
        compacted = (compact or ctx.cache_layout.iswa) and n_evict > 0
        keep = np.ones(len(pos), dtype=bool)
        keep[evict_rows] = False
        if on_device:
            t3 = time.perf_counter()
            if compacted:
                try:
                    device_compact(ctx.device, seq.cache, pos, keep)
                except StateError:
                    seq.reset()
                    raise
            else:
                seq.cache.evict(evicted)
        elif compacted:
            edited = inputs.state.keep(np.flatnonzero(keep), ctx.state_out)
            t3 = time.perf_counter()
            seq.cache.set_state(edited, fallback=raw)
        else:
            seq.cache.evict(evicted)
            t3 = time.perf_counter()
        t4 = time.perf_counter()
        if n_evict > 0:
            # compacted: the cells in the state's order, which is the positions' where it was
            seq.cells_in_order = compacted and bool(np.all(np.diff(pos[keep]) > 0))
        kept = np.ones(seq.n_cells, dtype=bool)  # in the sorted order of the positions
        kept[np.searchsorted(seq.cell_positions(), evicted)] = False
        seq.keep_cells(kept)

        report = CompressionReport(
            method=press.name, aggregation=aggregation, ratio=ratio,
            cells_before=len(pos), cells_after=seq.n_cells, evicted=len(evict_rows), runs=runs,
            kv_bytes_before=bytes_before, kv_bytes_after=seq.cache.state_size(),
            protected_cells=int(protected.sum()), compacted=compacted,
            capture_s=seq.queries.capture_seconds - seq.capture_mark, state_read_s=t1 - t0,
            scoring_s=t2 - t1, eviction_s=t3 - t2, compaction_s=t4 - t3, n_kv_before=n_kv_before,
            sliding_cells=0 if on_device else sum(sec.n_cells for sec in inputs.state.sections[1:]),
            device=ctx.device.name if on_device else "")
        seq.capture_mark = seq.queries.capture_seconds
        seq.reports.append(report)
        return report

    def on_device(self, seq: Sequence, press: Press) -> bool:
        """Whether compress() scores and compacts this sequence on its cache's device (`device`)."""
        dev = seq.ctx.device
        if self.device is False or dev is None or not dev.available or not (self.device or dev.is_gpu):
            return False
        ea = press.expected_attention if isinstance(press, ExpectedAttentionKeyDiff) else press
        return (isinstance(ea, ExpectedAttention) and not ea.device_unsupported() and seq.cells_in_order
                and not seq.ctx.cache_layout.iswa)

    def compress_to(self, seq: Sequence, n_cells: int, *, protect_recent: int | None = None,
                    **kw) -> CompressionReport | None:
        """Compress down to `n_cells` cells, or as close as the protected cells allow (None if
        nothing is to go), keeping the sinks and the newest `protect_recent` positions (default
        `recent`). Other arguments as in compress()."""
        protect = max(1, self.recent if protect_recent is None else protect_recent)
        pos = seq.cell_positions()
        candidates = int(np.count_nonzero((pos >= self.n_sink) & (pos < seq.next_pos - protect)))
        n_evict = min(seq.n_cells - int(n_cells), candidates)
        if n_evict <= 0:
            return None
        ratio = min((n_evict + 0.5) / candidates, (candidates - 0.5) / candidates)
        return self.compress(seq, ratio, protect_recent=protect, **kw)

    # -- question-guided -------------------------------------------------------------------
    def compress_with_question(self, seq: Sequence, question: list[int], ratio: float, *, press: Press,
                               aggregation: str, compact: bool, protect_recent: int,
                               n_future: int) -> CompressionReport:
        """compress() with the question decoded after the cells for the scoring only: the
        cells its queries attend to are kept next to the press's choice (QuestionAware). The
        question is removed again (and the logits with it): it is prefilled later where it
        belongs."""
        if len(question) > seq.free_cells:
            raise CacheFullError(f"the {len(question)}-token question does not fit in the {seq.free_cells} "
                                 f"free cells it is decoded into while the cache is compressed")
        start, bytes_before = seq.next_pos, seq.cache.state_size()
        recent = seq.queries.recent_queries()  # a copy: the question's queries take their place
        # the question's tokens may take the cells of the sliding cache's oldest positions: its
        # part of the state is put back afterwards
        sliding = seq.cache.get_state(partial=True) if seq.ctx.cache_layout.iswa else None
        try:
            seq.decode(question, stats=False)
            n_question = min(len(question), seq.queries.window_len)
            self.compress(seq, ratio, press=QuestionAware(press, n_question), aggregation=aggregation,
                          compact=compact, protect_recent=max(1, protect_recent) + len(question), n_future=n_future)
        finally:
            seq.drop_from(start)
            if sliding is not None:
                seq.cache.set_state(sliding, partial=True)
            seq.queries.set_recent_queries(*recent)
        r = seq.reports[-1]
        r = replace(r, cells_before=r.cells_before - len(question), cells_after=seq.n_cells,
                    kv_bytes_before=bytes_before, kv_bytes_after=seq.cache.state_size(),
                    protected_cells=r.protected_cells - len(question), question_tokens=len(question))
        seq.reports[-1] = r
        return r

    # -- bounded prefill -------------------------------------------------------------------
    def bounds(self, seq: Sequence, budget: int, target: int | None) -> tuple[int, int]:
        """A budget of cells and the size compressions bring it down to, checked."""
        budget = int(budget)
        if not 0 < budget <= seq.n_ctx:
            raise ValueError(f"the cache budget must be in (0, n_ctx = {seq.n_ctx}], got {budget}")
        target = budget // 2 if target is None else int(target)
        if not self.n_sink + self.recent < target < budget:
            raise ValueError(f"the target size after compression must be in ({self.n_sink + self.recent}, "
                             f"{budget}) for a budget of {budget} cells, got {target}")
        return budget, target

    def prefill_steps(self, seq: Sequence, tokens: Seq[int], *, budget: int, target: int | None = None,
                      question: Seq[int] = ()) -> Iterator[int]:
        """Stream a prompt of any length through `budget` cells (yields the tokens done after
        each chunk): it is decoded in chunks (a ubatch, or budget - target tokens if fewer) and,
        whenever the next chunk would not fit, the sequence is compressed down to `target` cells
        (default half the budget), keeping the sinks and the newest `recent` tokens; the query
        statistics accumulate over the whole prompt (the sample plus the chunk before each
        compression). `question`: what will be asked after the prompt, if known: each
        compression is guided by it; its tokens count against the budget while decoded."""
        budget, target = self.bounds(seq, budget, target)
        question = list(question)
        room = budget - len(question)  # what the prompt's cells may fill before a compression
        if room - target < 1:
            raise ValueError(f"a {len(question)}-token question leaves no room between the target ({target}) "
                             f"and the budget ({budget}): lower the target or shorten the question")
        step = min(seq.ctx.n_ubatch, room - target)
        done = 0
        while done < len(tokens):
            chunk = tokens[done:done + step]
            if seq.n_cells + len(chunk) > room:
                # the cells kept now will be read by the queries of the rest of the prompt and of
                # the answer, within the model's context: averaged over the next 512 positions,
                # RoPE favours recent cells at every compression and old ones (a needle) are lost
                self.compress_to(seq, target, n_future=len(tokens) - done + seq.ctx.n_ctx_train, question=question)
            following = len(tokens[done + step:done + 2 * step])
            # the chunk before a compression always feeds the statistics: a sample spread over the
            # whole prompt may have none before the first compression
            seq.decode(chunk, prompt=(done, len(tokens)),
                       stats_last=following > 0 and seq.n_cells + len(chunk) + following > room)
            done += len(chunk)
            yield done
