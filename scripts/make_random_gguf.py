#!/usr/bin/env python3
"""Write a GGUF with random weights of a chosen shape, keeping a real model's tokenizer.

For tests (a second, different model; an unsupported architecture) and for timing large shapes
where no real weights can be downloaded. The answers of such a model are noise; its speed and
memory are those of the shape.

    python scripts/make_random_gguf.py out.gguf --like smollm2-135m-instruct --layers 2 --embd 64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

SHAPES = {
    # name: layers, embd, heads, kv heads, ffn, head_dim
    "tiny": (2, 64, 4, 2, 128, 16),
    "llama-3.1-8b": (32, 4096, 32, 8, 14336, 128),
}


def copy_tokenizer(reader: GGUFReader, writer: GGUFWriter) -> int:
    """Copy tokenizer.* fields; returns the vocabulary size."""
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == GGUFValueType.ARRAY:
            writer.add_array(key, value)
            if key == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        elif vtype == GGUFValueType.STRING:
            writer.add_string(key, value)
        else:
            writer.add_key_value(key, value, vtype)
    return n_vocab


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--like", default="smollm2-135m-instruct", help="GGUF path or model name to take the tokenizer from")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--arch", default="llama", help="architecture name written (llama; anything else for tests of refusal)")
    ap.add_argument("--dtype", choices=["f16", "f32"], default="f16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from llamakv.models import resolve_model

    n_layer, n_embd, n_head, n_head_kv, n_ff, head_dim = SHAPES[args.shape]
    reader = GGUFReader(str(resolve_model(args.like)))
    w = GGUFWriter(args.out, args.arch)
    w.add_name(f"random-{args.shape}")
    w.add_block_count(n_layer)
    w.add_context_length(8192)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    n_vocab = copy_tokenizer(reader, w)
    w.add_vocab_size(n_vocab)

    rng = np.random.default_rng(args.seed)
    dt = np.float16 if args.dtype == "f16" else np.float32

    def mat(rows, cols, scale=None):
        scale = scale or 1.0 / np.sqrt(cols)
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(dt)

    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd, 1.0))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", mat(n_head * head_dim, n_embd))
        w.add_tensor(p + "attn_k.weight", mat(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_v.weight", mat(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_head * head_dim))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    print(f"wrote {args.out}: {args.arch}, {args.shape}, vocab {n_vocab}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
