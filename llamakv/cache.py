"""Operations on llama.cpp's KV cache for one sequence: state bytes parsed, eviction, compaction."""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

import llama_cpp
import numpy as np

from . import _shim
from .errors import StateError


def position_runs(positions: np.ndarray) -> list[tuple[int, int]]:
    """Sorted positions -> half-open runs [p0, p1) of consecutive positions."""
    if len(positions) == 0:
        return []
    p = np.sort(np.asarray(positions, dtype=np.int64))
    breaks = np.flatnonzero(np.diff(p) != 1)
    starts = np.concatenate(([p[0]], p[breaks + 1]))
    ends = np.concatenate((p[breaks], [p[-1]])) + 1
    return list(zip(starts.tolist(), ends.tolist()))


STATE_MAGIC = 0xAF143CD8
PARTIAL_ONLY = 1  # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY: the sliding-window cache's part of a state


def _u8p(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


@dataclass
class LayerTensor:
    """One layer's K or V in a sequence state: `data` is [n_cells, row_bytes] (one row per
    cell) or, for transposed V, [n_embd, n_cells * elem] (one row per dimension)."""
    type: int
    header: np.ndarray      # the 12 bytes before the data
    data: np.ndarray        # uint8, 2-d view into the state
    transposed: bool
    elem: int = 0           # bytes per element (transposed V)

    @property
    def row_bytes(self) -> int:
        return self.data.shape[1]


@dataclass
class CacheSection:
    """The part of a sequence state written by one KV cache (llama_kv_cache::state_write): u32
    n_stream, then per stream u32 n_cells and, for a stream with cells, per cell (i32 pos,
    u32 n_seq_id = 1, i32 seq_id), u32 v_trans, u32 n_layer, per layer (i32 type, u64 row_bytes,
    n_cells rows) for K, then the same for V, or when V is transposed per layer (i32 type,
    u32 elem_size, u32 n_embd, n_embd x n_cells elements). One stream holds the sequence's cells
    (the others, with llama.cpp's per-sequence streams, are empty)."""
    start: int              # byte offsets of the section in the state
    end: int
    n_stream: int
    stream: int             # the stream holding the cells (0 when there are none)
    pos: np.ndarray         # [n_cells] int32, in cell order
    cell_meta: np.ndarray   # [n_cells, 3] int32
    v_trans: bool
    k: list[LayerTensor]
    v: list[LayerTensor]

    @property
    def n_cells(self) -> int:
        return len(self.pos)

    @classmethod
    def parse(cls, buf: np.ndarray, off: int) -> "CacheSection":
        """The section starting at byte `off` of the state `buf`; raises ValueError on any other layout."""
        start = off
        (n_stream,) = struct.unpack_from("<I", buf, off)
        off += 4
        if not 1 <= n_stream <= 4096:
            raise ValueError(f"implausible stream count {n_stream}")
        found, data = 0, None
        for s in range(n_stream):
            (n,) = struct.unpack_from("<I", buf, off)
            off += 4
            if n == 0:
                continue
            if data is not None:
                raise ValueError("the sequence has cells in several streams")
            found = s
            data, off = cls._parse_stream(buf, off, n)
        if data is None:
            return cls(start, off, n_stream, 0, np.zeros(0, np.int32), np.zeros((0, 3), np.int32), False, [], [])
        return cls(start, off, n_stream, found, *data)

    @staticmethod
    def _parse_stream(buf: np.ndarray, off: int, n: int):
        meta = buf[off:off + 12 * n].view(np.int32).reshape(n, 3) if off + 12 * n <= len(buf) else None
        if meta is None or not (meta[:, 1] == 1).all():
            raise ValueError("cells shared by several sequences or with extensions")
        off += 12 * n
        v_trans, n_layer = struct.unpack_from("<II", buf, off)
        off += 8
        sections: dict[str, list[LayerTensor]] = {"k": [], "v": []}
        for section in ("k", "v"):
            for _ in range(n_layer):
                header = buf[off:off + 12]
                if section == "v" and v_trans:
                    t, el, n_embd = struct.unpack_from("<iII", buf, off)
                    off += 12
                    size = n_embd * n * el
                    data = buf[off:off + size].reshape(n_embd, n * el)
                    sections[section].append(LayerTensor(t, header, data, True, el))
                else:
                    t, row = struct.unpack_from("<iQ", buf, off)
                    off += 12
                    size = n * row
                    sections[section].append(LayerTensor(t, header, buf[off:off + size].reshape(n, row), False))
                off += size
                if off > len(buf):
                    raise ValueError("state truncated")
        return (meta[:, 0].copy(), meta, bool(v_trans), sections["k"], sections["v"]), off

    def size_keeping(self, m: int) -> int:
        """Bytes of this section holding m of its cells."""
        if self.n_cells == 0:
            return self.end - self.start
        size = 4 + 4 * self.n_stream + 12 * m + 8 + 12 * (len(self.k) + len(self.v))
        return size + sum(lt.data.shape[0] * m * lt.elem if lt.transposed else lt.row_bytes * m
                          for lt in (*self.k, *self.v))

    def write_keeping(self, buf: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """Write this section into `out` (size_keeping(len(rows)) bytes) with only the cells at
        `rows` (sorted), in order."""
        n, m, s = self.n_cells, len(rows), self.stream
        # n_stream, then per stream its cell count, followed by its cells where it has some
        out[:4] = np.array([self.n_stream], dtype="<u4").view(np.uint8)
        out[4:4 + 4 * s] = 0
        out[4 + 4 * s:8 + 4 * s] = np.array([m], dtype="<u4").view(np.uint8)
        off = 8 + 4 * s
        out[off:off + 12 * m] = self.cell_meta[rows].reshape(-1).view(np.uint8)
        off += 12 * m
        v_trans_at = self.start + 8 + 4 * s + 12 * n
        out[off:off + 8] = buf[v_trans_at:v_trans_at + 8]
        off += 8
        lib = _shim.load().lib
        idx = _shim.ptr("int64_t *", rows)
        jobs = []
        for lt in (*self.k, *self.v):
            out[off:off + 12] = lt.header
            off += 12
            size = lt.data.shape[0] * m * lt.elem if lt.transposed else m * lt.row_bytes
            jobs.append((lt, out[off:off + size]))
            off += size
        out[off:] = 0  # the streams after this one: no cells
        assert off + 4 * (self.n_stream - s - 1) == len(out)

        def gather(job) -> None:
            lt, dst = job
            if lt.transposed:
                lib.llamakv_gather_cols(_shim.ptr("uint8_t *", lt.data), _shim.ptr("uint8_t *", dst),
                                        lt.data.shape[0], n, lt.elem, idx, m)
            else:
                lib.llamakv_gather_rows(_shim.ptr("uint8_t *", lt.data), _shim.ptr("uint8_t *", dst),
                                        lt.row_bytes, idx, m)

        _shim.parallel_map(gather, jobs)


@dataclass
class SeqState:
    """A parsed llama_state_seq_get_data blob of one sequence: u32 magic, i32 seq_id, then one
    section per KV cache of the model (CacheSection): one for a plain cache; for a
    sliding-window (iSWA) model the global layers' cache, then the sliding layers' one. The
    first section holds the cells llamakv scores and evicts; `pos`, `k`, `v` are its."""
    buf: np.ndarray
    sections: list[CacheSection]
    layer_rows: tuple[int, ...] | None = None  # k[i], v[i] are the main section's layer layer_rows[i]
    k_float: dict | None = None  # main-section layer -> its keys as they are scored, where not as stored

    @property
    def main(self) -> CacheSection:
        return self.sections[0]

    @property
    def pos(self) -> np.ndarray:
        return self.main.pos

    @property
    def k(self) -> list[LayerTensor]:
        rows = range(len(self.main.k)) if self.layer_rows is None else self.layer_rows
        return [(self.k_float or {}).get(i, self.main.k[i]) for i in rows]

    @property
    def v(self) -> list[LayerTensor]:
        return self.main.v if self.layer_rows is None else [self.main.v[i] for i in self.layer_rows]

    def with_layers(self, rows) -> "SeqState":
        """The same state seen as the main section's layers `rows` (a layer may appear several
        times: layers that share another's cells), for scoring; keep() still writes every layer."""
        return SeqState(self.buf, self.sections, tuple(int(r) for r in rows), self.k_float)

    def with_keys(self, row: int, keys: LayerTensor) -> "SeqState":
        """The same state with the main section's layer `row` scored from other keys (keep()
        still writes the stored ones)."""
        return SeqState(self.buf, self.sections, self.layer_rows, {**(self.k_float or {}), row: keys})

    @property
    def n_cells(self) -> int:
        return self.main.n_cells

    @classmethod
    def from_layers(cls, pos: np.ndarray, k: list[LayerTensor], v: list[LayerTensor]) -> "SeqState":
        """A state of one section made of given layer tensors (scoring keys that come from elsewhere)."""
        n = len(pos)
        section = CacheSection(0, 0, 1, 0, np.asarray(pos, dtype=np.int32), np.zeros((n, 3), np.int32), False, k, v)
        return cls(np.zeros(0, np.uint8), [section])

    @classmethod
    def parse(cls, state: np.ndarray, n_sections: int | None = None) -> "SeqState":
        """Raises ValueError on any other layout (or another number of sections, if given)."""
        buf = np.frombuffer(state, dtype=np.uint8)
        if len(buf) < 12:
            raise ValueError("state too short")
        magic, _seq = struct.unpack_from("<Ii", buf, 0)
        if magic != STATE_MAGIC:
            raise ValueError("not a sequence state")
        off, sections = 8, []
        while off < len(buf):
            sections.append(CacheSection.parse(buf, off))
            off = sections[-1].end
        if off != len(buf):
            raise ValueError(f"unexpected state layout ({off} of {len(buf)} bytes parsed)")
        if not sections or (n_sections is not None and len(sections) != n_sections):
            raise ValueError(f"{len(sections)} cache sections in the state, expected {n_sections}")
        return cls(buf, sections)

    def keep(self, rows: np.ndarray, into: _shim.HostBuffer | None = None) -> np.ndarray:
        """A new state blob whose first section holds only the cells at these row indices
        (sorted), in order; the other sections as they are (a view of `into` if given)."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        main = self.main
        size_main = main.size_keeping(len(rows))
        rest = self.buf[main.end:]
        size_total = 8 + size_main + len(rest)
        out = into.view(size_total) if into is not None else np.empty(size_total, dtype=np.uint8)
        out[:8] = self.buf[:8]
        main.write_keeping(self.buf, rows, out[8:8 + size_main])
        out[8 + size_main:] = rest
        return out


def with_streams(state: np.ndarray, n_stream: int) -> np.ndarray:
    """The same sequence state for a context of `n_stream` KV streams (llama.cpp refuses a state
    whose stream count differs from its own): the cells go to stream 0, restored into whichever
    sequence they are given to. Returns `state` itself where the count is already right."""
    parsed = SeqState.parse(state)
    if all(sec.n_stream == n_stream for sec in parsed.sections):
        return state
    buf = parsed.buf
    out = [buf[:8]]
    for sec in parsed.sections:
        counts = np.zeros(n_stream, dtype="<u4")
        out.append(np.array([n_stream], dtype="<u4").view(np.uint8))
        if sec.n_cells == 0:
            out.append(counts.view(np.uint8))
            continue
        payload = buf[sec.start + 4 + 4 * (sec.stream + 1):sec.end - 4 * (sec.n_stream - sec.stream - 1)]
        out += [np.array([sec.n_cells], dtype="<u4").view(np.uint8), payload, counts[1:].view(np.uint8)]
    return np.concatenate(out)


def drop_cells(state: np.ndarray, evicted_positions: np.ndarray) -> np.ndarray:
    """Remove the cells holding `evicted_positions` from a sequence state blob, in host memory.
    Raises ValueError on a layout SeqState does not know."""
    parsed = SeqState.parse(state)
    return parsed.keep(np.flatnonzero(~np.isin(parsed.pos, evicted_positions)))


class SequenceCache:
    """One sequence of a llama_context's memory."""

    def __init__(self, ctx, seq_id: int = 0):
        self.ctx = ctx
        self.seq_id = seq_id

    @property
    def memory(self):
        return llama_cpp.llama_get_memory(self.ctx)

    def pos_min(self) -> int:
        return llama_cpp.llama_memory_seq_pos_min(self.memory, self.seq_id)

    def pos_max(self) -> int:
        return llama_cpp.llama_memory_seq_pos_max(self.memory, self.seq_id)

    def clear(self) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, self.seq_id, -1, -1)

    def evict(self, positions: np.ndarray) -> int:
        """Free the cells holding these positions, one seq_rm per run (each call scans all cells)."""
        runs = position_runs(positions)
        mem = self.memory
        for p0, p1 in runs:
            if not llama_cpp.llama_memory_seq_rm(mem, self.seq_id, p0, p1):
                raise RuntimeError(f"llama_memory_seq_rm refused positions [{p0}, {p1})")
        return len(runs)

    def state_size(self, partial: bool = False) -> int:
        return llama_cpp.llama_state_seq_get_size_ext(self.ctx, self.seq_id, PARTIAL_ONLY if partial else 0)

    def get_state(self, into: _shim.HostBuffer | None = None, partial: bool = False) -> np.ndarray:
        """The sequence's state bytes (uint8 array; a view of `into` if given, valid until its
        next use). `partial`: only the sliding-window cache's part (iSWA models)."""
        flags = PARTIAL_ONLY if partial else 0
        size = self.state_size(partial)
        buf = into.view(size) if into is not None else np.empty(size, dtype=np.uint8)
        written = llama_cpp.llama_state_seq_get_data_ext(self.ctx, _u8p(buf), size, self.seq_id, flags)
        if written != size:
            raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
        return buf

    def set_state(self, data: np.ndarray, fallback: np.ndarray | None = None, partial: bool = False) -> None:
        """Replace the sequence's cells by a saved state (cells placed contiguously from 0);
        if llama.cpp refuses it, `fallback` is put back before raising. `partial`: a state of
        get_state(partial=True), which replaces the sliding-window cache's cells only."""
        if not partial:
            self.clear()
        data = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8))
        flags = PARTIAL_ONLY if partial else 0
        if llama_cpp.llama_state_seq_set_data_ext(self.ctx, _u8p(data), len(data), self.seq_id, flags) == 0:
            if fallback is not None:
                self.set_state(fallback, partial=partial)
            raise StateError("llama.cpp refused the saved sequence state (different model, cache "
                             "types or a context too small for it)")

    def compact(self) -> None:
        """Move the sequence's cells to the bottom of the cache, so that n_kv (the attention
        width: padded highest used cell) shrinks; llama.cpp has no defragmentation any more."""
        state = self.get_state()
        self.set_state(state, fallback=state)
