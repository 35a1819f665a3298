"""Scoring methods ("presses") and the aggregation of per-head scores into one score per cell.

A press looks at what the capture holds (keys after RoPE, value norms, positions, query
statistics, the model's rope) and returns scores per (layer, KV head, cell): higher means keep.
llama.cpp frees whole cells (every layer and head of a token at once), so `aggregate` turns those
scores into one score per cell through an explicit policy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .rope import RopeParams
from .stats import QueryStats


@dataclass
class ScoreInputs:
    keys: np.ndarray        # [n_cells, n_layer, n_head_kv, head_dim] fp16, after RoPE
    vnorm: np.ndarray       # [n_cells, n_layer, n_head_kv]
    pos: np.ndarray         # [n_cells]
    stats: QueryStats       # pre-RoPE query statistics
    rope: Callable[[int], RopeParams]
    next_pos: int           # position the next token will take
    n_head: int
    n_sink: int

    @property
    def n_layer(self) -> int:
        return self.keys.shape[1]

    @property
    def n_head_kv(self) -> int:
        return self.keys.shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]


class Press(Protocol):
    name: str

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        """Scores [n_layer, n_head_kv, n_cells]; higher = more worth keeping."""


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


@dataclass
class ExpectedAttention:
    """Expected Attention (Devoto et al., 2025, "Expected Attention: KV cache compression by
    estimating attention from future queries distribution"): future queries ~ N(mu, Sigma) from
    pre-RoPE statistics, RoPE averaged over the next `n_future_positions`, closed-form
    log E[exp(qᵀk/√d)] = mu'ᵀk/√d + kᵀΣ'k/(2d), softmax per query head, mean over each GQA
    group, times the value norm."""

    n_future_positions: int = 512
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.01
    full_covariance: bool = False
    name: str = "expected_attention"

    def layer_logits(self, inputs: ScoreInputs, layer: int) -> np.ndarray:
        """z [n_head, n_cells]: the expected log attention logit of each query head for each key."""
        d = inputs.head_dim
        group = inputs.n_head // inputs.n_head_kv
        keys = inputs.keys[:, layer].astype(np.float32)  # [n, hk, d]
        k_bar = inputs.rope(layer).unrotate_mean(keys, inputs.next_pos, self.n_future_positions)
        k_bar = np.repeat(k_bar, group, axis=1).transpose(1, 0, 2)  # [n_head, n, d]
        mu = inputs.stats.mean[layer].astype(np.float32)  # [n_head, d]
        z = np.einsum("hnd,hd->hn", k_bar, mu) / math.sqrt(d)
        if self.use_covariance:
            if self.full_covariance:
                cov = inputs.stats.covariance()[layer].astype(np.float32)  # [n_head, d, d]
                z += np.einsum("hnd,hde,hne->hn", k_bar, cov, k_bar, optimize=True) / (2 * d)
            else:
                var = inputs.stats.variance()[layer].astype(np.float32)  # [n_head, d]
                z += np.einsum("hnd,hd->hn", k_bar * k_bar, var) / (2 * d)
        return z

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        n = len(inputs.pos)
        group = inputs.n_head // inputs.n_head_kv
        not_sink = inputs.pos >= inputs.n_sink
        out = np.full((inputs.n_layer, inputs.n_head_kv, n), np.inf, dtype=np.float32)
        if not not_sink.any():
            return out
        for layer in range(inputs.n_layer):
            z = self.layer_logits(inputs, layer)[:, not_sink]
            a = softmax(z, axis=-1).reshape(inputs.n_head_kv, group, -1).mean(axis=1)
            if self.use_vnorm:
                a = (a + self.epsilon) * inputs.vnorm[not_sink, layer].T
            out[layer][:, not_sink] = a
        return out


AGGREGATIONS = ("mean", "max")


def aggregate(scores: np.ndarray, policy: str = "mean") -> np.ndarray:
    """One score per cell from scores [n_layer, n_head_kv, n_cells].

    Each (layer, head) row is first normalised to sum 1 over the scored cells, so that layers
    with large value norms do not outvote the others; then
      mean: average share of attention the cell gets over all layers and heads;
      max:  the largest share any single head gives it (keeps what one head needs badly).
    Cells with infinite scores (sinks) stay infinite.
    """
    finite = np.isfinite(scores).all(axis=(0, 1))
    s = scores[:, :, finite].astype(np.float64)
    s = s / np.maximum(s.sum(axis=-1, keepdims=True), 1e-30)
    out = np.full(scores.shape[-1], np.inf)
    if policy == "mean":
        out[finite] = s.mean(axis=(0, 1))
    elif policy == "max":
        out[finite] = s.max(axis=(0, 1))
    else:
        raise ValueError(f"unknown aggregation {policy!r}; choose one of {', '.join(AGGREGATIONS)}")
    return out


PRESSES = {"expected_attention": ExpectedAttention}


def make_press(name: str, **kwargs) -> Press:
    try:
        return PRESSES[name.replace("-", "_")](**kwargs)
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(PRESSES)}") from None
