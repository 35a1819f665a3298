"""`llamakv serve`: an HTTP server of llama-server's shape whose KV caches are compressed.

Endpoints: OpenAI's /v1/chat/completions, /v1/completions and /v1/models; llama-server's
/completion, /tokenize, /detokenize, /health, /props, /slots (and slot save / restore / erase),
/metrics (Prometheus). This module: the command line; llamakv.server_engine: the slots and the
inference thread (continuous batching over `-np` sequences of one llama.cpp context);
llamakv.server_app: the Starlette app (served by uvicorn, streams by sse-starlette).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import LlamaKVError
from .scoring import AGGREGATIONS, PRESSES
from .flags import add_llama_flags, llama_kwargs
from .server_engine import ApiError, Engine, KVParams




# -- command line ------------------------------------------------------------------------------
def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible server of llama-server's shape, with compressed KV caches",
        description="Serve a GGUF model like llama-server (same flags and endpoints), compressing each "
                    "slot's KV cache with Expected Attention. Example: llamakv serve -m model.gguf -c 8192 "
                    "--port 8080 --kv-ratio 0.5")
    g = p.add_argument_group("llama-server flags")
    g.add_argument("-m", "--model", default=None,
                   help="GGUF file or model name from models.toml (default: smollm2-135m-instruct)")
    g.add_argument("-a", "--alias", help="model name reported by /v1/models (default: the file name)")
    add_llama_flags(g)
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    g.add_argument("-np", "--parallel", type=int, default=1,
                   help="slots: conversations decoded together, each with n_ctx / np cells (default 1)")
    g.add_argument("-n", "--n-predict", type=int, default=-1, help="default most tokens to generate (-1: no limit)")
    g.add_argument("--temp", type=float, default=0.8, help="default temperature (0.8)")
    g.add_argument("--top-k", type=int, default=40, help="default top-k (40)")
    g.add_argument("--top-p", type=float, default=0.95, help="default top-p (0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="default min-p (0.05)")
    g.add_argument("--seed", type=int, default=-1, help="default sampling seed (-1: random)")
    # the other samplers' defaults, as llama-server's flags (a request's fields override them)
    for flag, kind, default in (("--repeat-penalty", float, 1.0), ("--repeat-last-n", int, 64),
                                ("--presence-penalty", float, 0.0), ("--frequency-penalty", float, 0.0),
                                ("--typical", float, 1.0), ("--top-nsigma", float, -1.0), ("--mirostat", int, 0),
                                ("--mirostat-lr", float, 0.1), ("--mirostat-ent", float, 5.0),
                                ("--dry-multiplier", float, 0.0), ("--dry-base", float, 1.75),
                                ("--dry-allowed-length", int, 2), ("--dry-penalty-last-n", int, -1),
                                ("--xtc-probability", float, 0.0), ("--xtc-threshold", float, 0.1)):
        g.add_argument(flag, type=kind, default=default, help=f"default {flag[2:]} ({default:g})")
    g.add_argument("--slot-save-path", help="folder for slot save / restore (POST /slots/ID?action=...)")
    g.add_argument("--strict-model", action="store_true",
                   help="answer 404 to a request naming another model (default: the name is ignored, as by "
                        "llama-server)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (all endpoints but /health)")
    g.add_argument("-v", "--verbose", action="store_true", help="llama.cpp's logs and request logs")
    for flag in ("-cb", "--cont-batching", "--metrics", "--slots", "--no-webui"):
        g.add_argument(flag, action="store_true", dest="noop_" + flag.strip("-").replace("-", "_"),
                       help=argparse.SUPPRESS)
    k = p.add_argument_group("compression (defaults; a request overrides them in its \"llamakv\" object)")
    k.add_argument("--kv-ratio", type=float, default=0.5,
                   help="fraction of a conversation's tokens whose cells are evicted, in [0, 1) (default 0.5)")
    k.add_argument("--kv-method", default="ea_keydiff", choices=sorted(PRESSES), help="scoring method")
    k.add_argument("--kv-aggregation", default="mean", choices=AGGREGATIONS, help="per-head to per-cell scores")
    k.add_argument("--kv-min-tokens", type=int, default=1024,
                   help="compress only conversations of at least this many tokens (default 1024)")
    k.add_argument("--kv-budget", type=int, default=0,
                   help="most cells a slot may keep after a prompt; more are evicted (0: no budget)")
    k.add_argument("--kv-query-aware", action="store_true",
                   help="the last user message guides the compression of the conversation before it (decoded "
                        "after it for the scoring only, then prefilled in its place); default: query-agnostic")
    k.add_argument("--kv-n-sink", type=int, default=4, help="first positions never evicted (default 4)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    try:
        import sse_starlette  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise LlamaKVError(f"llamakv serve needs the server extra ({e.name} is missing): "
                           "pip install 'llamakv[server]'") from None

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    defaults = KVParams(ratio=args.kv_ratio, method=args.kv_method, aggregation=args.kv_aggregation,
                        min_tokens=args.kv_min_tokens, budget=args.kv_budget, query_aware=args.kv_query_aware)
    try:
        defaults.validate()
    except ApiError as e:
        raise LlamaKVError(f"bad compression flag: {e.message}") from None
    llama_kwargs(args)  # the llama.cpp flags checked before the model loads
    if args.parallel < 1:
        raise LlamaKVError(f"-np must be at least 1, got {args.parallel}")
    if args.slot_save_path:
        Path(args.slot_save_path).mkdir(parents=True, exist_ok=True)
    engine = Engine(args, defaults)
    print(f"llamakv serve: {engine.model_name} loaded (n_ctx {engine.context.n_ctx}, {args.parallel} slots of "
          f"{engine.n_ctx_slot} cells), "
          f"listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    from .server_app import create_app

    app = create_app(engine, api_key=args.api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
    return 0
