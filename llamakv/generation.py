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
import ctypes
import json
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
    """What to sample and when to stop, with llama.cpp's samplers and their defaults (as
    llama-server's fields). `max_tokens` < 0: until end of generation or a full cache.
    `logprobs`: report each sampled token's log-probability, with the `n_probs` most likely tokens
    and theirs (under the model's distribution, before the samplers). `grammar`: GBNF text the
    answer must match (llama.cpp's grammar sampler); `logit_bias`: (token, bias) pairs, -inf bans."""
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
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    min_keep: int = 0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: Seq[str] = ("\n", ":", "\"", "*")
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    logit_bias: Seq[tuple[int, float]] = ()
    grammar: str = ""

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that could change the argmax: llama.cpp's greedy sampler alone."""
        return (self.temperature <= 0 and self.mirostat == 0 and self.repeat_penalty == 1.0
                and self.presence_penalty == 0 and self.frequency_penalty == 0 and self.dry_multiplier <= 0
                and self.xtc_probability <= 0 and self.top_n_sigma <= 0)


class Sampler:
    """A llama.cpp sampler chain built from `Sampling` in llama.cpp's order (common_sampler_init:
    logit bias, penalties, DRY, top-n-sigma, top-k, typical, top-p, min-p, XTC, temperature, then
    a seeded draw, or mirostat), and the grammar apart from it: prompt tokens feed the chain's
    penalties (as llama-server does), only generated tokens the grammar."""

    def __init__(self, p: Sampling, ctx: Context, banned: Seq[int] = ()):
        self.n_vocab = ctx.n_vocab
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self.grammar = None
        self._keep: list = []  # ctypes buffers the samplers point into
        add = lambda smp: llama_cpp.llama_sampler_chain_add(self.chain, smp)  # noqa: E731
        bias = [(int(t), float(b)) for t, b in p.logit_bias] + [(int(t), -math.inf) for t in banned]
        if bias:
            arr = (llama_cpp.llama_logit_bias * len(bias))(*[llama_cpp.llama_logit_bias(t, b) for t, b in bias])
            self._keep.append(arr)
            add(llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(bias), arr))
        if p.grammar:
            self.grammar = llama_cpp.llama_sampler_init_grammar(ctx.vocab, p.grammar.encode(), b"root")
            if not self.grammar:
                self.close()
                raise ValueError("llama.cpp could not parse the grammar")
        if p.plain_greedy:
            add(llama_cpp.llama_sampler_init_greedy())
        elif p.mirostat == 0:
            self._chain(p, ctx, add)
        else:
            add(llama_cpp.llama_sampler_init_temp(p.temperature))
            if p.mirostat == 1:
                add(llama_cpp.llama_sampler_init_mirostat(self.n_vocab, p.seed, p.mirostat_tau, p.mirostat_eta, 100))
            else:
                add(llama_cpp.llama_sampler_init_mirostat_v2(p.seed, p.mirostat_tau, p.mirostat_eta))

    def _chain(self, p: Sampling, ctx: Context, add) -> None:
        add(llama_cpp.llama_sampler_init_penalties(self.n_vocab, p.repeat_last_n, p.repeat_penalty,
                                                   p.frequency_penalty, p.presence_penalty))
        if p.dry_multiplier > 0:
            breakers = [b.encode() for b in p.dry_sequence_breakers]
            c_breakers = (ctypes.c_char_p * len(breakers))(*breakers)
            self._keep += [breakers, c_breakers]
            last_n = p.dry_penalty_last_n if p.dry_penalty_last_n >= 0 else ctx.n_ctx_seq
            add(llama_cpp.llama_sampler_init_dry(ctx.vocab, p.dry_multiplier, p.dry_base, p.dry_allowed_length,
                                                 last_n, c_breakers, len(breakers)))
        if p.top_n_sigma > 0:
            add(llama_cpp.llama_sampler_init_top_n_sigma(p.top_n_sigma))
        if p.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(p.top_k))
        add(llama_cpp.llama_sampler_init_typical(p.typical_p, p.min_keep))
        add(llama_cpp.llama_sampler_init_top_p(p.top_p, p.min_keep))
        if p.min_p > 0:
            add(llama_cpp.llama_sampler_init_min_p(p.min_p, p.min_keep))
        if p.xtc_probability > 0:
            add(llama_cpp.llama_sampler_init_xtc(p.xtc_probability, p.xtc_threshold, p.min_keep, p.seed))
        add(llama_cpp.llama_sampler_init_temp(p.temperature))
        add(llama_cpp.llama_sampler_init_dist(p.seed))

    def accept_prompt(self, tokens: Seq[int]) -> None:
        """The prompt's tokens, for the penalties (not the grammar)."""
        for t in tokens:
            llama_cpp.llama_sampler_accept(self.chain, int(t))

    def sample(self, ctx: Context, row: int) -> int:
        if self.grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.chain, ctx.ctx, row))
        cand = np.empty(self.n_vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        cand["id"] = np.arange(self.n_vocab, dtype=np.int32)
        cand["logit"] = ctx.logits(row)
        cand["p"] = 0
        arr = llama_cpp.llama_token_data_array(
            data=cand.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), size=self.n_vocab,
            selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise RuntimeError("the sampler chain selected no token")
        tok = int(cand["id"][arr.selected])
        llama_cpp.llama_sampler_accept(self.grammar, tok)
        llama_cpp.llama_sampler_accept(self.chain, tok)
        return tok

    def close(self) -> None:
        for smp in (self.chain, self.grammar):
            if smp:
                llama_cpp.llama_sampler_free(smp)
        self.chain = self.grammar = None


def json_grammar(schema: dict | None = None) -> str:
    """GBNF for any JSON value, or for JSON valid against `schema` (llama.cpp's converter, as
    llama-cpp-python ships it)."""
    from llama_cpp import llama_grammar

    if schema is None:
        return llama_grammar.JSON_GBNF
    return llama_grammar.json_schema_to_gbnf(json.dumps(schema))


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
    """One sequence's answer in progress (`prompt`: its prompt's tokens, for the penalties).
    begin() samples the first token from the logits of the prompt's last token (call it before
    another sequence decodes); then, until `done`, each decode of the pending token (decode_step)
    is followed by the next sample. The last sampled token is decoded only if generation goes on,
    so the sequence holds exactly the prompt and the tokens before it."""

    def __init__(self, seq: Sequence, sampling: Sampling, *, bound: Bound | None = None,
                 capture: bool | None = None, prompt: Seq[int] = ()):
        self.seq, self.p, self.bound = seq, sampling, bound
        self.capture = seq.capture_generation if capture is None else capture
        ctx = seq.ctx
        self.sampler = Sampler(sampling, ctx, ctx.eog_tokens() if sampling.ignore_eos else ())
        if not sampling.plain_greedy:  # the penalties see the end of the prompt, as in llama-server
            last = max(sampling.repeat_last_n, 0)
            if sampling.dry_multiplier > 0:
                last = max(last, sampling.dry_penalty_last_n if sampling.dry_penalty_last_n >= 0 else len(prompt))
            self.sampler.accept_prompt(list(prompt)[len(prompt) - min(last, len(prompt)):])
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
        self.started = False

    @property
    def n(self) -> int:
        return len(self.tokens)

    @property
    def stopping_word(self) -> str:
        return self.stop.word

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
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
        self.started = True
        if self.p.max_tokens == 0:
            return self.finish("length")
        return self._sample()

    def _sample(self) -> list[Piece]:
        seq, ctx = self.seq, self.seq.ctx
        row = seq.logits_row
        tok = self.sampler.sample(ctx, row)
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
    """Run generations to the end together, yielding each released piece as it comes. Those not
    begun yet are begun first: with several, begin each right after its prompt instead (the
    next sequence's prefill replaces the logits)."""
    try:
        for g in gens:
            if g.started:
                continue
            for piece in g.begin():
                yield g, piece
        while any(not g.done for g in gens):
            for g, pieces in decode_step(ctx, gens):
                for piece in pieces:
                    yield g, piece
    finally:
        for g in gens:
            g.finish("cancelled")
