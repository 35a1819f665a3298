"""One run of the RPC comparison, in its own process (RPC servers stay registered in a process
once added, so the local run and each RPC run get a process each): SmolLM2, a needle prompt,
capture, compress(0.5), compaction, a greedy answer. Writes the query statistics, the kept
positions, the answer and where the layers and the compression ran to an .npz.

    python tests/rpc_child.py OUT.npz [--rpc host:port,host:port] [--device auto|host|device]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamakv import KVSession  # noqa: E402
from tests.conftest import needle_prompt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--rpc", default=None)
    p.add_argument("--device", choices=["auto", "host", "device"], default="auto")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    s = KVSession.from_model(None, n_ctx=4096, n_threads=args.threads, rpc_servers=args.rpc,
                             n_gpu_layers=99 if args.rpc else 0)
    s.compressor.device = {"auto": None, "host": False, "device": True}[args.device]
    text, question, answer = needle_prompt(args.repeats, at=args.repeats // 2)
    t0 = time.perf_counter()
    s.prefill(text)
    t1 = time.perf_counter()
    stats = s.queries.stats
    count, mean, m2 = stats.count.copy(), stats.mean.copy(), stats.m2.copy()
    report = s.compress(0.5)
    t2 = time.perf_counter()
    reply = s.generate(f"\n{question} Answer:", max_tokens=12, temperature=0.0, ignore_eos=True)
    t3 = time.perf_counter()
    np.savez(args.out, count=count, mean=mean, m2=m2, positions=s.positions, reply=np.array(reply),
             device=np.array(report.device), cells=np.array([report.cells_before, report.cells_after]),
             seconds=np.array([t1 - t0, t2 - t1, t3 - t2]), n_tokens=np.array(len(s.llama.tokenize(text.encode()))),
             answer=np.array(answer), cache_devices=np.array(s.context.device.name))
    s.close()


if __name__ == "__main__":
    main()
