"""`llamakv serve`: an HTTP server of llama-server's shape whose KV caches are compressed.

Endpoints: OpenAI's /v1/chat/completions, /v1/completions and /v1/models; llama-server's
/completion, /tokenize, /detokenize, /health, /props, /slots (and slot save / restore / erase),
/metrics (Prometheus). This module: the flags, request parameters, slots and the inference
thread; llamakv.server_app: the Starlette app (served by uvicorn, streams by sse-starlette).

Why one worker and swapped slots: llamakv's capture observes one sequence of one llama context
(one KVSession), so requests are served one at a time by a single inference thread fed by a
queue; the event loop only parses, queues and streams, and never waits on llama.cpp. The `-np`
slots are logical conversations: the slot being served lives in llama.cpp's cache, the others
wait as compressed in-memory snapshots (KVSession.snapshot / restore). A slot keeps the token ids
of everything fed to it, evicted ones included (token i sits at position i), so a request whose
prompt starts with that history only prefills the rest on top of the compressed cache.
"""
from __future__ import annotations

import argparse
import asyncio
import codecs
import logging
import math
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import llama_cpp
import numpy as np

from .errors import CacheFullError, LlamaKVError, StateError
from .scoring import AGGREGATIONS, PRESSES, make_press

log = logging.getLogger("llamakv.server")

CACHE_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
               "iq4_nl": "IQ4_NL", "q5_0": "Q5_0", "q5_1": "Q5_1"}
_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


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
    g.add_argument("-c", "--ctx-size", type=int, default=4096, help="KV cache size in cells (default 4096)")
    g.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", type=int, default=0, help="layers on the GPU")
    g.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("-b", "--batch-size", type=int, default=512, help="tokens per decode call (default 512)")
    g.add_argument("-fa", "--flash-attn", nargs="?", const="on", default="off", choices=["on", "off", "auto"],
                   help="flash attention (auto means off here)")
    g.add_argument("-ctk", "--cache-type-k", default="f16", choices=sorted(CACHE_TYPES), help="K cache type")
    g.add_argument("-ctv", "--cache-type-v", default="f16", choices=sorted(CACHE_TYPES), help="V cache type")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    g.add_argument("-np", "--parallel", type=int, default=1, help="slots (conversations kept; default 1)")
    g.add_argument("-n", "--n-predict", type=int, default=-1, help="default most tokens to generate (-1: no limit)")
    g.add_argument("--temp", type=float, default=0.8, help="default temperature (0.8)")
    g.add_argument("--top-k", type=int, default=40, help="default top-k (40)")
    g.add_argument("--top-p", type=float, default=0.95, help="default top-p (0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="default min-p (0.05)")
    g.add_argument("--seed", type=int, default=-1, help="default sampling seed (-1: random)")
    g.add_argument("--slot-save-path", help="folder for slot save / restore (POST /slots/ID?action=...)")
    g.add_argument("--accept-any-model", action="store_true",
                   help="answer requests for any model name as llama-server does (default: 404 for a name "
                        "that is not this model's)")
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
    if args.cache_type_v not in ("f16", "f32", "bf16") and args.flash_attn != "on":
        raise LlamaKVError(f"a quantized V cache (-ctv {args.cache_type_v}) needs flash attention: add -fa on")
    if args.parallel < 1:
        raise LlamaKVError(f"-np must be at least 1, got {args.parallel}")
    if args.slot_save_path:
        Path(args.slot_save_path).mkdir(parents=True, exist_ok=True)
    engine = Engine(args, defaults)
    print(f"llamakv serve: {engine.model_name} loaded (n_ctx {engine.session.n_ctx}, {args.parallel} slots), "
          f"listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    from .server_app import create_app

    app = create_app(engine, api_key=args.api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
    return 0


# -- errors ------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered as JSON of OpenAI's shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


# -- request parameters ------------------------------------------------------------------------
@dataclass
class KVParams:
    ratio: float
    method: str
    aggregation: str
    min_tokens: int
    budget: int
    query_aware: bool

    def validate(self) -> KVParams:
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) or not 0.0 <= r < 1.0:
            raise _bad(f"llamakv.ratio must be a number in [0, 1), got {r!r}")
        if self.method not in PRESSES:
            raise _bad(f"unknown llamakv.method {self.method!r}; choose one of {', '.join(sorted(PRESSES))}")
        if self.aggregation not in AGGREGATIONS:
            raise _bad(f"unknown llamakv.aggregation {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        for name in ("min_tokens", "budget"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _bad(f"llamakv.{name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.query_aware, bool):
            raise _bad(f"llamakv.query_aware must be true or false, got {self.query_aware!r}")
        return self

    @classmethod
    def from_body(cls, body: dict, defaults: KVParams) -> KVParams:
        ext = body.get("llamakv", {})
        if ext is None:
            ext = {}
        if not isinstance(ext, dict):
            raise _bad("\"llamakv\" must be an object, e.g. {\"ratio\": 0.5}")
        unknown = set(ext) - set(cls.__dataclass_fields__)
        if unknown:
            raise _bad(f"unknown llamakv field(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        values = {k: getattr(defaults, k) for k in cls.__dataclass_fields__}
        if "kv_compress_ratio" in body:
            values["ratio"] = body["kv_compress_ratio"]
        values.update(ext)
        return cls(**values).validate()


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    stop: list[str]


def _number(body: dict, names: tuple[str, ...], default, kind=float, lo=None, hi=None):
    for name in names:
        if name in body and body[name] is not None:
            v = body[name]
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
            if not ok or (isinstance(v, float) and math.isnan(v)):
                raise _bad(f"{name} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
            v = kind(v)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise _bad(f"{name} must be in [{lo}, {hi}], got {v!r}")
            return v
    return default


def sampling_from(body: dict, args) -> Sampling:
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop must be a string or a list of non-empty strings")
    n = _number(body, ("max_completion_tokens", "max_tokens", "n_predict"), args.n_predict, int, lo=-1)
    if body.get("n", 1) != 1:
        raise _bad("only n = 1 is supported")
    seed = _number(body, ("seed",), args.seed, int)
    return Sampling(max_tokens=n if n >= 0 else -1,
                    temperature=_number(body, ("temperature",), args.temp, lo=0.0),
                    top_k=_number(body, ("top_k",), args.top_k, int, lo=0),
                    top_p=_number(body, ("top_p",), args.top_p, lo=0.0, hi=1.0),
                    min_p=_number(body, ("min_p",), args.min_p, lo=0.0, hi=1.0),
                    seed=seed if seed >= 0 else int.from_bytes(os.urandom(4), "little"), stop=stop)


# -- the engine: slots, the queue and the inference thread ------------------------------------
@dataclass
class Slot:
    id: int
    history: list[int] = field(default_factory=list)  # every token fed; token i is at position i
    snap: Any = None            # Snapshot while the slot is not the one in llama.cpp's cache
    n_cells: int = 0
    is_processing: bool = False
    id_task: int = -1
    last_used: float = 0.0
    compressions: int = 0


@dataclass
class Job:
    kind: str                   # "generate", "save", "restore", "erase"
    loop: asyncio.AbstractEventLoop
    id_task: int
    tokens: list[int] = field(default_factory=list)
    split: int | None = None    # query-agnostic: compress before tokens[split:] (the last user message)
    sampling: Sampling | None = None
    kv: KVParams | None = None
    id_slot: int = -1
    cache_prompt: bool = True
    filename: str = ""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    checked_at: float = 0.0     # when the client's connection was last checked

    def emit(self, kind: str, data: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))


class Metrics:
    COUNTERS: ClassVar[dict[str, str]] = {
        "llamacpp:prompt_tokens_total": "prompt tokens prefilled (not counting reused ones)",
        "llamacpp:prompt_seconds_total": "time spent prefilling prompts",
        "llamacpp:tokens_predicted_total": "generated tokens",
        "llamacpp:tokens_predicted_seconds_total": "time spent generating",
        "llamacpp:n_decode_total": "llama_decode calls",
        "llamakv:requests_total": "completion requests served",
        "llamakv:prompt_tokens_reused_total": "prompt tokens reused from a slot's (compressed) cache",
        "llamakv:compressions_total": "compressions run",
        "llamakv:kv_cells_evicted_total": "KV cells evicted by compression",
        "llamakv:compress_seconds_total": "time spent compressing (scoring, eviction, compaction)",
        "llamakv:slot_swaps_total": "slot states swapped into llama.cpp's cache",
    }

    def __init__(self):
        self.values = dict.fromkeys(self.COUNTERS, 0.0)
        self.lock = threading.Lock()

    def add(self, name: str, value: float) -> None:
        with self.lock:
            self.values[name] += value


class Engine:
    def __init__(self, args, defaults: KVParams):
        from .models import resolve_model
        from .session import KVSession

        self.args, self.defaults = args, defaults
        type_k = getattr(llama_cpp, "GGML_TYPE_" + CACHE_TYPES[args.cache_type_k])
        type_v = getattr(llama_cpp, "GGML_TYPE_" + CACHE_TYPES[args.cache_type_v])
        self.model_path = resolve_model(args.model)
        self.session = KVSession.from_model(
            args.model, n_ctx=args.ctx_size, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
            flash_attn=args.flash_attn == "on", n_batch=args.batch_size, type_k=type_k, type_v=type_v,
            verbose=args.verbose, n_sink=args.kv_n_sink)
        self.model_name = args.alias or self.model_path.name
        self.model_names = {self.model_name, self.model_path.name, self.model_path.stem, str(self.model_path)}
        if args.model:
            self.model_names.add(args.model)
        self.llama = self.session.llama
        self.vocab = self.session.vocab
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.slots = [Slot(i) for i in range(args.parallel)]
        self.active: Slot | None = None
        self.metrics = Metrics()
        self.presses: dict[str, Any] = {}
        self.jobs: queue.Queue = queue.Queue()
        self.current: Job | None = None
        self.n_task = 0
        self.created = int(time.time())
        self.thread = threading.Thread(target=self._work, name="llamakv-inference", daemon=True)
        self.thread.start()

    # called from the event loop's threads (tokenizing reads the vocabulary only)
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        toks = self.llama.tokenize(text.encode("utf-8"), add_bos=add_special and self.add_bos, special=parse_special)
        if len(toks) >= 2 and toks[0] == toks[1] == self.llama.token_bos():
            toks = toks[1:]  # the chat template already wrote the BOS
        return toks

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.session.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        """Cancel the running and the queued requests, then end the inference thread."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.emit("error", ApiError(503, "the server is shutting down", "unavailable_error"))
        if self.current is not None:
            self.current.cancelled.set()
        self.jobs.put(None)
        self.thread.join(timeout=30)

    # -- inference thread ---------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                job.emit("error", ApiError(499, "the client went away", "cancelled"))
                continue
            self.current = job
            try:
                getattr(self, "_" + job.kind)(job)
            except ApiError as e:
                job.emit("error", e)
            except Exception as e:  # a failed request must not stop the server
                log.exception("request %s failed", job.id_task)
                job.emit("error", ApiError(500, f"{type(e).__name__}: {e}", "server_error"))
            finally:
                self.current = None

    def _slot(self, job: Job) -> Slot:
        if job.id_slot >= 0:
            return self.slots[job.id_slot]
        best, best_lcp = None, 0
        for s in self.slots:
            lcp = _common_prefix(s.history, job.tokens)
            if lcp > best_lcp:
                best, best_lcp = s, lcp
        # as llama-server: the slot sharing the longest prefix, if it is most of the prompt (or the
        # whole of the slot's conversation); otherwise an empty slot, else the least recently used
        if best is not None and (best_lcp == len(best.history) or 2 * best_lcp >= len(job.tokens)):
            return best
        empty = [s for s in self.slots if not s.history]
        return empty[0] if empty else min(self.slots, key=lambda s: s.last_used)

    def _activate(self, slot: Slot) -> None:
        """Make `slot` the sequence in llama.cpp's cache; the previous one becomes a snapshot."""
        if self.active is slot:
            return
        s = self.session
        if self.active is not None:
            self.active.snap = s.snapshot() if self.active.history else None
            self.active.n_cells = s.n_cells
        if slot.snap is not None:
            s.restore(slot.snap)
            slot.snap = None
            self.metrics.add("llamakv:slot_swaps_total", 1)
        else:
            s.reset()
        self.active = slot

    def _forget(self, slot: Slot) -> None:
        self.session.reset()
        slot.history, slot.n_cells = [], 0

    def _rewind(self, n: int) -> None:
        """Keep only positions < n (the first n tokens of the history), compressed as they are."""
        self.session.truncate(n)

    def _reuse(self, slot: Slot, tokens: list[int], cache_prompt: bool) -> int:
        """Prepare the slot's cache for `tokens`; returns how many of them are already in it."""
        n = _common_prefix(slot.history, tokens) if cache_prompt else 0
        n = min(n, len(tokens) - 1)  # at least one token is decoded, for its logits
        if n <= 0 or (n < len(slot.history) and not self.session.can_truncate(n)):
            # nothing in common, or a sliding-window cache that no longer holds the window before
            # the common prefix (llama-server re-processes the prompt then too)
            self._forget(slot)
            return 0
        if n < len(slot.history):
            self._rewind(n)
            slot.history = slot.history[:n]
        return n

    def _compress(self, slot: Slot, kv: KVParams, n_logical: int, protect: int,
                  question: list[int] | None = None) -> dict | None:
        """Evict down to (1 - ratio) of the conversation's tokens (and to the budget), guided by
        the `question` tokens that follow if given (KVSession.compress(question=...))."""
        s = self.session
        if n_logical < kv.min_tokens or (kv.ratio <= 0 and not kv.budget):
            return None
        target = s.n_cells - math.ceil((1.0 - kv.ratio) * n_logical)  # cells to evict
        if kv.budget:
            target = max(target, s.n_cells - kv.budget)
        t0 = time.perf_counter()
        report = s.compress_to(s.n_cells - target, press=self._press(kv), aggregation=kv.aggregation,
                               protect_recent=protect, question=question)
        took = time.perf_counter() - t0  # scoring, eviction, compaction (capture ran during prefill)
        if report is None:
            return None
        m = self.metrics
        m.add("llamakv:compressions_total", 1)
        m.add("llamakv:kv_cells_evicted_total", report.evicted)
        m.add("llamakv:compress_seconds_total", took)
        slot.compressions += 1
        return {"cells_before": report.cells_before, "cells_after": report.cells_after,
                "evicted": report.evicted, "kv_bytes_before": report.kv_bytes_before,
                "kv_bytes_after": report.kv_bytes_after, "ms": took * 1e3, "capture_ms": report.capture_s * 1e3,
                "method": report.method, "question_tokens": report.question_tokens,
                "aggregation": report.aggregation}

    def _press(self, kv: KVParams):
        press = self.presses.get(kv.method)
        if press is None:
            press = self.presses[kv.method] = make_press(kv.method)
        return press

    def _prefill(self, tokens: list[int]) -> None:
        s = self.session
        if tokens:
            s.prefill(tokens)
            self.metrics.add("llamacpp:n_decode_total", math.ceil(len(tokens) / s.n_ubatch))

    def _generate(self, job: Job) -> None:
        s, m = self.session, self.metrics
        slot = self._slot(job)
        slot.is_processing, slot.id_task, slot.last_used = True, job.id_task, time.time()
        try:
            self._activate(slot)
            tokens, kv = job.tokens, job.kv
            # the prompt's surprisal, for a press that reads it (cells reused from a request that
            # did not compute it have none)
            s.track_surprisal = (kv.ratio > 0 or bool(kv.budget)) and getattr(self._press(kv), "uses_surprisal", False)
            reused = self._reuse(slot, tokens, job.cache_prompt)
            new = len(tokens) - reused
            if new > s.free_cells:
                raise ApiError(400, f"the request exceeds the available context size: {new} prompt tokens to "
                                    f"prefill, {s.free_cells} free cells (n_ctx {s.n_ctx}); raise -c, shorten "
                                    "the prompt, or compress harder", "exceed_context_size_error")
            t0 = time.perf_counter()
            try:
                compression, done = None, reused
                if job.split is not None and job.split > reused:
                    # compress the conversation before its last user message; query-aware: with
                    # that message decoded after it for the scoring only, then prefilled in its place
                    self._prefill(tokens[reused:job.split])
                    slot.history = tokens[:job.split]
                    compression = self._compress(slot, kv, job.split, 1,
                                                 question=tokens[job.split:] if kv.query_aware else None)
                    done = job.split
                self._prefill(tokens[done:])
                slot.history = list(tokens)
                if compression is None:  # one message, or too short before it: compress it all
                    protect = len(tokens) - job.split if (job.split is not None and kv.query_aware) else 1
                    compression = self._compress(slot, kv, len(tokens), protect)
                    if compression:
                        compression["before_last_message"] = False
                else:
                    compression["before_last_message"] = True
            except (LlamaKVError, RuntimeError) as e:
                self._forget(slot)
                raise ApiError(500, f"prefill failed: {e}", "server_error") from e
            # prefill time only, as llama-server's prompt_ms; compression is timed in its own report
            prompt_s = time.perf_counter() - t0 - (compression["ms"] / 1e3 if compression else 0.0)
            m.add("llamacpp:prompt_tokens_total", new)
            m.add("llamacpp:prompt_seconds_total", prompt_s)
            m.add("llamakv:prompt_tokens_reused_total", reused)
            m.add("llamakv:requests_total", 1)
            job.emit("start", {"id_slot": slot.id, "reused": reused})
            t1 = time.perf_counter()
            out = self._decode_loop(job, slot)
            gen_s = time.perf_counter() - t1
            m.add("llamacpp:tokens_predicted_total", out["n"])
            m.add("llamacpp:tokens_predicted_seconds_total", gen_s)
            n = out["n"]
            job.emit("done", {
                **out, "id_slot": slot.id, "prompt_tokens": len(tokens),
                "timings": {"cache_n": reused, "prompt_n": new, "prompt_ms": prompt_s * 1e3,
                            "prompt_per_token_ms": prompt_s * 1e3 / max(new, 1),
                            "prompt_per_second": new / max(prompt_s, 1e-9),
                            "predicted_n": n, "predicted_ms": gen_s * 1e3,
                            "predicted_per_token_ms": gen_s * 1e3 / max(n, 1),
                            "predicted_per_second": n / max(gen_s, 1e-9)},
                "llamakv": {"tokens_reused": reused, "tokens_prefilled": new, "cells": s.n_cells,
                            "n_ctx": s.n_ctx, "ratio": kv.ratio, "query_aware": kv.query_aware,
                            "compression": compression}})
        finally:
            slot.n_cells = s.n_cells
            slot.is_processing, slot.last_used = False, time.time()

    def _decode_loop(self, job: Job, slot: Slot) -> dict:
        """Sample until EOG, the limit, a stop string, a full cache or a cancel. The last sampled
        token is not decoded (the next request prefills it), so the history is what the cache holds."""
        s, p = self.session, job.sampling
        sampler = _sampler(p)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending, reason, n, word = "", "length", 0, ""
        try:
            while p.max_tokens < 0 or n < p.max_tokens:
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
                tok = llama_cpp.llama_sampler_sample(sampler, s.ctx, -1)
                if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
                    reason = "stop"
                    break
                n += 1
                pending += decoder.decode(s.token_bytes(tok))
                hit = _find_stop(pending, p.stop)
                if hit is not None:
                    at, word = hit
                    if pending[:at]:
                        job.emit("text", pending[:at])
                    pending, reason = "", "stop"
                    break
                keep = _partial_stop(pending, p.stop)
                if len(pending) > keep:
                    job.emit("text", pending[:len(pending) - keep])
                    pending = pending[len(pending) - keep:]
                if p.max_tokens >= 0 and n >= p.max_tokens:
                    break
                try:
                    self._prefill([tok])
                except CacheFullError:
                    break
                slot.history.append(tok)
        finally:
            llama_cpp.llama_sampler_free(sampler)
        if pending:
            job.emit("text", pending)
        return {"n": n, "finish_reason": reason, "stopping_word": word}

    # -- slot files -------------------------------------------------------------------------
    def _path(self, job: Job) -> Path:
        return Path(self.args.slot_save_path) / job.filename

    def _save(self, job: Job) -> None:
        slot = self.slots[job.id_slot]
        self._activate(slot)
        t0 = time.perf_counter()
        size = self.session.save(self._path(job), extra={"tokens": slot.history, "llamakv_slot": 1})
        job.emit("done", {"id_slot": slot.id, "filename": job.filename, "n_saved": len(slot.history),
                          "n_written": size, "n_cells": self.session.n_cells,
                          "timings": {"save_ms": (time.perf_counter() - t0) * 1e3}})

    def _restore(self, job: Job) -> None:
        slot = self.slots[job.id_slot]
        path = self._path(job)
        if not path.is_file():
            raise ApiError(404, f"no saved slot named {job.filename!r} in --slot-save-path", "not_found_error")
        self._activate(slot)
        t0 = time.perf_counter()
        try:
            extra = self.session.load(path)
        except StateError as e:
            raise _bad(str(e)) from e
        tokens = extra.get("tokens")
        if not isinstance(tokens, list) or len(tokens) != self.session.next_pos:
            self._forget(slot)
            raise _bad(f"{job.filename} is a llamakv state but not a saved slot (no token history)")
        slot.history, slot.n_cells = [int(t) for t in tokens], self.session.n_cells
        job.emit("done", {"id_slot": slot.id, "filename": job.filename, "n_restored": len(tokens),
                          "n_read": path.stat().st_size, "n_cells": slot.n_cells,
                          "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3}})

    def _erase(self, job: Job) -> None:
        slot = self.slots[job.id_slot]
        n = len(slot.history)
        if self.active is slot:
            self._forget(slot)
        slot.history, slot.snap, slot.n_cells = [], None, 0
        job.emit("done", {"id_slot": slot.id, "n_erased": n})

    # -- views (event loop; reads only) -----------------------------------------------------------
    def slots_view(self) -> list[dict]:
        return [{"id": s.id, "id_task": s.id_task, "n_ctx": self.session.n_ctx, "is_processing": s.is_processing,
                 "n_past": len(s.history), "n_cells": self.session.n_cells if s is self.active else s.n_cells,
                 "loaded": s is self.active, "compressions": s.compressions} for s in self.slots]

    def prometheus(self) -> str:
        lines = []
        with self.metrics.lock:
            values = dict(self.metrics.values)
        for name, help_ in Metrics.COUNTERS.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {values[name]:g}"]
        views = self.slots_view()
        gauges = {
            "llamakv:kv_cells_used": ("KV cells in llama.cpp's cache (the loaded slot)", self.session.n_cells),
            "llamakv:kv_cells_slots": ("KV cells held by all slots (loaded and swapped out)",
                                       sum(v["n_cells"] for v in views)),
            "llamakv:slot_tokens": ("tokens of all slots' conversations, evicted ones included",
                                    sum(v["n_past"] for v in views)),
            "llamakv:n_ctx": ("KV cache size in cells", self.session.n_ctx),
            "llamacpp:requests_processing": ("requests being served", sum(v["is_processing"] for v in views)),
            "llamacpp:requests_deferred": ("requests waiting in the queue", self.jobs.qsize()),
        }
        for name, (help_, v) in gauges.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {v:g}"]
        return "\n".join(lines) + "\n"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n


def _find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    hits = [(i, w) for w in stops if (i := text.find(w)) >= 0]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could begin a stop string (held back)."""
    best = 0
    for w in stops:
        for k in range(min(len(w) - 1, len(text)), best, -1):
            if text.endswith(w[:k]):
                best = k
                break
    return best


def _sampler(p: Sampling):
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = lambda smp: llama_cpp.llama_sampler_chain_add(chain, smp)
    if p.temperature <= 0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if p.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(p.top_k))
    add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
    add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(p.temperature))
    add(llama_cpp.llama_sampler_init_dist(p.seed))
    return chain
