#!/usr/bin/env python3
"""What llamakv's batch shapes cost in llama.cpp's non-unified cache, measured with plain
llama-cpp-python calls (no llamakv callback), in one process.

llamakv decodes only batches that are one ubatch as llama.cpp's split_equal would form it
(sequences of consecutive ids with equal token counts), so the captured rows of each sequence
are known by index. This measures, for -np sequences:
- a decode step of all sequences in one llama_decode call against one call per sequence
  (what batching gains);
- one llama_decode of a prompt chunk of one sequence plus the next token of the others, which
  llama.cpp itself splits into two ubatches, against the two calls llamakv makes;
- a step of sequences with a gap in their ids (0, 2, ...), which llama.cpp splits per run of
  consecutive ids, against the same number of consecutive ones.
Each pair alternated, best of --repeat, milliseconds.

    python scripts/bench_batching.py -np 4 --chunk 256
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402

from llamakv.models import load_llama, resolve_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("-np", "--parallel", type=int, default=4)
    ap.add_argument("-c", "--ctx-size", type=int, default=8192)
    ap.add_argument("--context-tokens", type=int, default=512, help="tokens already in each sequence")
    ap.add_argument("--chunk", type=int, default=256, help="prompt chunk of the mixed batch")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("-fa", "--flash-attn", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = args.parallel
    path = resolve_model(args.model)
    llama = load_llama(path, n_ctx=args.ctx_size, n_batch=512, n_ubatch=512, n_threads=args.threads,
                       n_threads_batch=args.threads, n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn,
                       verbose=False)
    params = llama.context_params
    params.n_seq_max, params.kv_unified = n, False
    llama._ctx.close()
    from llama_cpp import _internals

    llama._ctx = _internals.LlamaContext(model=llama._model, params=params, verbose=False)
    ctx = llama._ctx.ctx
    mem = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    base = [1 + (i * 37) % 5000 for i in range(args.context_tokens)]

    def decode(items):  # items: (seq, [tokens], pos0)
        k = 0
        for s, toks, p0 in items:
            for i, t in enumerate(toks):
                batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.seq_id[k][0] = t, p0 + i, 1, s
                batch.logits[k] = int(i == len(toks) - 1)
                k += 1
        batch.n_tokens = k
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")
        llama_cpp.llama_synchronize(ctx)  # on a GPU the call returns before the work is done

    def reset():
        llama_cpp.llama_memory_seq_rm(mem, -1, -1, -1)
        for s in range(n):
            for i in range(0, len(base), 512):
                decode([(s, base[i:i + 512], i)])

    P = args.context_tokens

    def pair(run_a, run_b, cleanup):
        """Best times of two ways of doing the same work, alternated (ms)."""
        ta, tb = [], []
        for _ in range(args.repeat):
            for run, times in ((run_a, ta), (run_b, tb)):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
                cleanup()
        return min(ta) * 1e3, min(tb) * 1e3

    def rm_after(seqs, pos=P):
        for s in seqs:
            llama_cpp.llama_memory_seq_rm(mem, s, pos, -1)

    reset()
    rows = []
    every = list(range(n))
    one_call, per_seq = pair(lambda: decode([(s, [42], P) for s in every]),
                             lambda: [decode([(s, [42], P)]) for s in every], lambda: rm_after(every))
    rows.append((f"next token of {n} sequences", "one llama_decode", one_call, f"{n} calls, one per sequence", per_seq))
    chunk = [7 + i % 300 for i in range(args.chunk)]
    others = every[1:]
    mixed, split = pair(lambda: decode([(0, chunk, P)] + [(s, [42], P) for s in others]),
                        lambda: (decode([(0, chunk, P)]), decode([(s, [42], P) for s in others])),
                        lambda: rm_after(every))
    rows.append((f"a {args.chunk}-token chunk of one sequence + next token of {n - 1}",
                 "one llama_decode (llama.cpp splits it)", mixed, "two calls (llamakv)", split))
    if n >= 4:
        gap = [0, 2]
        gapped, consec = pair(lambda: decode([(s, [42], P) for s in gap]),
                              lambda: decode([(s, [42], P) for s in (0, 1)]), lambda: rm_after([0, 1, 2]))
        rows.append(("next token of 2 sequences", "ids 0 and 2 (llama.cpp splits them)", gapped,
                     "ids 0 and 1", consec))
    print(f"`{' '.join(sys.argv)}`  \n{platform.node()} ({platform.machine()}, {os.cpu_count()} cores), "
          f"{time.strftime('%Y-%m-%d')}, {path.name}, -np {n}, {P} tokens in each sequence, best of {args.repeat}\n")
    print("| work | as | ms | against | ms | ratio |\n|---|---|---|---|---|---|")
    for what, a, ta, b, tb in rows:
        print(f"| {what} | {a} | {ta:.1f} | {b} | {tb:.1f} | {ta / tb:.2f} |")
    llama_cpp.llama_batch_free(batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
