"""Model resolution, refusal of bad files, and the command line, run as a user would."""
import json
import shutil
import subprocess
import sys

import pytest

from llamakv import ModelError, UnsupportedModelError
from llamakv.models import check_gguf, resolve_model
from conftest import ROOT


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "llamakv.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_default_model_resolves_and_verifies():
    path = resolve_model(None)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert check_gguf(path) == "llama"


def test_missing_model(tmp_path):
    with pytest.raises(ModelError, match="no model file"):
        resolve_model(tmp_path / "nope.gguf")


def test_not_gguf_and_truncated_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelError, match="not a GGUF"):
        check_gguf(bad)
    truncated = tmp_path / "truncated.gguf"
    with open(resolve_model(None), "rb") as f:
        truncated.write_bytes(f.read(200_000))
    with pytest.raises(ModelError, match="damaged"):
        check_gguf(truncated)


def test_unsupported_architecture(tmp_path):
    out = tmp_path / "gpt2.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_gguf.py"), str(out), "--arch", "gpt2"],
                   check=True, capture_output=True)
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        check_gguf(out, {"llama": False})
    r = run_cli("compress", str(out), "-p", "hello")
    assert r.returncode == 2 and "not supported" in r.stderr


def test_cli_compress_json_and_save_then_ask(tmp_path):
    state = tmp_path / "s.npz"
    r = run_cli("compress", "-p", "The secret word is tangerine. " + "Filler sentence here. " * 60,
                "--ratio", "0.5", "-c", "2048", "--question", "What is the secret word?",
                "--save", str(state), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rep = out["report"]
    assert rep["cells_after"] < rep["cells_before"] and rep["kv_bytes_after"] < rep["kv_bytes_before"]
    assert out["answer"]
    r = run_cli("ask", str(state), "-c", "2048", "-q", "What is the secret word?", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loaded_cells"] == rep["cells_after"]


def test_cli_default_document_runs():
    r = run_cli("compress", "--ratio", "0.5", "-n", "16")
    assert r.returncode == 0, r.stderr
    assert "cells" in r.stdout and "question      What is the access code" in r.stdout
    assert "prefill:" in r.stderr  # progress shown on the long prefill


@pytest.mark.parametrize("args, message", [
    (["compress", "--ratio", "1.0", "-p", "x"], "ratio must be in [0, 1)"),
    (["compress", "/no/such/model.gguf", "-p", "x"], "no model file"),
    (["compress", "-f", "/no/such/prompt.txt"], "no such prompt file"),
    (["compress", "-p", "   "], "the prompt is empty"),
])
def test_cli_bad_input(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_cli_help_explains():
    r = run_cli("compress", "--help")
    assert r.returncode == 0 and "--ratio" in r.stdout and "--question" in r.stdout


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no compiler")
def test_missing_compiler_gives_clear_error(monkeypatch, tmp_path):
    from llamakv import _shim, ShimBuildError

    monkeypatch.setenv("LLAMAKV_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(ShimBuildError, match="could not run the C compiler"):
        _shim.build()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ShimBuildError, match="needs a C compiler"):
        _shim.build()
