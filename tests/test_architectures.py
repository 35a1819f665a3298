"""Every supported architecture, on a random-weight GGUF in its real tensor layout, through the real
llama.cpp: the layout learnt from the graph, the captured queries against llama.cpp's own tensors,
the statistics against numpy, compression against a dense numpy reference of the closed form,
decoding afterwards and a saved state's round trip.

What the files hold is known independently of llamakv's capture: `random_gguf.layout(arch)` says
what was written and how llama.cpp's loader of that architecture runs it (scales, soft caps,
sliding layers, rope bases, layers without rope)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from gguf import GGUFReader

from llamakv import KVSession
from llamakv.architectures import SPECS, supported
from llamakv.random_gguf import ARCHITECTURES, layout, write_random_gguf
from llamakv.scoring import ExpectedAttention

TESTED = [a for a in supported() if a in ARCHITECTURES]
TEXT = ("Compression of key-value caches lets long prompts fit in memory, and the model keeps "
        "answering from what it read. ") * 40


def test_every_supported_architecture_is_in_the_matrix():
    assert set(supported()) == set(TESTED), set(supported()) - set(TESTED)
    assert all(SPECS[a].tested for a in TESTED)


@pytest.fixture(scope="module", params=TESTED)
def arch_session(request, tmp_path_factory):
    arch = request.param
    path = write_random_gguf(tmp_path_factory.mktemp(arch) / f"{arch}.gguf", arch)
    s = KVSession.from_model(path, n_ctx=1024, n_batch=64, n_threads=2)
    s.path = path
    yield arch, s
    s.close()


def tokens_of(s: KVSession, n: int) -> list[int]:
    s.reset()
    return s.tokenize(TEXT)[:n]


def probe_chunks(s: KVSession, name: str, op: str | int, tokens: list[int], chunk: int) -> np.ndarray:
    """The F32 tensor of that name and ggml op at each decode call of `chunk` tokens, stacked."""
    s.capture.set_probe(name, s.capture.shim.op_code(op) if isinstance(op, str) else op,
                        64 * s.n_head * s.head_dim * 4)
    out = []
    try:
        for i in range(0, len(tokens), chunk):
            s.prefill(tokens[i:i + chunk])
            out.append(s.capture.probe_result().reshape(-1, s.n_head, s.head_dim))
    finally:
        s.capture.clear_probe()
    return np.concatenate(out)


def rope_layers(s: KVSession) -> list[int]:
    """Layers with rope whose query heads have the model's shape (Gemma 4's sliding ones differ)."""
    return [i for i, a in enumerate(s.layout.layers)
            if a.has_rope and (a.head_dim, a.n_head) == (s.head_dim, s.n_head)]


def test_layout_learnt_from_the_graph(arch_session):
    arch, s = arch_session
    lay = layout(arch)
    assert s.scored_layers == tuple(i for i in range(lay.n_layer) if not lay.swa_layers[i])
    assert s.cache_layout.window == lay.n_swa
    for i, a in enumerate(s.layout.layers):
        assert a is not None, f"no attention found for layer {i}"
        assert a.has_rope == (not lay.nope_layers[i])
        assert a.scale == pytest.approx(lay.attn_scale, rel=1e-6)
        assert a.softcap == pytest.approx(lay.attn_softcap or 0.0)
        assert (a.sinks is not None) == lay.attn_sinks
        if a.has_rope:
            rope = s.capture.rope(i)
            assert rope.n_dims == lay.n_rot[i]
            assert rope.mode == {"norm": 0, "neox": 2}[lay.rope_type]
            base = lay.rope_base_swa if lay.swa_layers[i] else lay.rope_base
            assert rope.freq_base == pytest.approx(base, rel=1e-6)
    assert rope_layers(s), "every architecture here has RoPE on some layer"


def test_rotated_captured_query_equals_llama_cpp_post_rope_query(arch_session):
    arch, s = arch_session
    tokens = tokens_of(s, 150)
    for layer in {rope_layers(s)[0], rope_layers(s)[-1]}:
        a = s.layout.layers[layer]
        s.reset()
        pre = probe_chunks(s, a.query_node, a.query_op, tokens, 64)
        s.reset()
        post = probe_chunks(s, a.rope_node, "ROPE", tokens, 64)
        assert pre.shape == post.shape == (len(tokens), s.n_head, s.head_dim)
        rotated = s.capture.rope(layer).rotate(pre, np.arange(len(tokens)))
        assert np.abs(rotated - post).max() <= 1e-4 * np.abs(post).max() + 1e-5
        assert np.abs(pre - post).max() > 0.05 * np.abs(post).max()  # the rotation is not trivial


def test_statistics_equal_numpy(arch_session):
    arch, s = arch_session
    tokens = tokens_of(s, 140)
    layer = s.scored_layers[-1]
    a = s.layout.layers[layer]
    q = probe_chunks(s, a.query_node, a.query_op, tokens, 37).astype(np.float64)
    rows = q[s.n_sink:]
    st = s.queries.stats
    assert st.count[layer] == len(rows)
    np.testing.assert_allclose(st.mean[layer], rows.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(st.variance()[layer], rows.var(axis=0), rtol=1e-5, atol=1e-7)
    for other in set(range(s.n_layer)) - set(s.scored_layers):
        assert st.count[other] == 0  # sliding layers' queries are not captured


def sink_logits(path, n_layer: int) -> dict[int, np.ndarray]:
    out = {}
    for t in GGUFReader(str(path)).tensors:
        if t.name.endswith("attn_sinks.weight"):
            out[int(t.name.split(".")[1])] = np.asarray(t.data, dtype=np.float64)
    return out


def dense_layer_scores(keys, vnorm, mask, mean, var, rope, next_pos, n_future, scale, cap, sinks):
    """Expected Attention of one layer from the formula with dense matrices: mean rotation as
    the average of the rotation matrices, the logit's scale, soft cap and sinks as llama.cpp's
    loader of the architecture sets them."""
    d, H, Hk = keys.shape[-1], mean.shape[0], keys.shape[1]
    if rope is None:
        R_bar = np.eye(d)
    else:
        R_bar = np.zeros((d, d))
        a, b = rope.pair_dims()
        for t in range(next_pos, next_pos + n_future):
            cos, sin = rope.cos_sin([t])
            R = np.eye(d)
            R[a, a], R[a, b], R[b, a], R[b, b] = cos[0], -sin[0], sin[0], cos[0]
            R_bar += R / n_future
    out = np.zeros((H, mask.sum()))
    for h in range(H):
        mu, sigma = R_bar @ mean[h], R_bar @ np.diag(var[h]) @ R_bar.T
        k = keys[mask, h // (H // Hk)].astype(np.float64)
        z = scale * (k @ mu) + scale ** 2 * np.einsum("nd,de,ne->n", k, sigma, k) / 2
        if cap:
            z = cap * np.tanh(z / cap)
        top = max(z.max(), sinks[h] if sinks is not None else -np.inf)
        e = np.exp(z - top)
        out[h] = e / (e.sum() + (math.exp(sinks[h] - top) if sinks is not None else 0.0))
    out = out.reshape(Hk, H // Hk, -1).mean(axis=1)
    return out * vnorm[mask].T


def test_compression_keeps_the_cells_of_the_numpy_reference(arch_session):
    arch, s = arch_session
    lay = layout(arch)
    tokens = tokens_of(s, 400)
    s.prefill(tokens)
    inputs = s.score_inputs()
    mask = inputs.pos >= s.n_sink
    sinks = sink_logits(s.path, s.n_layer)
    shares = []
    for j, layer in enumerate(s.scored_layers):
        sc = dense_layer_scores(inputs.keys[:, j], inputs.vnorm[:, j], mask, s.queries.stats.mean[layer],
                                s.queries.stats.variance()[layer], s.capture.rope(layer), s.next_pos, 512,
                                lay.attn_scale, lay.attn_softcap or 0.0, sinks.get(layer))
        shares.append(sc / sc.sum(axis=1, keepdims=True))
    cell = np.mean(np.concatenate(shares), axis=0)  # each (layer, head) row normalised, then the mean
    candidates = np.flatnonzero(mask & (inputs.pos < s.next_pos - 1))
    cand_scores = cell[candidates - (~mask).sum()]
    n_evict = math.floor(0.5 * len(candidates))
    order = np.argsort(cand_scores, kind="stable")
    # cells whose reference scores are too close to call are left out of the comparison
    margin = np.abs(cand_scores - cand_scores[order[n_evict]]) > 1e-4 * cand_scores.std()
    expected_gone = set(inputs.pos[candidates[order[:n_evict]]][margin[order[:n_evict]]])
    expected_kept = set(inputs.pos[candidates[order[n_evict:]]][margin[order[n_evict:]]])
    report = s.compress(0.5, press=ExpectedAttention())
    kept = set(s.positions)
    assert report.cells_after == len(kept) == len(tokens) - n_evict
    assert expected_kept <= kept and not (expected_gone & kept)
    assert len(expected_kept) + len(expected_gone) > 0.9 * len(candidates)
    if lay.has_swa:
        assert report.sliding_cells > 0  # the sliding cache keeps its window, untouched
        held = [sec.n_cells for sec in s.score_inputs().state.sections]
        assert held[0] == len(kept) and held[1] == report.sliding_cells


def test_decoding_continues_and_a_saved_state_continues_identically(arch_session, tmp_path):
    arch, s = arch_session
    tokens = tokens_of(s, 300)
    s.prefill(tokens[:280])
    s.compress(0.5)
    s.save(tmp_path / "state.npz")
    a = s.generate(tokens[280:], max_tokens=12)
    s.reset()
    s.load(tmp_path / "state.npz")
    b = s.generate(tokens[280:], max_tokens=12)
    assert a == b and len(a) > 0
    assert s.n_cells > 280 - math.floor(0.5 * (280 - s.n_sink - 1)) + 20


def test_quantized_key_cache_is_scored_from_the_keys_before_llama_cpp_rotation(tmp_path):
    """With a quantized K cache llama.cpp rotates q and k by a Hadamard matrix before storing k;
    the keys llamakv scores must be the unrotated ones: those of an f16 cache, up to q8_0's
    rounding."""
    path = write_random_gguf(tmp_path / "qwen3.gguf", "qwen3")  # head_dim 64: llama.cpp rotates
    keys = {}
    for name, type_k in (("f16", 1), ("q8_0", 8)):
        s = KVSession.from_model(path, n_ctx=512, n_batch=64, n_threads=2, type_k=type_k)
        s.prefill(s.tokenize(TEXT)[:100])
        assert all(a.k_rot == (64 if name == "q8_0" else 0) for a in s.layout.layers)
        keys[name] = s.score_inputs().keys
        s.close()
    scale = np.abs(keys["f16"]).max()
    assert np.abs(keys["q8_0"] - keys["f16"]).max() < 0.02 * scale


@pytest.mark.parametrize("arch", ["hunyuan-dense", "llama4"])
def test_a_query_normalised_after_rope_is_found_in_the_graph(arch, tmp_path, monkeypatch):
    """Refused by the table; without it, the capture finds the norm after RoPE in the graph itself."""
    from dataclasses import replace

    import llamakv.architectures as A
    from llamakv.errors import UnsupportedModelError

    path = write_random_gguf(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(UnsupportedModelError, match="after RoPE"):
        KVSession.from_model(path, n_ctx=256, n_batch=64, n_threads=2)
    monkeypatch.setitem(A.SPECS, arch, replace(A.SPECS[arch], compressible=True))
    with pytest.raises(UnsupportedModelError, match="normalises the query after RoPE"):
        KVSession.from_model(path, n_ctx=256, n_batch=64, n_threads=2)


@pytest.mark.parametrize("arch, reason", [("mamba", "recurrent state"), ("qwen3next", "recurrent state"),
                                          ("rwkv7", "recurrent state"), ("deepseek2", "latent"),
                                          ("gpt2", "not supported yet")])
def test_architectures_without_evictable_cells_are_refused_with_the_reason(arch, reason, tmp_path):
    """Refused from the file's header, before llama.cpp loads it (here the llama layout under
    that architecture's name)."""
    from llamakv.errors import UnsupportedModelError

    path = write_random_gguf(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(UnsupportedModelError, match=reason):
        KVSession.from_model(path)


def test_scores_and_compaction_on_the_cache_device_equal_the_host_path(arch_session):
    """The device path (a ggml graph over the cache tensors, here on the CPU backend, and
    compaction through llama.cpp's device-side states) scores like the host kernels and leaves
    the very state the host path writes; sliding-window models stay on the host path."""
    arch, s = arch_session
    tokens = tokens_of(s, 300)
    s.prefill(tokens)
    snap = s.snapshot()
    s.compressor.device = True
    try:
        if s.context.cache_layout.iswa or not s.context.device.available:
            assert not s.compressor.on_device(s.seq, s.press)
            assert s.compress(0.5).device == ""
            return
        host, dev = s.score_inputs(), s.seq.device_score_inputs()
        kd_host = np.empty((host.n_layer, host.n_cells), np.float32)
        kd_dev = np.empty_like(kd_host)
        ea = ExpectedAttention()
        a, b = ea.score(host, kd_host, 64), ea.score(dev, kd_dev, 64)
        finite = np.isfinite(a)
        assert np.array_equal(finite, np.isfinite(b)) and finite.sum() > 0.9 * a.size
        np.testing.assert_allclose(b[finite], a[finite], rtol=2e-4, atol=1e-7 * np.abs(a[finite]).max())
        np.testing.assert_allclose(kd_dev, kd_host, atol=2e-4 * s.n_head_kv)
        report = s.compress(0.5)
        assert report.device == "CPU" and report.state_read_s < 0.05
        on_device = (s.positions, s.cache.get_state().tobytes())
        s.restore(snap)
        s.compressor.device = False
        assert s.compress(0.5).device == ""
        assert np.array_equal(on_device[0], s.positions) and on_device[1] == s.cache.get_state().tobytes()
    finally:
        s.compressor.device = None
