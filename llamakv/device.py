"""Compression on the device that holds the KV cache.

On a GPU the host path moves a sequence's whole cache over the bus twice per compression (the
state read for scoring, the compacted state written back) and pins host buffers the size of the
cache. Here nothing of the cache leaves the device:

- scores: csrc/llamakv_device.c computes Expected Attention (and KeyDiff) from the layers' cache
  tensors with a ggml graph on the backend that holds them; only the scores come back;
- compaction (compact()): the kept cells' K and V move down to the first cells of the stream in
  the cache tensors (one gather per tensor), the cells above are freed, and a device-side
  sequence state (llama.cpp's LLAMA_STATE_SEQ_FLAGS_ON_DEVICE: the data copied within the device,
  the cells' metadata on the host) relabels the cells with the kept positions; only positions
  cross. llama.cpp keeps that state's device buffers (the size of the kept cells) for the
  sequence's next device copy;
- eviction without compaction: seq_rm of the evicted positions (llama.cpp's cell metadata).

The scores are those of the cells 0 .. n-1 of the sequence's stream, taken to hold its positions
in ascending order: llama.cpp fills a stream from its lowest free cell, and compaction and
restores keep the order (Sequence.cells_in_order tracks it; where it does not hold, the host
path scores from the state, which names every cell's position).
"""
from __future__ import annotations

import ctypes
import time

import llama_cpp
import numpy as np

from . import _shim
from .errors import DeviceError, LlamaKVError, StateError

ON_DEVICE = 2  # LLAMA_STATE_SEQ_FLAGS_ON_DEVICE


class _Group:
    """The scored layers whose cache tensors one device holds, and every (K, V) pair of the cache
    that lies there (compaction moves those)."""

    def __init__(self, backend, rows: list[int], k, v, v_trans, pairs: list[tuple]):
        lib, ffi = _shim.load().lib, _shim.load().ffi
        self.backend = backend
        self.rows = np.array(rows, dtype=np.intp)
        self.k = np.ascontiguousarray(k[self.rows], dtype=np.uint64)
        self.v = np.ascontiguousarray(v[self.rows], dtype=np.uint64)
        self.v_trans = np.ascontiguousarray(v_trans[self.rows], dtype=np.int32)
        self.pairs_k, self.pairs_v, self.pairs_v_trans = (np.array(x, dtype=t) for x, t in zip(
            zip(*pairs), (np.uint64, np.uint64, np.int32)))
        self.is_gpu = bool(lib.llamakv_device_is_gpu(backend))
        self.name = ffi.string(lib.llamakv_device_name(backend)).decode()


class DeviceCache:
    """The cache tensors of a context's scored layers and the device backends that hold them: one
    group of layers per device (several where llama.cpp splits the layers over GPUs or RPC
    servers). `available` False where the path does not apply; `why_not` says why."""

    def __init__(self, ctx):
        self.ctx = ctx
        cap = ctx.capture
        layers = list(ctx.scored_layers)
        k, v = cap.k_cache[layers].copy(), cap.v_cache[layers].copy()
        v_trans = np.asarray(cap.v_trans[layers], dtype=np.int32)
        # every (K, V) pair of the cache once (layers that share another's cells read its tensors)
        pairs = list(dict.fromkeys(zip(cap.k_cache.tolist(), cap.v_cache.tolist(), cap.v_trans.tolist())))
        self.groups: list[_Group] = []
        self.is_gpu, self.name = False, ""
        self.why_not = ""
        self.last_call_s = 0.0  # the last scoring call on the device(s), wall
        if not (k.all() and v.all() and all(p[0] and p[1] for p in pairs)):
            self.why_not = "the attention does not read the cache tensors directly (a cache on another backend)"
            return
        if any(ctx.layout.layers[i].k_rot for i in layers):
            self.why_not = "keys rotated by a Hadamard transform (quantized K cache)"
            return
        lib, ffi = _shim.load().lib, _shim.load().ffi
        threads = int(llama_cpp.llama_n_threads(ctx.ctx))

        def backend(t) -> int:
            return int(ffi.cast("uintptr_t", lib.llamakv_device_backend(ffi.cast("void *", int(t)), threads)))

        layer_dev = [backend(t) for t in k]
        pair_dev = [backend(p[0]) for p in pairs]
        if 0 in layer_dev or 0 in pair_dev or any(backend(t) != b for t, b in zip(v, layer_dev)):
            self.why_not = "part of the cache lies in host memory of a GPU"
            return
        order = list(dict.fromkeys(layer_dev))
        self.groups = [_Group(ffi.cast("void *", b), [i for i, d in enumerate(layer_dev) if d == b], k, v, v_trans,
                              [p for p, d in zip(pairs, pair_dev) if d == b]) for b in order]
        if set(pair_dev) - set(order):
            self.groups, self.why_not = [], "a device holds cache tensors of no scored layer"
            return
        self.is_gpu = all(g.is_gpu for g in self.groups)
        self.name = "+".join(g.name for g in self.groups)
        if self.is_gpu:
            try:
                self.warm()
            except DeviceError as e:
                self.groups, self.why_not = [], str(e)

    @property
    def backend(self):
        """The first device's backend (the only one where a single device holds the cache)."""
        return self.groups[0].backend if self.groups else None

    WARM_CELLS = 16384  # the scoring graph's largest chunk: its scratch does not grow past it

    def warm(self, n_cells: int | None = None) -> None:
        """Run the scoring and gather graphs once on the context's empty cache (their results are
        discarded; the gather moves cells: only while no sequence holds any), so that the first
        compression finds the scratch memory allocated and the kernels loaded: on a GPU both are
        done lazily, and cost the first compression of a session about 60 ms at 8k tokens."""
        ctx = self.ctx
        n = min(int(n_cells or self.WARM_CELLS), int(ctx.n_ctx_seq))
        if n < 2:
            return
        n_layer, d = sum(len(g.rows) for g in self.groups), ctx.head_dim
        weights = np.zeros((n_layer, ctx.n_head, 2 * d + d // 2), dtype=np.float32)
        anchors = np.arange(0, n, max(1, n // 64), dtype=np.int32)
        try:
            self._scores(0, n, weights, d // 2, 2, None, None, np.ones(n, dtype=np.uint8), True, 0.0, anchors,
                         None, np.empty(n, np.float32), np.empty((n_layer, n), np.float32))
            self.gather(0, n, np.arange(0, 2 * (n // 2), 2))  # cells moved within the empty cache
        except DeviceError as e:
            raise DeviceError(f"the compression graphs do not run on {self.name}: {e}") from e

    @property
    def available(self) -> bool:
        return bool(self.groups)

    def stream_of(self, seq_id: int) -> int:
        """The KV stream holding a sequence: its own with per-sequence streams, else the only one."""
        return seq_id if self.ctx.n_seq > 1 else 0

    def ea_scores(self, inputs, weights: np.ndarray, n_pairs: int, pair_kind: int, scored: np.ndarray,
                  use_vnorm: bool, epsilon: float, anchor_cells: np.ndarray | None,
                  keydiff_sums: np.ndarray | None, mean_only: bool = False) -> np.ndarray:
        """Expected Attention's scores [n_layer, n_head_kv, n_cells] of the cells of `inputs.device`
        (DeviceCells), as ExpectedAttention.score computes them on the host, or with `mean_only`
        their "mean" aggregation [n_cells] (scoring.aggregate) without the per-head scores ever
        leaving the device; KeyDiff's summed scores into `keydiff_sums` [n_layer, n_cells] where
        `anchor_cells` are given."""
        cells = inputs.device
        n, n_layer = cells.n_cells, inputs.n_layer
        out = np.empty(n if mean_only else (n_layer, inputs.n_head_kv, n), dtype=np.float32)
        caps = np.array([inputs.cap(j) for j in range(n_layer)], dtype=np.float32)
        # llama_decode returns before a GPU has finished: the cache is read on another stream
        llama_cpp.llama_synchronize(self.ctx.ctx)
        t0 = time.perf_counter()
        self._scores(cells.stream, n, weights, n_pairs, pair_kind, caps, inputs.sink_logits, scored, use_vnorm,
                     epsilon, anchor_cells, None if mean_only else out, out if mean_only else None, keydiff_sums)
        self.last_call_s = time.perf_counter() - t0
        return out

    def _scores(self, stream: int, n: int, weights, n_pairs: int, pair_kind: int, caps, sinks, scored,
                use_vnorm: bool, epsilon: float, anchor_cells, out, mean_share, keydiff_sums) -> None:
        """llamakv_device_ea_scores over the scored layers (arrays None: not given), one call per
        device on its own layers; "mean" shares of several devices are averaged by layer count."""
        if len(self.groups) == 1:
            return self._group_scores(self.groups[0], stream, n, weights, n_pairs, pair_kind, caps, sinks, scored,
                                      use_vnorm, epsilon, anchor_cells, out, mean_share, keydiff_sums)
        n_layer = len(weights)
        if mean_share is not None:
            mean_share[:] = 0.0
        for g in self.groups:
            rows = g.rows
            part = lambda a: None if a is None else np.ascontiguousarray(a[rows])  # noqa: E731
            out_g = None if out is None else np.empty((len(rows),) + out.shape[1:], dtype=np.float32)
            kd_g = None if keydiff_sums is None else np.empty((len(rows), n), dtype=np.float32)
            mean_g = None if mean_share is None else np.empty(n, dtype=np.float32)
            self._group_scores(g, stream, n, part(weights), n_pairs, pair_kind, part(caps), part(sinks), scored,
                               use_vnorm, epsilon, anchor_cells, out_g, mean_g, kd_g)
            if out is not None:
                out[rows] = out_g
            if keydiff_sums is not None:
                keydiff_sums[rows] = kd_g
            if mean_share is not None:
                mean_share += mean_g * np.float32(len(rows) / n_layer)  # +inf (not scored) stays +inf

    def _group_scores(self, g: _Group, stream: int, n: int, weights, n_pairs: int, pair_kind: int, caps, sinks,
                      scored, use_vnorm: bool, epsilon: float, anchor_cells, out, mean_share, keydiff_sums) -> None:
        lib, ffi = _shim.load().lib, _shim.load().ffi
        keep = []  # every array passed stays alive through the call

        def arg(ctype: str, a, dtype):
            if a is None:
                return ffi.NULL
            keep.append(np.ascontiguousarray(a, dtype=dtype))
            return _shim.ptr(ctype, keep[-1])

        ctx = self.ctx
        err = lib.llamakv_device_ea_scores(
            g.backend, ffi.cast("void **", g.k.ctypes.data), ffi.cast("void **", g.v.ctypes.data),
            _shim.ptr("int32_t *", g.v_trans), len(g.k), stream, n, ctx.n_head, ctx.n_head_kv, ctx.head_dim,
            arg("float *", weights, np.float32), n_pairs, pair_kind, arg("float *", caps, np.float32),
            arg("float *", sinks, np.float32), arg("uint8_t *", scored, np.uint8), int(use_vnorm), float(epsilon),
            arg("int32_t *", anchor_cells, np.int32), 0 if anchor_cells is None else len(anchor_cells),
            ffi.NULL if out is None else _shim.ptr("float *", out),
            ffi.NULL if mean_share is None else _shim.ptr("float *", mean_share),
            ffi.NULL if keydiff_sums is None else _shim.ptr("float *", keydiff_sums))
        if err:
            raise DeviceError(f"scoring on {g.name} failed: {_shim.load().error_string(err)}")

    def gather(self, stream: int, n_cells: int, kept: np.ndarray) -> None:
        """Cells 0 .. len(kept) - 1 of `stream` take the contents of the cells `kept` (ascending), in
        every K and V tensor of the cache (llamakv_device_gather, per device). Raises DeviceError
        where nothing moved, StateError where a device failed after another's cells had moved."""
        lib, ffi = _shim.load().lib, _shim.load().ffi
        kept = np.ascontiguousarray(kept, dtype=np.int32)
        for i, g in enumerate(self.groups):
            err = lib.llamakv_device_gather(g.backend, ffi.cast("void **", g.pairs_k.ctypes.data),
                                            ffi.cast("void **", g.pairs_v.ctypes.data),
                                            _shim.ptr("int32_t *", g.pairs_v_trans), len(g.pairs_k),
                                            stream, n_cells, _shim.ptr("int32_t *", kept), len(kept))
            if err:  # nothing moved on this device: the graph failed before it ran, or ran whole
                msg = f"compaction on {g.name} failed: {_shim.load().error_string(err)}"
                raise (StateError(msg + " after other devices had moved their cells") if i else DeviceError(msg))


class DeviceCells:
    """A sequence's cells as they lie in its stream of the cache tensors: cells 0 .. n-1, holding
    the positions `pos` (ascending)."""

    def __init__(self, cache: DeviceCache, seq_id: int, pos: np.ndarray):
        self.cache = cache
        self.stream = cache.stream_of(seq_id)
        self.pos = np.asarray(pos)

    @property
    def n_cells(self) -> int:
        return len(self.pos)


def _u8p(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


def _first_section_cells(meta: np.ndarray) -> np.ndarray:
    """The cells [n, 3] (pos, n_seq_id, seq_id) of the first cache section of a sequence state or
    of the host part of an ON_DEVICE state (a view), in cell order: the header llama.cpp writes
    before any tensor data (cache.CacheSection)."""
    off = 8  # magic, sequence id
    (n_stream,) = meta[off:off + 4].view("<u4")
    off += 4
    for _ in range(int(n_stream)):
        (n,) = meta[off:off + 4].view("<u4")
        off += 4
        if n:
            return meta[off:off + 12 * int(n)].view("<i4").reshape(-1, 3)
    return np.zeros((0, 3), dtype=np.int32)


def first_section_positions(meta: np.ndarray) -> np.ndarray:
    """Positions of the cells of the first cache section of a state (or its ON_DEVICE metadata), in cell order."""
    return _first_section_cells(meta)[:, 0].copy()


def compact(dev: DeviceCache, seq_cache, pos: np.ndarray, keep: np.ndarray) -> None:
    """Compaction without leaving the device. `pos`: the positions of the sequence's cells 0 .. n-1
    (ascending), `keep`: which stay. Three steps:
    1. the kept cells' K and V move down to cells 0 .. m-1 (llamakv_device_gather, bytes unchanged);
    2. the cells from m on are freed: they hold the highest positions, one seq_rm;
    3. cells 0 .. m-1 still carry the positions of the cells that were there: the sequence is
       copied into llama.cpp's device buffers (ON_DEVICE state: the data stays on the device, the
       host gets the cells' metadata), the metadata's positions are set to the kept ones, and the
       state is put back, which relabels the cells and copies the same data back in place.
    On return the sequence's cells are 0 .. m-1 holding pos[keep], ascending."""
    ctx, seq_id = seq_cache.ctx, seq_cache.seq_id
    kept_rows = np.flatnonzero(keep).astype(np.int32)
    m, n = len(kept_rows), len(pos)
    if m == n:
        return
    llama_cpp.llama_synchronize(ctx)
    try:
        dev.gather(dev.stream_of(seq_id), n, kept_rows)  # DeviceError: nothing moved, the host path can run
        _relabel(ctx, seq_id, pos, keep, m)
    except DeviceError:
        raise
    except LlamaKVError as e:
        # the data has moved (on some device at least) and llama.cpp's metadata has not: the cells are no longer what they say
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), seq_id, -1, -1)
        raise StateError(f"{e}; the sequence's cells were freed (prefill again)") from e


def _relabel(ctx, seq_id: int, pos: np.ndarray, keep: np.ndarray, m: int) -> None:
    """Steps 2 and 3 of compact()."""
    mem = llama_cpp.llama_get_memory(ctx)
    if not llama_cpp.llama_memory_seq_rm(mem, seq_id, int(pos[m]), -1):
        raise LlamaKVError(f"llama_memory_seq_rm refused positions from {int(pos[m])}")
    size = llama_cpp.llama_state_seq_get_size_ext(ctx, seq_id, ON_DEVICE)
    meta = np.empty(size, dtype=np.uint8)
    written = llama_cpp.llama_state_seq_get_data_ext(ctx, _u8p(meta), size, seq_id, ON_DEVICE)
    if written != size:
        raise LlamaKVError(f"llama.cpp wrote {written} of {size} bytes of a device-side sequence state")
    held = first_section_positions(meta)
    if not np.array_equal(held, pos[:m]):
        raise LlamaKVError("the sequence's cells are not the ones llamakv scored: its stream holds other positions")
    _first_section_cells(meta)[:, 0] = pos[keep]
    if llama_cpp.llama_state_seq_set_data_ext(ctx, _u8p(meta), size, seq_id, ON_DEVICE) == 0:
        raise LlamaKVError("llama.cpp refused its own device-side sequence state")
