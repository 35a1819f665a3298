"""Operations on llama.cpp's KV cache for one sequence: eviction, compaction, state bytes."""
from __future__ import annotations

import ctypes

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

    def get_state(self) -> bytes:
        size = self.state_size()
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, self.seq_id)
        if written != size:
            raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
        return bytes(buf)

    def set_state(self, data: bytes) -> None:
        """Replace the sequence's cells by a saved state (cells placed contiguously from 0)."""
        self.clear()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(data), self.seq_id) == 0:
            raise StateError("llama.cpp refused the saved sequence state (different model, cache "
                             "types or a context too small for it)")

    def compact(self) -> None:
        """Move the sequence's cells to the bottom of the cache so that n_kv (the attention width,
        padded highest used cell) shrinks: llama.cpp has no defragmentation any more."""
        self.set_state(self.get_state())
