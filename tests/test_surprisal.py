"""The prompt's surprisal, tracked per cell for the presses that read it: equal to what llama.cpp's
own logits say, kept with its cells through compression, snapshots and saved states."""
import numpy as np
import pytest

from llamakv.eval import run, tasks
from llamakv.models import load_llama
from llamakv.scoring import ExpectedAttentionKeyDiff, make_press, sentence_surprisal
from conftest import needle_prompt, needs_data


@pytest.fixture()
def tracking(session):
    """The shared SmolLM2 session, emptied, with surprisal tracked; put back afterwards."""
    session.reset()
    session.track_surprisal = True
    yield session
    session.track_surprisal = None  # as its press says again
    session.reset()


def reference_surprisal(model_path: str, tokens: list[int]) -> np.ndarray:
    """−log p of tokens 1.. from llama-cpp-python's logits of every token (logits_all), in numpy."""
    llama = load_llama(model_path, n_ctx=1024, logits_all=True, n_threads=2, n_batch=256, verbose=False)
    llama.eval(tokens)
    logits = np.asarray(llama.scores[:len(tokens)], dtype=np.float64)
    top = logits.max(axis=1)
    lse = np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top
    return lse[:-1] - logits[np.arange(len(tokens) - 1), tokens[1:]]


def test_surprisal_equals_llama_cpp_logits_across_ubatches_and_calls(tracking):
    context, _, _ = needle_prompt(n_repeats=40, at=20)
    tokens = tracking.tokenize(context)
    assert len(tokens) > tracking.n_ubatch + 100  # the first call spans two ubatches
    split = tracking.n_ubatch + 50
    tracking.prefill(tokens[:split])
    tracking.prefill(tokens[split:])  # its first token: from the first call's last logits
    got = tracking.score_inputs().surprisal
    assert np.isnan(got[0])  # nothing predicted the first token
    np.testing.assert_allclose(got[1:], reference_surprisal(tracking.llama.model_path, tokens), atol=2e-3)


def test_untracked_surprisal_is_unknown_and_the_press_falls_back(session):
    session.reset()
    session.track_surprisal = False
    context, _, _ = needle_prompt(n_repeats=12, at=3)
    session.prefill(context)
    inputs = session.score_inputs()
    session.track_surprisal = None
    assert np.isnan(inputs.surprisal).all()
    np.testing.assert_array_equal(ExpectedAttentionKeyDiff(surprising_share=0.2).score(inputs),
                                  ExpectedAttentionKeyDiff(surprising_share=0).score(inputs))


def test_surprisal_stays_with_its_cells_through_compression_and_state(tracking, tmp_path):
    context, _, _ = needle_prompt(n_repeats=30, at=10)
    tracking.prefill(context)
    before = tracking.score_inputs()
    by_pos = dict(zip(before.pos.tolist(), before.surprisal.tolist()))
    ends = dict(zip(before.pos.tolist(), before.sentence_end.tolist()))
    tracking.compress(0.5, press=make_press("ea_keydiff:surprising_share=0.2"))
    tracking.compress(0.3)
    after = tracking.score_inputs()
    assert len(after.pos) < len(before.pos) // 2
    np.testing.assert_array_equal(after.surprisal, [by_pos[p] for p in after.pos.tolist()])
    np.testing.assert_array_equal(after.sentence_end, [ends[p] for p in after.pos.tolist()])
    path = tmp_path / "state.npz"
    tracking.save(path)
    tracking.reset()
    tracking.load(path)
    loaded = tracking.score_inputs()
    np.testing.assert_array_equal(loaded.pos, after.pos)
    np.testing.assert_array_equal(loaded.surprisal, after.surprisal)
    np.testing.assert_array_equal(loaded.sentence_end, after.sentence_end)


def test_sentence_surprisal_equals_a_loop_over_sentences():
    rng = np.random.default_rng(3)
    n = 200
    surprisal = rng.exponential(2.0, n).astype(np.float32)
    surprisal[rng.random(n) < 0.1] = np.nan
    ends = rng.random(n) < 0.15
    ends[40:60] = False
    surprisal[40:60] = np.nan  # one sentence of unknown surprisal only
    expected, start = np.empty(n), 0
    for i in range(n):
        if ends[i] or i == n - 1:
            known = surprisal[start:i + 1][np.isfinite(surprisal[start:i + 1])]
            expected[start:i + 1] = known.mean() if len(known) else np.nan
            start = i + 1
    perm = rng.permutation(n)  # cells come in the cache's order, not by position
    got = sentence_surprisal(np.arange(n)[perm], surprisal[perm], ends[perm])
    np.testing.assert_allclose(got, expected[perm], rtol=1e-6)


def test_surprising_sentences_score_at_least_their_rank(tracking):
    context, _, _ = needle_prompt(n_repeats=25, at=10)
    tracking.prefill(context)
    inputs = tracking.score_inputs()
    base = ExpectedAttentionKeyDiff(surprising_share=0).score(inputs)
    finite = np.isfinite(base)
    n = int(finite.sum())

    def percentile(x):  # argsort of argsort: the rank of each entry
        return (np.argsort(np.argsort(x, kind="stable"), kind="stable") + 1) / n

    sentence = percentile(sentence_surprisal(inputs.pos, inputs.surprisal, inputs.sentence_end)[finite])
    for share in (0.1, 0.3):
        got = ExpectedAttentionKeyDiff(surprising_share=share).score(inputs)
        assert np.isinf(got[~finite]).all()
        lifted = sentence >= 1 - share
        assert 0 < lifted.sum() <= share * n + 1
        np.testing.assert_allclose(got[finite], np.where(lifted, np.maximum(percentile(base[finite]), sentence),
                                                         percentile(base[finite])), atol=1e-6)


@needs_data
def test_surprising_sentence_is_kept_whole(tracking):
    """A prose needle (an essay's one off-topic sentence, RULER's niah_single_2) at 2x compression:
    lifting the most surprising sentences keeps all of it; Expected Attention and KeyDiff alone keep
    its digits and drop words around them (then the model answers wrongly)."""
    sample = tasks.generate_sample("niah_single_2", 0, 1500, run.token_counter(tracking), seed=2, depth=50)
    tokens, _ = run.encode(tracking, sample)
    tracking.prefill(tokens)
    snap = tracking.snapshot()
    pieces = [tracking.token_bytes(t) for t in tokens]
    text, offsets = b"".join(pieces), np.cumsum([0] + [len(p) for p in pieces])
    answer = sample.outputs[0].encode()
    start, end = text.find(b" One of the special magic"), text.find(answer) + len(answer) + 1
    needle = np.flatnonzero((offsets[:-1] >= start) & (offsets[1:] <= end))
    assert len(needle) > 15
    tracking.compress(0.5, press=make_press("ea_keydiff:surprising_share=0.1"))
    assert np.isin(needle, tracking.positions).all()
    tracking.restore(snap)
    tracking.compress(0.5, press=make_press("ea_keydiff:surprising_share=0"))
    assert not np.isin(needle, tracking.positions).all()
