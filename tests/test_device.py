"""Compression on the cache's device (device.py, csrc/llamakv_device.c) against the host path.

On this CPU the device path runs on ggml's CPU backend: the same graph and the same llama.cpp
device-side states as on a GPU, so its results are checked here against the host kernels; the
GPU test repeats the check where the cache lives on a GPU and skips without one."""
from __future__ import annotations

import os

import numpy as np
import pytest

from llamakv import KVSession
from tests.conftest import needle_prompt


def _compress_both(s: KVSession, ratio: float = 0.5, **kw):
    """(positions, state bytes, report) after compress() on the host and on the device, from the
    same snapshot."""
    snap = s.snapshot()
    out = {}
    for device in (False, True):
        s.restore(snap)
        s.compressor.device = device
        report = s.compress(ratio, **kw)
        out[device] = (s.positions, s.cache.get_state().tobytes(), report)
    s.compressor.device = None
    return out[False], out[True]


@pytest.fixture(scope="module")
def fa_session():
    """SmolLM2 with flash attention: V stored a row per cell (without it, a row per dimension)."""
    s = KVSession.from_model(None, n_ctx=4096, n_threads=2, flash_attn=True)
    yield s
    s.close()


@pytest.mark.parametrize("which", ["fresh", "fa_session"])
def test_device_compaction_writes_the_host_paths_state(which, request):
    s = request.getfixturevalue(which)
    s.reset()
    text, question, answer = needle_prompt(40, at=20)
    s.prefill(text)
    assert s.context.device.available and s.context.device.name == "CPU"
    assert s.context.capture.v_trans[0] == (0 if which == "fa_session" else 1)
    host, dev = _compress_both(s)
    assert dev[2].device == "CPU" and host[2].device == ""
    assert np.array_equal(host[0], dev[0]) and host[1] == dev[1]
    assert dev[2].cells_after == host[2].cells_after < host[2].cells_before
    assert len(s.generate(f"\n{question}", max_tokens=8, ignore_eos=True)) > 0  # the compacted cells decode on


def test_cpu_caches_use_the_host_path_unless_asked(fresh):
    fresh.prefill("The quick brown fox jumps over the lazy dog. " * 20)
    assert not fresh.compressor.on_device(fresh.seq, fresh.press)  # a CPU cache: the host path by default
    assert fresh.compress(0.5).device == ""


def test_an_eviction_without_compaction_sends_the_next_compression_to_the_host(fresh):
    fresh.prefill("The quick brown fox jumps over the lazy dog. " * 30)
    fresh.compressor.device = True
    try:
        r1 = fresh.compress(0.3, compact=False)  # holes in the stream: cells no longer in position order
        assert r1.device == "CPU" and not fresh.seq.cells_in_order
        r2 = fresh.compress(0.3)
        assert r2.device == "" and fresh.seq.cells_in_order  # the host path compacts from the state
        assert fresh.compress(0.3).device == "CPU"
    finally:
        fresh.compressor.device = None


def test_bounded_prefill_on_the_device_keeps_the_host_paths_cells(fresh):
    text, _, _ = needle_prompt(110, at=30)
    tokens = fresh.tokenize(text)
    results = []
    for device in (False, True):
        fresh.reset()
        fresh.compressor.device = device
        fresh.prefill(tokens, budget=1024, target=512)
        results.append((fresh.positions, fresh.cache.get_state().tobytes(), [r.device for r in fresh.reports]))
    fresh.compressor.device = None
    assert len(results[0][2]) >= 2 and set(results[1][2]) == {"CPU"} and set(results[0][2]) == {""}
    assert np.array_equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


def _gpu_offload_works() -> bool:
    import llama_cpp
    return bool(llama_cpp.llama_supports_gpu_offload())


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_offload_works(), reason="llama.cpp was built without a GPU backend")
def test_gpu_device_scores_and_kept_cells_match_the_host_path():
    """On a GPU, all layers offloaded: the GGUF at $LLAMAKV_GPU_MODEL, else the default model."""
    s = KVSession.from_model(os.environ.get("LLAMAKV_GPU_MODEL"), n_ctx=8192, n_gpu_layers=99, flash_attn=True)
    try:
        if not s.context.device.available or not s.context.device.is_gpu:
            pytest.skip(f"the KV cache is not on a GPU here ({s.context.device.why_not or s.context.device.name})")
        text, _, _ = needle_prompt(150)
        s.prefill(text)
        host_in, dev_in = s.score_inputs(), s.seq.device_score_inputs()
        kd_host = np.empty((host_in.n_layer, host_in.n_cells), np.float32)
        kd_dev = np.empty_like(kd_host)
        ea = s.press.expected_attention
        a, b = ea.score(host_in, kd_host, 4096), ea.score(dev_in, kd_dev, 4096)
        finite = np.isfinite(a)
        assert np.array_equal(finite, np.isfinite(b))
        np.testing.assert_allclose(b[finite], a[finite], rtol=2e-3, atol=1e-6 * np.abs(a[finite]).max())
        np.testing.assert_allclose(kd_dev, kd_host, atol=2e-3 * s.n_head_kv)
        shares_host, shares_dev = ea.mean_shares(host_in), ea.mean_shares(dev_in)
        np.testing.assert_allclose(shares_dev[finite[0, 0]], shares_host[finite[0, 0]], rtol=2e-3)
        host, dev = _compress_both(s)
        assert dev[2].device and dev[2].device != "CPU" and host[2].device == ""
        overlap = len(np.intersect1d(host[0], dev[0])) / len(host[0])
        assert overlap > 0.995, overlap
        assert len(s.generate(" The", max_tokens=8, ignore_eos=True)) > 0
    finally:
        s.close()


def test_the_scoring_graph_frees_each_layers_float_keys_before_the_next_layer(tmp_path):
    """The graph of all layers holds one layer's float copies of the keys at a time: its scratch
    memory is a few layers' worth, not the model's (a fresh process: the scratch only grows)."""
    script = tmp_path / "scratch.py"
    script.write_text(
        "from llamakv import KVSession, _shim\n"
        "from tests.conftest import needle_prompt\n"
        "s = KVSession.from_model(None, n_ctx=4096, n_threads=2)\n"
        "s.prefill(needle_prompt(80)[0])\n"
        "import numpy as np\n"
        "inputs = s.seq.device_score_inputs()\n"  # as ea_keydiff scores: KeyDiff's sums beside
        "s.press.expected_attention.mean_shares(inputs, np.empty((inputs.n_layer, inputs.n_cells), np.float32), 512)\n"
        "print(s.n_cells, s.n_layer, s.n_head_kv * s.head_dim, _shim.load().lib.llamakv_device_scratch_bytes("
        "s.context.device.backend))\n")
    import subprocess
    import sys
    from tests.conftest import ROOT
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    n, n_layer, row, scratch = map(int, out.stdout.split()[-4:])
    one_copy = n * row * 4  # one layer's keys as float32
    assert scratch < 12 * one_copy < n_layer * one_copy, (scratch, one_copy)


def test_a_failure_on_the_device_before_anything_moved_compresses_on_the_host(fresh, monkeypatch):
    """Out of device memory while scoring (injected): the cache is untouched, so this compression
    takes the host path, with a warning."""
    from llamakv.device import DeviceCache
    from llamakv.errors import DeviceError

    def out_of_memory(self, *a, **kw):
        raise DeviceError("scoring on CPU failed: out of memory")

    fresh.prefill("The quick brown fox jumps over the lazy dog. " * 30)
    snap = fresh.snapshot()
    fresh.compressor.device = False
    fresh.compress(0.5)
    expected = fresh.cache.get_state().tobytes()
    fresh.restore(snap)
    monkeypatch.setattr(DeviceCache, "ea_scores", out_of_memory)
    fresh.compressor.device = True
    try:
        with pytest.warns(RuntimeWarning, match="compressing on the host instead"):
            report = fresh.compress(0.5)
    finally:
        fresh.compressor.device = None
    assert report.device == "" and fresh.cache.get_state().tobytes() == expected
    assert fresh.reports[-1] is report and len(fresh.reports) == 2  # the host one before, this one


def test_the_warm_up_on_an_empty_cache_leaves_compression_as_it_was():
    """On a GPU the graphs run once when the context is made (scratch allocated, kernels loaded
    before the first compression); run here on the CPU backend before a prefill, the device
    path still writes the host path's state."""
    s = KVSession.from_model(None, n_ctx=2048, n_threads=2, flash_attn=True)
    try:
        s.context.device.warm(512)
        s.prefill(needle_prompt(30, at=10)[0])
        host, dev = _compress_both(s)
        assert dev[2].device == "CPU" and host[1] == dev[1]
    finally:
        s.close()
