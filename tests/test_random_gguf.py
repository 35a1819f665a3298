"""The random-weight GGUF writer: every architecture it writes loads in the real llama.cpp, decodes
to finite logits that depend on the seed, and llama.cpp's own report of the file (its hyper-parameters
and KV-cache layers, from the verbose load log) agrees with `layout()`."""
from __future__ import annotations

import re

import llama_cpp
import numpy as np
import pytest

from llamakv import load_llama
from llamakv.random_gguf import ARCHITECTURES, layout, write_random_gguf

TEXT = ("The lighthouse keeper counted the ships that passed in the night, and wrote each name "
        "in a book that nobody read. Years later his daughter found it, and read every page. ") * 3
LOAD = dict(n_ctx=512, n_batch=64, n_ubatch=64, n_threads=2)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Files written once per module: (arch, seed) -> path."""
    root = tmp_path_factory.mktemp("random_gguf")
    cache = {}

    def get(arch: str, seed: int = 0):
        if (arch, seed) not in cache:
            cache[arch, seed] = write_random_gguf(root / f"{arch}-{seed}.gguf", arch, seed=seed)
        return cache[arch, seed]
    return get


def last_logits(llm: llama_cpp.Llama, tokens: list[int]) -> np.ndarray:
    llm.eval(tokens)
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def decode(path) -> tuple[llama_cpp.Llama, np.ndarray]:
    llm = load_llama(path, verbose=False, **LOAD)
    tokens = llm.tokenize(TEXT.encode())[:80]
    assert len(tokens) == 80
    return llm, last_logits(llm, tokens)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loads_and_decodes(arch, written):
    facts = layout(arch)
    llm, logits = decode(written(arch))
    model = llm._model.model
    assert llm.metadata["general.architecture"] == arch
    assert llama_cpp.llama_model_n_layer(model) == facts.n_layer
    assert llama_cpp.llama_model_n_swa(model) == facts.n_swa
    assert llama_cpp.llama_model_rope_type(model) == {"norm": 0, "neox": 2}[facts.rope_type]
    assert np.isfinite(logits).all()
    assert logits.std() > 1e-3
    _, other = decode(written(arch, seed=1))
    assert np.isfinite(other).all()
    assert not np.allclose(logits, other)


def parse_load_log(text: str) -> tuple[dict[str, str], dict[int, bool], dict[int, int]]:
    """From llama.cpp's verbose load log: print_info's hyper-parameters; for each layer that owns KV
    cells, whether they are in the sliding-window cache; for each layer reusing another's, its source."""
    info = dict(re.findall(r"^print_info: (\S[^=]*?)\s+= (.*)$", text, re.M))
    owner, reuse = {}, {}
    in_swa = False
    for line in text.splitlines():
        if "creating" in line and "KV cache" in line:
            in_swa = "non-SWA" not in line
        elif m := re.match(r"llama_kv_cache: layer +(\d+): dev = ", line):
            owner[int(m[1])] = in_swa
        elif m := re.match(r"llama_kv_cache: - layer +(\d+): reuse layer (\d+), is_swa = (\d)", line):
            reuse[int(m[1])] = int(m[2])
            owner.setdefault(int(m[1]), bool(int(m[3])))
    return info, owner, reuse


def per_layer(values: tuple[int, ...]) -> str:
    """print_info's format of a per-layer value: one number if constant, else a list."""
    return str(values[0]) if len(set(values)) == 1 else "[" + ", ".join(map(str, values)) + "]"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_llama_cpp_reads_what_layout_says(arch, written, capsys):
    facts = layout(arch)
    capsys.readouterr()
    llm = load_llama(written(arch), verbose=True, **LOAD)
    info, owner, reuse = parse_load_log(capsys.readouterr().err)
    del llm

    full = [i for i, s in enumerate(facts.swa_layers) if not s] or [0]
    swa = [i for i, s in enumerate(facts.swa_layers) if s]
    assert info["arch"] == arch
    assert int(info["n_layer"]) == facts.n_layer
    assert int(info["n_embd"]) == facts.n_embd
    assert info["n_head"] == str(facts.n_head)
    assert info["n_head_kv"] == per_layer(facts.n_head_kv)
    assert int(info["n_embd_head_k"]) == facts.head_dim[full[0]]
    assert int(info["n_rot"]) == facts.n_rot[full[0]]
    assert int(info["n_swa"]) == facts.n_swa
    assert int(info["n_expert"]) == facts.n_expert
    assert int(info["n_expert_used"]) == facts.n_expert_used
    assert float(info["freq_base_train"]) == pytest.approx(facts.rope_base)
    if facts.has_swa:
        assert float(info["freq_base_swa"]) == pytest.approx(facts.rope_base_swa)
        assert int(info["n_embd_head_k_swa"]) == facts.head_dim[swa[0]]
        assert int(info["n_rot_swa"]) == facts.n_rot[swa[0]]
    f_attn_scale = float(info["f_attn_scale"])  # 0: the graph's default 1/sqrt(head_dim)
    if f_attn_scale:
        assert f_attn_scale == pytest.approx(facts.attn_scale, rel=0.05)  # printed with 2 digits
    # the KV cache: which layers own cells, in which cache (sliding or not), which reuse another's
    assert {i: owner[i] for i in range(facts.n_layer)} == dict(enumerate(facts.swa_layers))
    assert tuple(reuse.get(i, i) for i in range(facts.n_layer)) == facts.kv_source


def test_layout_facts_are_consistent():
    for arch in ARCHITECTURES:
        f = layout(arch)
        for name in ("n_head_kv", "head_dim", "n_rot", "swa_layers", "nope_layers", "kv_source"):
            assert len(getattr(f, name)) == f.n_layer, (arch, name)
        assert all(d % 8 == 0 for d in f.head_dim), arch
        assert f.has_swa == (f.n_swa > 0), arch
        assert f.rope_type in ("norm", "neox") and f.swa_type in ("none", "standard", "chunked"), arch
    assert layout("gemma3").rope_base_swa != layout("gemma3").rope_base
    assert layout("gemma3").swa_layers == (True,) * 5 + (False,)
    assert layout("smollm3").nope_layers == (False, False, False, True)
    assert layout("cohere2").nope_layers == tuple(not s for s in layout("cohere2").swa_layers)
    assert layout("gpt-oss").attn_sinks and layout("phi3").fused_qkv


def test_q4_0_and_other_names(tmp_path):
    """Q4_0 blocks written directly (2-D and expert 3-D weights); an unknown architecture name gets
    the llama layout under that name, which llama.cpp refuses."""
    for arch in ("llama", "qwen3moe"):
        _, logits = decode(write_random_gguf(tmp_path / f"{arch}.gguf", arch, qtype="q4_0"))
        assert np.isfinite(logits).all() and logits.std() > 1e-3
    path = write_random_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ValueError):
        load_llama(path, verbose=False, **LOAD)
    with pytest.raises(ValueError):
        write_random_gguf(tmp_path / "x.gguf", "gemma3", shape="llama-3.1-8b")
