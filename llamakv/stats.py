"""Streaming statistics of the pre-RoPE queries, per layer, query head and dimension.

The C callback hands every ubatch's queries of a layer to one of the numba cfuncs below (no
Python, no GIL). Each call merges the ubatch into the running statistics with Chan's parallel
form of Welford's update (count, mean, M2 = sum of squared deviations; optionally the full
comoment matrix), leaving out positions below `n_sink`.
"""
from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit, types

_f32p = types.CPointer(types.float32)
_f64p = types.CPointer(types.float64)
_i32p = types.CPointer(types.int32)
SINK_SIGNATURE = types.void(_f32p, types.int64, types.int64, types.int64, _i32p, types.int32,
                            _f64p, _f64p, _f64p, _f64p)


@njit(cache=True, nogil=True)
def merge_batch(q, pos, n_sink, count, mean, m2, cov, full):
    """Merge the rows of q [n_tok, n_head, d] whose position is >= n_sink into the statistics."""
    n_tok, n_head, d = q.shape
    n_b = 0
    for t in range(n_tok):
        if pos[t] >= n_sink:
            n_b += 1
    if n_b == 0:
        return
    n_a = count[0]
    n = n_a + n_b
    mb = np.zeros(d)
    dev = np.zeros(d)
    for h in range(n_head):
        mb[:] = 0.0
        for t in range(n_tok):
            if pos[t] >= n_sink:
                for j in range(d):
                    mb[j] += q[t, h, j]
        for j in range(d):
            mb[j] /= n_b
        for t in range(n_tok):
            if pos[t] >= n_sink:
                for j in range(d):
                    dev[j] = q[t, h, j] - mb[j]
                for j in range(d):
                    m2[h, j] += dev[j] * dev[j]
                if full:
                    for i in range(d):
                        for j in range(d):
                            cov[h, i, j] += dev[i] * dev[j]
        # Chan: M2 = M2_a + M2_b + delta^2 n_a n_b / n (M2_b was added above)
        w = n_a * n_b / n
        for j in range(d):
            delta = mb[j] - mean[h, j]
            m2[h, j] += delta * delta * w
            mean[h, j] += delta * n_b / n
            dev[j] = delta
        if full:
            for i in range(d):
                for j in range(d):
                    cov[h, i, j] += dev[i] * dev[j] * w
    count[0] = n


@cfunc(SINK_SIGNATURE, nopython=True, cache=True)
def accumulate_diagonal(q_ptr, n_tok, n_head, d, pos_ptr, n_sink, count_ptr, mean_ptr, m2_ptr, cov_ptr):
    q = carray(q_ptr, (n_tok, n_head, d))
    pos = carray(pos_ptr, (n_tok,))
    mean = carray(mean_ptr, (n_head, d))
    merge_batch(q, pos, n_sink, carray(count_ptr, (1,)), mean, carray(m2_ptr, (n_head, d)),
                np.empty((1, 1, 1)), False)


@cfunc(SINK_SIGNATURE, nopython=True, cache=True)
def accumulate_full(q_ptr, n_tok, n_head, d, pos_ptr, n_sink, count_ptr, mean_ptr, m2_ptr, cov_ptr):
    q = carray(q_ptr, (n_tok, n_head, d))
    pos = carray(pos_ptr, (n_tok,))
    merge_batch(q, pos, n_sink, carray(count_ptr, (1,)), carray(mean_ptr, (n_head, d)),
                carray(m2_ptr, (n_head, d)), carray(cov_ptr, (n_head, d, d)), True)


class QueryStats:
    """Accumulators of one model's query statistics (owned here, filled by the callback)."""

    def __init__(self, n_layer: int, n_head: int, head_dim: int, full_covariance: bool = False):
        self.full_covariance = full_covariance
        self.count = np.zeros(n_layer)
        self.mean = np.zeros((n_layer, n_head, head_dim))
        self.m2 = np.zeros((n_layer, n_head, head_dim))
        self.cov = np.zeros((n_layer, n_head, head_dim, head_dim)) if full_covariance else None

    @property
    def sink_address(self) -> int:
        return (accumulate_full if self.full_covariance else accumulate_diagonal).address

    def reset(self) -> None:
        self.count[:] = 0
        self.mean[:] = 0
        self.m2[:] = 0
        if self.cov is not None:
            self.cov[:] = 0

    def variance(self) -> np.ndarray:
        """Population variance per (layer, head, dim): M2 / N, as kvpress divides by N."""
        return self.m2 / np.maximum(self.count, 1)[:, None, None]

    def covariance(self) -> np.ndarray:
        if self.cov is None:
            raise ValueError("full covariance was not accumulated (full_covariance=False)")
        return self.cov / np.maximum(self.count, 1)[:, None, None, None]

    def arrays(self) -> dict:
        out = {"q_count": self.count, "q_mean": self.mean, "q_m2": self.m2}
        if self.cov is not None:
            out["q_cov"] = self.cov
        return out

    def restore(self, arrays: dict) -> None:
        self.count[:] = arrays["q_count"]
        self.mean[:] = arrays["q_mean"]
        self.m2[:] = arrays["q_m2"]
        if self.cov is not None:
            if "q_cov" in arrays:
                self.cov[:] = arrays["q_cov"]
            else:
                self.cov[:] = 0
