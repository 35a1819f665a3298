#!/usr/bin/env python3
"""One table from several `llamakv eval` CSVs (e.g. runs with different seeds): per method and
ratio, each task's mean over every sample of every file, the mean over tasks, its share of the
full cache's score on the same samples, the mean KL, and how sure the share and the differences to
a reference method at the same ratio are: 95% intervals from a bootstrap over samples (resampled
within each task, the same draw for every method) of the share and of the paired differences of
the average score and of the mean KL. Rows of a method that did not run on every sample are left
out (they would compare different samples), or with `--common` only the samples every method ran
on are used. Markdown to stdout.

    python scripts/combine_eval.py benchmarks/quality/smollm2_4k_seed7.csv benchmarks/quality/smollm2_4k_seed11.csv

Rows of `scripts/kvpress_parity.py --csv` are read too (methods named ENGINE:METHOD, with the
epsilon of kvpress's presses). With `--same-samples` every file holds results on one set of
samples (e.g. the kvpress runs and `llamakv eval` on the samples it dumped), matched by task and
index instead of by file.
"""
import argparse
import csv
from collections import defaultdict

import numpy as np


def load(paths: list[str], same_samples: bool = False) -> dict:
    """(method, ratio, aggregation, mode) -> {(file, task, sample): (score, kl)}"""
    runs = defaultdict(dict)
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if "engine" in r:  # a kvpress_parity.py row: no aggregation, mode or KL there
                    eps = f" eps={float(r['epsilon']):g}" if r["epsilon"] else ""
                    r = {**r, "method": f"{r['engine']}:{r['method']}{eps}", "sample": r["index"],
                         "aggregation": "", "mode": "", "kl": "nan"}
                key = (r["method"], float(r["ratio"]), r["aggregation"] or "-", r["mode"] or "-")
                runs[key][("" if same_samples else path, r["task"], r["sample"])] = (float(r["score"]), float(r["kl"]))
    return runs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--reference", default="ea_keydiff", help="method the differences are taken to (default: ea_keydiff)")
    ap.add_argument("--same-samples", action="store_true", help="all files are runs on the same samples")
    ap.add_argument("--common", action="store_true", help="only the samples every method ran on")
    ap.add_argument("--bootstrap", type=int, default=10000, help="bootstrap draws (default: 10000)")
    args = ap.parse_args(argv)
    runs = load(args.csv, args.same_samples)
    fulls = sorted((k for k in runs if k[0] in ("full", "llamakv:full", "kvpress:full")),
                   key=lambda k: ("full", "llamakv:full", "kvpress:full").index(k[0]))
    if not fulls:
        raise SystemExit("no full-cache rows in these files")
    full = fulls[0]  # the share of the full cache is against llamakv's own, where it ran
    samples = set(runs[full])
    if args.common:
        samples = samples.intersection(*map(set, runs.values()))
    samples = sorted(samples)
    if not samples:
        raise SystemExit("no sample has every method's rows (--common): these files ran different methods "
                         "on different samples; leave --common out")
    keys = [k for k in runs if set(runs[k]) >= set(samples)]
    tasks = sorted({s[1] for s in samples})
    score = np.array([[runs[k][s][0] for s in samples] for k in keys])  # [key, sample]
    kl = np.array([[runs[k][s][1] for s in samples] for k in keys])  # nan: kvpress_parity.py does not measure it
    in_task = [np.flatnonzero([s[1] == t for s in samples]) for t in tasks]

    # bootstrap: resample the samples of each task (the same draw for every key); per draw each key's
    # average over tasks (as the table's) and mean KL over samples
    rng = np.random.default_rng(0)
    score_draws = np.zeros((len(keys), args.bootstrap))
    kl_draws = np.zeros((len(keys), args.bootstrap))
    for cols in in_task:
        pick = cols[rng.integers(0, len(cols), size=(args.bootstrap, len(cols)))]
        score_draws += score[:, pick].mean(axis=-1) / len(tasks)
        kl_draws += kl[:, pick].sum(axis=-1) / len(samples)
    per_task = np.stack([score[:, cols].mean(axis=1) for cols in in_task], axis=1)  # [key, task]
    average, mean_kl = per_task.mean(axis=1), kl.mean(axis=1)
    index = {k: i for i, k in enumerate(keys)}

    def reference(i: int) -> int | None:
        ref = index.get((args.reference, *keys[i][1:]))
        if ref is None:  # the reference's rows of another aggregation or mode, if only those ran
            ref = next((index[k] for k in keys if k[0] == args.reference and k[1] == keys[i][1]), None)
        return None if ref == i or keys[i][0].endswith("full") else ref

    def versus(value: np.ndarray, draws: np.ndarray, i: int, digits: int) -> str:
        ref = reference(i)
        if ref is None or np.isnan(value[i] - value[ref]):
            return ""
        lo, hi = np.percentile(draws[i] - draws[ref], [2.5, 97.5])
        return f"{value[i] - value[ref]:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"

    f = index[full]

    def of_full(i: int) -> str:
        if i == f:
            return "100%"
        with np.errstate(divide="ignore", invalid="ignore"):
            lo, hi = np.percentile(100 * score_draws[i] / score_draws[f], [2.5, 97.5])
        return f"{100 * average[i] / average[f]:.0f}% [{lo:.0f}, {hi:.0f}]"

    print(f"{len(samples)} samples from {len(args.csv)} files; of full: the average's share of the full "
          f"cache's; last columns: paired difference to {args.reference} at the same ratio (score, KL); "
          f"[95% bootstrap intervals]\n")
    print("| method | ratio | aggregation | mode | " + " | ".join(tasks)
          + f" | average | of full | mean KL | vs {args.reference} | KL vs {args.reference} |")
    print("|---|---|---|---|" + "---|" * (len(tasks) + 5))
    for i in sorted(range(len(keys)), key=lambda i: (keys[i][1], -average[i])):
        k = keys[i]
        cells = " | ".join(f"{v:.1f}" for v in per_task[i])
        kl_cell = "" if np.isnan(mean_kl[i]) else f"{mean_kl[i]:.3f}"
        print(f"| {k[0]} | {k[1]:g} | {k[2]} | {k[3]} | {cells} | **{average[i]:.1f}** | "
              f"{of_full(i)} | {kl_cell} | {versus(average, score_draws, i, 1)} | "
              f"{versus(mean_kl, kl_draws, i, 3)} |")


if __name__ == "__main__":
    main()
