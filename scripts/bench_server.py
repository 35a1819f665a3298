#!/usr/bin/env python3
"""Concurrent clients against `llamakv serve` and llama-server, side by side.

Both servers are started in turn with the same model, context, slots and flags. For each number
of concurrent clients N, N streamed /v1/completions requests (distinct prompts of
--prompt-tokens token ids, greedy, --max-tokens each with end of generation ignored, no prompt
reuse) are sent at once, then the same N one after another. Reported per server and N: total
generated tokens per second, mean time to the first token, the wall time of the N at once and
its ratio to the N in a row.

    python scripts/bench_server.py --llama-server /path/to/llama-server -np 4 -c 8192 \\
        --clients 1 2 4 8
    python scripts/bench_server.py --model l8b.gguf --llama-server ./llama-server -ngl 99 -fa \\
        -np 8 -c 65536 --prompt-tokens 4096 --max-tokens 128
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llamakv.models import resolve_model  # noqa: E402

WORDS = ("river stone lantern orchard meadow harbor violet copper falcon summit willow ember "
         "glacier canyon thistle marble saffron tundra beacon quartz").split()


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(kind: str, args, model: Path):
    port = free_port()
    common = ["-m", str(model), "-c", str(args.ctx_size), "-np", str(args.parallel), "-b", str(args.batch_size),
              "--port", str(port), "-ngl", str(args.n_gpu_layers)]
    if args.threads:
        common += ["-t", str(args.threads)]
    if kind == "llama-server":
        cmd = [args.llama_server, *common, "-fa", "on" if args.flash_attn else "off", "--no-webui"]
        if args.no_repack:  # what llamakv.load_llama does where llama.cpp has AMX kernels (README: AMX)
            cmd += ["--no-repack"]
        if args.threads:
            cmd += ["-tb", str(args.threads)]
    else:
        cmd = [sys.executable, "-m", "llamakv.cli", "serve", *common, "--kv-ratio", str(args.kv_ratio)]
        if args.flash_attn:
            cmd += ["-fa"]
    logf = open(Path(args.log_dir) / f"{kind}.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{kind} exited with {proc.returncode}: see {logf.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.time() > deadline:
                raise SystemExit(f"{kind} did not come up in 600 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        logf.close()


def prompt(i: int, n_tokens: int) -> list[int]:
    """A distinct prompt of exactly n_tokens token ids (words of a small list, tokenized by the
    first server, repeated with a per-request start)."""
    words = _WORD_TOKENS[i % len(_WORD_TOKENS):] + _WORD_TOKENS
    out = [t for _ in range(n_tokens // max(1, len(words)) + 1) for t in words]
    return out[:n_tokens]


_WORD_TOKENS: list[int] = []


def one_request(url: str, text, max_tokens: int, out: dict) -> None:
    body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "cache_prompt": False, "llamakv": {"ratio": 0}}
    t0 = time.perf_counter()
    first, n, pieces = None, 0, []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            if ch.get("choices") and ch["choices"][0].get("text"):
                first = first or time.perf_counter()
                pieces.append(ch["choices"][0]["text"])
            if "timings" in ch:
                n = ch["timings"]["predicted_n"]
    out.update(ttft=(first or time.perf_counter()) - t0, total=time.perf_counter() - t0, n=n, text="".join(pieces))


def at_once(url: str, texts: list[str], max_tokens: int) -> tuple[float, list[dict]]:
    results = [{} for _ in texts]
    threads = [threading.Thread(target=one_request, args=(url, t, max_tokens, r)) for t, r in zip(texts, results)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def in_a_row(url: str, texts: list, max_tokens: int) -> tuple[float, list[dict]]:
    results = [{} for _ in texts]
    t0 = time.perf_counter()
    for t, r in zip(texts, results):
        one_request(url, t, max_tokens, r)
    return time.perf_counter() - t0, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--llama-server", required=True, help="llama-server binary built from the vendored llama.cpp")
    ap.add_argument("-c", "--ctx-size", type=int, default=8192)
    ap.add_argument("-np", "--parallel", type=int, default=4)
    ap.add_argument("-b", "--batch-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("-fa", "--flash-attn", action="store_true")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-ratio", type=float, default=0.0, help="llamakv's compression (default 0: none)")
    ap.add_argument("--no-repack", action="store_true",
                    help="llama-server without extra buffer types (its AMX matmul crashed on this project's CPU)")
    ap.add_argument("--servers", nargs="+", default=["llamakv", "llama-server"])
    ap.add_argument("--log-dir", default="/tmp")
    args = ap.parse_args()
    model = resolve_model(args.model)
    rows = []
    for kind in args.servers:
        with serving(kind, args, model) as url:
            if not _WORD_TOKENS:
                _WORD_TOKENS.extend(httpx.post(url + "/tokenize", json={"content": " ".join(WORDS)}).json()["tokens"])
            one_request(url, prompt(999, args.prompt_tokens), 8, {})  # warm-up
            for n in args.clients:
                texts = [prompt(100 * n + i, args.prompt_tokens) for i in range(n)]
                wall, res = at_once(url, texts, args.max_tokens)
                row_wall, row_res = in_a_row(url, texts, args.max_tokens)
                tokens = sum(r["n"] for r in res)
                same = sum(a["text"] == b["text"] for a, b in zip(res, row_res))
                rows.append((kind, n, tokens / wall, sum(r["ttft"] for r in res) / n, wall, row_wall, same))
                log(f"{kind:12s} N={n}: {tokens / wall:7.1f} tok/s, ttft {rows[-1][3]:.2f} s, "
                    f"{wall:.2f} s at once vs {row_wall:.2f} s in a row, {same}/{n} answers as in a row")
    head = (f"`{' '.join(sys.argv)}`  \n{platform.node()} ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}, model {model.name}, -c {args.ctx_size} "
            f"-np {args.parallel}, prompts of {args.prompt_tokens} tokens, {args.max_tokens} generated each")
    print(head + "\n")
    print("| server | clients | generated tok/s | mean time to first token (s) | wall at once (s) "
          "| wall in a row (s) | at once / in a row | answers as in a row |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, n, tps, ttft, wall, row_wall, same in rows:
        print(f"| {kind} | {n} | {tps:.1f} | {ttft:.2f} | {wall:.2f} | {row_wall:.2f} | {wall / row_wall:.2f} "
              f"| {same}/{n} |")
    by = {(k, n): tps for k, n, tps, *_ in rows}
    if "llama-server" in args.servers and "llamakv" in args.servers:
        print("\n| clients | llamakv / llama-server throughput |\n|---|---|")
        for n in args.clients:
            print(f"| {n} | {by[('llamakv', n)] / by[('llama-server', n)]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
