"""Expected Attention scores against an independent numpy implementation and Monte Carlo."""
import math

import numpy as np
import pytest

from llamakv.scoring import ExpectedAttention, aggregate
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


def reference_scores(session, layer, n_future, eps):
    """Expected Attention written from the formula with dense matrices."""
    inputs = session.score_inputs()
    d, H, Hk = session.head_dim, session.n_head, session.n_head_kv
    rope = session.capture.rope(layer)
    R_bar = sum(rotation_matrix(rope, t, d) for t in range(session.next_pos, session.next_pos + n_future)) / n_future
    keys = inputs.keys[:, layer].astype(np.float64)  # [n, Hk, d]
    mask = inputs.pos >= session.n_sink
    mean = session.capture.stats.mean[layer]
    var = session.capture.stats.variance()[layer]
    a = np.zeros((H, mask.sum()))
    for h in range(H):
        mu_p = R_bar @ mean[h]
        sigma_p = R_bar @ np.diag(var[h]) @ R_bar.T
        k = keys[mask, h // (H // Hk)]
        z = k @ mu_p / math.sqrt(d) + np.einsum("nd,de,ne->n", k, sigma_p, k) / (2 * d)
        z -= z.max()
        a[h] = np.exp(z) / np.exp(z).sum()
    a = a.reshape(Hk, H // Hk, -1).mean(axis=1)
    return (a + eps) * inputs.vnorm[mask, layer].T


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_scores_equal_numpy_reference(prefilled, where):
    layer = round(where * (prefilled.n_layer - 1))
    press = ExpectedAttention(n_future_positions=64, epsilon=0.01)
    ours = press.score(prefilled.score_inputs())[layer]
    mask = prefilled.capture.pos[:prefilled.capture.n_rows] >= prefilled.n_sink
    ref = reference_scores(prefilled, layer, 64, 0.01)
    np.testing.assert_allclose(ours[:, mask], ref, rtol=1e-3)  # ours: float32 throughout
    assert np.isinf(ours[:, ~mask]).all()  # sinks are never candidates


def test_closed_form_matches_monte_carlo(prefilled):
    """log E[exp(qᵀk/√d)] for q ~ N(R̄mu, R̄ΣR̄ᵀ) equals the closed form used for z."""
    layer, h = 13, 4
    press = ExpectedAttention(n_future_positions=128)
    z = press.layer_logits(prefilled.score_inputs(), layer)[h]
    d = prefilled.head_dim
    rope = prefilled.capture.rope(layer)
    R_bar = sum(rotation_matrix(rope, t, d) for t in range(prefilled.next_pos, prefilled.next_pos + 128)) / 128
    mu = R_bar @ prefilled.capture.stats.mean[layer, h]
    cov = R_bar @ np.diag(prefilled.capture.stats.variance()[layer, h]) @ R_bar.T
    rng = np.random.default_rng(0)
    q = rng.multivariate_normal(mu, cov, size=400_000)
    group = prefilled.n_head // prefilled.n_head_kv
    keys = prefilled.capture.keys[:prefilled.capture.n_rows, layer, h // group].astype(np.float64)
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
