#!/usr/bin/env python3
"""Write a GGUF with random weights of a chosen shape, keeping a real model's tokenizer.

For tests (a second, different model; an unsupported architecture) and for timing large shapes
where no real weights can be downloaded. The answers of such a model are noise; its speed and
memory are those of the shape.

    python scripts/make_random_gguf.py tiny.gguf                        # 2 layers, 8 MB, F16
    python scripts/make_random_gguf.py l8b.gguf --shape llama-3.1-8b --qtype q4_0   # ~4.5 GB

Q4_0 weights are written as random blocks directly (no float weights, no quantization pass), so
an 8B shape takes seconds plus the disk write. The vocabulary is the tokenizer's (SmolLM2: 49152
tokens, not Llama-3's 128256), so the output layer is smaller than the real model's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

SHAPES = {
    # name: layers, embd, heads, kv heads, ffn, head_dim
    "tiny": (2, 64, 4, 2, 128, 16),
    "smollm2-135m": (30, 576, 9, 3, 1536, 64),
    "llama-3.2-1b": (16, 2048, 32, 8, 8192, 64),
    "llama-3.1-8b": (32, 4096, 32, 8, 14336, 128),
    # Qwen3-8B's sizes (36 layers, 32/8 heads of 128, FFN 12288) written as a llama graph: for timing
    # (llamakv does not take the qwen3 architecture, whose QK-norm moves the query it reads)
    "qwen3-8b-like": (36, 4096, 32, 8, 12288, 128),
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
    ap.add_argument("--qtype", choices=["f16", "f32", "q4_0"], default="f16", help="weight type of the matrices")
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

    def add_matrix(name, rows, cols, std=None):
        """A [rows, cols] weight (numpy order) of standard deviation std (1/sqrt(cols) default)."""
        std = std or 1.0 / np.sqrt(cols)
        if args.qtype == "q4_0":
            # a block: f16 scale d, then 16 bytes of 4-bit values q; weight = (q - 8) * d, and
            # uniform q in 0..15 has a standard deviation of about 4.6
            blocks = rng.integers(0, 256, size=(rows, cols // 32, 18), dtype=np.uint8)
            blocks[..., :2] = np.frombuffer(np.float16(std / 4.6).tobytes(), dtype=np.uint8)
            w.add_tensor(name, blocks.reshape(rows, -1), raw_dtype=GGMLQuantizationType.Q4_0)
        else:
            dt = np.float16 if args.qtype == "f16" else np.float32
            w.add_tensor(name, (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(dt))

    add_matrix("token_embd.weight", n_vocab, n_embd, 1.0)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add_matrix(p + "attn_q.weight", n_head * head_dim, n_embd)
        add_matrix(p + "attn_k.weight", n_head_kv * head_dim, n_embd)
        add_matrix(p + "attn_v.weight", n_head_kv * head_dim, n_embd)
        add_matrix(p + "attn_output.weight", n_embd, n_head * head_dim)
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add_matrix(p + "ffn_gate.weight", n_ff, n_embd)
        add_matrix(p + "ffn_up.weight", n_ff, n_embd)
        add_matrix(p + "ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    print(f"wrote {args.out}: {args.arch}, {args.shape}, {args.qtype}, vocab {n_vocab}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
