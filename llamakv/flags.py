"""llama.cpp's flags, defined once for every command (compress, ask, eval, serve): the same
names, defaults and help, and one translation into `open_llama`'s arguments."""
from __future__ import annotations

import argparse
import re

from .errors import LlamaKVError

# -ctk / -ctv values, as llama.cpp's (common/arg.cpp), and their ggml type names
CACHE_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
               "iq4_nl": "IQ4_NL", "q5_0": "Q5_0", "q5_1": "Q5_1"}
DEFAULT_CTX = 4096  # llama.cpp's own default context size


def add_llama_flags(p, *, ctx_default: int | None = DEFAULT_CTX, ctx_help: str | None = None) -> None:
    """-c, -ngl, -t, -b, -fa, -ctk, -ctv, --rpc, -sm, -ts, -mg on a parser or argument group. `ctx_default`/`ctx_help`:
    a command that sizes the cache itself when -c is not given (eval)."""
    p.add_argument("-c", "--ctx-size", type=int, default=ctx_default,
                   help=ctx_help or f"KV cache size in cells (default {ctx_default})")
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", type=int, default=0,
                   help="layers to offload to the GPU (default 0; 99: all)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="tokens per decode call (default 512)")
    p.add_argument("-fa", "--flash-attn", nargs="?", const="on", default="off", choices=["on", "off", "auto"],
                   help="flash attention: on, off (the default) or auto (llama.cpp decides per device); "
                        "-fa alone means on")
    p.add_argument("-ctk", "--cache-type-k", default="f16", choices=sorted(CACHE_TYPES),
                   help="K cache type (default f16)")
    p.add_argument("-ctv", "--cache-type-v", default="f16", choices=sorted(CACHE_TYPES),
                   help="V cache type (default f16; a quantized one needs -fa on)")
    p.add_argument("--rpc", metavar="SERVERS", default=None,
                   help="llama.cpp rpc-servers to offload layers to, host:port[,host:port...] "
                        "(needs llama-cpp-python built with -DGGML_RPC=on; `llamakv rpc-server` starts one)")
    p.add_argument("-sm", "--split-mode", default="layer", choices=["none", "layer", "row"],
                   help="how to split the model over several devices: layer (the default; layers and "
                        "their KV cache per device), row, none (the main GPU only)")
    p.add_argument("-ts", "--tensor-split", metavar="SPLIT", default=None,
                   help="share of each device, e.g. 3,1 (default: by free memory)")
    p.add_argument("-mg", "--main-gpu", type=int, default=0,
                   help="the device used with -sm none, and for the KV cache with -sm row (default 0)")


def llama_kwargs(args: argparse.Namespace) -> dict:
    """open_llama's arguments for the flags of add_llama_flags (checked)."""
    if args.cache_type_v not in ("f16", "f32", "bf16") and args.flash_attn != "on":
        raise LlamaKVError(f"a quantized V cache (-ctv {args.cache_type_v}) needs flash attention: add -fa on")
    import llama_cpp

    try:
        split = [float(x) for x in re.split(r"[,/]", args.tensor_split)] if args.tensor_split else None
    except ValueError:
        raise LlamaKVError(f"-ts {args.tensor_split}: expected numbers separated by commas, e.g. 3,1") from None
    return dict(rpc_servers=args.rpc, split_mode=args.split_mode, tensor_split=split, main_gpu=args.main_gpu,
                n_ctx=args.ctx_size, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                n_batch=args.batch_size, flash_attn={"on": True, "off": False, "auto": "auto"}[args.flash_attn],
                type_k=getattr(llama_cpp, "GGML_TYPE_" + CACHE_TYPES[args.cache_type_k]),
                type_v=getattr(llama_cpp, "GGML_TYPE_" + CACHE_TYPES[args.cache_type_v]))
