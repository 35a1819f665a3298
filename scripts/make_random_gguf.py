#!/usr/bin/env python3
"""Write a GGUF with random weights, keeping a real model's tokenizer (llamakv.random_gguf).

For tests (another model; other architectures in their real llama.cpp layout; an unsupported
architecture) and for timing large shapes where no real weights can be downloaded. The answers of
such a model are noise; its speed and memory are those of the shape.

    python scripts/make_random_gguf.py tiny.gguf                        # llama, 2 layers, 8 MB, F16
    python scripts/make_random_gguf.py l8b.gguf --shape llama-3.1-8b --qtype q4_0   # ~4.5 GB
    python scripts/make_random_gguf.py g3.gguf --arch gemma3            # gemma3's layout, tiny
    python scripts/make_random_gguf.py x.gguf --arch gpt2               # llama layout named gpt2
    python scripts/make_random_gguf.py --list                           # the real layouts

Q4_0 weights are written as random blocks directly (no float weights, no quantization pass), so
an 8B shape takes seconds plus the disk write. The vocabulary is the tokenizer's (SmolLM2: 49152
tokens, not Llama-3's 128256), so the output layer is smaller than the real model's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from llamakv.random_gguf import ARCHITECTURES, DEFAULT_LIKE, QTYPES, SHAPES, write_random_gguf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?")
    ap.add_argument("--like", default=DEFAULT_LIKE, help="GGUF path or model name to take the tokenizer from")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="size of the llama layout (default: tiny)")
    ap.add_argument("--arch", default="llama",
                    help="architecture: its real layout if listed by --list, else the llama layout under "
                         "that name (for tests of refusal)")
    ap.add_argument("--qtype", choices=QTYPES, default="f16", help="weight type of the matrices")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="list the architectures written in their real layout")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(ARCHITECTURES))
        return 0
    if args.out is None:
        ap.error("the output path is required")
    if args.shape and args.arch in ARCHITECTURES and args.arch != "llama":
        ap.error(f"--shape sizes the llama layout; {args.arch} has its own tiny shape")

    write_random_gguf(args.out, args.arch, shape=args.shape, qtype=args.qtype, seed=args.seed,
                      like=args.like, progress=True)
    print(f"wrote {args.out}: {args.arch}, {args.shape or 'tiny'}, {args.qtype}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
