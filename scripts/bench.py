#!/usr/bin/env python3
"""Benchmark of llamakv: capture overhead, compression cost, decode speed (CPU or GPU).

For each prompt length (the bundled document, repeated): prefill speed with no callback at all,
with the callback installed but capture off, with the queries of every token in the statistics,
of an even sample (--stats-sample), of the last --stats-window tokens, and with the session's
defaults; the compression time breakdown at --ratio (statistics of the defaults); and decode speed
with the full cache, after compression with compaction, after compression without it, and with a
plain cache holding as many cells as the compressed one (prefilled directly), all with capture off
during decoding, plus the compacted cache with capture on. All variants run in the same process,
alternated, best of --repeat. On a GPU, the memory nvidia-smi reports after the runs of each
length is printed too. --stream streams a long prompt through a bounded cache (session defaults).

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
from llamakv.models import load_llama, resolve_model  # noqa: E402
from llamakv.scoring import make_press  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def plain_prefill(llama: llama_cpp.Llama, tokens: list[int]) -> float:
    """Prefill with llama-cpp-python's own eval (no callback): seconds."""
    llama.reset()
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llama._ctx.ctx), -1, -1, -1)
    t0 = time.perf_counter()
    llama.eval(tokens)
    return time.perf_counter() - t0


def timed_prefill(s: KVSession, tokens: list[int], capture: bool, **stats) -> float:
    """Prefill with the session's options changed to `stats` (stats_window, stats_sample, track_surprisal)."""
    s.reset()
    s.capture.enabled = capture
    saved = {k: getattr(s, k) for k in stats}
    for k, v in stats.items():
        setattr(s, k, v)
    t0 = time.perf_counter()
    s.prefill(tokens, progress=lambda done, total: None)
    dt = time.perf_counter() - t0
    s.capture.enabled = True
    for k, v in saved.items():
        setattr(s, k, v)
    return dt


def gpu_memory() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip()
    except OSError:
        return ""


def decode_speed(s: KVSession, n: int, token: int, capture: bool = False) -> float:
    s.capture.enabled = capture
    s.prefill([token])  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        s.prefill([token])
    dt = time.perf_counter() - t0
    s.capture.enabled = True
    return n / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path or registry name (default SmolLM2-135M)")
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("-fa", "--flash-attn", action="store_true")
    ap.add_argument("--stream", type=int, nargs=2, metavar=("TOKENS", "BUDGET"), default=None,
                    help="also stream a prompt of TOKENS tokens through a cache of BUDGET cells (e.g. 65536 16384)")
    ap.add_argument("--stats-window", type=int, default=1024,
                    help="last tokens whose queries feed the statistics, in one prefill variant")
    ap.add_argument("--stats-sample", type=int, nargs="*", default=[],
                    help="prefill variants with the statistics from an even sample of S queries")
    ap.add_argument("--methods", nargs="*", default=[],
                    help="also time whole compress() calls (wall, best of two) with these presses")
    ap.add_argument("--question-tokens", type=int, default=0,
                    help="and each of them guided by a question of this many tokens (compress(question=...))")
    ap.add_argument("--minimal", action="store_true",
                    help="prefill variants: no callback, capture off and the defaults only")
    ap.add_argument("--host-too", action="store_true",
                    help="on a GPU, also compress on the host path (state read to the host and written back), "
                         "first and later, for comparison with the device path")
    args = ap.parse_args(argv)

    path = resolve_model(args.model)
    common = dict(n_ctx=args.n_ctx, n_batch=512, n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn)
    s = KVSession.from_model(path, n_threads=args.threads, **common)
    log(f"model {path.name}: {s.n_layer} layers, {s.n_head}/{s.n_head_kv} heads, head_dim {s.head_dim}")
    plain = load_llama(path, n_threads=args.threads, n_threads_batch=args.threads,
                       n_ubatch=512, verbose=False, **common)
    doc = resources.files("llamakv").joinpath("data", "sample_document.txt").read_text()
    doc_tokens = s.tokenize(doc)

    rows, method_rows, compressions = [], [], []
    for n in args.lengths:
        tokens = (doc_tokens * (n // len(doc_tokens) + 1))[:n]
        off = dict(track_surprisal=False)  # the capture alone
        variants = {"no callback": None, "callback, capture off": dict(capture=False, **off)}
        if not args.minimal:
            variants["capture on, every query"] = dict(capture=True, stats_sample=None, **off)
            variants.update({f"capture on, sample of {r} queries": dict(capture=True, stats_sample=r, **off)
                             for r in args.stats_sample})
            variants[f"capture on, last {args.stats_window} tokens"] = dict(
                capture=True, stats_window=args.stats_window, stats_sample=None, **off)
            # the prompt's surprisal (every token's logits; ea_keydiff:surprising_share reads it) on top of the defaults
            variants["capture on, defaults + the prompt's surprisal"] = dict(capture=True, track_surprisal=True)
        # last: the compression below uses the statistics of this one
        variants[f"capture on, defaults (sample of {s.stats_sample} queries)"] = dict(capture=True, **off)
        times = {k: [] for k in variants}
        for r in range(args.repeat):
            log(f"[{n} tokens] prefill round {r + 1}/{args.repeat}")
            for name, kw in variants.items():
                times[name].append(plain_prefill(plain, tokens) if kw is None else timed_prefill(s, tokens, **kw))
            log(f"  capture of the last one: {s.capture.capture_seconds * 1e3:.0f} ms in the callback, of which "
                f"{s.capture.copy_seconds * 1e3:.0f} ms copying (staging pinned: {s.capture.pinned})")
            log("  " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
        best = {k: min(v) for k, v in times.items()}
        snap = s.snapshot()  # after the last-tokens-capture prefill
        log(f"[{n} tokens] compression and decode")
        rep = s.compress(args.ratio, compact=True)  # the session's first: nothing prepared by an earlier one
        log("  " + rep.format().replace("\n", "\n  "))
        if rep.device:
            log(f"  of the scoring, the graph on {rep.device}: {s.context.device.last_call_s * 1e3:.1f} ms")
        dec_compact = decode_speed(s, args.decode_tokens, doc_tokens[5])
        dec_compact_capture = decode_speed(s, args.decode_tokens, doc_tokens[5], capture=True)
        s.restore(snap)
        warm = s.compress(args.ratio, compact=True)
        warm.capture_s = rep.capture_s
        log("  again:\n  " + warm.format().replace("\n", "\n  "))
        if warm.device:
            log(f"  of the scoring, the graph on {warm.device}: {s.context.device.last_call_s * 1e3:.1f} ms")
        host = []
        if args.host_too and rep.device:
            s.compressor.device = False
            for _ in range(2):  # the host path's first compression allocates its pinned buffers
                s.restore(snap)
                host.append(s.compress(args.ratio, compact=True))
                log("  host path:\n  " + host[-1].format().replace("\n", "\n  "))
            s.compressor.device = None
        dec_compact = max(dec_compact, decode_speed(s, args.decode_tokens, doc_tokens[5]))  # best of two
        s.restore(snap)
        dec_full = max(decode_speed(s, args.decode_tokens, doc_tokens[5]) for _ in range(2))
        s.restore(snap)
        s.compress(args.ratio, compact=False)
        dec_nocompact = max(decode_speed(s, args.decode_tokens, doc_tokens[5]) for _ in range(2))
        s.reset()
        s.capture.enabled = False
        s.prefill(tokens[:rep.cells_after])
        s.capture.enabled = True
        dec_plain = max(decode_speed(s, args.decode_tokens, doc_tokens[5]) for _ in range(2))
        log(f"  decode full {dec_full:.1f}, compacted {dec_compact:.1f} (capture on {dec_compact_capture:.1f}), "
            f"not compacted {dec_nocompact:.1f}, plain {dec_plain:.1f} tok/s")
        for m in args.methods:
            for q in [None] + ([doc_tokens[:args.question_tokens]] if args.question_tokens else []):
                walls = []
                for _ in range(2):
                    s.restore(snap)
                    t0 = time.perf_counter()
                    r = s.compress(args.ratio, press=make_press(m), question=q)
                    walls.append(time.perf_counter() - t0)
                log(f"  {r.method}: {min(walls) * 1e3:.0f} ms (scoring {r.scoring_s * 1e3:.0f} ms)")
                method_rows.append((n, r.method, r.question_tokens, min(walls), r.scoring_s, best["no callback"]))
        compressions.append((n, best["no callback"], [("device" if rep.device else "host", rep, warm)]
                             + ([("host", host[0], host[1])] if host else [])))
        rows.append((n, best, warm, warm.compression_s, dec_full, dec_compact, dec_nocompact, dec_plain,
                     dec_compact_capture, gpu_memory()))
        del snap

    versions = f"llamakv 0.1.0, llama-cpp-python {metadata.version('llama_cpp_python')}"
    where = f"GPU {gpu_memory().split(',')[0]}, n_gpu_layers {args.n_gpu_layers}" if args.n_gpu_layers else "CPU"
    print(f"# llamakv benchmark\n\nModel `{path.name}`; {where}; {platform.processor() or platform.machine()}, "
          f"{args.threads} threads; {versions}; n_ctx {args.n_ctx}, batch 512, flash attention "
          f"{'on' if args.flash_attn else 'off'}, ratio {args.ratio}, best of {args.repeat}.\n")
    print("Command: `python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n")
    print("## Prefill (tok/s)\n")
    print("| tokens | variant | tok/s | cost |")
    print("|---:|---|---:|---:|")
    for n, best, *_ in rows:
        for name, t in best.items():
            print(f"| {n} | {name} | {n / t:.1f} | {100 * (t / best['no callback'] - 1):+.1f}% |")
    print("\nCost: prefill time relative to no callback at all.\n")
    print("## Compression (ratio %g)\n" % args.ratio)
    print("The session's first compression (nothing prepared by an earlier one) and a second one of the same "
          "prefill. Path: device = scored and compacted where the cache lies (only scores and positions cross "
          "to the host); host = the state read to the host, scored there and written back. Capture ms is the "
          "time the callback spent copying and accumulating during the (sampled) prefill; total = state read "
          "+ scoring + eviction + compaction, relative to the prefill without callback.\n")
    print("| tokens | path | compression | cells | capture ms | state read ms | scoring ms | eviction ms "
          "| compaction ms | total ms | % of prefill |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, pre, paths in compressions:
        for path_name, first, later in paths:
            for which, rep in (("first", first), ("later", later)):
                cs = rep.compression_s
                print(f"| {n} | {path_name} | {which} | {rep.cells_before} → {rep.cells_after} | "
                      f"{rep.capture_s * 1e3:.0f} | {rep.state_read_s * 1e3:.0f} | {rep.scoring_s * 1e3:.0f} | "
                      f"{rep.eviction_s * 1e3:.0f} | {rep.compaction_s * 1e3:.0f} | {cs * 1e3:.0f} | "
                      f"{100 * cs / pre:.1f}% |")
    if method_rows:
        print("\n### By method (whole compress() call, wall, best of two)\n")
        print("| tokens | method | question tokens | total ms | of which scoring ms | % of prefill |")
        print("|---:|---|---:|---:|---:|---:|")
        for n, m, q, wall, sc, pre in method_rows:
            print(f"| {n} | {m} | {q} | {wall * 1e3:.0f} | {sc * 1e3:.0f} | {100 * wall / pre:.1f}% |")
    print("\n## Decode (tok/s, %d tokens, capture off unless said)\n" % args.decode_tokens)
    print("| tokens | full cache | compressed + compacted | same, capture on | compressed, not compacted "
          "| plain cache of the compressed size | compacted / plain |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, best, rep, cs, d0, d1, d2, d3, d1c, _ in rows:
        print(f"| {n} | {d0:.1f} | {d1:.1f} | {d1c:.1f} | {d2:.1f} | {d3:.1f} ({rep.cells_after} cells) | "
              f"{100 * d1 / d3:.1f}% |")
    if args.stream:
        n, budget = args.stream
        tokens = (doc_tokens * (n // len(doc_tokens) + 1))[:n]
        log(f"[{n} tokens through {budget} cells]")
        s.reset()
        t0 = time.perf_counter()
        s.prefill(tokens, budget=budget, progress=lambda done, total: None)
        dt = time.perf_counter() - t0
        comp = sum(r.compression_s for r in s.reports)
        dec = decode_speed(s, args.decode_tokens, doc_tokens[5])
        plain_budget = min(plain_prefill(plain, tokens[:budget]) for _ in range(2))
        print(f"\n## Streaming {n} tokens through {budget} cells\n")
        print(f"Prefill {dt:.2f} s ({n / dt:.1f} tok/s), {len(s.reports)} compressions to {budget // 2} cells taking "
              f"{comp:.2f} s in all ({100 * comp / dt:.1f}% of the prefill; path: "
              f"{s.reports[-1].device or 'host'}); {s.n_cells} cells at the end; decode {dec:.1f} tok/s. "
              f"A plain prefill of {budget} tokens (no callback) runs at {budget / plain_budget:.1f} tok/s: the "
              f"stream reaches {100 * (n / dt) / (budget / plain_budget):.0f}% of it.")
    if args.n_gpu_layers:
        print("\n## GPU memory in use after each length (nvidia-smi)\n")
        for n, *_, mem in rows:
            print(f"- {n} tokens: {mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
