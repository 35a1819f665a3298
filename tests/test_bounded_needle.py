"""scripts/bounded_needle.py end to end on the tiny random-weight model (seconds): every method
runs at every length, the results files are written and --resume does nothing twice."""
import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("bounded_needle", ROOT / "scripts" / "bounded_needle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bounded_needle_script(tiny_gguf, tmp_path, capsys):
    bn = _script()
    argv = [str(tiny_gguf), "--budget", "192", "--multiples", "2", "-n", "2", "--max-new-tokens", "4",
            "--out", str(tmp_path), "--name", "tiny",
            "--method", "full", "--method", "expected_attention", "--aggregation", "votes",
            "--press-kwargs", '{"epsilon": 0.001}', "--target", "0.75", "--pool", "3", "--question",
            "--method", "streaming_llm"]
    assert bn.main(argv) == 0
    rows = _rows(tmp_path / "tiny.csv")
    labels = ["full", "expected_attention votes epsilon=0.001 T=144 pool=3 question", "streaming_llm"]
    assert [r["method"] for r in rows[:3]] == labels
    assert len(rows) == 2 * 3
    assert {float(r["depth"]) for r in rows} == {10.0, 90.0}
    for r in rows:
        assert int(r["n_tokens"]) <= int(r["length"]) and int(r["needle_pos"]) < int(r["n_tokens"])
        if r["method"] == "full":
            assert (r["cells"], r["compressions"], r["value_kept"]) == (r["n_tokens"], "0", "1")
        else:
            assert int(r["cells"]) <= 192 and int(r["compressions"]) >= 1
    md = (tmp_path / "tiny.md").read_text()
    assert "| expected_attention votes epsilon=0.001 T=144 pool=3 question |" in md and "2x = 384" in md
    assert (tmp_path / "tiny.png").stat().st_size > 0
    assert bn.main(argv + ["--resume"]) == 0  # nothing left to run
    assert len(_rows(tmp_path / "tiny.csv")) == len(rows)
