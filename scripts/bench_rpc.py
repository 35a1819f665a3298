"""What llama.cpp's RPC backend costs llamakv: prefill, compress(0.5) and decode with the layers on
rpc-servers (loopback here: the protocol's cost without a network's), beside the same run local.

    python scripts/bench_rpc.py [--model NAME] [--repeats 40] [--threads 1] [--decode-tokens 64] [-fa]

Each configuration runs in a process of its own (RPC devices stay registered once added); the
servers are llama.cpp's rpc-server built by `llamakv rpc-server` for the installed llama.cpp.
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(args) -> None:
    from llamakv import KVSession
    from tests.conftest import needle_prompt

    s = KVSession.from_model(args.model, n_ctx=8192, n_threads=args.threads, rpc_servers=args.rpc,
                             n_gpu_layers=99 if args.rpc else 0, flash_attn=args.flash_attn)
    s.compressor.device = {"auto": None, "host": False}[args.device]
    text, question, _ = needle_prompt(args.repeats, at=args.repeats // 2)
    t0 = time.perf_counter()
    s.prefill(text)
    t1 = time.perf_counter()
    report = s.compress(0.5)
    t2 = time.perf_counter()
    s.prefill(f"\n{question} Answer:")
    t3 = time.perf_counter()
    out = s.generate(max_tokens=args.decode_tokens, ignore_eos=True, temperature=0.0)
    t4 = time.perf_counter()
    print(json.dumps({"tokens": report.cells_before, "prefill_s": t1 - t0, "compress_s": t2 - t1,
                      "decode_tok_s": args.decode_tokens / (t4 - t3), "where": report.device or "host",
                      "parts_ms": [round(x * 1e3) for x in (report.state_read_s, report.scoring_s,
                                                            report.eviction_s, report.compaction_s)],
                      "positions_hash": hash(tuple(s.positions.tolist())), "answer": out[:40]}))


def start_servers(n: int, threads: int) -> tuple[list[subprocess.Popen], list[str]]:
    from llamakv import rpc

    exe = rpc.server_binary()
    procs, endpoints = [], []
    for _ in range(n):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs.append(subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        endpoints.append(f"127.0.0.1:{port}")
    return procs, endpoints


def run(args, rpc_spec: str | None, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--decode-tokens", str(args.decode_tokens), "--device", device] + (["-fa"] if args.flash_attn else [])
    if args.model:
        cmd += ["--model", args.model]
    if rpc_spec:
        cmd += ["--rpc", rpc_spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=int, default=40, help="needle-haystack repeats (~24 tokens each)")
    p.add_argument("--threads", type=int, default=1, help="threads of the local run and of each server")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("-fa", "--flash-attn", action="store_true",
                   help="flash attention (V cached a row per cell; without it, a row per dimension)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rpc", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = [("local (CPU)", run(args, None, "auto"))]
    procs, endpoints = start_servers(2, args.threads)
    try:
        rows.append(("1 rpc-server, compression on its device", run(args, endpoints[0], "auto")))
        rows.append(("1 rpc-server, compression on the host", run(args, endpoints[0], "host")))
        rows.append(("2 rpc-servers, layers split", run(args, ",".join(endpoints), "auto")))
    finally:
        for proc in procs:
            proc.terminate()
    base = rows[0][1]
    print(f"{base['tokens']} tokens, compress(0.5), {args.decode_tokens} tokens decoded; "
          f"{args.threads} thread(s) per process; {os.cpu_count()} cores; "
          f"flash attention {'on' if args.flash_attn else 'off'}\n")
    print("| configuration | prefill s | vs local | compress(0.5) ms | read / score / evict / compact ms | ran on "
          "| decode tok/s | vs local | kept cells = local |")
    print("|---|---:|---:|---:|---|---|---:|---:|---|")
    for name, r in rows:
        print(f"| {name} | {r['prefill_s']:.2f} | {r['prefill_s'] / base['prefill_s']:.2f}x | "
              f"{r['compress_s'] * 1e3:.0f} | {' / '.join(map(str, r['parts_ms']))} | {r['where']} | {r['decode_tok_s']:.1f} | "
              f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {r['positions_hash'] == base['positions_hash']} |")


if __name__ == "__main__":
    main()
