"""Several sequences in one llama.cpp context (real SmolLM2, CPU): batched decoding gives each
sequence its own answer and its own captured queries, and compressing one leaves the others'
cells untouched."""
from __future__ import annotations

import numpy as np
import pytest

from llamakv.compressor import Compressor
from llamakv.context import Context, open_llama
from llamakv.generation import Generation, Sampling, StopFilter, decode_step
from llamakv.sequence import Sequence
from conftest import needle_prompt

PROMPTS = ["Write one sentence about the sea.", "List three fruits:", "The first five prime numbers are"]


@pytest.fixture(scope="module")
def multi():
    llama = open_llama(None, n_ctx=3 * 1024, n_threads=2)
    ctx = Context(llama, n_seq=3)
    seqs = [Sequence(ctx, i) for i in range(3)]
    yield ctx, seqs
    ctx.close()


def run_together(ctx, seqs, prompts, max_tokens):
    """Prefill each sequence (its first token sampled right after its prompt), then decode all
    together until done."""
    gens = []
    texts = [[] for _ in seqs]
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        s.reset()
        s.decode(s.tokenize(p))
        g = Generation(s, Sampling(max_tokens=max_tokens))
        texts[i] += [piece.text for piece in g.begin()]
        gens.append(g)
    calls = ctx.epoch
    while any(not g.done for g in gens):
        for g, pieces in decode_step(ctx, gens):
            texts[gens.index(g)] += [p.text for p in pieces]
    return ["".join(t) for t in texts], ctx.epoch - calls


def test_batched_generation_equals_each_sequence_alone(multi, session):
    ctx, seqs = multi
    alone = []
    for p in PROMPTS:
        session.reset()
        alone.append(session.generate(p, max_tokens=16))
    together, calls = run_together(ctx, seqs, PROMPTS, 16)
    assert together == alone
    assert len(set(together)) == 3
    assert calls <= 16  # one llama_decode per step for the three sequences (ids 0, 1, 2)


def test_captured_rows_go_to_their_own_sequence(multi, session):
    """Two sequences' tokens in one decode call, both captured: each sequence's statistics and
    recent queries are those of its own tokens decoded alone."""
    ctx, seqs = multi
    a, b = seqs[0], seqs[1]
    prompts = [a.tokenize("The quick brown fox jumps over the lazy dog."), a.tokenize("Rain falls on the hills.")]
    extra = [[3400, 2311, 1715, 288], [1085, 4287, 355, 1206]]
    for s, p in zip((a, b), prompts):
        s.reset()
        s.decode(p, capture=False)
    ctx.decode([a.part(extra[0], stats_rows=4, window_rows=4), b.part(extra[1], stats_rows=4, window_rows=4)])
    for row, (s, x) in enumerate(zip((a, b), extra)):
        s.decoded(x, 4 * row)
    for s, p, x in zip((a, b), prompts, extra):
        session.reset()
        session.seq.decode(p, capture=False)
        session.seq.decode(x, stats_last=True)
        ref, got = session.queries, s.queries
        np.testing.assert_array_equal(got.stats.count, ref.stats.count)
        np.testing.assert_allclose(got.stats.mean, ref.stats.mean, rtol=1e-3, atol=1e-4)
        q_ref, pos_ref = ref.recent_queries()
        q_got, pos_got = got.recent_queries()
        np.testing.assert_array_equal(pos_got, pos_ref)
        np.testing.assert_allclose(q_got, q_ref, rtol=1e-3, atol=1e-3)
    assert not np.allclose(a.queries.stats.mean, b.queries.stats.mean, atol=1e-3)


def test_compressing_one_sequence_leaves_the_others_untouched(multi):
    ctx, seqs = multi
    doc, _, _ = needle_prompt(n_repeats=12, at=5)
    for s in seqs:
        s.reset()
        s.decode(s.tokenize(doc))
    before = [s.cache.get_state().copy() for s in seqs]
    n = seqs[1].n_cells
    report = Compressor().compress(seqs[1], 0.5)
    assert report.evicted > 0.45 * n and seqs[1].n_cells == n - report.evicted
    after = [s.cache.get_state() for s in seqs]
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[2], before[2])
    assert len(after[1]) < 0.6 * len(before[1])
    for s in (seqs[0], seqs[2]):
        assert (s.cache.pos_min(), s.cache.pos_max(), s.n_cells) == (0, n - 1, n)


def test_a_state_moves_between_contexts_of_different_sizes(multi, session):
    """A one-sequence session's compressed state restored into sequence 2 of a three-sequence
    context (and back) continues as it would have."""
    ctx, seqs = multi
    doc, question, _ = needle_prompt(n_repeats=10, at=4)
    session.reset()
    session.prefill(doc)
    session.compress(0.5)
    snap = session.snapshot()
    expected = session.generate(" " + question, max_tokens=12)
    s2 = seqs[2]
    s2.reset()
    s2.restore(snap)
    assert (s2.n_cells, s2.next_pos) == (snap.n_cells, snap.next_pos)
    s2.decode(s2.ctx.tokenize(" " + question, add_bos=False))
    g = Generation(s2, Sampling(max_tokens=12))
    text = [p.text for p in g.begin()]
    while not g.done:
        for _, pieces in decode_step(ctx, [g]):
            text += [p.text for p in pieces]
    assert "".join(text) == expected
    session.reset()
    s2.drop_from(snap.next_pos)
    session.restore(s2.snapshot())  # and back into a one-stream context
    assert session.generate(" " + question, max_tokens=12) == expected


def test_decode_refuses_batches_llama_cpp_would_reorder(multi):
    ctx, seqs = multi
    for s in seqs:
        s.reset()
    with pytest.raises(ValueError, match="consecutive"):
        ctx.decode([seqs[0].part([1]), seqs[2].part([1])])
    with pytest.raises(ValueError, match="same number"):
        ctx.decode([seqs[0].part([1, 2]), seqs[1].part([1])])
    assert Context.runs([3, 0, 1, 4, 7]) == [[1, 2], [0, 3], [4]]


def test_stop_filter_holds_back_a_split_stop_string():
    f = StopFilter(["END"])
    assert [f.push(p) for p in ("The story E", "N", "Ding")] == [("The story ", False), ("", False), ("", True)]
    assert f.word == "END"
    f = StopFilter(["END"])
    assert f.push("abc E") == ("abc ", False) and f.push("x") == ("Ex", False) and f.flush() == ""
    f = StopFilter(["END"])
    assert f.push("abc EN") == ("abc ", False) and f.flush() == "EN"  # released when generation ends


def test_a_stop_string_spanning_two_pieces_is_not_leaked(session):
    """The session's stream holds back the start of a stop string until it is known."""
    prompt = session.chat_prompt([{"role": "user", "content": "Write a short sentence about a cat."}])
    session.reset()
    pieces = list(session.stream(prompt, max_tokens=24))
    text = "".join(pieces)
    k = next(i for i in range(1, len(pieces)) if len(pieces[i - 1].strip()) >= 2 and len(pieces[i].strip()) >= 2)
    at = len("".join(pieces[:k]))
    stop = text[at - 2:at + 2]  # the end of piece k-1 and the start of piece k
    first = text.find(stop)
    session.reset()
    got = list(session.stream(prompt, max_tokens=24, stop=[stop]))
    assert "".join(got) == text[:first]


def test_the_session_samples_with_grammar_bias_and_penalties(session):
    """The one sampler chain behind the API: a grammar constrains, a banned token never comes,
    a repeat penalty changes a repetitive greedy answer."""
    prompt = session.chat_prompt([{"role": "user", "content": "Is the sky blue? Answer yes or no."}])
    session.reset()
    got = session.generate(prompt, max_tokens=6, grammar='root ::= ("maybe" | "never") "!"')
    assert got in ("maybe!", "never!")
    loop = "the cat the cat the cat the cat the cat the cat"
    session.reset()
    plain = session.generate(loop, max_tokens=16)
    first = session.context.tokenize(plain, add_bos=False)[0]
    session.reset()
    banned = session.generate(loop, max_tokens=16, logit_bias=[(first, float("-inf"))])
    assert first not in session.context.tokenize(banned, add_bos=False)
    session.reset()
    assert session.generate(loop, max_tokens=16, repeat_penalty=1.8) != plain
