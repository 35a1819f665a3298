"""Running statistics of the pre-RoPE queries, per layer, query head and dimension.

The C callback merges every ubatch's queries of a layer into these arrays (Chan's parallel form
of Welford's update, csrc/llamakv_shim.c: merge_queries), leaving out positions below n_sink.
They hold count, mean and M2 (the sum of squared deviations), and optionally the comoment
matrix; they stream across decode calls until reset.
"""
from __future__ import annotations

import numpy as np


class QueryStats:
    def __init__(self, n_layer: int, n_head: int, head_dim: int, full_covariance: bool = False):
        self.count = np.zeros(n_layer)
        self.mean = np.zeros((n_layer, n_head, head_dim))
        self.m2 = np.zeros((n_layer, n_head, head_dim))
        self.cov = np.zeros((n_layer, n_head, head_dim, head_dim)) if full_covariance else None

    def subset(self, layers) -> "QueryStats":
        """The statistics of these layers only (copies), in that order."""
        layers = list(layers)
        out = QueryStats.__new__(QueryStats)
        out.count, out.mean, out.m2 = self.count[layers], self.mean[layers], self.m2[layers]
        out.cov = None if self.cov is None else self.cov[layers]
        return out

    def reset(self) -> None:
        for a in self.arrays().values():
            a[:] = 0

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
        for name, a in self.arrays().items():
            a[:] = arrays[name] if name in arrays else 0
