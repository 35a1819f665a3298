#!/usr/bin/env python3
"""Benchmark of llamakv: capture overhead, compression cost, decode speed (CPU or GPU).

For each prompt length (the bundled document, repeated): prefill speed with no callback at all,
with the callback installed but capture off, and with capture on; the compression time breakdown
at --ratio; and decode speed with the full cache, after compression with compaction, after
compression without it, and with a plain cache holding as many cells as the compressed one
(prefilled directly). All variants run in the same process, alternated, best of --repeat. On a
GPU, the memory nvidia-smi reports after the runs of each length is printed too.

    python scripts/bench.py --lengths 1024 4096 --threads 2 > benchmarks/cpu.md
    python scripts/bench.py --model l8b.gguf -ngl 99 -fa --lengths 8192 32768 --n-ctx 33280
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from importlib import metadata, resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402

from llamakv import KVSession  # noqa: E402
from llamakv.models import resolve_model  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def plain_prefill(llama: llama_cpp.Llama, tokens: list[int]) -> float:
    """Prefill with llama-cpp-python's own eval (no callback): seconds."""
    llama.reset()
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llama._ctx.ctx), -1, -1, -1)
    t0 = time.perf_counter()
    llama.eval(tokens)
    return time.perf_counter() - t0


def timed_prefill(s: KVSession, tokens: list[int], capture: bool) -> float:
    s.reset()
    s.capture.enabled = capture
    t0 = time.perf_counter()
    s.prefill(tokens)
    dt = time.perf_counter() - t0
    s.capture.enabled = True
    return dt


def gpu_memory() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip()
    except OSError:
        return ""


def decode_speed(s: KVSession, n: int, token: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        s.prefill([token])
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path or registry name (default SmolLM2-135M)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("-fa", "--flash-attn", action="store_true")
    args = ap.parse_args(argv)

    path = resolve_model(args.model)
    common = dict(n_ctx=args.n_ctx, n_batch=512, n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn)
    s = KVSession.from_model(path, n_threads=args.threads, **common)
    log(f"model {path.name}: {s.n_layer} layers, {s.n_head}/{s.n_head_kv} heads, head_dim {s.head_dim}")
    plain = llama_cpp.Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads,
                            n_ubatch=512, verbose=False, **common)
    doc = resources.files("llamakv").joinpath("data", "sample_document.txt").read_text()
    doc_tokens = s.tokenize(doc)

    rows = []
    for n in args.lengths:
        tokens = (doc_tokens * (n // len(doc_tokens) + 1))[:n]
        times = {"no callback": [], "capture off": [], "capture on": []}
        for r in range(args.repeat):
            log(f"[{n} tokens] prefill round {r + 1}/{args.repeat}")
            times["no callback"].append(plain_prefill(plain, tokens))
            times["capture off"].append(timed_prefill(s, tokens, False))
            times["capture on"].append(timed_prefill(s, tokens, True))
        best = {k: min(v) for k, v in times.items()}
        snap = s.snapshot()
        log(f"[{n} tokens] decode and compression")
        rep = s.compress(args.ratio, compact=True)  # right after the captured prefill
        dec_compact = decode_speed(s, args.decode_tokens, doc_tokens[5])
        s.restore(snap)
        dec_full = decode_speed(s, args.decode_tokens, doc_tokens[5])
        s.restore(snap)
        s.compress(args.ratio, compact=False)
        dec_nocompact = decode_speed(s, args.decode_tokens, doc_tokens[5])
        s.reset()
        s.prefill(tokens[:rep.cells_after])
        dec_plain = decode_speed(s, args.decode_tokens, doc_tokens[5])
        compress_s = rep.scoring_s + rep.eviction_s + rep.compaction_s
        rows.append((n, best, rep, compress_s, dec_full, dec_compact, dec_nocompact, dec_plain, gpu_memory()))

    versions = f"llamakv 0.1.0, llama-cpp-python {metadata.version('llama_cpp_python')}"
    where = f"GPU {gpu_memory().split(',')[0]}, n_gpu_layers {args.n_gpu_layers}" if args.n_gpu_layers else "CPU"
    print(f"# llamakv benchmark\n\nModel `{path.name}`; {where}; {platform.processor() or platform.machine()}, "
          f"{args.threads} threads; {versions}; n_ctx {args.n_ctx}, batch 512, flash attention "
          f"{'on' if args.flash_attn else 'off'}, ratio {args.ratio}, best of {args.repeat}.\n")
    print("Command: `python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n")
    print("## Prefill (tok/s)\n")
    print("| tokens | no callback | callback, capture off | capture on | capture cost |")
    print("|---:|---:|---:|---:|---:|")
    for n, best, *_ in rows:
        cost = best["capture on"] / best["capture off"] - 1
        print(f"| {n} | {n / best['no callback']:.1f} | {n / best['capture off']:.1f} | "
              f"{n / best['capture on']:.1f} | {100 * cost:+.1f}% |")
    print("\n## Compression (ratio %g)\n" % args.ratio)
    print("Capture ms is the time the callback spent copying and accumulating during the prefill; "
          "total is scoring + eviction + compaction.\n")
    print("| tokens | cells | capture ms | scoring ms | eviction ms (runs) | compaction ms | total ms | % of prefill |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n, best, rep, cs, *_ in rows:
        print(f"| {n} | {rep.cells_before} → {rep.cells_after} | {rep.capture_s * 1e3:.0f} | {rep.scoring_s * 1e3:.0f} | "
              f"{rep.eviction_s * 1e3:.0f} ({rep.runs}) | {rep.compaction_s * 1e3:.0f} | {cs * 1e3:.0f} | "
              f"{100 * cs / best['capture on']:.1f}% |")
    print("\n## Decode (tok/s, %d tokens, capture on)\n" % args.decode_tokens)
    print("| tokens | full cache | compressed + compacted | compressed, not compacted | plain cache of the compressed size |")
    print("|---:|---:|---:|---:|---:|")
    for n, best, rep, cs, d0, d1, d2, d3, _ in rows:
        print(f"| {n} | {d0:.1f} | {d1:.1f} | {d2:.1f} | {d3:.1f} ({rep.cells_after} cells) |")
    if args.n_gpu_layers:
        print("\n## GPU memory in use after each length (nvidia-smi)\n")
        for n, *_, mem in rows:
            print(f"- {n} tokens: {mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
