"""Prompts and generations longer than the cache stream through a fixed number of cells."""
import numpy as np
import pytest

from llamakv import KVSession
from llamakv.cache import SeqState


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    s = KVSession.from_model(tiny_gguf, n_ctx=256, n_batch=64, recent=16)
    yield s
    s.close()


def check_cache(s: KVSession, budget: int) -> None:
    """The cells llama.cpp holds are the ones the session thinks, within the budget; sinks and the
    newest positions are there."""
    held = np.sort(SeqState.parse(s.cache.get_state()).pos)
    np.testing.assert_array_equal(held, s.positions)
    assert len(held) == s.n_cells <= budget
    assert set(range(s.n_sink)) <= set(held.tolist())
    assert set(range(s.next_pos - s.recent, s.next_pos)) <= set(held.tolist())
    assert (s.cache.pos_min(), s.cache.pos_max()) == (0, s.next_pos - 1)


def test_prompt_three_times_the_cache(tiny):
    tiny.reset()
    tokens = list(range(300, 300 + 3 * 256))
    tiny.prefill(tokens, budget=256, target=128)
    assert tiny.next_pos == len(tokens)
    assert len(tiny.reports) >= 4 and all(r.cells_after == 128 for r in tiny.reports)
    check_cache(tiny, 256)
    assert tiny.generate(max_tokens=4, budget=256, target=128)  # and decoding goes on from there


def test_streamed_prompt_guided_by_a_question(tiny):
    """prefill(question=...): every compression decodes the question after the cells and removes
    it again; with it the cache never holds more than the budget."""
    tiny.reset()
    question = list(range(1200, 1240))
    tokens = list(range(300, 300 + 3 * 256))
    tiny.prefill(tokens, budget=256, target=128, question=question)
    assert tiny.next_pos == len(tokens)
    assert len(tiny.reports) >= 4
    for r in tiny.reports:
        assert r.question_tokens == 40 and r.cells_after == 128 and r.cells_before + 40 <= 256
    check_cache(tiny, 256)
    tiny.reset()
    with pytest.raises(ValueError, match="question"):  # refused before anything is decoded
        tiny.prefill(tokens, budget=256, target=200, question=list(range(1200, 1260)))
    assert tiny.n_cells == 0


def test_sampled_statistics_exist_at_every_compression(tiny):
    """With a sample of the prompt's queries (one ubatch of 64 tokens of 768 here, the last), the
    chunk before each compression feeds the statistics too: every compression has statistics, from
    the prompt so far."""
    tiny.reset()
    tiny.stats_sample = 64
    counts = []
    compressor = tiny.compressor
    compress_to = compressor.compress_to
    compressor.compress_to = lambda seq, target, **kw: (counts.append(seq.queries.stats.count.max()),
                                                        compress_to(seq, target, **kw))[1]
    try:
        tiny.prefill(list(range(300, 300 + 3 * 256)), budget=256, target=128)
    finally:
        tiny.stats_sample = 2048
        del compressor.compress_to
    assert len(counts) == len(tiny.reports) >= 4
    assert all(c > 0 for c in counts) and counts == sorted(counts)
    assert counts[-1] < 3 * 256 / 2  # a sample: far fewer than every query


class RecordingPress:
    """Expected Attention, noting the future horizon each compression was scored for."""

    def __init__(self):
        from llamakv.scoring import ExpectedAttention

        self.inner, self.horizons = ExpectedAttention(), []
        self.name = self.inner.name

    def score(self, inputs):
        self.horizons.append((inputs.next_pos, self.inner.horizon(inputs)))
        return self.inner.score(inputs)


def test_streamed_prompt_is_scored_for_queries_to_the_end_of_the_context(tiny):
    """Compressions of a streamed prompt average RoPE over the rest of the prompt plus the model's
    training context; a compression of a prefilled cache over the press's 512 positions."""
    tiny.reset()
    press, tiny.press = tiny.press, RecordingPress()
    try:
        n = 3 * 256
        tiny.prefill(list(range(300, 300 + n)), budget=256, target=128)
        streamed = tiny.press.horizons
        assert len(streamed) == len(tiny.reports) >= 4
        assert [h for _, h in streamed] == [n - pos + tiny.n_ctx_train for pos, _ in streamed]
        tiny.compress(0.5)
        assert tiny.press.horizons[-1][1] == 512
    finally:
        tiny.press = press


def test_generation_twice_the_cache(tiny):
    tiny.reset()
    tiny.prefill(list(range(500, 600)))
    n = 0
    for _ in tiny.stream(max_tokens=520, budget=256, target=160, compress_every=None, query_buffer=32):
        n += 1
    assert tiny.next_pos > 2 * 256
    assert len(tiny.reports) >= 2
    check_cache(tiny, 256)
    # the statistics of the last compression came from the buffer of generated queries only
    assert tiny.queries.stats.count.max() <= 32 + 1


def test_generation_compresses_every_n_tokens(tiny):
    tiny.reset()
    tiny.prefill(list(range(500, 600)))
    for _ in tiny.stream(max_tokens=120, budget=256, target=100, compress_every=50, query_buffer=16):
        pass
    assert len(tiny.reports) == 2  # after 50 and 100 generated tokens
    check_cache(tiny, 256)


def test_bad_budgets(tiny):
    tiny.reset()
    with pytest.raises(ValueError, match="budget"):
        tiny.prefill([1, 2, 3], budget=257)
    with pytest.raises(ValueError, match="target"):
        tiny.prefill([1, 2, 3], budget=256, target=256)
    with pytest.raises(ValueError, match="target"):
        tiny.prefill([1, 2, 3], budget=256, target=10)


def test_state_saved_midway_loads_and_continues(tiny, tiny_gguf, tmp_path):
    first, second = list(range(300, 700)), list(range(700, 1000))
    tiny.reset()
    tiny.prefill(first, budget=256, target=128)
    tiny.save(tmp_path / "mid.npz")
    tiny.prefill(second, budget=256, target=128)
    positions = tiny.positions
    expected = tiny.generate(max_tokens=12)

    other = KVSession.from_model(tiny_gguf, n_ctx=256, n_batch=64, recent=16)
    other.load(tmp_path / "mid.npz")
    other.prefill(second, budget=256, target=128)
    np.testing.assert_array_equal(other.positions, positions)  # the same cells were kept
    assert other.generate(max_tokens=12) == expected
    check_cache(other, 256)
    other.close()


@pytest.mark.slow
def test_needle_in_a_prompt_three_times_the_cache(session):
    """SmolLM2, a needle in the first third of a prompt three times as long as the budget. (With RoPE
    averaged over the next 512 positions only, recent cells won every compression and the answer
    lost digits: 48172 for 4817263.)"""
    from conftest import needle_prompt

    session.reset()
    context, question, answer = needle_prompt(n_repeats=45, at=5)
    full = session.chat_prompt([{"role": "user", "content": context + "\n\n\x00"}])
    before, after = full.split("\x00")
    tokens = session.tokenize(before)
    budget = len(tokens) // 3
    session.prefill(tokens, budget=budget, target=budget // 2)
    assert session.n_cells <= budget and len(session.reports) >= 3
    assert answer in session.generate(question + after, max_tokens=32)
