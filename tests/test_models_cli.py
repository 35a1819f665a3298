"""Model resolution, refusal of bad files, and the command line, run as a user would."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from llamakv import ModelError, UnsupportedModelError, models
from llamakv.models import check_gguf, lookup, registry, resolve_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def run_cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "llamakv.cli", *args], capture_output=True, check=False,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


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


@pytest.mark.parametrize("method", ["snapkv", "streaming_llm", "ea_keydiff:weight=0.1"])
def test_cli_baseline_methods(method):
    r = run_cli("compress", "-p", "Filler sentence here. " * 40, "--ratio", "0.5", "-c", "1024",
                "--method", method, "--no-chat", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["report"]
    assert rep["method"] == method and rep["cells_after"] < rep["cells_before"]


def test_cli_long_prompt_streams_through_the_cache():
    r = run_cli("compress", "-p", "Filler sentence here. " * 160, "--ratio", "0.5", "-c", "512", "-b", "128",
                "--no-chat", "--json", "-q", "Anything?", "-n", "8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_tokens"] > 512 and out["prefill_compressions"]
    assert out["report"]["cells_before"] <= 512
    r = run_cli("compress", "-p", "Filler sentence here. " * 160, "--ratio", "0.5", "-c", "512", "-b", "128",
                "--no-chat", "--json", "-q", "Anything?", "-n", "8", "--question-aware")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prefill_compressions"] and all(c["question_tokens"] > 0 for c in out["prefill_compressions"])


def test_cli_question_aware_keeps_what_the_question_needs():
    """The default document's answer (4 digit tokens in 2.2k tokens of prose) at ratio 0.5: the
    question, decoded for the scoring, keeps the digits that query-agnostic scores evict."""
    r = run_cli("compress", "--ratio", "0.5", "-n", "16", "--question-aware", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["report"]["question_tokens"] > 0 and "7294" in out["answer"]


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
    (["compress", "--stats-sample", "-5", "-p", "x"], "must be 0 or more"),
    (["compress", "--question-aware", "-p", "x"], "needs a --question"),
    (["compress", "--method", "ea_keydiff:weight=lots", "-p", "x"], "bad value in 'weight=lots'"),
    (["compress", "--method", "no_such_press", "-p", "x"], "unknown method 'no_such_press'"),
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
    from llamakv import ShimBuildError, _shim

    monkeypatch.setenv("LLAMAKV_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(ShimBuildError, match="could not run the C compiler"):
        _shim.build()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ShimBuildError, match="needs a C compiler"):
        _shim.build()


# `llamakv models list` / `llamakv models fetch NAME`, on the models the test extras install

def _rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 6 and cols[0] in registry()[1]:
            rows[cols[0]] = [c for c in cols[1:] if c != "*"]
    return rows


def test_models_list_marks_compression_support():
    from llamakv.architectures import supported

    r = run_cli("models", "list")
    assert r.returncode == 0, r.stderr
    rows = _rows(r.stdout)
    _, entries = registry()
    assert set(rows) == set(entries)
    for name, (arch, _size, _unit, compress, status, *_path) in rows.items():
        assert arch == entries[name].architecture
        assert compress == ("yes" if arch in supported() else "no")
    assert rows["gemma-3-270m"][3] == "yes"  # sliding-window layers: the global ones are compressed
    assert rows["smollm2-135m-instruct"][4] == "installed"
    assert run_cli("models").stdout == r.stdout  # bare `models` lists


def test_fetch_installed_model_is_a_verified_noop(tmp_path):
    env = {"LLAMAKV_CACHE": str(tmp_path)}
    r = run_cli("models", "fetch", "smollm2-135m-instruct", env=env)
    assert r.returncode == 0, r.stderr
    assert "already fetched, nothing to do; sha256 verified" in r.stdout
    assert "checking SmolLM2" in r.stderr  # an empty cache: the file was hashed
    assert [m.read_text() for m in (tmp_path / "verified").iterdir()] == [lookup(None).sha256]
    r = run_cli("models", "fetch", "smollm2-135m-instruct", env=env)
    assert r.returncode == 0 and "nothing to do" in r.stdout and "checking" not in r.stderr


def test_fetch_unknown_model():
    r = run_cli("models", "fetch", "no-such-model")
    assert r.returncode == 2
    assert "unknown model 'no-such-model'" in r.stderr and "qwen2.5-coder-0.5b-instruct" in r.stderr
    assert "Traceback" not in r.stderr


def test_damaged_assembled_model_is_detected_and_rebuilt(tmp_path, monkeypatch):
    entry = lookup("qwen2.5-coder-0.5b-instruct")
    r = run_cli("models", "fetch", entry.name, "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "models" / f"{entry.name}.gguf"
    assert "fetched; sha256 verified" in r.stdout and str(out) in r.stdout
    assert f"LLAMAKV_CACHE={tmp_path}" in r.stdout and "assembling" in r.stderr
    assert out.stat().st_size == entry.size

    with open(out, "r+b") as f:  # one flipped byte in the middle of the weights
        f.seek(entry.size // 2)
        b = f.read(1)
        f.seek(entry.size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    monkeypatch.setenv("LLAMAKV_CACHE", str(tmp_path))
    assert resolve_model(entry.name) == out  # found damaged, removed, assembled again
    h = hashlib.sha256()
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == entry.sha256
    r = run_cli("models", "fetch", entry.name, env={"LLAMAKV_CACHE": str(tmp_path)})
    assert r.returncode == 0 and "nothing to do" in r.stdout


def test_fetch_reports_damage(tmp_path):
    entry = lookup("qwen2.5-coder-0.5b-instruct")
    out = tmp_path / "models" / f"{entry.name}.gguf"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"GGUF" + bytes(1000))  # a truncated leftover
    r = run_cli("models", "fetch", entry.name, env={"LLAMAKV_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "was damaged" in r.stderr and "removed, assembling it again" in r.stderr
    assert out.stat().st_size == entry.size


def test_registry_model_not_installed_names_the_fetch_command(tmp_path, monkeypatch):
    reg = tmp_path / "models.toml"
    reg.write_text('default = "absent"\n[models.absent]\ndescription = "x"\narchitecture = "llama"\n'
                   'packages = ["llamakv-absent-part1==1.0", "llamakv-absent-part2==1.0"]\n'
                   'files = ["a/part1.bin", "a/part2.bin"]\nsize = 10\nsha256 = "00"\ncontext = 512\n')
    monkeypatch.setattr(models, "REGISTRY_PATH", reg)
    monkeypatch.setenv("LLAMAKV_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match=r"'absent' is not installed \(2 of its 2 parts missing\): "
                                         r"run `llamakv models fetch absent`"):
        resolve_model("absent")
    reg.write_text(reg.read_text().replace("part2==1.0", "part2"))
    with pytest.raises(ModelError, match="pinned package 'name==version'"):
        resolve_model("absent")


def test_pyproject_extras_pin_the_registry_packages():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    extras = {"smollm2": "smollm2-135m-instruct", "qwen": "qwen2.5-coder-0.5b-instruct",
              "qwen15": "qwen2.5-coder-1.5b-instruct", "gemma3": "gemma-3-270m"}
    assert set(extras.values()) == set(registry()[1])
    for extra, name in extras.items():
        assert pyproject[extra] == list(lookup(name).packages), extra


def test_cli_answer_follows_a_json_schema():
    schema = {"type": "object", "properties": {"age": {"type": "integer"}, "city": {"type": "string", "maxLength": 20}},
              "required": ["age", "city"], "additionalProperties": False}
    r = run_cli("compress", "-c", "2048", "-t", "2", "-n", "40", "--json", "-p", "Ann is 31 years old and lives in Oslo.",
                "-q", "Give Ann's age and city as JSON.", "--json-schema", json.dumps(schema))
    assert r.returncode == 0, r.stderr
    answer = json.loads(json.loads(r.stdout)["answer"])
    assert set(answer) == {"age", "city"} and isinstance(answer["age"], int)
    bad = run_cli("compress", "-c", "2048", "-p", "x", "-q", "y", "--json-schema", "{not json")
    assert bad.returncode != 0 and "--json-schema" in bad.stderr
