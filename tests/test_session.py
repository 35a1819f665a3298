"""Compression really frees llama.cpp cells, keeps answers, and survives save / load."""
import math
import struct

import llama_cpp
import numpy as np
import pytest

from llamakv import CacheFullError, KVSession, StateError
from llamakv.scoring import aggregate
from conftest import needle_prompt


def state_positions(state: bytes, with_v_trans: bool = False):
    """Positions of the cells in a llama.cpp sequence state (independent parse of its header);
    with_v_trans: also whether V is stored transposed (flash attention off)."""
    magic, _seq, n_stream = struct.unpack_from("<IiI", state, 0)
    assert magic == 0xAF143CD8 and n_stream == 1
    (n_cells,) = struct.unpack_from("<I", state, 12)
    off, out = 16, []
    for _ in range(n_cells):
        pos, n_seq = struct.unpack_from("<iI", state, off)
        off += 8 + 4 * n_seq
        out.append(pos)
    if with_v_trans:
        (v_trans,) = struct.unpack_from("<I", state, off)
        return np.array(out), v_trans
    return np.array(out)


@pytest.fixture(scope="module")
def needle_session(session):
    """The needle haystack prefilled once (chat template, question kept for after compression)."""
    session.reset()
    context, question, answer = needle_prompt()
    full = session.chat_prompt([{"role": "user", "content": context + "\n\n\x00"}])
    before, after = full.split("\x00")
    session.prefill(before)
    return session, session.snapshot(), question + after, answer


def test_compress_half_frees_the_expected_cells(needle_session):
    s, snap, _, _ = needle_session
    s.restore(snap)
    n, last = s.n_cells, s.next_pos - 1
    size_before = s.cache.state_size()
    n_kv_before = int(s.capture.n_kv.max())
    inputs = s.score_inputs()
    scores = aggregate(s.press.score(inputs), "mean")
    report = s.compress(0.5)
    n_compressible = n - s.n_sink - 1
    expected = n - math.floor(0.5 * n_compressible)
    assert report.cells_after == s.n_cells == expected
    kept, v_trans = state_positions(s.cache.get_state(), with_v_trans=True)
    assert v_trans == 1  # flash attention off: V transposed
    assert len(kept) == expected
    candidates = np.flatnonzero((inputs.pos >= s.n_sink) & (inputs.pos != last))
    best = candidates[np.argsort(-scores[candidates], kind="stable")[:expected - s.n_sink - 1]]
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.r_[0:s.n_sink, last, inputs.pos[best]]))
    assert set(range(s.n_sink)) <= set(kept.tolist()) and last in kept  # sinks and newest kept
    assert (s.cache.pos_min(), s.cache.pos_max()) == (0, last)
    assert report.kv_bytes_after < 0.55 * size_before
    assert report.evicted == n - expected and report.runs > 0
    # decoding continues, at the next position, and attends over fewer cells after compaction
    s.prefill(" The")
    assert s.cache.pos_max() == last + 1
    n_kv_after = int(s.capture.n_kv.max())
    assert n_kv_after == 256 * math.ceil((expected + 1) / 256) < n_kv_before


def test_question_guided_compression_leaves_no_trace_of_the_question(needle_session):
    """compress(question=...): the question is decoded for the scoring and removed again: the
    cells, positions, statistics and recent queries are as if it had never been there."""
    s, snap, question, answer = needle_session
    s.restore(snap)
    n, next_pos = s.n_cells, s.next_pos
    count = s.queries.stats.count.copy()
    recent_q, recent_pos = s.queries.recent_queries()
    q = s.tokenize(question)
    report = s.compress(0.5, question=q)
    assert report.question_tokens == len(q) and report.method == "ea_keydiff+question"
    assert report.cells_before == n and report.cells_after == s.n_cells == n - math.floor(0.5 * (n - s.n_sink - 1))
    held = state_positions(s.cache.get_state())
    np.testing.assert_array_equal(np.sort(held), s.positions)
    assert s.next_pos == next_pos and held.max() == next_pos - 1  # the newest prompt cell, not the question's
    assert report.kv_bytes_after == s.cache.state_size()
    np.testing.assert_array_equal(s.queries.stats.count, count)  # the question fed no statistics
    q_after, pos_after = s.queries.recent_queries()
    np.testing.assert_array_equal(pos_after, recent_pos)
    np.testing.assert_array_equal(q_after, recent_q)
    with pytest.raises(ValueError, match="nothing to continue from"):
        s.generate(max_tokens=1)  # the logits were the question's: the question must be prefilled
    assert answer in s.generate(question, max_tokens=32)


def test_without_compaction_n_kv_stays(needle_session):
    s, snap, _, _ = needle_session
    s.restore(snap)
    s.prefill(" The")
    n_kv_full = int(s.capture.n_kv.max())
    s.restore(snap)
    s.compress(0.5, compact=False)
    s.prefill(" The")
    assert int(s.capture.n_kv.max()) == n_kv_full


def test_ratio_zero_keeps_greedy_output_identical(needle_session):
    s, snap, suffix, _ = needle_session
    s.restore(snap)
    plain = s.generate(suffix, max_tokens=24)
    s.restore(snap)
    report = s.compress(0.0)
    assert report.evicted == 0
    assert s.generate(suffix, max_tokens=24) == plain
    s.restore(snap)  # a stop string ends the text before it
    assert "magic" in plain
    assert s.generate(suffix, max_tokens=24, stop=["magic"]) == plain.split("magic")[0]


def test_needle_retrieved_at_half(needle_session):
    s, snap, suffix, answer = needle_session
    s.restore(snap)
    assert answer in s.generate(suffix, max_tokens=32), "the full cache must find the needle"
    s.restore(snap)
    s.compress(0.5)
    assert answer in s.generate(suffix, max_tokens=32)


def test_save_load_roundtrip_and_atomic_write(needle_session, tmp_path):
    s, snap, suffix, _ = needle_session
    s.restore(snap)
    s.compress(0.5)
    path = tmp_path / "state.npz"
    s.save(path, extra={"note": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]  # no temp file left
    expected = s.generate(suffix, max_tokens=16)
    s.reset()
    assert s.load(path) == {"note": "x"}
    assert s.generate(suffix, max_tokens=16) == expected
    # a second compression of the loaded state works from the saved statistics and keys
    report = s.compress(0.5)
    assert report.cells_before > report.cells_after


def test_generation_past_n_ctx_positions(tiny_gguf):
    s = KVSession.from_model(tiny_gguf, n_ctx=512)
    s.prefill(list(range(100, 500)))
    s.compress(0.75)
    out_tokens = 0
    for _ in s.stream(max_tokens=300):
        out_tokens += 1
    assert s.next_pos > 512 + 100  # positions beyond n_ctx
    assert s.cache.pos_max() == s.next_pos - 1
    assert s.n_cells <= 512


def test_load_llama_leaves_out_amx_buffers_where_llama_cpp_has_them():
    from llamakv.models import load_llama, resolve_model

    amx = b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()
    llama = load_llama(resolve_model(None), n_ctx=256, verbose=False)
    assert llama.model_params.use_extra_bufts is not amx
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts  # llama_cpp's default is back
    llama.eval(llama.tokenize(b"The capital of France is"))  # AMX builds crashed here on some CPUs
    assert llama.n_tokens == len(llama.tokenize(b"The capital of France is"))


def test_wraps_an_existing_llama_with_one_context():
    from llamakv.models import load_llama, resolve_model

    llama = load_llama(resolve_model(None), n_ctx=1024, verbose=False)
    old_ctx = llama._ctx.ctx
    s = KVSession(llama)
    assert llama._ctx.ctx is s.ctx and s.ctx is not old_ctx
    s.prefill("Paris is the capital of France. " * 20)
    n = s.n_cells
    assert n > 0 and (s.queries.stats.count == n - s.n_sink).all()
    report = s.compress(0.5)
    assert report.cells_after == s.n_cells < n
    assert s.generate(" France", max_tokens=4)
    llama.close()


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_outside_range_is_refused(needle_session, ratio):
    s, snap, _, _ = needle_session
    s.restore(snap)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        s.compress(ratio)
    assert s.n_cells == snap.n_cells


def test_empty_prompt_is_refused(fresh):
    with pytest.raises(ValueError, match="empty prompt"):
        fresh.prefill("")


def test_prompt_larger_than_cache_loses_nothing(needle_session):
    s, snap, suffix, _ = needle_session
    s.restore(snap)
    with pytest.raises(CacheFullError, match="free cells"):
        s.prefill(list(range(1000, 1000 + s.free_cells + 1)))
    assert s.n_cells == snap.n_cells
    assert (s.cache.pos_min(), s.cache.pos_max()) == (0, snap.next_pos - 1)


def test_state_of_another_model_is_refused(needle_session, tiny_gguf, tmp_path):
    s, snap, _, _ = needle_session
    other = KVSession.from_model(tiny_gguf, n_ctx=512)
    other.prefill("a state of another model")
    other.save(tmp_path / "other.npz")
    s.restore(snap)
    with pytest.raises(StateError, match="another model"):
        s.load(tmp_path / "other.npz")
    assert s.n_cells == snap.n_cells and s.cache.pos_max() == snap.next_pos - 1
    (tmp_path / "junk.npz").write_bytes(b"not a state")
    with pytest.raises(StateError, match="not a llamakv state"):
        s.load(tmp_path / "junk.npz")
    with pytest.raises(StateError, match="no saved state"):
        s.load(tmp_path / "missing.npz")


def test_qwen2_compress_and_continue(qwen_session):
    s = qwen_session
    s.reset()
    s.prefill("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 10)
    n, last = s.n_cells, s.next_pos - 1
    report = s.compress(0.5)
    assert report.cells_after == s.n_cells == n - (n - s.n_sink - 1) // 2
    assert len(state_positions(s.cache.get_state())) == s.n_cells
    assert (s.cache.pos_min(), s.cache.pos_max()) == (0, last)
    assert s.generate("\ndef", max_tokens=8)
    assert s.cache.pos_max() > last


def test_sampled_generation_is_seeded(fresh):
    fresh.prefill("Once upon a time, in a small village by the sea,")
    snap = fresh.snapshot()
    runs = []
    for seed in (1, 1, 2):
        fresh.restore(snap)
        runs.append(fresh.generate(" there", max_tokens=24, temperature=0.9, seed=seed))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_flash_attention_cache_compresses_and_shrinks(tmp_path):
    s = KVSession.from_model(None, n_ctx=1024, flash_attn=True)
    s.prefill("Flash attention keeps V untransposed in the cache. " * 40)
    n_kv_before = int(s.capture.n_kv.max())
    assert n_kv_before >= s.n_cells
    report = s.compress(0.5)
    kept, v_trans = state_positions(s.cache.get_state(), with_v_trans=True)
    assert v_trans == 0 and len(kept) == report.cells_after
    s.prefill(" ok")
    assert int(s.capture.n_kv.max()) < n_kv_before
    n = s.n_cells
    s.save(tmp_path / "fa.npz")
    s.reset()
    s.load(tmp_path / "fa.npz")
    assert s.n_cells == n == len(state_positions(s.cache.get_state()))


def test_host_side_eviction_equals_seq_rm_and_round_trip(needle_session):
    """drop_cells (state edited on the host) leaves exactly the cache that llama.cpp's own
    seq_rm followed by a save/restore round trip leaves."""
    from llamakv.cache import drop_cells

    s, snap, _, _ = needle_session
    rng = np.random.default_rng(0)
    evicted = np.sort(rng.choice(np.arange(s.n_sink, snap.next_pos - 1), size=700, replace=False))
    s.restore(snap)
    s.cache.evict(evicted)
    s.cache.compact()
    by_llama = s.cache.get_state()
    s.restore(snap)
    s.cache.set_state(drop_cells(s.cache.get_state(), evicted))
    np.testing.assert_array_equal(s.cache.get_state(), by_llama)
    assert len(state_positions(by_llama)) == snap.n_cells - 700
    with pytest.raises(ValueError):
        drop_cells(np.zeros(64, dtype=np.uint8), evicted)
