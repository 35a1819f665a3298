"""The real Gemma-3-270M (PyPI parts, a base model: completion prompts), a sliding-window model:
its global layers' cells are compressed, the sliding cache keeps its window, and a needle the
full cache finds at ~3k tokens is still found at ratio 0.5, through the API, the CLI and the server."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from llamakv import KVSession
from llamakv.cache import SeqState
from llamakv.errors import StateError
from llamakv.models import ModelError, resolve_model

from conftest import ROOT, needle_prompt

try:
    resolve_model("gemma-3-270m")
    HAVE_GEMMA = True
except ModelError:
    HAVE_GEMMA = False
pytestmark = pytest.mark.skipif(not HAVE_GEMMA, reason="Gemma-3-270M not installed: pip install '.[gemma3]'")

CONTEXT, QUESTION, NEEDLE = needle_prompt(120, 40)  # 2902 tokens
TAIL = "\nThe special magic number for the lighthouse mentioned in the provided text is"


@pytest.fixture(scope="module")
def gemma():
    s = KVSession.from_model("gemma-3-270m", n_ctx=4096, n_threads=2)
    s.prefill(CONTEXT)
    snap = s.snapshot()
    s.full_answer = s.generate(TAIL, max_tokens=12)
    yield s, snap
    s.close()


def test_needle_found_after_compressing_the_global_layers_by_half(gemma):
    s, snap = gemma
    assert NEEDLE in s.full_answer
    s.restore(snap)
    assert s.cache_layout.iswa and s.scored_layers == (5, 11, 17)
    sliding_before = s.cache.get_state(partial=True).copy()
    r = s.compress(0.5)
    assert r.cells_before == snap.n_cells and r.cells_after == snap.n_cells - r.evicted
    assert r.evicted == (snap.n_cells - s.n_sink - 1) // 2
    state = SeqState.parse(s.cache.get_state(), 2)
    assert state.sections[0].n_cells == r.cells_after  # the global layers' cells are really freed
    assert state.sections[1].n_cells == r.sliding_cells == s.cache_layout.window  # the window, untouched
    np.testing.assert_array_equal(s.cache.get_state(partial=True), sliding_before)
    assert r.kv_bytes_after < r.kv_bytes_before
    assert NEEDLE in s.generate(TAIL, max_tokens=12)


def test_saved_state_continues_exactly_past_the_window(gemma, tmp_path):
    s, snap = gemma
    s.restore(snap)
    s.compress(0.5)
    s.save(tmp_path / "g.npz")
    a = s.generate(TAIL, max_tokens=24)
    s.reset()
    s.load(tmp_path / "g.npz")
    assert s.generate(TAIL, max_tokens=24) == a


def test_question_guided_compression_leaves_the_sliding_cache_as_it_was(gemma):
    s, snap = gemma
    s.restore(snap)
    sliding = s.cache.get_state(partial=True).copy()
    r = s.compress(0.5, question=TAIL)
    assert r.question_tokens > 0 and s.next_pos == snap.next_pos
    np.testing.assert_array_equal(s.cache.get_state(partial=True), sliding)
    assert NEEDLE in s.generate(TAIL, max_tokens=12)


def test_truncation_past_the_window_is_refused(gemma):
    s, snap = gemma
    s.restore(snap)
    assert s.can_truncate(s.next_pos - 1) and not s.can_truncate(100)
    with pytest.raises(StateError, match="sliding-window cache"):
        s.truncate(100)
    assert s.n_cells == snap.n_cells  # nothing was lost


def test_cli_finds_the_needle_at_half_the_cache(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(CONTEXT)
    r = subprocess.run([sys.executable, "-m", "llamakv.cli", "compress", "gemma-3-270m", "-f", str(doc), "--no-chat",
                        "-q", QUESTION, "--ratio", "0.5", "-c", "4096", "-n", "12", "-t", "2", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert NEEDLE in out["answer"]
    rep = out["report"]
    assert rep["cells_after"] < 0.55 * rep["cells_before"] and rep["sliding_cells"] == 512


def test_server_finds_the_needle_at_half_the_cache(tmp_path):
    httpx = pytest.importorskip("httpx")
    from test_server import running_server

    with running_server(tmp_path, "-t", "2", model="gemma-3-270m") as srv:
        r = httpx.post(srv["url"] + "/completion", timeout=600, json={
            "prompt": CONTEXT + TAIL, "n_predict": 12, "temperature": 0,
            "llamakv": {"ratio": 0.5, "min_tokens": 0}}).json()
    assert NEEDLE in r.get("content", ""), r
    comp = r["llamakv"]["compression"]
    assert comp["evicted"] > 1000 and comp["cells_after"] < 0.55 * comp["cells_before"]


def test_prompt_streamed_through_a_bounded_cache(gemma):
    """2.9k tokens through 1024 global cells: compressed while prefilling, the needle still found."""
    s, snap = gemma
    s.reset()
    s.prefill(CONTEXT, budget=1024)
    assert len(s.reports) >= 2 and s.n_cells <= 1024
    assert all(r.sliding_cells > 0 for r in s.reports)
    answer = s.generate(TAIL, max_tokens=12, budget=1024)
    assert s.n_cells <= 1024
    assert NEEDLE in answer
