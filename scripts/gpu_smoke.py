#!/usr/bin/env python3
"""GPU check: capture and compression with all layers offloaded give what the CPU gives.

Loads one GGUF twice, with -ngl N (tested) and -ngl 0 (reference), prefills the same tokens,
and compares the attention layout learnt from the graph, the query statistics, the
recent-query window, the keys and value norms read from the cache state, the Expected
Attention scores and the cells kept at --ratio; then decodes from the compressed GPU cache.
Prints a markdown report per model; exits 1 if a check fails. With --arch, the models are
random-weight GGUFs in those architectures' layouts (llamakv.random_gguf), written on the spot
with the tokenizer of --like.

    python scripts/gpu_smoke.py --model tiny.gguf -ngl 99 [-fa]
    python scripts/gpu_smoke.py --arch all --like tiny.gguf -fa
    python scripts/gpu_smoke.py --model l8b.gguf -ngl 99 -fa -sm layer -ts 1,1   # two GPUs
"""
from __future__ import annotations

import argparse
import sys
import tempfile
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


def same_layout(a, b) -> bool:
    """The attention layouts of two sessions of one model agree (node, op, rope, logit, sinks)."""
    def key(la):
        return None if la is None else (la.query_node, la.query_op, la.rope_node, la.has_rope, round(la.scale, 6),
                                        round(la.softcap, 4), la.k_rot, la.head_dim, la.n_head)
    sinks = all((x is None) == (y is None) and (x is None or np.allclose(x.sinks if x.sinks is not None else 0,
                                                                         y.sinks if y.sinks is not None else 0))
                for x, y in zip(a.layers, b.layers))
    return [key(x) for x in a.layers] == [key(y) for y in b.layers] and sinks


def check(model: str, args) -> tuple[bool, str]:
    common = dict(n_ctx=4096, flash_attn=args.flash_attn)
    split = [float(x) for x in args.tensor_split.split(",")] if args.tensor_split else None
    gpu = KVSession.from_model(model, n_gpu_layers=args.n_gpu_layers, split_mode=args.split_mode,
                               tensor_split=split, **common)
    cpu = KVSession.from_model(model, n_gpu_layers=0, **common)
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
        ("attention layout", same_layout(gpu.layout, cpu.layout), f"{len(gpu.scored_layers)} layers compressed"),
        ("query counts equal", bool((gpu.queries.stats.count == cpu.queries.stats.count).all()), ""),
        ("query mean", rel_err(gpu.queries.stats.mean, cpu.queries.stats.mean) < args.tol,
         f"{rel_err(gpu.queries.stats.mean, cpu.queries.stats.mean):.2e}"),
        ("query variance", rel_err(gpu.queries.stats.variance(), cpu.queries.stats.variance()) < args.tol,
         f"{rel_err(gpu.queries.stats.variance(), cpu.queries.stats.variance()):.2e}"),
        ("recent queries", rel_err(gpu.queries.recent_queries()[0], cpu.queries.recent_queries()[0]) < args.tol,
         f"{rel_err(gpu.queries.recent_queries()[0], cpu.queries.recent_queries()[0]):.2e}"),
        ("rope parameters", all(gpu.capture.rope(i) == cpu.capture.rope(i) for i in gpu.scored_layers), ""),
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
    width = lambda: int(gpu.capture.n_kv[list(gpu.scored_layers)].max())  # noqa: E731  the compressed cache's
    n_kv_before = width()
    rep = gpu.compress(args.ratio)
    n_cells = gpu.n_cells
    gpu.prefill(tokens[-1:])  # one decode with capture on: the callback reads the attention width
    text = gpu.generate(max_tokens=8)
    checks += [
        ("compressed cells", rep.cells_after == n_cells < len(tokens), f"{rep.cells_before} -> {rep.cells_after}"),
        ("query staging pinned", gpu.capture.pinned, ""),
        ("decoding continues", gpu.cache.pos_max() == gpu.next_pos - 1, f"{len(text)} chars generated"),
        ("attention width shrank", width() < n_kv_before, f"n_kv {n_kv_before} -> {width()}"),
    ]
    out = [f"## `{gpu.architecture}`: {Path(model).name}\n",
           f"{gpu.n_layer} layers, {gpu.n_head}/{gpu.n_head_kv} heads, head_dim {gpu.head_dim}; llama-cpp-python "
           f"{llama_cpp.__version__}, GPU offload {bool(llama_cpp.llama_supports_gpu_offload())}; -ngl "
           f"{args.n_gpu_layers} vs 0, flash attention {'on' if args.flash_attn else 'off'}; {len(tokens)} random "
           f"tokens: prefill GPU {times['gpu']:.2f} s, CPU {times['cpu']:.2f} s.\n", rep.format() + "\n",
           "| check | ok | detail |\n|---|---|---|"]
    out += [f"| {name} | {'yes' if ok else '**NO**'} | {detail} |" for name, ok, detail in checks]
    gpu.close()
    cpu.close()
    return all(ok for _, ok, _ in checks), "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a GGUF path or registry name")
    src.add_argument("--arch", help="comma-separated architectures of llamakv.random_gguf, or 'all' (the supported ones)")
    ap.add_argument("--like", default=None, help="GGUF to take the tokenizer from, with --arch")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=99)
    ap.add_argument("-fa", "--flash-attn", action="store_true")
    ap.add_argument("-sm", "--split-mode", default="layer", choices=["none", "layer", "row"],
                    help="several GPUs: layer (each GPU its layers and their cache), row, none")
    ap.add_argument("-ts", "--tensor-split", default=None, help="share of each GPU, e.g. 1,1")
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--tol", type=float, default=2e-2, help="max relative difference GPU vs CPU")
    args = ap.parse_args(argv)
    models = [args.model] if args.model else []
    if args.arch:
        from llamakv.architectures import supported
        from llamakv.random_gguf import ARCHITECTURES, write_random_gguf

        archs = [a for a in supported() if a in ARCHITECTURES] if args.arch == "all" else args.arch.split(",")
        tmp = Path(tempfile.mkdtemp(prefix="llamakv-gpu-"))
        models = [str(write_random_gguf(tmp / f"{a}.gguf", a, like=args.like)) for a in archs]
    print("# llamakv GPU check\n")
    failed = []
    for m in models:
        ok, report = check(m, args)
        print(report, flush=True)
        if not ok:
            failed.append(m)
    print(f"{len(models) - len(failed)} of {len(models)} models pass" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
