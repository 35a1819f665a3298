#!/usr/bin/env python3
"""GPU check: capture and compression with all layers offloaded give what the CPU gives.

Loads one GGUF twice, with -ngl N (tested) and -ngl 0 (reference), prefills the same tokens,
and compares the query statistics, the recent-query window, the keys and value norms read from
the cache state, the Expected Attention scores and the cells kept at --ratio; then decodes from
the compressed GPU cache. Prints a markdown report; exits 1 if a check fails.

    python scripts/gpu_smoke.py --model tiny.gguf -ngl 99 [-fa]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402  (before numpy: see llamakv/__init__.py)
import numpy as np  # noqa: E402

from llamakv import KVSession  # noqa: E402
from llamakv.scoring import aggregate  # noqa: E402


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=99)
    ap.add_argument("-fa", "--flash-attn", action="store_true")
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--tol", type=float, default=2e-2, help="max relative difference GPU vs CPU")
    args = ap.parse_args(argv)

    common = dict(n_ctx=4096, flash_attn=args.flash_attn)
    gpu = KVSession.from_model(args.model, n_gpu_layers=args.n_gpu_layers, **common)
    cpu = KVSession.from_model(args.model, n_gpu_layers=0, **common)
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 20000, size=args.tokens).tolist()
    times = {}
    for name, s in (("gpu", gpu), ("cpu", cpu)):
        t0 = time.perf_counter()
        s.prefill(tokens)
        times[name] = time.perf_counter() - t0
    gi, ci = gpu.score_inputs(), cpu.score_inputs()
    g_scores, c_scores = gpu.press.score(gi), cpu.press.score(ci)
    fin = np.isfinite(c_scores)
    checks = [
        ("query counts equal", bool((gpu.capture.stats.count == cpu.capture.stats.count).all()), ""),
        ("query mean", rel_err(gpu.capture.stats.mean, cpu.capture.stats.mean) < args.tol,
         f"{rel_err(gpu.capture.stats.mean, cpu.capture.stats.mean):.2e}"),
        ("query variance", rel_err(gpu.capture.stats.variance(), cpu.capture.stats.variance()) < args.tol,
         f"{rel_err(gpu.capture.stats.variance(), cpu.capture.stats.variance()):.2e}"),
        ("recent queries", rel_err(gpu.capture.recent_queries()[0], cpu.capture.recent_queries()[0]) < args.tol,
         f"{rel_err(gpu.capture.recent_queries()[0], cpu.capture.recent_queries()[0]):.2e}"),
        ("rope parameters", all(gpu.capture.rope(i) == cpu.capture.rope(i) for i in range(gpu.n_layer)), ""),
        ("cell positions", bool(np.array_equal(gi.pos, ci.pos)), f"{len(gi.pos)} cells"),
        ("keys from the cache", rel_err(gi.keys, ci.keys) < args.tol, f"{rel_err(gi.keys, ci.keys):.2e}"),
        ("value norms", rel_err(gi.vnorm, ci.vnorm) < args.tol, f"{rel_err(gi.vnorm, ci.vnorm):.2e}"),
        ("scores", rel_err(g_scores[fin], c_scores[fin]) < 5 * args.tol,
         f"{rel_err(g_scores[fin], c_scores[fin]):.2e}"),
    ]
    g_cell, c_cell = aggregate(g_scores), aggregate(c_scores)
    n_keep = len(tokens) // 2
    overlap = len(set(np.argsort(-g_cell)[:n_keep]) & set(np.argsort(-c_cell)[:n_keep])) / n_keep
    checks.append(("top half of cells agree", overlap > 0.95, f"{100 * overlap:.1f}%"))
    n_kv_before = int(gpu.capture.n_kv.max())
    rep = gpu.compress(args.ratio)
    n_cells = gpu.n_cells
    gpu.prefill(tokens[-1:])  # one decode with capture on: the callback reads the attention width
    text = gpu.generate(max_tokens=8)
    checks += [
        ("compressed cells", rep.cells_after == n_cells < len(tokens), f"{rep.cells_before} -> {rep.cells_after}"),
        ("query staging pinned", gpu.capture.pinned, ""),
        ("decoding continues", gpu.cache.pos_max() == gpu.next_pos - 1, f"{len(text)} chars generated"),
        ("attention width shrank", int(gpu.capture.n_kv.max()) < n_kv_before,
         f"n_kv {n_kv_before} -> {int(gpu.capture.n_kv.max())}"),
    ]
    print(f"# llamakv GPU check\n\nModel `{args.model}` ({gpu.n_layer} layers, {gpu.n_head}/{gpu.n_head_kv} heads, "
          f"head_dim {gpu.head_dim}); llama-cpp-python {llama_cpp.__version__}, GPU offload "
          f"{bool(llama_cpp.llama_supports_gpu_offload())}; -ngl {args.n_gpu_layers} vs 0, flash attention "
          f"{'on' if args.flash_attn else 'off'}; {len(tokens)} random tokens: prefill GPU {times['gpu']:.2f} s, "
          f"CPU {times['cpu']:.2f} s.\n")
    print(rep.format() + "\n")
    print("| check | ok | detail |\n|---|---|---|")
    for name, ok, detail in checks:
        print(f"| {name} | {'yes' if ok else '**NO**'} | {detail} |")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
