"""Capture of pre-RoPE queries through llama.cpp's eval callback.

A `Capture` owns the C state the callback writes (`llamakv_capture`): the attention layout it
learns, the model's rope parameters, the staging buffers; it tells the callback about each ubatch
before it is decoded, as segments of rows, one per sequence. A `SeqCapture` is one sequence's
share (`llamakv_seq_capture`): its query statistics and its ring of recent queries. Keys and
values are not captured: they are in llama.cpp's cache and are read from the sequence state when
scoring (llamakv/cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _shim
from .errors import CaptureError, UnsupportedModelError
from .rope import RopeParams
from .stats import QueryStats

NAME_LEN = 64  # bytes per node name in the layout arrays (csrc: NAME_LEN)

# csrc: the LAYOUT_* codes of learn_attention
_LAYOUT_ERRORS = {
    1: "its attention adds something other than scales and a soft cap to q.k before the softmax",
    2: "the query of an attention node could not be followed back to a [head_dim, n_head, n_tokens] tensor",
    3: "its graph has more attention nodes than layers",
    4: "it normalises the query after RoPE, so the rotated pre-RoPE query is not what the attention reads",
}


@dataclass(frozen=True)
class LayerAttention:
    """How one layer attends, as llama.cpp's graph computes it: the pre-RoPE query node the
    callback reads, the rope applied to it (None for a layer without rope), and the logit of a
    rotated query q and a cached key k: softcap * tanh(scale * q.k / softcap), or scale * q.k
    when softcap is 0, with the learned sink logits in the softmax's denominator if any."""
    layer: int
    query_node: str
    query_op: int
    rope_node: str
    has_rope: bool
    scale: float
    softcap: float
    max_bias: float
    sinks: np.ndarray | None
    k_rot: int        # size of the Hadamard blocks that rotate q and k (quantized K cache), 0: none
    head_dim: int     # of the query node
    n_head: int


@dataclass(frozen=True)
class AttentionLayout:
    layers: tuple[LayerAttention | None, ...]  # None: no attention node found for that layer

    def missing(self) -> list[int]:
        return [i for i, a in enumerate(self.layers) if a is None]


class SeqCapture:
    """The queries captured for one sequence: running statistics and the ring of the most recent
    ones, written by the callback for that sequence's rows of each ubatch."""

    def __init__(self, shim, *, n_layer: int, n_head: int, head_dim: int, full_covariance: bool = False,
                 window: int = 64):
        self.stats = QueryStats(n_layer, n_head, head_dim, full_covariance)
        self.window_cap = max(1, int(window))
        self.window = np.zeros((n_layer, self.window_cap, n_head, head_dim), dtype=np.float32)
        self.window_pos = np.zeros(self.window_cap, dtype=np.int64)
        self.window_len = 0
        ffi = shim.ffi
        c = ffi.new("llamakv_seq_capture *")
        c.q_count = _shim.ptr("double *", self.stats.count)
        c.q_mean = _shim.ptr("double *", self.stats.mean)
        c.q_m2 = _shim.ptr("double *", self.stats.m2)
        c.q_cov = _shim.ptr("double *", self.stats.cov) if self.stats.cov is not None else ffi.NULL
        c.window = _shim.ptr("float *", self.window)
        c.window_cap = self.window_cap
        self._c = c

    def reset(self) -> None:
        """Forget everything captured."""
        self.stats.reset()
        self.window_len = 0
        self._c.window_head = 0

    @property
    def capture_seconds(self) -> float:
        """Time the callback spent copying and accumulating this sequence's queries."""
        return int(self._c.capture_ns) * 1e-9

    def advance_window(self, pos0: int, rows: int) -> None:
        """After a decode: the callback wrote `rows` queries at positions pos0 .. into the ring."""
        if rows <= 0:
            return
        head = int(self._c.window_head)
        slots = (head + np.arange(rows)) % self.window_cap
        self.window_pos[slots] = pos0 + np.arange(rows)
        self._c.window_head = (head + rows) % self.window_cap
        self.window_len = min(self.window_cap, self.window_len + rows)

    def recent_slots(self) -> np.ndarray:
        """Where the window's queries sit in the ring (`window`, `window_pos`), oldest first."""
        return (int(self._c.window_head) - self.window_len + np.arange(self.window_len)) % self.window_cap

    def recent_queries(self) -> tuple[np.ndarray, np.ndarray]:
        """The window of recent pre-RoPE queries, oldest first: q [n_layer, W, n_head, head_dim]
        and their positions [W]."""
        slots = self.recent_slots()
        return self.window[:, slots], self.window_pos[slots].copy()

    def set_recent_queries(self, q: np.ndarray, pos: np.ndarray) -> None:
        n = min(len(pos), self.window_cap)
        self.window[:, :n] = q[:, len(pos) - n:]
        self.window_pos[:n] = pos[len(pos) - n:]
        self.window_len = n
        self._c.window_head = n % self.window_cap

    def state_arrays(self) -> dict:
        """Everything captured, as named arrays (snapshots and saved states)."""
        q, pos = self.recent_queries()
        return {**self.stats.arrays(), "window_q": q.copy(), "window_pos": pos}

    def load_state_arrays(self, arrays: dict) -> None:
        self.stats.restore(arrays)
        self.set_recent_queries(arrays["window_q"], arrays["window_pos"])


@dataclass
class Segment:
    """Rows of a ubatch that belong to one sequence (see csrc: llamakv_segment)."""
    seq: SeqCapture
    row0: int
    n_tok: int
    pos0: int
    stats_rows: int = 0
    window_rows: int = 0


class Capture:
    """The callback's state for one llama.cpp context: the layout it learns, the rope it sees,
    and the segments of the ubatch being decoded."""

    def __init__(self, *, n_layer: int, n_head: int, head_dim: int, n_ubatch: int, n_sink: int = 4,
                 max_segments: int = 1):
        self.shim = _shim.load()
        ffi = self.shim.ffi
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.rope_params = np.zeros((n_layer, 16), dtype=np.int32)
        self.rope_factors = np.zeros((n_layer, head_dim // 2), dtype=np.float32)
        self.rope_has_factors = np.zeros(n_layer, dtype=np.int32)
        self.rope_seen = np.zeros(n_layer, dtype=np.int32)
        self.n_kv = np.zeros(n_layer, dtype=np.int32)
        # the attention layout, learnt once (learn_layout)
        self.q_names = np.zeros((n_layer, NAME_LEN), dtype=np.uint8)
        self.q_ops = np.full(n_layer, -1, dtype=np.int32)
        self.q_shape = np.zeros((n_layer, 2), dtype=np.int32)
        self.rope_names = np.zeros((n_layer, NAME_LEN), dtype=np.uint8)
        self.logit = np.zeros((n_layer, 3), dtype=np.float32)
        self.sinks = np.zeros((n_layer, n_head), dtype=np.float32)
        self.has_sinks = np.zeros(n_layer, dtype=np.int32)
        self.k_rot = np.zeros(n_layer, dtype=np.int32)
        self.attn_layer = np.full(n_layer, -1, dtype=np.int32)
        self.layer_on = np.ones(n_layer, dtype=np.int32)  # layers whose queries are captured
        self._seen = np.zeros(4096, dtype=np.uint64)  # node pointers, while learning (csrc: copied_from)
        # each layer's K and V cache tensors (ggml_tensor pointers; 0: not found), learnt with the layout
        self.k_cache = np.zeros(n_layer, dtype=np.uint64)
        self.v_cache = np.zeros(n_layer, dtype=np.uint64)
        self.v_trans = np.zeros(n_layer, dtype=np.int32)
        self._attn_node = np.zeros(n_layer, dtype=np.uint64)
        self.layout: AttentionLayout | None = None
        # pinned when there is a GPU: queries are copied from the device into it
        self._q_stage_buffer = _shim.HostBuffer()
        self._q_stage = self._q_stage_buffer.view(n_ubatch * n_head * head_dim * 4).view(np.float32)
        self._scratch = np.empty(n_ubatch * 3 * n_head * head_dim, dtype=np.float32)
        self._q_work = np.empty(3 * n_head * head_dim, dtype=np.float64)
        self._probe = None
        self._segs = ffi.new("llamakv_segment[]", max(1, max_segments))
        self._seg_list: list[Segment] = []

        c = ffi.new("llamakv_capture *")
        c.n_layer, c.n_head, c.head_dim = n_layer, n_head, head_dim
        c.n_ubatch = n_ubatch
        c.n_sink = n_sink
        c.enabled = 1
        c.stats_enabled = 1
        c.segs = self._segs
        c.seg_cap = max(1, max_segments)
        c.rope_params = _shim.ptr("int32_t *", self.rope_params)
        c.rope_factors = _shim.ptr("float *", self.rope_factors)
        c.rope_has_factors = _shim.ptr("int32_t *", self.rope_has_factors)
        c.rope_seen = _shim.ptr("int32_t *", self.rope_seen)
        c.n_kv = _shim.ptr("int32_t *", self.n_kv)
        c.q_names = _shim.ptr("char *", self.q_names)
        c.q_ops = _shim.ptr("int32_t *", self.q_ops)
        c.q_shape = _shim.ptr("int32_t *", self.q_shape)
        c.rope_names = _shim.ptr("char *", self.rope_names)
        c.logit = _shim.ptr("float *", self.logit)
        c.sinks = _shim.ptr("float *", self.sinks)
        c.has_sinks = _shim.ptr("int32_t *", self.has_sinks)
        c.k_rot = _shim.ptr("int32_t *", self.k_rot)
        c.attn_layer = _shim.ptr("int32_t *", self.attn_layer)
        c.layer_on = _shim.ptr("int32_t *", self.layer_on)
        c.seen = ffi.cast("void **", self._seen.ctypes.data)
        c.k_cache = ffi.cast("void **", self.k_cache.ctypes.data)
        c.v_cache = ffi.cast("void **", self.v_cache.ctypes.data)
        c.v_trans = _shim.ptr("int32_t *", self.v_trans)
        c.attn_node = ffi.cast("void **", self._attn_node.ctypes.data)
        c.seen_cap = len(self._seen)
        c.q_stage = _shim.ptr("float *", self._q_stage)
        c.scratch = _shim.ptr("float *", self._scratch)
        c.q_work = _shim.ptr("double *", self._q_work)
        self._c = c

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

    def reset_timers(self) -> None:
        self._c.error = 0
        self._c.capture_ns = 0
        self._c.copy_ns = 0

    # -- the layout ------------------------------------------------------------------------
    def begin_learning(self) -> None:
        """The next decode call only looks at the graph: it records each layer's attention
        (see the shim) and captures nothing."""
        for a in (self.q_names, self.rope_names, self.logit, self.sinks, self.has_sinks, self.k_rot,
                  self.rope_params, self.rope_factors, self.rope_has_factors, self.rope_seen,
                  self.k_cache, self.v_cache, self.v_trans, self._attn_node):
            a[:] = 0
        self.q_ops[:] = -1
        self.attn_layer[:] = -1
        self._c.layout_error = 0
        self._c.layout_detail = b""
        self._seen[:] = 0
        self._c.seen_head = 0
        self._c.n_attn = 0
        self._c.learn = 1

    @property
    def learning(self) -> bool:
        return bool(self._c.learn)

    def end_learning(self) -> AttentionLayout:
        """The layout the decode call since begin_learning() showed; raises where the graph is
        not one llamakv can score."""
        self._c.learn = 0
        err = int(self._c.layout_error)
        if err:
            detail = self.shim.ffi.string(self._c.layout_detail).decode(errors="replace")
            raise UnsupportedModelError(f"llamakv cannot score this model: {_LAYOUT_ERRORS.get(err, err)}"
                                        + (f" (at {detail})" if detail else ""))
        layers = []
        for il in range(self.n_layer):
            if self.q_ops[il] < 0:
                layers.append(None)
                continue
            name = lambda a: bytes(a[il]).split(b"\0", 1)[0].decode(errors="replace")  # noqa: E731
            layers.append(LayerAttention(
                layer=il, query_node=name(self.q_names), query_op=int(self.q_ops[il]),
                rope_node=name(self.rope_names), has_rope=bool(self.rope_seen[il]),
                scale=float(self.logit[il, 0]), softcap=float(self.logit[il, 1]),
                max_bias=float(self.logit[il, 2]),
                sinks=self.sinks[il].copy() if self.has_sinks[il] else None, k_rot=int(self.k_rot[il]),
                head_dim=int(self.q_shape[il, 0]), n_head=int(self.q_shape[il, 1])))
        self.layout = AttentionLayout(tuple(layers))
        return self.layout

    # -- per ubatch ------------------------------------------------------------------------
    def begin_ubatch(self, n_tok: int, segments: list[Segment]) -> bool:
        """Tell the callback about the ubatch about to be decoded: `n_tok` rows, of which the
        segments' rows are captured into their sequences (a segment's stats_rows and window_rows
        are its last rows). Returns whether any query is wanted."""
        on = self.enabled
        self._c.ubatch_n_tok = n_tok
        self._c.n_attn = 0
        kept = []
        for g in segments if on else ():
            stats = max(0, min(g.stats_rows, g.n_tok)) if self.stats_enabled else 0
            window = max(0, min(g.window_rows, g.n_tok, g.seq.window_cap))
            if stats or window:
                kept.append(Segment(g.seq, g.row0, g.n_tok, g.pos0, stats, window))
        if len(kept) > len(self._segs):
            raise CaptureError(f"{len(kept)} sequences in one ubatch, the capture was set up for {len(self._segs)}")
        for k, g in enumerate(kept):
            cs = self._segs[k]
            cs.seq, cs.row0, cs.n_tok, cs.pos0 = g.seq._c, g.row0, g.n_tok, g.pos0
            cs.stats_rows, cs.window_rows = g.stats_rows, g.window_rows
        self._c.n_seg = len(kept)
        self._seg_list = kept
        return bool(kept)

    def end_ubatch(self, decoded: bool) -> None:
        """After the decode call: advance each sequence's query window if the tokens went in."""
        self._c.n_seg = 0
        kept, self._seg_list = self._seg_list, []
        if decoded:
            for g in kept:
                g.seq.advance_window(g.pos0 + g.n_tok - g.window_rows, g.window_rows)

    # -- results ---------------------------------------------------------------------------
    @property
    def n_observed(self) -> int:
        return int(self._c.n_observed)

    @property
    def capture_seconds(self) -> float:
        """Time the callback spent copying queries and accumulating statistics."""
        return int(self._c.capture_ns) * 1e-9

    @property
    def copy_seconds(self) -> float:
        """Of capture_seconds, the time spent copying queries from the device."""
        return int(self._c.copy_ns) * 1e-9

    @property
    def pinned(self) -> bool:
        return self._q_stage_buffer.pinned

    def check(self) -> None:
        """Raise if the callback recorded an error (then clear it)."""
        err = int(self._c.error)
        if err:
            self._c.error = 0
            raise CaptureError(f"capture failed: {self.shim.error_string(err)}")

    def rope(self, layer: int) -> RopeParams | None:
        """The rope of a layer's query, None for a layer without rope."""
        if self.layout is not None and self.layout.layers[layer] is not None and not self.layout.layers[layer].has_rope:
            return None
        if not self.rope_seen[layer]:
            raise CaptureError(f"no ROPE node of layer {layer} has been observed yet")
        factors = self.rope_factors[layer] if self.rope_has_factors[layer] else None
        return RopeParams.from_op_params(self.rope_params[layer], factors)

    # -- probe (tests, debugging) ----------------------------------------------------------
    def set_probe(self, name: str, op: int, max_floats: int) -> None:
        """Copy the F32 tensor named `name` with ggml op number `op` at each decode."""
        self._probe = np.zeros(max_floats, dtype=np.float32)
        self._c.probe_buf = _shim.ptr("float *", self._probe)
        self._c.probe_cap = max_floats
        self._c.probe_op = op
        self._c.probe_name = name.encode()
        self._c.probe_n = 0

    @property
    def probing(self) -> bool:
        return self._probe is not None

    def clear_probe(self) -> None:
        self._c.probe_buf = self.shim.ffi.NULL
        self._c.probe_name = b""
        self._probe = None

    def probe_result(self) -> np.ndarray:
        """The last probed tensor as [ne3, ne2, ne1, ne0] with leading ones squeezed off."""
        n = int(self._c.probe_n)
        ne = [int(self._c.probe_ne[i]) for i in range(4)]
        out = self._probe[:n].reshape(ne[::-1])
        while out.ndim > 1 and out.shape[0] == 1:
            out = out[0]
        return out.copy()
