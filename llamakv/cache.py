"""Operations on llama.cpp's KV cache for one sequence: eviction, compaction, state bytes."""
from __future__ import annotations

import ctypes
import struct

import llama_cpp
import numpy as np

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


def _u8p(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


def drop_cells(state: np.ndarray, evicted_positions: np.ndarray) -> np.ndarray:
    """Remove the cells holding `evicted_positions` from a sequence state blob
    (llama_state_seq_get_data of one sequence, one stream, no per-cell extension), in host memory.

    Layout (llama-context.cpp / llama-kv-cache.cpp): u32 magic, i32 seq_id, u32 n_stream,
    u32 n_cells, per cell (i32 pos, u32 n_seq_id = 1, i32 seq_id), u32 v_trans, u32 n_layer,
    per layer (i32 type, u64 row_bytes, n_cells rows) for K, then the same for V, or when V is
    transposed per layer (i32 type, u32 elem_size, u32 n_embd, n_embd x n_cells elements).
    Raises ValueError on any other layout.
    """
    buf = np.frombuffer(state, dtype=np.uint8)
    if len(buf) < 24:
        raise ValueError("state too short")
    magic, _seq, n_stream, n = struct.unpack_from("<IiII", state, 0)
    if magic != STATE_MAGIC or n_stream != 1:
        raise ValueError("not a single-stream sequence state")
    off = 16
    meta = buf[off:off + 12 * n].view(np.int32).reshape(n, 3) if n else np.zeros((0, 3), np.int32)
    if len(meta) != n or (n and not (meta[:, 1] == 1).all()):
        raise ValueError("cells shared by several sequences or with extensions")
    keep = np.flatnonzero(~np.isin(meta[:, 0], evicted_positions))
    out = [buf[:12], np.array([len(keep)], dtype="<u4").view(np.uint8), meta[keep].reshape(-1).view(np.uint8)]
    off += 12 * n
    v_trans, n_layer = struct.unpack_from("<II", state, off)
    out.append(buf[off:off + 8])
    off += 8
    for section in ("k", "v"):
        for _ in range(n_layer):
            if section == "v" and v_trans:
                _t, el, n_embd = struct.unpack_from("<iII", state, off)
                out.append(buf[off:off + 12])
                off += 12
                size = n_embd * n * el
                if el not in (1, 2, 4):
                    raise ValueError(f"V element size {el}")
                elems = buf[off:off + size].view({1: np.uint8, 2: np.uint16, 4: np.uint32}[el])
                out.append(np.take(elems.reshape(n_embd, n), keep, axis=1).reshape(-1).view(np.uint8))
            else:
                _t, row = struct.unpack_from("<iQ", state, off)
                out.append(buf[off:off + 12])
                off += 12
                size = n * row
                out.append(np.take(buf[off:off + size].reshape(n, row), keep, axis=0).reshape(-1))
            off += size
    if off != len(buf):
        raise ValueError(f"unexpected state layout ({off} of {len(buf)} bytes parsed)")
    return np.concatenate(out)


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

    def state_size(self) -> int:
        return llama_cpp.llama_state_seq_get_size(self.ctx, self.seq_id)

    def get_state(self) -> np.ndarray:
        """The sequence's state bytes (uint8 array)."""
        size = self.state_size()
        buf = np.empty(size, dtype=np.uint8)
        written = llama_cpp.llama_state_seq_get_data(self.ctx, _u8p(buf), size, self.seq_id)
        if written != size:
            raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
        return buf

    def set_state(self, data: np.ndarray, fallback: np.ndarray | None = None) -> None:
        """Replace the sequence's cells by a saved state (cells placed contiguously from 0);
        if llama.cpp refuses it, `fallback` is put back before raising."""
        self.clear()
        data = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8))
        if llama_cpp.llama_state_seq_set_data(self.ctx, _u8p(data), len(data), self.seq_id) == 0:
            if fallback is not None:
                self.set_state(fallback)
            raise StateError("llama.cpp refused the saved sequence state (different model, cache "
                             "types or a context too small for it)")

    def compact(self) -> None:
        """Move the sequence's cells to the bottom of the cache, so that n_kv (the attention
        width: padded highest used cell) shrinks; llama.cpp has no defragmentation any more."""
        state = self.get_state()
        self.set_state(state, fallback=state)
