"""Saved sequence states: a llama.cpp sequence state with what llamakv captured for it.

A state file is an .npz archive: `meta` (JSON: magic, version, the model's fingerprint, the
next position, the number of cells and the caller's `extra`), `llama_state` (the bytes of
llama_state_seq_get_data), the cells' positions, surprisal and sentence ends, and the captured
query statistics and recent queries. Writes are atomic (a temporary file in the same directory,
fsync, rename). A state of another model is refused before anything is restored.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import StateError
from .sequence import Snapshot

STATE_MAGIC = "llamakv-state"
STATE_VERSION = 2
_CELLS = ("positions", "surprisal", "sentence_end")
_CAPTURED = ("q_count", "q_mean", "q_m2", "q_cov", "window_q", "window_pos")


def save(path: str | os.PathLike, snap: Snapshot, fingerprint: dict, extra: dict | None = None) -> int:
    """Write `snap` atomically; returns the file size."""
    path = Path(path)
    meta = {"magic": STATE_MAGIC, "version": STATE_VERSION, "model": fingerprint,
            "next_pos": snap.next_pos, "n_cells": snap.n_cells, "extra": extra or {}}
    arrays = dict(meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                  llama_state=snap.llama_state, positions=snap.positions, surprisal=snap.surprisal,
                  sentence_end=snap.sentence_end, **snap.captured)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path.stat().st_size


def load(path: str | os.PathLike, fingerprint: dict) -> tuple[Snapshot, dict]:
    """Read a state file saved from the model with this fingerprint: the snapshot and the
    `extra` given to save(). Raises StateError on a missing, damaged or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"no saved state at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(data["meta"].tobytes())
    except Exception as e:  # np.load and json raise many kinds on a damaged file
        raise StateError(f"{path} is not a llamakv state file: {e}") from e
    if not isinstance(meta, dict) or meta.get("magic") != STATE_MAGIC or meta.get("version") != STATE_VERSION:
        raise StateError(f"{path} is not a llamakv state file of version {STATE_VERSION}")
    if meta.get("model") != fingerprint:
        saved = meta.get("model") or {}
        diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
        raise StateError(f"{path} was saved from another model (saved vs loaded: {diff})")
    missing = [k for k in ("llama_state", "positions", "window_q", "window_pos", "q_count") if k not in data]
    if missing:
        raise StateError(f"{path} is damaged: it lacks {', '.join(missing)}")
    n = len(data["positions"])
    surprisal = data.get("surprisal", np.full(n, np.nan, np.float32))  # older states of version 2: unknown
    sentence_end = data.get("sentence_end", np.zeros(n, bool))
    if n != int(meta["n_cells"]) or len(surprisal) != n or len(sentence_end) != n:
        raise StateError(f"{path} is damaged: its per-cell arrays disagree on the number of cells")
    captured = {k: data[k] for k in _CAPTURED if k in data}
    snap = Snapshot(llama_state=data["llama_state"], captured=captured, next_pos=int(meta["next_pos"]),
                    n_cells=n, positions=data["positions"], surprisal=surprisal, sentence_end=sentence_end)
    return snap, meta.get("extra", {})
