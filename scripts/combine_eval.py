#!/usr/bin/env python3
"""One table from several `llamakv eval` CSVs (e.g. runs with different seeds): per method and
ratio, each task's mean over every sample of every file, the mean over tasks, its share of the
full cache's score on the same samples, and the mean KL. Rows of a method that did not run on
every sample are left out (their share would compare different samples). Markdown to stdout.

    python scripts/combine_eval.py benchmarks/quality/smollm2_4k_seed7.csv benchmarks/quality/smollm2_4k_seed11.csv
"""
import csv
import sys
from collections import defaultdict


def main(paths: list[str]) -> None:
    scores = defaultdict(lambda: defaultdict(list))  # (method, ratio, aggregation, mode) -> task -> scores
    kl, samples = defaultdict(list), defaultdict(set)
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                key = (r["method"], float(r["ratio"]), r["aggregation"] or "-", r["mode"] or "-")
                scores[key][r["task"]].append(float(r["score"]))
                kl[key].append(float(r["kl"]))
                samples[key].add((path, r["task"], r["sample"]))
    full = next(k for k in scores if k[0] == "full")
    tasks = sorted(scores[full])

    def average(key):
        return sum(sum(v) / len(v) for v in scores[key].values()) / len(tasks)

    print(f"{len(samples[full])} samples from {len(paths)} files\n")
    print("| method | ratio | aggregation | mode | " + " | ".join(tasks) + " | average | of full | mean KL |")
    print("|---|---|---|---|" + "---|" * (len(tasks) + 3))
    for key in sorted(scores, key=lambda k: (k[1], -average(k))):
        if samples[key] != samples[full]:
            continue
        cells = " | ".join(f"{sum(scores[key][t]) / len(scores[key][t]):.1f}" for t in tasks)
        print(f"| {key[0]} | {key[1]:g} | {key[2]} | {key[3]} | {cells} | **{average(key):.1f}** | "
              f"{100 * average(key) / average(full):.0f}% | {sum(kl[key]) / len(kl[key]):.3f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
