#!/usr/bin/env python3
"""Bar chart of the compression table of a scripts/bench.py output (markdown): each length's
first and later compression on each path, in % of the prefill.

    python scripts/plot_compression.py benchmarks/gpu_run.md benchmarks/gpu_compression.png --title "..."
"""
from __future__ import annotations

import argparse
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(text: str) -> list[tuple[int, str, str, float, float]]:
    """(tokens, path, which, total ms, % of prefill) of the compression table."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\| (\d+) \| (device|host) \| (first|later) \|.*\| ([\d.]+) \| ([\d.]+)% \|$", line)
        if m:
            out.append((int(m[1]), m[2], m[3], float(m[4]), float(m[5])))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_md")
    ap.add_argument("out_png")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    data = rows(open(args.bench_md).read())
    if not data:
        raise SystemExit("no compression table in " + args.bench_md)
    lengths = sorted({r[0] for r in data})
    bars = [(p, w) for p in ("host", "device") for w in ("first", "later")]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(bars)
    colours = {"host": ("#c44e52", "#e8a3a5"), "device": ("#4c72b0", "#a6bddb")}
    for j, (path, which) in enumerate(bars):
        ys = [next((r[4] for r in data if r[0] == n and r[1] == path and r[2] == which), 0.0) for n in lengths]
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(lengths))]
        b = ax.bar(xs, ys, width, label=f"{path}, {which}", color=colours[path][which == "later"])
        ax.bar_label(b, fmt="%.0f%%", fontsize=7)
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}k tokens" for n in lengths])
    ax.set_ylabel("compress(0.5), % of the prefill")
    ax.set_title(args.title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out_png, dpi=130)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
