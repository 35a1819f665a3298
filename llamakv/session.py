"""`KVSession`: one compressible sequence on top of a llama-cpp-python `Llama`.

The thin facade over the rooms that do the work: a `Context` of one sequence (context.py: the
llama.cpp context, its callback, decoding), the `Sequence` (sequence.py: cells, positions,
captured queries), the `Compressor` (compressor.py: one-shot, question-guided and bounded
compression), generation (generation.py: sampling, stop strings) and state files
(statefile.py). Prefill text or tokens, compress, generate from the compressed cache, save and
load the compressed sequence.
"""
from __future__ import annotations

import inspect
import os
from typing import Iterator, Sequence as Seq

import llama_cpp

from . import completions, statefile
from .compressor import CompressionReport, Compressor, check_ratio
from .context import Context, ProgressFn, open_llama
from .generation import Bound, Generation, Sampling, generate
from .scoring import Press
from .sequence import Sequence, Snapshot

__all__ = ["KVSession", "CompressionReport", "Snapshot"]

_OPEN_LLAMA_PARAMS = frozenset(inspect.signature(open_llama).parameters) - {"model"}


class KVSession:
    """Prefill, compress and generate on one sequence of a `Llama`'s KV cache.

    Wrapping an existing `Llama` replaces its context by one with the capture callback (the old
    context is freed first, so there is never a second KV cache); the model stays loaded once.
    Use the session, not the `Llama`'s own generation methods, on the cache afterwards: after
    eviction `Llama`'s position and prefix bookkeeping no longer describes the cache.
    """

    def __init__(self, llama: llama_cpp.Llama, *, n_sink: int = 4, full_covariance: bool = False,
                 press: Press | None = None, aggregation: str = "mean",
                 stats_window: int | None = None, stats_sample: int | None = 2048, window: int = 64,
                 capture_generation: bool = False, recent: int = 64, track_surprisal: bool | None = None):
        self.llama = llama
        self.context = Context(llama, n_seq=1, n_sink=n_sink)
        self.seq = Sequence(self.context, 0, full_covariance=full_covariance, window=window,
                            stats_window=stats_window, stats_sample=stats_sample,
                            capture_generation=capture_generation)
        self.compressor = Compressor(press, aggregation, n_sink=n_sink, recent=recent,
                                     full_covariance=full_covariance)
        self._track_surprisal = track_surprisal
        # the model's facts, as attributes (the public API since the first release)
        c = self.context
        self.architecture, self.spec, self.cache_layout = c.architecture, c.spec, c.cache_layout
        self.n_layer, self.n_head, self.n_head_kv, self.head_dim = c.n_layer, c.n_head, c.n_head_kv, c.head_dim
        self.n_ctx_train, self.n_ubatch, self.n_vocab, self.vocab = c.n_ctx_train, c.n_ubatch, c.n_vocab, c.vocab
        self.ctx, self.capture, self.layout = c.ctx, c.capture, c.layout
        self.cache, self.queries, self.n_ctx = self.seq.cache, self.seq.queries, self.seq.n_ctx

    @classmethod
    def from_model(cls, model: str | os.PathLike | None = None, **kwargs) -> "KVSession":
        """Load a GGUF (path or registry name, see models.toml) and wrap it. The keywords of
        context.open_llama (n_ctx, n_gpu_layers, n_threads, flash_attn, n_batch, type_k, type_v,
        seed, verbose, swa_full, rpc_servers, split_mode, tensor_split, main_gpu) load the model;
        the others are the session's (see KVSession)."""
        load = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPEN_LLAMA_PARAMS}
        return cls(open_llama(model, **load), **kwargs)

    def close(self) -> None:
        self.context.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- settings --------------------------------------------------------------------------
    press = property(lambda self: self.compressor.press, lambda self, v: setattr(self.compressor, "press", v))
    aggregation = property(lambda self: self.compressor.aggregation,
                           lambda self, v: setattr(self.compressor, "aggregation", v))
    recent = property(lambda self: self.compressor.recent, lambda self, v: setattr(self.compressor, "recent", v))
    n_sink = property(lambda self: self.compressor.n_sink)
    stats_window = property(lambda self: self.seq.stats_window, lambda self, v: setattr(self.seq, "stats_window", v))
    stats_sample = property(lambda self: self.seq.stats_sample, lambda self, v: setattr(self.seq, "stats_sample", v))
    capture_generation = property(lambda self: self.seq.capture_generation,
                                  lambda self, v: setattr(self.seq, "capture_generation", v))

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

    @property
    def scored_layers(self) -> tuple[int, ...]:
        return self.context.scored_layers

    # -- the sequence ----------------------------------------------------------------------
    next_pos = property(lambda self: self.seq.next_pos)
    n_cells = property(lambda self: self.seq.n_cells)
    free_cells = property(lambda self: self.seq.free_cells)
    positions = property(lambda self: self.seq.positions)
    reports = property(lambda self: self.seq.reports)
    last_report = property(lambda self: self.seq.last_report)

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        return self.seq.tokenize(text, special=special)

    def token_bytes(self, token: int) -> bytes:
        return self.context.token_bytes(token)

    def chat_prompt(self, messages: Seq[dict], add_generation_prompt: bool = True) -> str:
        """The model's own chat template applied to messages."""
        return self.context.chat_prompt(messages, add_generation_prompt)

    def fingerprint(self) -> dict:
        return self.context.fingerprint()

    def _tokens(self, prompt: str | Seq[int]) -> list[int]:
        return self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)

    def _question_tokens(self, question: str | Seq[int] | None) -> list[int]:
        if question is None:
            return []
        if not isinstance(question, str):
            return list(question)
        # never a BOS: the question follows the prompt, even when the prompt is not in yet
        tokens = self.context.tokenize(question, add_bos=False)
        if not tokens:
            raise ValueError("empty question")
        return tokens

    def prefill(self, prompt: str | Seq[int], *, progress: ProgressFn | None = None,
                budget: int | None = None, target: int | None = None,
                question: str | Seq[int] | None = None) -> int:
        """Append text (tokenized with special tokens) or token ids; returns the number of tokens.

        With a `budget` (cells, at most n_ctx) a prompt of any length streams through the cache,
        compressed to `target` cells (default half the budget) whenever the next chunk would not
        fit (Compressor.prefill_steps); each compression's report is appended to `reports`.
        `question`: what will be asked after the prompt, if known: each compression is guided by
        it as in compress(); its tokens count against the budget while they are decoded."""
        tokens = self._tokens(prompt)
        if not tokens:
            raise ValueError("empty prompt: nothing to prefill")
        self.seq.track_surprisal = self.track_surprisal
        if budget is None:
            self.seq.decode(tokens, progress=progress)
            return len(tokens)
        steps = self.compressor.prefill_steps(self.seq, tokens, budget=budget, target=target,
                                              question=self._question_tokens(question))
        for done in steps:
            if progress:
                progress(done, len(tokens))
        return len(tokens)

    def truncate(self, n_pos: int) -> None:
        """Forget positions >= n_pos (rewind a conversation to a common prefix)."""
        self.seq.truncate(n_pos)

    def can_truncate(self, n_pos: int) -> bool:
        return self.seq.can_truncate(n_pos)

    def score_inputs(self, state=None, n_future: int = 0):
        return self.seq.score_inputs(state, n_future)

    # -- compression -----------------------------------------------------------------------
    def compress(self, ratio: float, *, press: Press | None = None, aggregation: str | None = None,
                 compact: bool = True, protect_recent: int = 1, n_future: int = 0,
                 question: str | Seq[int] | None = None) -> CompressionReport:
        """Evict `ratio` of the compressible cells (all but the sinks and the `protect_recent`
        newest positions, e.g. a question already in the cache), those with the lowest
        aggregated score; then compact the cache so n_kv shrinks. `n_future`: future positions
        whose queries will read the cells, where known (a streamed prompt; 0: the press's own).

        `question` (text or token ids): what will be asked next, if known. It is decoded after
        the cells for the scoring only and removed again: the cells its queries attend to are
        kept next to the press's choice (scoring.QuestionAware), and the question is prefilled
        later where it belongs. Its tokens need free cells while they are decoded."""
        check_ratio(ratio)
        return self.compressor.compress(self.seq, ratio, press=press, aggregation=aggregation, compact=compact,
                                        protect_recent=protect_recent, n_future=n_future,
                                        question=self._question_tokens(question))

    def compress_to(self, n_cells: int, *, press: Press | None = None, aggregation: str | None = None,
                    compact: bool = True, protect_recent: int | None = None, n_future: int = 0,
                    question: str | Seq[int] | None = None) -> CompressionReport | None:
        """Compress down to `n_cells` cells, or as close as the protected cells allow (None if
        nothing is to go), keeping the sinks and the newest `protect_recent` positions (default
        `recent`). `n_future`, `question`: as in compress()."""
        return self.compressor.compress_to(self.seq, n_cells, protect_recent=protect_recent, press=press,
                                           aggregation=aggregation, compact=compact, n_future=n_future,
                                           question=self._question_tokens(question))

    # -- generation ------------------------------------------------------------------------
    def stream(self, prompt: str | Seq[int] | None = None, *, max_tokens: int = 256,
               temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95, seed: int = 0,
               stop: Seq[str] = (), budget: int | None = None, target: int | None = None,
               compress_every: int | None = None, query_buffer: int = 128, **sampling) -> Iterator[str]:
        """Yield generated text pieces. With a prompt, it is prefilled first (through the budget,
        if given); without one, generation continues from the logits of the last decoded token.
        Text that may begin a stop string is held back until it is known not to.

        With a `budget`, generation never runs out of cache: when the cache is full, or every
        `compress_every` generated tokens, it is compressed to `target` cells (default half the
        budget) with statistics of the last `query_buffer` generated queries (generation.Bound).
        This replaces llama.cpp's context shift. Without one, generation ends when the cache is
        full. Other keyword arguments are generation.Sampling's (penalties, grammar, logit_bias,
        min_p, mirostat, DRY, XTC, ...)."""
        bound = None
        if budget is not None:
            budget, target = self.compressor.bounds(self.seq, budget, target)
            bound = Bound(self.compressor, budget, target, compress_every, query_buffer)
        tokens: list[int] = []
        if prompt is not None:
            tokens = self._tokens(prompt)
            self.prefill(tokens, budget=budget, target=target)
        elif not self.seq.has_logits:
            raise ValueError("nothing to continue from: give a prompt (after load(), the state "
                             "holds no logits)")
        self.seq.track_surprisal = self.track_surprisal
        gen = Generation(self.seq, Sampling(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                            top_p=top_p, seed=seed, stop=tuple(stop), **sampling),
                         bound=bound, prompt=tokens)
        for _, piece in generate(self.context, [gen]):
            if piece.text:
                yield piece.text

    def generate(self, prompt: str | Seq[int] | None = None, **kwargs) -> str:
        return "".join(self.stream(prompt, **kwargs))

    def create_completion(self, prompt: str | list[int], *args, **kwargs):
        """llama-cpp-python's `Llama.create_completion` (same arguments, defaults and result shapes),
        plus `ratio=`, `budget=`, `target=` for compression (completions.py)."""
        return completions.create_completion(self, prompt, *args, **kwargs)

    def create_chat_completion(self, messages: list[dict], *args, **kwargs):
        """llama-cpp-python's `Llama.create_chat_completion`, with the model's own chat template,
        plus `ratio=`, `budget=`, `target=` for compression (completions.py)."""
        return completions.create_chat_completion(self, messages, *args, **kwargs)

    __call__ = create_completion  # as Llama.__call__

    # -- state -----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The sequence as it is now (cells and captured data), to restore() later: prefill once,
        then try several compressions."""
        return self.seq.snapshot()

    def restore(self, snap: Snapshot) -> None:
        """Put a snapshot back; if llama.cpp refuses it, the current cache is kept."""
        self.seq.restore(snap)

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> int:
        """Write the compressed sequence (llama.cpp state + captured queries) atomically; `extra`
        (JSON) comes back from load(). Returns the file size."""
        return statefile.save(path, self.snapshot(), self.fingerprint(), extra)

    def load(self, path: str | os.PathLike) -> dict:
        """Replace this sequence by a saved one; returns the `extra` given to save(). A state of
        another model is refused and the current cache is left as it was."""
        snap, extra = statefile.load(path, self.fingerprint())
        self.restore(snap)
        return extra

    def reset(self) -> None:
        """Empty the sequence and forget everything captured."""
        self.seq.reset()
        self.capture.reset_timers()

