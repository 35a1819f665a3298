#!/usr/bin/env python3
"""GPU smoke test of llamakv: capture with the layers offloaded (-ngl) matches a CPU run.

Loads the same GGUF twice, with n_gpu_layers=--ngl (default 99) and with --ref-ngl (default 0),
prefills the same tokens in both and compares what the capture callback recorded: query
statistics (mean, variance, count), the stored fp16 keys, the value norms, the positions and the
rope parameters. Then, on the offloaded session: compress, check the cells and positions left,
decode a few tokens from the compressed cache and read the attention width n_kv; and time prefill
with capture on and off (and with no callback at all). Prints a markdown report on stdout; exits
1 if a check fails.

    python scripts/gpu_smoke.py MODEL.gguf                  # on a machine with a CUDA build
    python scripts/gpu_smoke.py MODEL.gguf --ngl 0          # dry run of the script on a CPU

The model may be a random-weight GGUF (scripts/make_random_gguf.py): its answers are noise, but
capture and cache operations do not depend on the weights.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# llama_cpp before numpy: a CUDA build loaded after numpy segfaulted at model load on the H100
# machine (benchmarks/gpu_smoke.md); llamakv imports llama_cpp first for the same reason.
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

from llamakv import KVSession  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import plain_prefill, timed_prefill  # noqa: E402  the same timing on CPU and GPU


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Checks:
    def __init__(self):
        self.rows: list[tuple[str, bool, str]] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((name, bool(ok), detail))
        log(("PASS " if ok else "FAIL ") + name + (f"  ({detail})" if detail else ""))
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.rows)


def compare(a: np.ndarray, b: np.ndarray, rtol: float, atol_frac: float) -> dict:
    """a (tested) against b (reference), in float64. Elementwise test |a-b| <= atol + rtol|b|,
    atol = atol_frac * rms(b) (an absolute floor so that entries near zero do not dominate)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return dict(ok=False, shape=(a.shape, b.shape))
    d = np.abs(a - b)
    rms = float(np.sqrt(np.mean(b * b))) if b.size else 0.0
    atol = atol_frac * rms
    denom = np.maximum(np.abs(b), atol if atol > 0 else 1e-30)
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    return dict(
        ok=finite and bool(np.all(d <= atol + rtol * np.abs(b))),
        finite=finite,
        max_abs=float(d.max()) if d.size else 0.0,
        max_rel=float((d / denom).max()) if d.size else 0.0,
        rel_fro=float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
        n_bad=int(np.sum(d > atol + rtol * np.abs(b))),
        size=int(b.size), rms_ref=rms,
    )


def fmt_cmp(c: dict) -> str:
    if "shape" in c:
        return f"shape mismatch {c['shape'][0]} vs {c['shape'][1]}"
    return (f"max abs {c['max_abs']:.3g}, max rel {c['max_rel']:.3g}, rel Frobenius {c['rel_fro']:.3g}, "
            f"{c['n_bad']}/{c['size']} outside tol (ref rms {c['rms_ref']:.3g})")


def uniq(a) -> list:
    return sorted({int(x) if float(x).is_integer() else float(x) for x in np.ravel(a)})


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def gpu_name() -> str:
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or "none (nvidia-smi printed nothing)"
    except Exception as e:  # no nvidia-smi on a CPU machine
        return f"none ({type(e).__name__})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="GGUF path")
    ap.add_argument("--ngl", type=int, default=99, help="GPU layers of the tested session (default 99)")
    ap.add_argument("--ref-ngl", type=int, default=0, help="GPU layers of the reference session (default 0)")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-tokens", type=int, default=600, help="prompt length compared (default 600)")
    ap.add_argument("--first-token", type=int, default=1000, help="prompt = ids first..first+n-1")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--bench-tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rtol", type=float, default=1e-2)
    ap.add_argument("--atol-frac", type=float, default=1e-2, help="absolute floor, as a fraction of the reference's rms")
    ap.add_argument("-fa", "--flash-attn", action="store_true", help="flash attention in both sessions")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--verbose-load", action="store_true",
                    help="llama.cpp's log for the tested session (stderr: offloaded layers, buffers)")
    args = ap.parse_args(argv)

    checks = Checks()
    out: list[str] = []
    tokens = list(range(args.first_token, args.first_token + args.n_tokens))
    common = dict(n_ctx=args.n_ctx, n_threads=args.threads, flash_attn=args.flash_attn)

    log(f"loading {args.model} with n_gpu_layers={args.ngl} and {args.ref_ngl}")
    t0 = time.perf_counter()
    g = KVSession.from_model(args.model, n_gpu_layers=args.ngl, verbose=args.verbose_load, **common)
    c = KVSession.from_model(args.model, n_gpu_layers=args.ref_ngl, **common)
    load_s = time.perf_counter() - t0

    out += ["# llamakv GPU smoke test", "",
            "| | |", "|---|---|",
            f"| model | `{args.model}`: {g.fingerprint()['desc']}, {g.n_layer} layers, "
            f"{g.n_head} heads / {g.n_head_kv} kv heads, head_dim {g.head_dim} |",
            f"| GPU | {gpu_name()} |",
            f"| llama-cpp-python | {llama_cpp.__version__}, GPU offload supported: "
            f"{bool(llama_cpp.llama_supports_gpu_offload())} |",
            f"| python / numpy / cffi / gguf | {platform.python_version()} / {np.__version__} / "
            f"{version('cffi')} / {version('gguf')} |",
            f"| sessions | tested n_gpu_layers={args.ngl}, reference n_gpu_layers={args.ref_ngl}; "
            f"n_ctx {args.n_ctx}, n_ubatch {g.n_ubatch}, flash attention {args.flash_attn}; both loaded in {load_s:.2f} s |",
            f"| prompt | token ids {tokens[0]}..{tokens[-1]} ({len(tokens)} tokens) |",
            ""]

    # -- 1. the same prefill on both --------------------------------------------------------
    times = {}
    for name, s in (("tested", g), ("reference", c)):
        t0 = time.perf_counter()
        s.prefill(tokens)
        times[name] = time.perf_counter() - t0
    n = len(tokens)
    checks.add("rows captured (tested)", g.capture.n_rows == n, f"{g.capture.n_rows} of {n}")
    checks.add("rows captured (reference)", c.capture.n_rows == n, f"{c.capture.n_rows} of {n}")
    ng, nc = g.capture.n_rows, c.capture.n_rows
    m = min(ng, nc)

    pos_eq = bool(np.array_equal(g.capture.pos[:m], c.capture.pos[:m])) and ng == nc
    checks.add("positions identical", pos_eq and np.array_equal(g.capture.pos[:m], np.arange(m)),
               f"tested pos[0], pos[-1] = {int(g.capture.pos[0])}, {int(g.capture.pos[m - 1])}")
    cnt_eq = np.array_equal(g.capture.stats.count, c.capture.stats.count)
    expect_count = n - min(g.n_sink, n)
    checks.add("query counts identical", cnt_eq and np.all(g.capture.stats.count == expect_count),
               f"per layer, distinct values: tested {uniq(g.capture.stats.count)}, reference "
               f"{uniq(c.capture.stats.count)}, expected {expect_count}")

    cmp = {}
    cmp["keys (fp16, post-RoPE)"] = compare(g.capture.keys[:m], c.capture.keys[:m], args.rtol, args.atol_frac)
    cmp["value norms"] = compare(g.capture.vnorm[:m], c.capture.vnorm[:m], args.rtol, args.atol_frac)
    cmp["query mean"] = compare(g.capture.stats.mean, c.capture.stats.mean, args.rtol, args.atol_frac)
    cmp["query variance"] = compare(g.capture.stats.variance(), c.capture.stats.variance(), args.rtol, args.atol_frac)
    for name, r in cmp.items():
        checks.add(f"{name} match", r["ok"], fmt_cmp(r))
    nonzero = bool(np.abs(g.capture.keys[:m].astype(np.float32)).max() > 0 and g.capture.stats.variance().max() > 0)
    checks.add("captured data non-trivial", nonzero, "keys and variance not all zero")

    rope_ok = True
    for layer in range(g.n_layer):
        try:
            rg, rc = g.capture.rope(layer), c.capture.rope(layer)
        except Exception as e:
            rope_ok = False
            checks.add(f"rope({layer}) read", False, f"{type(e).__name__}: {e}")
            continue
        if rg != rc:
            rope_ok = False
    rg0 = g.capture.rope(0) if g.capture.rope_seen[0] else None
    checks.add("rope parameters identical (all layers)", rope_ok,
               f"rope(0) = n_dims {rg0.n_dims}, mode {rg0.mode}, base {rg0.freq_base:g}, "
               f"scale {rg0.freq_scale:g}" if rg0 else "rope(0) not seen")
    n_kv_prefill = (uniq(g.capture.n_kv), uniq(c.capture.n_kv))

    out += ["## Capture: tested vs reference", "",
            f"Prefill of {n} tokens: tested {times['tested'] * 1e3:.1f} ms, reference {times['reference'] * 1e3:.1f} ms "
            f"(first calls, including warm-up). n_kv after prefill (distinct values over layers): "
            f"tested {n_kv_prefill[0]}, reference {n_kv_prefill[1]}.", "",
            f"Tolerance: |tested - reference| <= {args.atol_frac:g}·rms(reference) + {args.rtol:g}·|reference|, "
            "elementwise; max rel is |d| / max(|reference|, that floor).", "",
            "| captured | max abs diff | max rel diff | rel Frobenius | outside tol | ok |",
            "|---|---|---|---|---|---|"]
    for name, r in cmp.items():
        if "shape" in r:
            out.append(f"| {name} | shape mismatch | | | | no |")
        else:
            out.append(f"| {name} | {r['max_abs']:.3g} | {r['max_rel']:.3g} | {r['rel_fro']:.3g} | "
                       f"{r['n_bad']}/{r['size']} | {'yes' if r['ok'] else 'NO'} |")
    out.append("")

    # -- 2. compress the tested session, then decode from it --------------------------------
    cells_before = g.n_cells
    protected = int(np.sum((g.capture.pos[:ng] < g.n_sink) | (g.capture.pos[:ng] == g.next_pos - 1)))
    expect_evicted = int(math.floor(args.ratio * (ng - protected)))
    rep = g.compress(args.ratio)
    kept_g = np.sort(g.capture.pos[:g.capture.n_rows].copy())
    checks.add("cells after compress", g.n_cells == rep.cells_after == cells_before - expect_evicted
               and g.capture.n_rows == g.n_cells,
               f"{cells_before} -> {g.n_cells} (expected {cells_before - expect_evicted}; "
               f"capture rows {g.capture.n_rows})")
    pmin, pmax = g.cache.pos_min(), g.cache.pos_max()
    checks.add("cache pos_min/pos_max after compress", pmin == 0 and pmax == n - 1,
               f"pos_min {pmin}, pos_max {pmax} (expected 0, {n - 1})")
    sinks_kept = bool(np.all(np.isin(np.arange(min(g.n_sink, n)), kept_g)))
    checks.add("sinks and newest position kept", sinks_kept and kept_g[-1] == n - 1)

    # same compression on the reference, for the overlap of the kept sets (not a check: near-ties
    # may flip with fp differences)
    rep_c = c.compress(args.ratio)
    kept_c = np.sort(c.capture.pos[:c.capture.n_rows].copy())
    inter = len(np.intersect1d(kept_g, kept_c))
    jacc = inter / max(len(np.union1d(kept_g, kept_c)), 1)

    next_before = g.next_pos
    text = g.generate(max_tokens=args.gen_tokens)
    n_gen = g.next_pos - next_before
    n_kv_after = int(g.capture.n_kv.max())
    checks.add("decode after compress", n_gen >= 1 and g.n_cells == rep.cells_after + n_gen,
               f"{n_gen} tokens decoded, cells {g.n_cells}, next_pos {g.next_pos}")
    checks.add("attention width shrank (n_kv)", n_kv_after < rep.n_kv_before,
               f"n_kv {rep.n_kv_before} before compress -> {n_kv_after} after decoding {n_gen} tokens")
    pmin2, pmax2 = g.cache.pos_min(), g.cache.pos_max()
    checks.add("positions continue after compress", pmin2 == 0 and pmax2 == next_before + n_gen - 1,
               f"pos_min {pmin2}, pos_max {pmax2}")

    text_c = c.generate(max_tokens=args.gen_tokens)
    out += ["## Compression and decoding (tested session)", "",
            "```", rep.format(), "```", "",
            f"- cells {rep.cells_before} -> {rep.cells_after}; cache pos_min/pos_max {pmin}/{pmax}",
            f"- kept positions, tested vs reference compression: {inter} in common of "
            f"{len(kept_g)} / {len(kept_c)} (Jaccard {jacc:.3f})",
            f"- decoded {n_gen} tokens: {text!r} (reference: {text_c!r}; random weights, noise)",
            f"- n_kv: {rep.n_kv_before} before compression, {n_kv_after} after compression + {n_gen} tokens "
            f"(reference: {rep_c.n_kv_before} -> {int(c.capture.n_kv.max())})",
            f"- cache pos_min/pos_max after decoding: {pmin2}/{pmax2}",
            ""]

    # -- 3. prefill speed, capture on / off / no callback -----------------------------------
    if not args.no_bench:
        nb = args.bench_tokens
        btoks = [(args.first_token + i) % 40000 + 100 for i in range(nb)]
        plain = llama_cpp.Llama(model_path=args.model, n_ctx=args.n_ctx, n_gpu_layers=args.ngl,
                                n_batch=512, n_ubatch=512, flash_attn=args.flash_attn, verbose=False,
                                **({} if not args.threads else dict(n_threads=args.threads,
                                                                     n_threads_batch=args.threads)))
        res = {"capture on": [], "capture off (callback installed)": [], "no callback (plain Llama)": []}
        timed_prefill(g, btoks, True)  # warm-up
        plain_prefill(plain, btoks)
        for _ in range(args.repeat):
            res["capture on"].append(timed_prefill(g, btoks, True))
            res["capture off (callback installed)"].append(timed_prefill(g, btoks, False))
            res["no callback (plain Llama)"].append(plain_prefill(plain, btoks))
        g.reset()
        cap0 = g.capture.capture_seconds
        g.prefill(btoks)
        cap_ms = (g.capture.capture_seconds - cap0) * 1e3
        checks.add(f"capture of a {nb}-token prefill", g.capture.n_rows == nb, f"{g.capture.n_rows} rows")
        out += [f"## Prefill speed, {nb} tokens, n_gpu_layers={args.ngl} (best of {args.repeat}, alternated)", "",
                "| variant | best s | tok/s | all runs (s) |", "|---|---|---|---|"]
        for name, ts in res.items():
            out.append(f"| {name} | {min(ts):.4f} | {nb / min(ts):,.0f} | {', '.join(f'{t:.4f}' for t in ts)} |")
        out += ["", f"Time inside the capture callback for one {nb}-token prefill: {cap_ms:.1f} ms.", ""]
        plain.close()

    out += ["## Checks", "", "| check | result | detail |", "|---|---|---|"]
    for name, ok, detail in checks.rows:
        out.append(f"| {name} | {'pass' if ok else '**FAIL**'} | {detail} |")
    out += ["", f"**{'ALL CHECKS PASSED' if checks.ok else 'SOME CHECKS FAILED'}**"]
    print("\n".join(out), flush=True)
    g.close()
    c.close()
    return 0 if checks.ok else 1


if __name__ == "__main__":
    sys.exit(main())
