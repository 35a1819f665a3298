"""Capture of queries, keys and values through llama.cpp's eval callback.

A `Capture` owns the C state the callback writes (`llamakv_capture`), the numpy buffers behind
it (key store, value norms, positions, staging) and the query statistics. Python only configures
it, reads the results between decode calls and compacts the store after an eviction.
"""
from __future__ import annotations

import numpy as np

from . import _shim
from .errors import CaptureError
from .rope import RopeParams
from .stats import QueryStats


class Capture:
    def __init__(self, *, n_layer: int, n_head: int, n_head_kv: int, head_dim: int, n_ubatch: int,
                 capacity: int, q_normed: bool = False, n_sink: int = 4,
                 full_covariance: bool = False):
        self.shim = _shim.load()
        ffi = self.shim.ffi
        self.n_layer, self.n_head, self.n_head_kv, self.head_dim = n_layer, n_head, n_head_kv, head_dim
        self.capacity = capacity
        self.stats = QueryStats(n_layer, n_head, head_dim, full_covariance)
        self.keys = np.empty((capacity, n_layer, n_head_kv, head_dim), dtype=np.float16)
        self.vnorm = np.empty((capacity, n_layer, n_head_kv), dtype=np.float32)
        self.pos = np.empty(capacity, dtype=np.int32)
        self.rope_params = np.zeros((n_layer, 16), dtype=np.int32)
        self.rope_factors = np.zeros((n_layer, head_dim // 2), dtype=np.float32)
        self.rope_has_factors = np.zeros(n_layer, dtype=np.int32)
        self.rope_seen = np.zeros(n_layer, dtype=np.int32)
        self.n_kv = np.zeros(n_layer, dtype=np.int32)
        self._q_stage = np.empty(n_ubatch * n_head * head_dim, dtype=np.float32)
        self._v_stage = np.empty(n_ubatch * n_head_kv, dtype=np.float32)
        self._kv_stage = np.empty(n_ubatch * n_head_kv * head_dim, dtype=np.float32)
        self._scratch = np.empty(n_ubatch * (n_head + 2 * n_head_kv) * head_dim, dtype=np.float32)
        self._pos_stage = np.empty(n_ubatch, dtype=np.int32)
        self._q_work = np.empty(2 * head_dim, dtype=np.float64)
        self._probe = None

        c = ffi.new("llamakv_capture *")
        c.n_layer, c.n_head, c.n_head_kv, c.head_dim = n_layer, n_head, n_head_kv, head_dim
        c.n_ubatch, c.capacity = n_ubatch, capacity
        c.q_normed = int(q_normed)
        c.n_sink = n_sink
        c.enabled = 1
        c.stats_enabled = 1
        c.keys = self._ptr("uint16_t *", self.keys)
        c.vnorm = self._ptr("float *", self.vnorm)
        c.pos = self._ptr("int32_t *", self.pos)
        c.q_count = self._ptr("double *", self.stats.count)
        c.q_mean = self._ptr("double *", self.stats.mean)
        c.q_m2 = self._ptr("double *", self.stats.m2)
        c.q_cov = self._ptr("double *", self.stats.cov) if self.stats.cov is not None else ffi.NULL
        c.rope_params = self._ptr("int32_t *", self.rope_params)
        c.rope_factors = self._ptr("float *", self.rope_factors)
        c.rope_has_factors = self._ptr("int32_t *", self.rope_has_factors)
        c.rope_seen = self._ptr("int32_t *", self.rope_seen)
        c.n_kv = self._ptr("int32_t *", self.n_kv)
        c.q_stage = self._ptr("float *", self._q_stage)
        c.v_stage = self._ptr("float *", self._v_stage)
        c.kv_stage = self._ptr("float *", self._kv_stage)
        c.scratch = self._ptr("float *", self._scratch)
        c.pos_stage = self._ptr("int32_t *", self._pos_stage)
        c.q_work = self._ptr("double *", self._q_work)
        c.last_k_layer = -1
        c.q_pending = -1
        c.v_pending = -1
        self._c = c

    def _ptr(self, ctype: str, array: np.ndarray):
        assert array.flags.c_contiguous
        return self.shim.ffi.cast(ctype, array.ctypes.data)

    # -- wiring into llama.cpp -------------------------------------------------------------
    @property
    def callback_address(self) -> int:
        return self.shim.callback_address

    @property
    def user_data_address(self) -> int:
        return int(self.shim.ffi.cast("uintptr_t", self._c))

    # -- switches --------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._c.enabled)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._c.enabled = int(bool(value))

    @property
    def stats_enabled(self) -> bool:
        return bool(self._c.stats_enabled)

    @stats_enabled.setter
    def stats_enabled(self, value: bool) -> None:
        self._c.stats_enabled = int(bool(value))

    @property
    def n_sink(self) -> int:
        return int(self._c.n_sink)

    def reset_stats(self) -> None:
        self.stats.reset()

    def reset(self) -> None:
        """Forget everything captured: statistics and the key store."""
        self.stats.reset()
        self._c.n_rows = 0
        self._c.last_k_layer = -1
        self._c.q_pending = -1
        self._c.v_pending = -1
        self._c.error = 0
        self._c.capture_ns = 0

    # -- results ---------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return int(self._c.n_rows)

    @property
    def n_observed(self) -> int:
        return int(self._c.n_observed)

    @property
    def capture_seconds(self) -> float:
        """Time the callback spent copying tensors and accumulating statistics."""
        return int(self._c.capture_ns) * 1e-9

    def check(self) -> None:
        """Raise if the callback recorded an error (then clear it)."""
        err = int(self._c.error)
        if err:
            self._c.error = 0
            raise CaptureError(f"capture failed: {self.shim.error_string(err)}")

    def end_ubatch_sequence(self) -> None:
        """Mark the end of a decode call: the next key seen starts a new ubatch."""
        self._c.last_k_layer = -1
        self._c.q_pending = -1
        self._c.v_pending = -1

    def truncate(self, n_rows: int) -> None:
        """Drop rows recorded past n_rows (a decode that failed)."""
        self._c.n_rows = min(self.n_rows, n_rows)

    def keep_rows(self, rows: np.ndarray) -> None:
        """Keep only these rows of the store, in this order (after an eviction)."""
        n = len(rows)
        self.keys[:n] = self.keys[rows]
        self.vnorm[:n] = self.vnorm[rows]
        self.pos[:n] = self.pos[rows]
        self._c.n_rows = n

    def load_rows(self, keys: np.ndarray, vnorm: np.ndarray, pos: np.ndarray) -> None:
        n = len(pos)
        if n > self.capacity:
            raise CaptureError(f"{n} rows do not fit a store of {self.capacity}")
        self.keys[:n], self.vnorm[:n], self.pos[:n] = keys, vnorm, pos
        self._c.n_rows = n

    def rope(self, layer: int) -> RopeParams:
        if not self.rope_seen[layer]:
            raise CaptureError(f"no ROPE node of layer {layer} has been observed yet")
        factors = self.rope_factors[layer] if self.rope_has_factors[layer] else None
        return RopeParams.from_op_params(self.rope_params[layer], factors)

    # -- probe (tests, debugging) ----------------------------------------------------------
    def set_probe(self, name: str, op: int, max_floats: int) -> None:
        """Copy the F32 tensor named `name` with ggml op number `op` at each decode."""
        self._probe = np.zeros(max_floats, dtype=np.float32)
        self._c.probe_buf = self._ptr("float *", self._probe)
        self._c.probe_cap = max_floats
        self._c.probe_op = op
        self._c.probe_name = name.encode()
        self._c.probe_n = 0

    def probe_result(self) -> np.ndarray:
        """The last probed tensor as [ne3, ne2, ne1, ne0] with leading ones squeezed off."""
        n = int(self._c.probe_n)
        ne = [int(self._c.probe_ne[i]) for i in range(4)]
        out = self._probe[:n].reshape(ne[::-1])
        while out.ndim > 1 and out.shape[0] == 1:
            out = out[0]
        return out.copy()
