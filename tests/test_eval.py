"""`llamakv eval`: RULER-style task generators (with SmolLM2's real tokenizer), RULER scoring,
samples as JSONL, one small end-to-end run on the real model, and scripts/combine_eval.py on
hand-made CSVs."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamakv.cli import main
from llamakv.eval import run, tasks
from conftest import needs_data


# (task, how far below the target a fitted sample may stay: about one unit of its haystack)
FIT = [
    ("niah_single_1", 40), ("niah_multikey_2", 60), ("niah_multikey_3", 80),
    pytest.param("niah_single_2", 40, marks=needs_data), pytest.param("niah_multivalue", 40, marks=needs_data),
    pytest.param("niah_multiquery", 40, marks=needs_data),
    ("vt", 40), ("cwe", 60), ("fwe", 40),
    pytest.param("qa_1", 600, marks=needs_data), pytest.param("qa_2", 600, marks=needs_data),
]


@pytest.fixture(scope="module")
def count(session):
    return run.token_counter(session)


@pytest.mark.parametrize("task,slack", FIT)
def test_generator_fits_length_and_holds_the_answers(session, count, task, slack):
    length = 1200
    s = tasks.generate_sample(task, 0, length, count, seed=7)
    ctx, q = run.encode(session, s)
    assert s.n_tokens == len(ctx) + len(q)  # what was fitted is what gets prefilled
    assert length - slack <= s.n_tokens + s.max_new_tokens <= length
    assert s.max_new_tokens == tasks.TASKS[task].max_new_tokens
    assert s.outputs and all(isinstance(o, str) and o for o in s.outputs)
    if task != "qa_2":  # HotpotQA answers may be "yes"/"no", not spans of the documents
        for o in s.outputs:
            assert o in s.context
    if task.startswith("niah"):
        spec = tasks.TASKS[task].spec
        assert s.context.count("One of the special magic") >= len(s.outputs)
        assert len(s.outputs) == spec["n_values"] * spec["n_queries"]
    if task == "vt":
        assert len(s.outputs) == 5 and f"VAR {s.outputs[0]} = " in s.context
        for a, b in zip(s.outputs, s.outputs[1:]):
            assert f"VAR {b} = VAR {a}" in s.context
    if task == "cwe":  # the 10 answers are the most frequent words of the (second) list
        words = s.context.rsplit("most often.\n", 1)[1].split()[1::2]
        top = sorted(set(words), key=words.count, reverse=True)[:10]
        assert set(top) == set(s.outputs)
    if task == "fwe":
        words = s.context.split()
        counts = {w: words.count(w) for w in set(words) if w.isalpha() and len(w) == 6}
        assert sorted(counts, key=counts.get, reverse=True)[:3] == s.outputs


def test_generation_is_deterministic_and_seeded(count):
    a = tasks.generate_sample("niah_multikey_2", 3, 900, count, seed=1)
    b = tasks.generate_sample("niah_multikey_2", 3, 900, count, seed=1)
    c = tasks.generate_sample("niah_multikey_2", 3, 900, count, seed=2)
    d = tasks.generate_sample("niah_multikey_2", 4, 900, count, seed=1)
    assert a == b
    assert a.outputs != c.outputs and a.outputs != d.outputs


def test_needle_at_a_chosen_depth(count):
    """depth (percent of the haystack) places a single needle there; the random draws stay those of
    the sample without a depth; tasks with several needles refuse it."""
    free = tasks.generate_sample("niah_single_1", 2, 1000, count, seed=3)
    for depth in (0, 50, 100):
        s = tasks.generate_sample("niah_single_1", 2, 1000, count, seed=3, depth=depth)
        assert s.outputs == free.outputs and s.question == free.question and s.extra["depth"] == depth
        lines = s.context.split("\n")[1:-1]  # the intro, the haystack lines, the final empty line
        at = next(i for i, line in enumerate(lines) if line.startswith("One of the special magic"))
        assert at == round((len(lines) - 1) * depth / 100)
    with pytest.raises(tasks.TaskError, match="single needle"):
        tasks.generate_sample("niah_multikey_1", 0, 1000, count, depth=50)
    with pytest.raises(tasks.TaskError, match="NIAH"):
        tasks.generate_sample("vt", 0, 1000, count, depth=50)


def test_generation_errors(count):
    with pytest.raises(tasks.TaskError, match="unknown task"):
        tasks.generate_sample("niah_single_9", 0, 1000, count)
    with pytest.raises(tasks.TaskError, match="raise the length"):
        tasks.generate_sample("vt", 0, 200, count)
    with pytest.raises(tasks.TaskError, match="unknown task"):
        tasks.expand_tasks(["niah", "nope"])
    assert tasks.expand_tasks(["qa", "vt", "qa_1"]) == ["qa_1", "qa_2", "vt"]  # groups expanded, no repeats


def test_scoring_on_hand_made_answers():
    refs = ["1234567", "7654321"]
    assert tasks.string_match_all("The numbers are 1234567 and 7654321.", refs) == 100
    assert tasks.string_match_all("The number is 1234567.", refs) == 50
    assert tasks.string_match_all("I do not know.", refs) == 0
    assert tasks.string_match_all("APPLE-PIE", ["apple-pie"]) == 100  # case-insensitive
    assert tasks.string_match_part("It is Paris, France.", ["France", "the French Republic"]) == 100
    assert tasks.string_match_part("Germany", ["France", "the French Republic"]) == 0
    assert tasks.score("qa_1", "Denver Broncos", ["Broncos", "Panthers"]) == 100  # part
    assert tasks.score("niah_multivalue", "Broncos", ["Broncos", "Panthers"]) == 50  # all
    with pytest.raises(ValueError):
        tasks.string_match_all("x", [])


def test_samples_jsonl_round_trip_and_bad_input(tmp_path, count):
    samples = [tasks.generate_sample("niah_single_1", i, 700, count) for i in range(2)]
    path = tmp_path / "s.jsonl"
    tasks.dump_samples(samples, path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {"task", "index", "context", "question", "answer_prefix", "outputs", "n_tokens"} <= set(lines[0])
    assert tasks.load_samples(path) == samples
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task": "vt", "index": 0, "context": "c", "question": "q"}) + "\n")
    with pytest.raises(tasks.TaskError, match="answer_prefix"):
        tasks.load_samples(bad)
    bad.write_text("{not json\n")
    with pytest.raises(tasks.TaskError, match="not JSON"):
        tasks.load_samples(bad)


def test_end_to_end_small_run(tmp_path, capsys):
    """Through the CLI: generate and dump one ~800-token sample, read it back, score the full
    cache and ratio 0.5, write the CSV, the markdown table and the plot. One thread: on a
    shared 2-core machine two spinning threads made this ten times slower."""
    dump, out = tmp_path / "samples.jsonl", tmp_path / "out"
    assert main(["eval", "--generate-only", "--tasks", "niah_single_1", "-n", "1", "--length", "800",
                 "-t", "1", "--dump-samples", str(dump)]) == 0
    samples = tasks.load_samples(dump)
    assert len(samples) == 1 and 650 <= samples[0].n_tokens + samples[0].max_new_tokens <= 800

    modes = ["agnostic", "aware"]
    assert main(["eval", "--samples", str(dump), "--ratios", "0,0.5", "--modes", ",".join(modes),
                 "--kl-tokens", "8", "--max-new-tokens", "24", "-t", "1", "--out", str(out),
                 "--name", "e2e"]) == 0
    captured = capsys.readouterr()
    assert "ETA" in captured.err and "| full | 0 |" in captured.out

    with open(out / "e2e.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == run.CSV_FIELDS
    assert len(rows) == 1 + len(modes)
    full = rows[0]
    assert (full["method"], float(full["ratio"]), float(full["score"]), float(full["kl"])) == ("full", 0, 100, 0)
    assert samples[0].outputs[0] in full["answer"]
    assert int(full["cells"]) == samples[0].n_tokens
    for r, mode in zip(rows[1:], modes):
        assert (r["method"], float(r["ratio"]), r["aggregation"], r["mode"]) == (
            "ea_keydiff", 0.5, "mean", mode)  # the default method
        assert int(r["cells"]) < 0.6 * int(full["cells"])
        assert float(r["kl"]) >= 0.0
    md = (out / "e2e.md").read_text()
    assert "| full | 0 | - | - | 100.0 | **100.0** |" in md
    assert "| ea_keydiff | 0.5 | mean | agnostic |" in md
    assert (out / "e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runner_refuses_bad_options(session, count):
    s = [tasks.generate_sample("niah_single_1", 0, 700, count)]
    with pytest.raises(ValueError, match="unknown method"):
        run.run_eval(session, s, methods=["no_such_press"])
    with pytest.raises(ValueError, match="ratios"):
        run.run_eval(session, s, ratios=[1.0])
    with pytest.raises(ValueError, match="mode"):
        run.run_eval(session, s, modes=["sideways"])


def test_combine_eval_paired_bootstrap(tmp_path):
    """scripts/combine_eval.py: per-task means, the share of the full cache, and a paired bootstrap
    interval of the difference to the reference method, on two hand-made CSVs."""
    fields = ["model", "task", "sample", "method", "ratio", "aggregation", "mode", "score", "kl"]
    rows = []
    for i in range(4):
        for method, ratio, got in (("full", 0, 100), ("ea_keydiff", 0.5, 100 if i < 3 else 0),
                                   ("same", 0.5, 100 if i < 3 else 0), ("worse", 0.5, 0)):
            rows.append(dict(model="m", task="t", sample=i, method=method, ratio=ratio, aggregation="mean",
                             mode="agnostic", score=got, kl=0.5 if method != "worse" else 0.5 + i))
    paths = []
    for half in (0, 1):  # two files, two samples each: the samples of different files stay apart
        p = tmp_path / f"r{half}.csv"
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(r for r in rows if r["sample"] // 2 == half)
        paths.append(str(p))
    script = Path(__file__).resolve().parent.parent / "scripts" / "combine_eval.py"
    out = subprocess.run([sys.executable, str(script), *paths, "--bootstrap", "2000"], check=True,
                         capture_output=True, text=True).stdout
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    assert "4 samples from 2 files" in out
    assert table["ea_keydiff"][4] == "**75.0**"
    share, interval = table["ea_keydiff"][5].split(" ", 1)  # 3 of 4 right: 0 to 4 of 4 resampled
    lo, hi = (float(x) for x in interval.strip("[]").split(","))
    assert share == "75%" and 0 <= lo < 75 < hi <= 100 and table["full"][5] == "100%"
    assert table["same"][-2:] == ["+0.0 [+0.0, +0.0]", "+0.000 [+0.000, +0.000]"]  # identical: no spread
    diff, interval = table["worse"][-2].split(" ", 1)
    lo, hi = (float(x) for x in interval.strip("[]").split(","))
    assert diff == "-75.0" and -100.0 <= lo < -75.0 < hi <= -25.0  # 1 to 4 of 4 losses resampled
    diff, interval = table["worse"][-1].split(" ", 1)  # KL higher by 0, 1, 2, 3: 1.5 on average
    lo, hi = (float(x) for x in interval.strip("[]").split(","))
    assert diff == "+1.500" and 0.0 <= lo < 1.5 < hi <= 3.0
