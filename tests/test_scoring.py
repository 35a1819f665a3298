"""Expected Attention scores against an independent numpy implementation and Monte Carlo."""
import math

import numpy as np
import pytest

from llamakv.rope import RopeParams
from llamakv.scoring import (PRESSES, TOVA, ExpectedAttention, ExpectedAttentionKeyDiff, KeyDiff, KNorm,
                             QuestionAware, ScoreInputs, SnapKV, aggregate, make_press)
from llamakv.stats import QueryStats
from conftest import needle_prompt


@pytest.fixture(scope="module", params=["session", "qwen_session"], ids=["llama", "qwen2"])
def prefilled(request):
    session = request.getfixturevalue(request.param)
    session.reset()
    context, _, _ = needle_prompt(n_repeats=25, at=10)
    session.prefill(context)
    return session


def rotation_matrix(rope, position, d):
    """The d x d RoPE matrix of one position, built element by element."""
    cos, sin = rope.cos_sin([position])
    a, b = rope.pair_dims()
    R = np.eye(d)
    for j in range(len(a)):
        R[a[j], a[j]] = cos[0, j]
        R[a[j], b[j]] = -sin[0, j]
        R[b[j], a[j]] = sin[0, j]
        R[b[j], b[j]] = cos[0, j]
    return R


def dense_reference(keys, vnorm, mask, mean, var, rope, next_pos, n_future, eps):
    """Expected Attention written from the formula with dense matrices, for one layer: keys
    [n, Hk, d] after RoPE, value norms [n, Hk], query mean and variance [H, d]."""
    d, H, Hk = keys.shape[-1], mean.shape[0], keys.shape[1]
    R_bar = sum(rotation_matrix(rope, t, d) for t in range(next_pos, next_pos + n_future)) / n_future
    a = np.zeros((H, mask.sum()))
    for h in range(H):
        mu_p = R_bar @ mean[h]
        sigma_p = R_bar @ np.diag(var[h]) @ R_bar.T
        k = keys[mask, h // (H // Hk)].astype(np.float64)
        z = k @ mu_p / math.sqrt(d) + np.einsum("nd,de,ne->n", k, sigma_p, k) / (2 * d)
        z -= z.max()
        a[h] = np.exp(z) / np.exp(z).sum()
    a = a.reshape(Hk, H // Hk, -1).mean(axis=1)
    return (a + eps) * vnorm[mask].T


def reference_scores(session, layer, n_future, eps):
    inputs = session.score_inputs()
    return dense_reference(inputs.keys[:, layer], inputs.vnorm[:, layer], inputs.pos >= session.n_sink,
                           session.queries.stats.mean[layer], session.queries.stats.variance()[layer],
                           session.capture.rope(layer), session.next_pos, n_future, eps)


@pytest.mark.parametrize("mode", [0, 2], ids=["norm", "neox"])
@pytest.mark.parametrize("group", [4, 3])
@pytest.mark.parametrize("rotated", [32, 16], ids=["all", "half"])  # the kernel with features in registers; the general one
def test_scores_of_synthetic_keys_equal_numpy_reference(mode, group, rotated):
    """Shapes the real test models do not have (their GQA groups are 3 and 7; partial rotation), an odd cell count."""
    rng = np.random.default_rng(mode + group)
    n, n_layer, n_head_kv, d = 203, 2, 2, 32
    stats = QueryStats(n_layer, n_head_kv * group, d)
    stats.count[:] = 50
    stats.mean[:] = rng.standard_normal(stats.mean.shape)
    stats.m2[:] = rng.random(stats.m2.shape) * 100
    rope = RopeParams(n_dims=rotated, mode=mode, n_ctx_orig=4096, freq_base=1e4, freq_scale=1.0, ext_factor=0.0,
                      attn_factor=1.0, beta_fast=32.0, beta_slow=1.0)
    keys = rng.standard_normal((n, n_layer, n_head_kv, d)).astype(np.float32)
    vnorm = rng.random((n, n_layer, n_head_kv)).astype(np.float32) + 0.5
    inputs = ScoreInputs.from_arrays(keys, vnorm, np.arange(n), stats=stats, rope=lambda layer: rope, next_pos=n,
                                     n_head=n_head_kv * group, n_sink=4)
    ours = ExpectedAttention(n_future_positions=64, epsilon=0.01).score(inputs)
    mask = np.arange(n) >= 4
    for layer in range(n_layer):
        ref = dense_reference(keys[:, layer], vnorm[:, layer], mask, stats.mean[layer], stats.variance()[layer],
                              rope, n, 64, 0.01)
        np.testing.assert_allclose(ours[layer][:, mask], ref, rtol=1e-4)
    assert np.isinf(ours[:, :, ~mask]).all()

    # KeyDiff from the same pass over the keys: anchor from every scored cell, or every 4th from the 2nd
    unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    for sample, sampled in ((0, mask), (n // 4, mask & (np.arange(n) % 4 == 2))):
        sums = np.empty((n_layer, n), np.float32)
        again = ExpectedAttention(n_future_positions=64, epsilon=0.01).score(inputs, sums, sample)
        np.testing.assert_array_equal(again, ours)
        anchor = unit[sampled].mean(axis=0)
        anchor /= np.linalg.norm(anchor, axis=-1, keepdims=True)  # [n_layer, n_head_kv, d]
        ref = -np.einsum("nlhd,lhd->ln", unit, anchor)
        np.testing.assert_allclose(sums, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_scores_equal_numpy_reference(prefilled, where):
    layer = round(where * (prefilled.n_layer - 1))
    press = ExpectedAttention(n_future_positions=64, epsilon=0.01)
    ours = press.score(prefilled.score_inputs())[layer]
    mask = prefilled.score_inputs().pos >= prefilled.n_sink
    ref = reference_scores(prefilled, layer, 64, 0.01)
    np.testing.assert_allclose(ours[:, mask], ref, rtol=1e-3)  # ours: float32 throughout
    assert np.isinf(ours[:, ~mask]).all()  # sinks are never candidates


@pytest.mark.parametrize("rope_kw", [
    dict(mode=0, freq_base=1e4, freq_scale=1.0, ext_factor=0.0),  # NORM pairs, plain
    dict(mode=2, freq_base=1e6, freq_scale=0.25, ext_factor=1.0),  # NEOX pairs, YaRN
    dict(mode=2, freq_base=5e5, freq_scale=1.0, ext_factor=0.0, freq_factors=tuple(np.linspace(1, 8, 32))),
])
def test_mean_rotation_in_closed_form_equals_the_mean(rope_kw):
    """R̄ over long horizons (a streamed prompt) from the geometric series equals the plain mean."""
    from llamakv.rope import RopeParams

    rope = RopeParams(n_dims=64, n_ctx_orig=8192, attn_factor=1.0, beta_fast=32.0, beta_slow=1.0, **rope_kw)
    for start, n in [(0, 1), (100, 512), (12345, 7), (40000, 65536)]:
        cos, sin = rope.cos_sin(np.arange(start, start + n))
        A, B = rope.mean_rotation(start, n)
        np.testing.assert_allclose(A, cos.mean(axis=0), atol=1e-9)
        np.testing.assert_allclose(B, sin.mean(axis=0), atol=1e-9)


def test_closed_form_matches_monte_carlo(prefilled):
    """log E[exp(qᵀk/√d)] for q ~ N(R̄mu, R̄ΣR̄ᵀ) equals the closed form used for z."""
    layer, h = 13, 4
    press = ExpectedAttention(n_future_positions=128)
    z = press.layer_logits(prefilled.score_inputs(), layer)[h]
    d = prefilled.head_dim
    rope = prefilled.capture.rope(layer)
    R_bar = sum(rotation_matrix(rope, t, d) for t in range(prefilled.next_pos, prefilled.next_pos + 128)) / 128
    mu = R_bar @ prefilled.queries.stats.mean[layer, h]
    cov = R_bar @ np.diag(prefilled.queries.stats.variance()[layer, h]) @ R_bar.T
    rng = np.random.default_rng(0)
    q = rng.multivariate_normal(mu, cov, size=400_000)
    group = prefilled.n_head // prefilled.n_head_kv
    keys = prefilled.score_inputs().layer_keys(layer)[:, h // group].astype(np.float64)
    some = np.linspace(prefilled.n_sink, len(keys) - 1, 12).astype(int)
    mc = np.log(np.exp(q @ keys[some].T / math.sqrt(d)).mean(axis=0))
    np.testing.assert_allclose(z[some], mc, atol=0.02 + 0.01 * np.abs(mc).max())


def test_aggregation_policies():
    scores = np.array([[[1.0, 2.0, 7.0, np.inf]], [[3.0, 3.0, 0.0, np.inf]]])  # 2 layers, 1 head, 4 cells
    mean = aggregate(scores, "mean")
    np.testing.assert_allclose(mean[:3], [(0.1 + 0.5) / 2, (0.2 + 0.5) / 2, (0.7 + 0.0) / 2])
    assert np.isinf(mean[3])
    np.testing.assert_allclose(aggregate(scores, "max")[:3], [0.5, 0.5, 0.7])
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(scores, "median")


def test_votes_aggregation():
    # 2 heads, 5 cells; each head keeps 2: head 0 votes for cells 0 and 1, head 1 for 1 and 3
    scores = np.array([[[9.0, 8.0, 1.0, 2.0, 0.5], [0.1, 9.0, 0.2, 8.0, 0.3]]])
    v = aggregate(scores, "votes", n_keep=2)
    assert np.argmax(v) == 1  # two votes
    assert set(np.argsort(-v)[1:3]) == {0, 3}  # one vote each
    assert v[1] > v[0] > v[2] and v[3] > v[4]


def post_rope_query_of_last_token(session, tokens, layer):
    """Prefill tokens; the post-RoPE query of the last one, probed from llama.cpp's graph."""
    session.capture.set_probe(f"Qcur-{layer}", session.capture.shim.op_code("ROPE"), 512 * 16 * 64)
    try:
        session.prefill(tokens)
        return session.capture.probe_result()[-1].astype(np.float64)  # [H, d]
    finally:
        session.capture.clear_probe()


def test_window_presses_match_attention_from_llama_cpp_queries(fresh_any):
    layer = 5
    context, _, _ = needle_prompt(n_repeats=8, at=3)
    q = post_rope_query_of_last_token(fresh_any, fresh_any.tokenize(context), layer)
    inputs = fresh_any.score_inputs()
    keys = inputs.layer_keys(layer).astype(np.float64)
    H, Hk, d = fresh_any.n_head, fresh_any.n_head_kv, fresh_any.head_dim
    mask = inputs.pos >= fresh_any.n_sink
    z = np.einsum("hd,nhd->hn", q, np.repeat(keys, H // Hk, axis=1)[mask]) / math.sqrt(d)
    att = np.exp(z - z.max(axis=1, keepdims=True))
    att /= att.sum(axis=1, keepdims=True)
    ref = att.reshape(Hk, H // Hk, -1).mean(axis=1)
    tova = TOVA().score(inputs)[layer]
    np.testing.assert_allclose(tova[:, mask], ref, rtol=2e-3, atol=1e-6)
    assert np.isinf(tova[:, ~mask]).all()
    # SnapKV with a window of one query and no pooling is the same attention
    plain = SnapKV(window=1, kernel=1).score(inputs)[layer][:, mask]
    np.testing.assert_allclose(plain, ref, rtol=2e-3, atol=1e-6)
    # pooling takes the max over neighbouring positions
    pooled = SnapKV(window=1, kernel=3).score(inputs)[layer][:, mask]
    assert (pooled >= plain).all() and (pooled[:, :-1] >= plain[:, 1:]).all() and (pooled > plain).any()


def test_window_attention_equals_numpy_reference(prefilled):
    """The window presses' attention (C) against dense numpy: per query the softmax over the
    non-sink cells at or before its position, then the mean over the queries."""
    from llamakv.scoring import _window_attention

    inputs = prefilled.score_inputs()
    inputs.window_pos = inputs.window_pos - 20  # inside the prompt: each query sees fewer cells
    group = prefilled.n_head // prefilled.n_head_kv
    for layer in (0, prefilled.n_layer - 1):
        for last in (None, 3):
            q = inputs.window_queries(layer).astype(np.float64)
            qpos = inputs.window_pos
            if last:
                q, qpos = q[-last:], qpos[-last:]
            keys = np.repeat(inputs.layer_keys(layer).astype(np.float64), group, axis=1)
            z = np.einsum("whd,nhd->hwn", q, keys) / math.sqrt(prefilled.head_dim)
            visible = (inputs.pos[None, :] <= qpos[:, None]) & (inputs.pos >= prefilled.n_sink)[None, :]
            z = np.where(visible[None], z, -np.inf)
            e = np.exp(z - z.max(axis=-1, keepdims=True))
            ref = (e / e.sum(axis=-1, keepdims=True)).mean(axis=1)
            got = _window_attention(inputs, layer, last)
            unseen = inputs.pos > qpos.max()
            assert unseen.any() and (got[:, unseen] == 0).all()  # cells after every query: no attention
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-7)  # float32 logits of large keys (qwen2)


def test_every_press_scores_and_compresses(fresh_any):
    context, _, _ = needle_prompt(n_repeats=12, at=3)
    fresh_any.prefill(context)
    inputs = fresh_any.score_inputs()
    knorm = KNorm().score(inputs)
    np.testing.assert_allclose(knorm[3, :, 10], -np.linalg.norm(inputs.layer_keys(3)[10], axis=-1), rtol=1e-5)
    snap = fresh_any.snapshot()
    for name in PRESSES:
        fresh_any.restore(snap)
        scores = make_press(name).score(fresh_any.score_inputs())
        assert scores.shape in ((fresh_any.n_layer, fresh_any.n_head_kv, inputs.n_cells), (inputs.n_cells,)), name
        assert np.isinf(scores[..., inputs.pos < fresh_any.n_sink]).all(), name
        assert np.isfinite(scores[..., inputs.pos >= fresh_any.n_sink]).all(), name
        rep = fresh_any.compress(0.5, press=make_press(name))
        assert rep.method == name and rep.cells_after < rep.cells_before
    fresh_any.restore(snap)
    fresh_any.compress(0.5, press=make_press("streaming_llm"))
    kept = fresh_any.score_inputs().pos
    n = len(inputs.pos)
    n_keep = n - (n - fresh_any.n_sink - 1) // 2
    np.testing.assert_array_equal(np.sort(kept), np.r_[0:fresh_any.n_sink, n - (n_keep - fresh_any.n_sink):n])


def test_ea_keydiff_averages_the_rank_percentiles_of_both(prefilled):
    inputs = prefilled.score_inputs()
    ea = aggregate(ExpectedAttention().score(inputs), "mean")
    kd = aggregate(KeyDiff().score(inputs), "mean")
    finite = np.isfinite(ea)
    n = int(finite.sum())

    def percentile(x):  # argsort of argsort: the rank of each entry
        return (np.argsort(np.argsort(x[finite], kind="stable"), kind="stable") + 1) / n

    def combined(weight):
        return weight * percentile(ea) + (1 - weight) * percentile(kd)

    for weight in (0.0, 0.3, 1.0):
        got = ExpectedAttentionKeyDiff(weight=weight, surprising_share=0).score(prefilled.score_inputs())
        assert got.shape == (inputs.n_cells,) and np.isinf(got[~finite]).all()
        np.testing.assert_allclose(got[finite], combined(weight), atol=1e-6)

    # keeping a share f < 1/2 of the cells, Expected Attention's weight is weight * 2f, so the
    # cells KeyDiff ranks first stay among the kept ones, whatever Expected Attention's rank
    top_kd = np.argsort(percentile(kd))[-3:]
    for keep in (0.5, 0.25, 0.1):
        inputs.keep_fraction = keep
        for scale, weight in ((True, 0.3 * min(1, 2 * keep)), (False, 0.3)):
            got = ExpectedAttentionKeyDiff(scale_weight=scale, surprising_share=0).score(inputs)[finite]
            np.testing.assert_allclose(got, combined(weight), atol=1e-6)
            if scale:
                threshold = np.sort(got)[-int(keep * n)]
                assert (got[top_kd] >= threshold).all()


def test_make_press_takes_settings_in_the_name(prefilled):
    """NAME:KEY=VALUE settings (llamakv eval --methods ea_keydiff:weight=0.1) build the press as its
    constructor does, name it by the whole spec, and refuse unknown keys and ill-typed values."""
    press = make_press("ea_keydiff:weight=0.1:anchor_sample=0")
    assert (press.weight, press.anchor_sample, press.name) == (0.1, 0, "ea_keydiff:weight=0.1:anchor_sample=0")
    np.testing.assert_array_equal(press.score(prefilled.score_inputs()),
                                  ExpectedAttentionKeyDiff(weight=0.1, anchor_sample=0).score(prefilled.score_inputs()))
    ea = make_press("expected_attention:use_vnorm=false", expected_attention={"epsilon": 0.01, "use_vnorm": True})
    assert (ea.use_vnorm, ea.epsilon) == (False, 0.01)  # the spec's own settings win
    for spec, message in (("ea_keydiff:wieght=0.1", "KEY one of weight, anchor_sample"),
                          ("ea_keydiff:weight", "give a number"), ("ea_keydiff:weight=x", "give a number"),
                          ("random:seed=1.5", "give an integer"), ("expected_attention:use_vnorm=1", "true or false"),
                          ("ea_keydiff:name=x", "KEY one of"), ("nope:weight=1", "unknown method")):
        with pytest.raises(ValueError, match=message):
            make_press(spec)


def test_question_aware_keeps_the_better_rank_of_both(prefilled):
    """QuestionAware: per cell, the larger of the base press's and the question's (SnapKV over the
    newest queries) rank percentiles, both after mean aggregation."""
    inputs = prefilled.score_inputs()
    base = aggregate(ExpectedAttention().score(inputs), "mean")
    asked = aggregate(SnapKV(window=8, kernel=5).score(inputs), "mean")
    finite = np.isfinite(base)
    n = int(finite.sum())

    def percentile(x):
        return (np.argsort(np.argsort(x[finite], kind="stable"), kind="stable") + 1) / n

    got = QuestionAware(ExpectedAttention(), n_question=8).score(prefilled.score_inputs())
    assert got.shape == (inputs.n_cells,) and np.isinf(got[~finite]).all()
    np.testing.assert_allclose(got[finite], np.maximum(percentile(base), percentile(asked)), atol=1e-6)


def test_keydiff_equals_numpy_formula(prefilled):
    inputs = prefilled.score_inputs()
    got = KeyDiff().score(inputs)
    not_sink = inputs.pos >= prefilled.n_sink
    for layer in (0, prefilled.n_layer - 1):
        k = inputs.layer_keys(layer).astype(np.float64)  # [n, Hk, d]
        k /= np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
        anchor = k[not_sink].mean(axis=0)
        anchor /= np.linalg.norm(anchor, axis=-1, keepdims=True)
        ref = -np.einsum("nhd,hd->hn", k, anchor)
        np.testing.assert_allclose(got[layer][:, not_sink], ref[:, not_sink], rtol=1e-4, atol=1e-5)
    assert np.isinf(got[:, :, ~not_sink]).all()


def test_make_press_passes_expected_attention_settings_to_the_presses_that_use_it():
    settings = {"epsilon": 0.1, "n_future_positions": 64}
    assert make_press("expected_attention", expected_attention=settings).epsilon == 0.1
    inner = make_press("ea_keydiff", expected_attention=settings).expected_attention
    assert (inner.epsilon, inner.n_future_positions) == (0.1, 64)
    assert make_press("keydiff", expected_attention=settings).name == "keydiff"  # ignored there
    with pytest.raises(TypeError):
        make_press("expected_attention", expected_attention={"epsilom": 0.1})
