"""Generation: sampling, stop strings, token probabilities and bounded generation, for one or
many sequences of a context.

One loop serves the Python API, the CLI, the server and the evaluation. A `Generation` is one
sequence's answer in progress: it samples from the sequence's logits right after they are
computed (another sequence's decode call replaces them), holds back text that may be the start
of a stop string, and, with a budget, compresses its sequence before the cache is full.
`decode_step` decodes the next token of several generations, sequences of consecutive ids in
one llama_decode call (how llama.cpp batches a non-unified cache).
"""
from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence as Seq

import llama_cpp
import numpy as np

from .compressor import Compressor
from .context import Context
from .sequence import Sequence


@dataclass
class Sampling:
    """What to sample and when to stop. `max_tokens` < 0: until end of generation or a full
    cache. `logprobs`: report each sampled token's log-probability, with the `n_probs` most
    likely tokens and theirs (under the model's distribution, before the samplers)."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.0
    seed: int = 0
    stop: Seq[str] = ()
    logprobs: bool = False
    n_probs: int = 0
    ignore_eos: bool = False  # end-of-generation tokens are never sampled (fixed-length benchmarks)


def make_sampler(p: Sampling, n_vocab: int = 0, banned: Seq[int] = ()):
    """A llama.cpp sampler chain: the `banned` tokens' logits set to -inf, then greedy at
    temperature 0, else top-k, top-p, min-p, temperature and a seeded draw, in llama.cpp's order."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = lambda smp: llama_cpp.llama_sampler_chain_add(chain, smp)  # noqa: E731
    if banned:
        bias = (llama_cpp.llama_logit_bias * len(banned))(*[llama_cpp.llama_logit_bias(t, -math.inf) for t in banned])
        add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(banned), bias))
    if p.temperature <= 0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if p.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(p.top_k))
    add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0:
        add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(p.temperature))
    add(llama_cpp.llama_sampler_init_dist(p.seed))
    return chain


class StopFilter:
    """Releases generated text up to the first stop string, holding back an end of the text that
    could be the start of one (a stop string may arrive split over several tokens)."""

    def __init__(self, stops: Seq[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.word = ""   # the stop string found, if any

    def push(self, piece: str) -> tuple[str, bool]:
        """Text that can be released now, and whether a stop string was found (the text before it
        is released, the rest dropped)."""
        text = self.held + piece
        hits = [(i, w) for w in self.stops if (i := text.find(w)) >= 0]
        if hits:
            at, self.word = min(hits)
            self.held = ""
            return text[:at], True
        keep = self._partial(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out

    def _partial(self, text: str) -> int:
        """Length of the longest end of `text` that could begin a stop string."""
        best = 0
        for w in self.stops:
            for k in range(min(len(w) - 1, len(text)), best, -1):
                if text.endswith(w[:k]):
                    best = k
                    break
        return best


@dataclass
class TokenProb:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the n_probs most likely tokens and their log-probabilities


@dataclass
class Piece:
    """Text released by a generation and the sampled tokens it came from (with probabilities
    when asked for)."""
    text: str
    tokens: list[int] = field(default_factory=list)
    probs: list[TokenProb] = field(default_factory=list)


def token_probs(logits: np.ndarray, token: int, n: int) -> TokenProb:
    """Log-probability of `token` and the `n` most likely tokens under the raw logits."""
    x = logits.astype(np.float64)
    lse = float(np.log(np.exp(x - x.max()).sum()) + x.max())
    n = min(n, len(x))
    top = np.argpartition(-x, n - 1)[:n] if n > 0 else np.zeros(0, np.int64)
    top = top[np.argsort(-x[top], kind="stable")]
    return TokenProb(int(token), float(x[token] - lse), [(int(t), float(x[t] - lse)) for t in top])


@dataclass
class Bound:
    """Bounded generation: never more than `budget` cells. When the cache is full, or every
    `compress_every` generated tokens, the sequence is compressed to `target` cells with
    statistics of the last `query_buffer` generated queries (the only tokens whose queries are
    captured while generating). This replaces llama.cpp's context shift."""
    compressor: Compressor
    budget: int
    target: int
    compress_every: int | None = None
    query_buffer: int = 128


class Generation:
    """One sequence's answer in progress. begin() samples the first token from the logits of the
    prompt's last token; then, until `done`, each decode of the pending token (decode_step) is
    followed by the next sample. The last sampled token is decoded only if generation goes on,
    so the sequence holds exactly the prompt and the tokens before it."""

    def __init__(self, seq: Sequence, sampling: Sampling, *, bound: Bound | None = None,
                 capture: bool | None = None):
        self.seq, self.p, self.bound = seq, sampling, bound
        self.capture = seq.capture_generation if capture is None else capture
        ctx = seq.ctx
        self.sampler = make_sampler(sampling, ctx.n_vocab, ctx.eog_tokens() if sampling.ignore_eos else ())
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = StopFilter(sampling.stop)
        self.tokens: list[int] = []        # every token sampled
        self.pending: int | None = None     # sampled, to be decoded before the next sample
        self.done = False
        self.finish_reason = "length"
        self._held_tokens: list[int] = []
        self._held_probs: list[TokenProb] = []
        self._since = 0                     # tokens decoded since the last compression
        self._buffering = False             # the statistics hold only the current query buffer
        self._next_surprisal = math.nan

    @property
    def n(self) -> int:
        return len(self.tokens)

    @property
    def stopping_word(self) -> str:
        return self.stop.word

    def close(self) -> None:
        if self.sampler is not None:
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None

    def finish(self, reason: str) -> list[Piece]:
        """End the generation (the held-back text is released unless a stop string ended it)."""
        if self.done:
            return []
        self.done, self.finish_reason, self.pending = True, reason, None
        self.close()
        text = self.stop.flush()
        return [self._piece(text)] if text or self._held_tokens else []

    def _piece(self, text: str) -> Piece:
        piece = Piece(text, self._held_tokens, self._held_probs)
        self._held_tokens, self._held_probs = [], []
        return piece

    def begin(self) -> list[Piece]:
        """Sample the first token (the sequence's logits must be the prompt's last token's)."""
        if self.p.max_tokens == 0:
            return self.finish("length")
        return self._sample()

    def _sample(self) -> list[Piece]:
        seq, ctx = self.seq, self.seq.ctx
        row = seq.logits_row
        tok = int(llama_cpp.llama_sampler_sample(self.sampler, ctx.ctx, row))
        if ctx.is_eog(tok):
            return self.finish("stop")
        self.tokens.append(tok)
        self._held_tokens.append(tok)
        if self.p.logprobs or self.p.n_probs > 0:
            self._held_probs.append(token_probs(ctx.logits(row), tok, self.p.n_probs))
        if seq.track_surprisal:
            self._next_surprisal = seq.surprisal_of(tok)
        text, stopped = self.stop.push(self._utf8.decode(ctx.token_bytes(tok)))
        out = [self._piece(text)] if text else []
        if stopped:
            return out + self.finish("stop")
        if 0 <= self.p.max_tokens <= self.n:
            return out + self.finish("length")
        self.pending = tok
        return out

    def cancel(self) -> list[Piece]:
        return self.finish("cancelled")

    def next_part(self):
        """The decode part of the pending token, after compressing the sequence if its budget
        says so; None (and the generation finished) when the cache is full."""
        seq, b, capture = self.seq, self.bound, self.capture
        if b is not None:
            if seq.n_cells + 1 > b.budget or (b.compress_every and self._since >= b.compress_every):
                b.compressor.compress_to(seq, b.target)
                self._since, self._buffering = 0, False
            until = b.budget - seq.n_cells
            if b.compress_every:
                until = min(until, b.compress_every - self._since)
            if until <= b.query_buffer:
                if not self._buffering:
                    seq.queries.stats.reset()
                    self._buffering = True
                capture = True
        if seq.free_cells < 1:
            return None
        return seq.part([self.pending], stats_rows=int(capture), window_rows=int(capture))

    def decoded(self, row: int) -> list[Piece]:
        """After the pending token went in at batch row `row`: sample the next one."""
        self.seq.decoded([self.pending], row, self._next_surprisal)
        self._since += 1
        self.pending = None
        return self._sample()


def decode_step(ctx: Context, gens: Seq[Generation]) -> list[tuple[Generation, list[Piece]]]:
    """Decode the pending token of each of `gens` (distinct sequences) and sample the next:
    sequences of consecutive ids share a llama_decode call; each run is sampled right after its
    call, before the next one replaces the logits. Returns the pieces each generation released."""
    out: list[tuple[Generation, list[Piece]]] = []
    ready = []
    for g in gens:
        if g.done or g.pending is None:
            continue
        part = g.next_part()  # may compress g's sequence first; ids stay as they are
        if part is None:
            out.append((g, g.finish("length")))
        else:
            ready.append((g, part))
    for run in Context.runs([g.seq.seq_id for g, _ in ready]):
        for i in range(0, len(run), ctx.n_ubatch):
            chunk = [ready[j] for j in run[i:i + ctx.n_ubatch]]
            ctx.decode([p for _, p in chunk])
            for row, (g, _) in enumerate(chunk):
                out.append((g, g.decoded(row)))
    return out


def generate(ctx: Context, gens: Seq[Generation]) -> Iterator[tuple[Generation, Piece]]:
    """Run generations to the end together, yielding each released piece as it comes."""
    try:
        for g in gens:
            for piece in g.begin():
                yield g, piece
        while any(not g.done for g in gens):
            for g, pieces in decode_step(ctx, gens):
                for piece in pieces:
                    yield g, piece
    finally:
        for g in gens:
            g.finish("cancelled")
