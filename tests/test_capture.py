"""The callback captures the right queries (statistics, recent window, RoPE), and the keys and values
read from the cache state are llama.cpp's."""
import numpy as np
import pytest

LAYER = 7


def probe_per_decode(session, name, op, tokens, chunk):
    """Prefill tokens in calls of `chunk` tokens, collecting the probed tensor of each call."""
    session.capture.set_probe(name, session.capture.shim.op_code(op), 512 * 16 * 64)
    out = []
    for i in range(0, len(tokens), chunk):
        session.prefill(tokens[i:i + chunk])
        out.append(session.capture.probe_result())
    return np.concatenate(out)


@pytest.fixture()
def text_tokens(fresh_any):
    return fresh_any.tokenize("Compression of key-value caches lets long prompts fit in memory. " * 12)


def test_rope_of_captured_query_reproduces_llama_cpp(fresh_any, text_tokens):
    pre = probe_per_decode(fresh_any, f"Qcur-{LAYER}", "RESHAPE", text_tokens, 64)
    fresh_any.reset()
    post = probe_per_decode(fresh_any, f"Qcur-{LAYER}", "ROPE", text_tokens, 64)
    assert pre.shape == post.shape == (len(text_tokens), fresh_any.n_head, fresh_any.head_dim)
    rope = fresh_any.capture.rope(LAYER)
    assert rope.mode == {"llama": 0, "qwen2": 2}[fresh_any.architecture]  # NORM vs NEOX pairs
    rotated = rope.rotate(pre, np.arange(len(text_tokens)))
    assert np.abs(rotated - post).max() <= 1e-4 * np.abs(post).max() + 1e-5
    # and the rotation is not trivial: without it, the tensors differ
    assert np.abs(pre - post).max() > 0.1 * np.abs(post).max()


def test_keys_read_from_the_cache_are_llama_cpp_keys_after_rope(fresh_any, text_tokens):
    pre = probe_per_decode(fresh_any, f"Kcur-{LAYER}", "RESHAPE", text_tokens, 100)
    n = len(text_tokens)
    inputs = fresh_any.score_inputs()
    np.testing.assert_array_equal(inputs.pos, np.arange(n))
    expected = fresh_any.capture.rope(LAYER).rotate(pre, np.arange(n))
    stored = inputs.layer_keys(LAYER).astype(np.float64)  # fp16 in the cache
    assert np.abs(stored - expected).max() <= 2e-3 * np.abs(expected).max()
    assert np.abs(stored - pre).max() > 0.1 * np.abs(expected).max()  # RoPE was applied


def test_value_norms_read_from_the_cache(fresh_any, text_tokens):
    v = probe_per_decode(fresh_any, f"Vcur-{LAYER}", "RESHAPE", text_tokens, 100)
    np.testing.assert_allclose(fresh_any.score_inputs().vnorm[:, LAYER], np.linalg.norm(v, axis=-1), rtol=2e-3)


def test_window_holds_the_most_recent_queries(fresh_any, text_tokens):
    q = probe_per_decode(fresh_any, f"Qcur-{LAYER}", "RESHAPE", text_tokens, 50)
    window, pos = fresh_any.queries.recent_queries()
    w = fresh_any.queries.window_cap
    assert window.shape[1] == len(pos) == w
    np.testing.assert_array_equal(pos, np.arange(len(text_tokens) - w, len(text_tokens)))
    np.testing.assert_array_equal(window[LAYER], q[-w:])
    fresh_any.prefill(text_tokens[:3])  # one more decode call: the ring moves by 3
    window, pos = fresh_any.queries.recent_queries()
    assert pos[-1] == len(text_tokens) + 2 and pos[0] == len(text_tokens) + 3 - w
    np.testing.assert_array_equal(window[LAYER, :-3], q[-w + 3:])


def test_statistics_equal_numpy_over_several_decode_calls(fresh_any, text_tokens):
    q = probe_per_decode(fresh_any, f"Qcur-{LAYER}", "RESHAPE", text_tokens, 37).astype(np.float64)
    stats = fresh_any.queries.stats
    rows = q[fresh_any.n_sink:]  # sinks are left out
    assert stats.count[LAYER] == len(rows)
    np.testing.assert_allclose(stats.mean[LAYER], rows.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.variance()[LAYER], rows.var(axis=0), rtol=1e-9, atol=1e-9)


def test_statistics_from_an_even_sample_of_a_long_prompt(fresh_any, text_tokens):
    """stats_sample: whole ubatches spread over the prompt (or its last stats_window tokens), the
    last one included; never a part of a ubatch."""
    tokens = (text_tokens * 10)[:1300]  # ubatches 0..511, 512..1023, 1024..1299
    q = probe_per_decode(fresh_any, f"Qcur-{LAYER}", "RESHAPE", tokens, 200).astype(np.float64)
    fresh_any.capture.clear_probe()
    assert fresh_any.n_ubatch == 512 and len(q) == 1300
    # 600 of 1300: two ubatches, those holding tokens 1299 and 1299 - 650
    # 300 of the last 700: the ubatch of token 1299, every query of it (all are in the window)
    for sample, window, rows in ((600, None, q[512:]), (300, 700, q[1024:])):
        fresh_any.reset()
        fresh_any.stats_sample, fresh_any.stats_window = sample, window
        try:
            fresh_any.prefill(tokens)
        finally:
            fresh_any.stats_sample, fresh_any.stats_window = 2048, None
        stats = fresh_any.queries.stats
        assert stats.count[LAYER] == len(rows)
        np.testing.assert_allclose(stats.mean[LAYER], rows.mean(axis=0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(stats.variance()[LAYER], rows.var(axis=0), rtol=1e-7, atol=1e-9)


def test_statistics_from_the_last_tokens_of_a_prefill(fresh_any, text_tokens):
    tokens = (text_tokens * 4)[:600]  # two ubatches of one decode call
    q = probe_per_decode(fresh_any, f"Qcur-{LAYER}", "RESHAPE", tokens, 100).astype(np.float64)
    fresh_any.capture.clear_probe()
    fresh_any.reset()
    fresh_any.stats_window = 30
    observed = fresh_any.capture.n_observed
    try:
        fresh_any.prefill(tokens)
    finally:
        fresh_any.stats_window = None
    assert fresh_any.context.switch.switchable  # llama.cpp as expected: the callback can be switched off
    # the callback ran for the last ubatch only (window and statistics), once per layer
    assert fresh_any.capture.n_observed - observed == fresh_any.n_layer
    stats = fresh_any.queries.stats
    assert stats.count[LAYER] == 30
    np.testing.assert_allclose(stats.mean[LAYER], q[-30:].mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.variance()[LAYER], q[-30:].var(axis=0), rtol=1e-7, atol=1e-9)


def test_capture_switches_off_and_resets(fresh_any, text_tokens):
    observed = fresh_any.capture.n_observed
    fresh_any.capture.enabled = False
    try:
        fresh_any.prefill(text_tokens[:50])
    finally:
        fresh_any.capture.enabled = True
    assert fresh_any.capture.n_observed == observed
    assert fresh_any.queries.stats.count.sum() == 0 and fresh_any.queries.window_len == 0
    fresh_any.prefill(text_tokens[50:100])
    assert (fresh_any.queries.stats.count == 50).all()
    assert fresh_any.n_cells == 100
    fresh_any.queries.reset()
    assert fresh_any.queries.stats.count.sum() == 0 and fresh_any.queries.window_len == 0


def test_full_covariance_matches_numpy(tiny_gguf):
    from llamakv import KVSession

    s = KVSession.from_model(tiny_gguf, n_ctx=512, full_covariance=True)
    toks = s.tokenize("A short prompt for the full covariance of queries. " * 6)
    q = probe_per_decode(s, "Qcur-1", "RESHAPE", toks, 16).astype(np.float64)[s.n_sink:]
    centered = q - q.mean(axis=0)
    cov = np.einsum("thi,thj->hij", centered, centered) / len(q)
    np.testing.assert_allclose(s.queries.stats.covariance()[1], cov, rtol=1e-8, atol=1e-10)
