"""The inference side of `llamakv serve`: slots, the queue and the scheduling thread.

One llama.cpp context holds the `-np` slots as sequences in their own KV streams
(context.Context, non-unified cache), each compressed on its own. A single inference thread
runs llama-server's continuous batching: each turn it admits waiting requests to idle slots,
advances one slot's prompt by one ubatch (or one compression), then decodes the next token of
every generating slot (sequences of consecutive ids in one llama_decode call, generation.
decode_step). A new request thus joins the running batch, and its prompt stalls the others at
most a ubatch at a time. A slot keeps the token ids of everything fed to it, evicted ones
included (token i sits at position i), so a request whose prompt starts with that history only
prefills the rest on top of the compressed cache. The event loop only parses, queues and
streams, and never waits on llama.cpp.
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import llama_cpp
import numpy as np

from . import statefile
from .compressor import Compressor
from .context import Context, open_llama
from .errors import LlamaKVError, StateError
from .flags import llama_kwargs
from .generation import Generation, Piece, Sampling, decode_step
from .models import resolve_model
from .scoring import AGGREGATIONS, PRESSES, make_press
from .sequence import Sequence

log = logging.getLogger("llamakv.server")

class ApiError(Exception):
    """An error answered as JSON of OpenAI's shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


@dataclass
class KVParams:
    """A request's compression settings (the server's flags as defaults)."""
    ratio: float
    method: str
    aggregation: str
    min_tokens: int
    budget: int
    query_aware: bool

    def validate(self) -> KVParams:
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) or not 0.0 <= r < 1.0:
            raise bad_request(f"llamakv.ratio must be a number in [0, 1), got {r!r}")
        if self.method not in PRESSES:
            raise bad_request(f"unknown llamakv.method {self.method!r}; choose one of {', '.join(sorted(PRESSES))}")
        if self.aggregation not in AGGREGATIONS:
            raise bad_request(f"unknown llamakv.aggregation {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        for name in ("min_tokens", "budget"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad_request(f"llamakv.{name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.query_aware, bool):
            raise bad_request(f"llamakv.query_aware must be true or false, got {self.query_aware!r}")
        return self

    @classmethod
    def from_body(cls, body: dict, defaults: KVParams) -> KVParams:
        ext = body.get("llamakv", {})
        if ext is None:
            ext = {}
        if not isinstance(ext, dict):
            raise bad_request("\"llamakv\" must be an object, e.g. {\"ratio\": 0.5}")
        unknown = set(ext) - set(cls.__dataclass_fields__)
        if unknown:
            raise bad_request(f"unknown llamakv field(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        values = {k: getattr(defaults, k) for k in cls.__dataclass_fields__}
        if "kv_compress_ratio" in body:
            values["ratio"] = body["kv_compress_ratio"]
        values.update(ext)
        return cls(**values).validate()


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


@dataclass
class Slot:
    id: int
    seq: Sequence
    history: list[int] = field(default_factory=list)  # every token fed; token i is at position i
    job: Job | None = None
    work: Iterator[None] | None = None  # the prompt's remaining steps
    gen: Generation | None = None
    id_task: int = -1
    last_used: float = 0.0
    admitted: float = 0.0
    compressions: int = 0
    info: dict = field(default_factory=dict)  # the running request's figures

    @property
    def is_processing(self) -> bool:
        return self.job is not None


class Metrics:
    COUNTERS: ClassVar[dict[str, str]] = {
        "llamacpp:prompt_tokens_total": "prompt tokens prefilled (not counting reused ones)",
        "llamacpp:prompt_seconds_total": "time spent prefilling prompts",
        "llamacpp:tokens_predicted_total": "generated tokens",
        "llamacpp:tokens_predicted_seconds_total": "time spent generating",
        "llamakv:requests_total": "completion requests served",
        "llamakv:prompt_tokens_reused_total": "prompt tokens reused from a slot's (compressed) cache",
        "llamakv:compressions_total": "compressions run",
        "llamakv:kv_cells_evicted_total": "KV cells evicted by compression",
        "llamakv:compress_seconds_total": "time spent compressing (scoring, eviction, compaction)",
    }

    def __init__(self):
        self.values = dict.fromkeys(self.COUNTERS, 0.0)
        self.lock = threading.Lock()

    def add(self, name: str, value: float) -> None:
        with self.lock:
            self.values[name] += value


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n


class Engine:
    def __init__(self, args, defaults: KVParams):
        self.args, self.defaults = args, defaults
        self.model_path = resolve_model(args.model)
        self.model_name = args.alias or self.model_path.name
        self.model_names = {self.model_name, self.model_path.name, self.model_path.stem, str(self.model_path)}
        if args.model:
            self.model_names.add(args.model)
        self.metrics = Metrics()
        self.compressors: dict[str, Compressor] = {}
        self.jobs: queue.Queue = queue.Queue()
        self.waiting: list[Job] = []
        self.n_task = 0
        self.created = int(time.time())
        # the model is loaded and every llama.cpp call made on the inference thread: llama.cpp's
        # OpenMP threads, once started by one thread, made decode calls from another 3x slower
        # (SmolLM2, 2 threads: 33 ms a token instead of 11)
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="llamakv-inference", daemon=True)
        self.thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def _load(self) -> None:
        args = self.args
        self.llama = open_llama(args.model, **llama_kwargs(args), verbose=args.verbose)
        self.context = Context(self.llama, n_seq=args.parallel, n_sink=args.kv_n_sink)
        self.vocab = self.context.vocab
        self.slots = [Slot(i, Sequence(self.context, i)) for i in range(args.parallel)]

    def _main(self) -> None:
        try:
            self._load()
        except BaseException as e:  # handed to the constructor, which raises it
            self._load_error = e
            return
        finally:
            self._ready.set()
        self._work()

    @property
    def n_ctx_slot(self) -> int:
        return self.context.n_ctx_seq

    # called from the event loop's threads (tokenizing reads the vocabulary only)
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.context.tokenize(text, add_bos=add_special, special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.context.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        return self.context.token_bytes(token).decode("utf-8", errors="replace")

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        """Cancel the running and the queued requests, then end the inference thread."""
        self.jobs.put(None)
        self.thread.join(timeout=30)

    # -- the inference thread ---------------------------------------------------------------
    def _work(self) -> None:
        while True:
            busy = any(s.job is not None for s in self.slots)
            try:  # wait for work only when there is none
                job = self.jobs.get(block=not busy and not self.waiting, timeout=None)
                while True:
                    if job is None:
                        return self._shutdown()
                    self.waiting.append(job)
                    job = self.jobs.get_nowait()
            except queue.Empty:
                pass
            try:
                self._turn()
            except Exception:  # a bug must not stop the server: fail the running requests
                log.exception("the inference loop failed")
                for s in self.slots:
                    if s.job is not None:
                        self._fail(s, ApiError(500, "the inference loop failed (see the server log)", "server_error"))

    def _shutdown(self) -> None:
        err = ApiError(503, "the server is shutting down", "unavailable_error")
        for job in self.waiting:
            job.emit("error", err)
        for s in self.slots:
            if s.job is not None:
                self._fail(s, err)

    def _turn(self) -> None:
        """One turn of continuous batching: admissions, one prompt step, one decode step."""
        self._admit()
        for s in self.slots:
            if s.job is not None and s.job.cancelled.is_set():
                self._cancel(s)
        prefilling = [s for s in self.slots if s.work is not None]
        if prefilling:
            self._advance(min(prefilling, key=lambda s: s.admitted))
        generating = [s for s in self.slots if s.gen is not None and not s.gen.done]
        if generating:
            by_gen = {id(s.gen): s for s in generating}
            for gen, pieces in decode_step(self.context, [s.gen for s in generating]):
                slot = by_gen[id(gen)]
                self._emit(slot, pieces)
                if gen.done:
                    self._complete(slot)

    def _admit(self) -> None:
        """Give waiting jobs their slots, first come first served; a job whose slot is busy waits."""
        still = []
        for job in self.waiting:
            if job.cancelled.is_set():
                job.emit("error", ApiError(499, "the client went away", "cancelled"))
                continue
            slot = self._pick(job)
            if slot is None:
                still.append(job)
                continue
            try:
                if job.kind == "generate":
                    self._start(slot, job)
                else:
                    getattr(self, "_" + job.kind)(slot, job)
            except ApiError as e:
                job.emit("error", e)
            except Exception as e:  # a failed request must not stop the server
                log.exception("request %s failed", job.id_task)
                job.emit("error", ApiError(500, f"{type(e).__name__}: {e}", "server_error"))
        self.waiting = still

    def _pick(self, job: Job) -> Slot | None:
        if job.id_slot >= 0:
            slot = self.slots[job.id_slot]
            return slot if slot.job is None else None
        idle = [s for s in self.slots if s.job is None]
        if not idle:
            return None
        best, best_lcp = None, 0
        for s in idle:
            lcp = common_prefix(s.history, job.tokens)
            if lcp > best_lcp:
                best, best_lcp = s, lcp
        # as llama-server: the slot sharing the longest prefix, if it is most of the prompt (or the
        # whole of the slot's conversation); otherwise an empty slot, else the least recently used
        if best is not None and (best_lcp == len(best.history) or 2 * best_lcp >= len(job.tokens)):
            return best
        empty = [s for s in idle if not s.history]
        return empty[0] if empty else min(idle, key=lambda s: s.last_used)

    def _start(self, slot: Slot, job: Job) -> None:
        slot.job, slot.id_task, slot.admitted = job, job.id_task, time.perf_counter()
        slot.info = {}
        slot.work = self._prompt(slot, job)

    def _advance(self, slot: Slot) -> None:
        try:
            next(slot.work)
        except StopIteration:
            slot.work = None
        except ApiError as e:
            self._fail(slot, e)
        except (LlamaKVError, RuntimeError) as e:
            self._forget(slot)
            self._fail(slot, ApiError(500, f"prefill failed: {e}", "server_error"))
        except Exception as e:
            log.exception("request %s failed", slot.id_task)
            self._fail(slot, ApiError(500, f"{type(e).__name__}: {e}", "server_error"))

    def _release(self, slot: Slot) -> None:
        if slot.gen is not None:
            tokens = slot.job.tokens + slot.gen.tokens
            slot.history = tokens[:slot.seq.next_pos]  # the last sampled token is not in the cache
            slot.gen.close()
        elif slot.job is not None and slot.job.kind == "generate":
            slot.history = slot.job.tokens[:slot.seq.next_pos]
        if slot.work is not None:
            slot.work.close()
        slot.job, slot.work, slot.gen = None, None, None
        slot.last_used = time.time()

    def _fail(self, slot: Slot, e: ApiError) -> None:
        job = slot.job
        self._release(slot)
        if job is not None:
            job.emit("error", e)

    def _cancel(self, slot: Slot) -> None:
        if slot.gen is not None:
            slot.gen.cancel()
            self._complete(slot)
        else:
            self._fail(slot, ApiError(499, "the client went away", "cancelled"))

    def _forget(self, slot: Slot) -> None:
        slot.seq.reset()
        slot.history = []

    # -- a request's prompt -----------------------------------------------------------------
    def _reuse(self, slot: Slot, tokens: list[int], cache_prompt: bool) -> int:
        """Prepare the slot's cache for `tokens`; returns how many of them are already in it."""
        seq = slot.seq
        n = common_prefix(slot.history, tokens) if cache_prompt else 0
        n = min(n, len(tokens) - 1)  # at least one token is decoded, for its logits
        if n <= 0 or (n < len(slot.history) and not seq.can_truncate(n)):
            # nothing in common, or a sliding-window cache that no longer holds the window before
            # the common prefix (llama-server re-processes the prompt then too)
            self._forget(slot)
            return 0
        if n < len(slot.history):
            seq.truncate(n)
            slot.history = slot.history[:n]
        return n

    def _compressor(self, kv: KVParams) -> Compressor:
        c = self.compressors.get(kv.method)
        if c is None:
            c = self.compressors[kv.method] = Compressor(make_press(kv.method), n_sink=self.args.kv_n_sink)
        return c

    def _feed(self, slot: Slot, tokens: list[int], final: bool) -> Iterator[None]:
        """Decode `tokens` into the slot, a ubatch per step. After the prompt's last ubatch
        (`final`) there is no pause: the first token is sampled before another slot decodes."""
        if not tokens:
            return
        for done in slot.seq.decode_steps(tokens):
            if done < len(tokens) or not final:
                yield

    def _prompt(self, slot: Slot, job: Job) -> Iterator[None]:
        """The steps of a request before its first token: prefix reuse, prefill (with the
        compression before the last user message, if any), compression, the first sample."""
        seq, kv, tokens = slot.seq, job.kv, job.tokens
        comp = self._compressor(kv)
        # the prompt's surprisal, for a press that reads it (cells reused from a request that
        # did not compute it have none)
        seq.track_surprisal = (kv.ratio > 0 or bool(kv.budget)) and getattr(comp.press, "uses_surprisal", False)
        reused = self._reuse(slot, tokens, job.cache_prompt)
        new = len(tokens) - reused
        if new > seq.free_cells:
            raise ApiError(400, f"the request exceeds the available context size: {new} prompt tokens to "
                                f"prefill, {seq.free_cells} free cells (n_ctx {seq.n_ctx} per slot); raise -c, "
                                "shorten the prompt, or compress harder", "exceed_context_size_error")
        t0 = time.perf_counter()
        compression, done = None, reused
        if job.split is not None and job.split > reused:
            # compress the conversation before its last user message; query-aware: with that
            # message decoded after it for the scoring only, then prefilled in its place
            yield from self._feed(slot, tokens[reused:job.split], final=False)
            slot.history = tokens[:job.split]
            compression = self._compress(slot, kv, job.split, 1,
                                         question=tokens[job.split:] if kv.query_aware else None)
            done = job.split
        yield from self._feed(slot, tokens[done:], final=True)
        slot.history = list(tokens)
        if compression is None:  # one message, or too short before it: compress it all
            protect = len(tokens) - job.split if (job.split is not None and kv.query_aware) else 1
            compression = self._compress(slot, kv, len(tokens), protect)
            if compression:
                compression["before_last_message"] = False
        else:
            compression["before_last_message"] = True
        # prefill time only, as llama-server's prompt_ms; compression is timed in its own report
        prompt_s = time.perf_counter() - t0 - (compression["ms"] / 1e3 if compression else 0.0)
        m = self.metrics
        m.add("llamacpp:prompt_tokens_total", new)
        m.add("llamacpp:prompt_seconds_total", prompt_s)
        m.add("llamakv:prompt_tokens_reused_total", reused)
        m.add("llamakv:requests_total", 1)
        slot.info = {"reused": reused, "new": new, "prompt_s": prompt_s, "compression": compression,
                     "t_gen": time.perf_counter()}
        job.emit("start", {"id_slot": slot.id, "reused": reused})
        slot.gen = Generation(seq, job.sampling, prompt=tokens)
        pieces = slot.gen.begin()  # right after the prompt's last logits
        slot.work = None
        self._emit(slot, pieces)
        if slot.gen.done:
            self._complete(slot)

    def _compress(self, slot: Slot, kv: KVParams, n_logical: int, protect: int,
                  question: list[int] | None = None) -> dict | None:
        """Evict down to (1 - ratio) of the conversation's tokens (and to the budget), guided by
        the `question` tokens that follow if given (Compressor.compress_with_question)."""
        seq = slot.seq
        if n_logical < kv.min_tokens or (kv.ratio <= 0 and not kv.budget):
            return None
        target = seq.n_cells - math.ceil((1.0 - kv.ratio) * n_logical)  # cells to evict
        if kv.budget:
            target = max(target, seq.n_cells - kv.budget)
        t0 = time.perf_counter()
        report = self._compressor(kv).compress_to(seq, seq.n_cells - target, aggregation=kv.aggregation,
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

    # -- a request's answer -----------------------------------------------------------------
    def _emit(self, slot: Slot, pieces: list[Piece]) -> None:
        for piece in pieces:
            if piece.text or piece.probs:
                slot.job.emit("text", piece)

    def _complete(self, slot: Slot) -> None:
        job, gen, seq, info = slot.job, slot.gen, slot.seq, slot.info
        gen_s = time.perf_counter() - info["t_gen"]
        n, new, reused, prompt_s = gen.n, info["new"], info["reused"], info["prompt_s"]
        self.metrics.add("llamacpp:tokens_predicted_total", n)
        self.metrics.add("llamacpp:tokens_predicted_seconds_total", gen_s)
        data = {
            "n": n, "finish_reason": gen.finish_reason, "stopping_word": gen.stopping_word,
            "id_slot": slot.id, "prompt_tokens": len(job.tokens),
            "timings": {"cache_n": reused, "prompt_n": new, "prompt_ms": prompt_s * 1e3,
                        "prompt_per_token_ms": prompt_s * 1e3 / max(new, 1),
                        "prompt_per_second": new / max(prompt_s, 1e-9),
                        "predicted_n": n, "predicted_ms": gen_s * 1e3,
                        "predicted_per_token_ms": gen_s * 1e3 / max(n, 1),
                        "predicted_per_second": n / max(gen_s, 1e-9)},
            "llamakv": {"tokens_reused": reused, "tokens_prefilled": new, "cells": seq.n_cells,
                        "n_ctx": seq.n_ctx, "ratio": job.kv.ratio, "query_aware": job.kv.query_aware,
                        "compression": info["compression"]}}
        self._release(slot)
        job.emit("done", data)

    # -- slot files ---------------------------------------------------------------------------
    def _path(self, job: Job) -> Path:
        return Path(self.args.slot_save_path) / job.filename

    def _save(self, slot: Slot, job: Job) -> None:
        t0 = time.perf_counter()
        size = statefile.save(self._path(job), slot.seq.snapshot(), self.context.fingerprint(),
                              extra={"tokens": slot.history, "llamakv_slot": 1})
        job.emit("done", {"id_slot": slot.id, "filename": job.filename, "n_saved": len(slot.history),
                          "n_written": size, "n_cells": slot.seq.n_cells,
                          "timings": {"save_ms": (time.perf_counter() - t0) * 1e3}})

    def _restore(self, slot: Slot, job: Job) -> None:
        path = self._path(job)
        if not path.is_file():
            raise ApiError(404, f"no saved slot named {job.filename!r} in --slot-save-path", "not_found_error")
        t0 = time.perf_counter()
        try:
            snap, extra = statefile.load(path, self.context.fingerprint())
        except StateError as e:
            raise bad_request(str(e)) from e
        tokens = extra.get("tokens")
        if not isinstance(tokens, list) or len(tokens) != snap.next_pos:
            raise bad_request(f"{job.filename} is a llamakv state but not a saved slot (no token history)")
        try:
            slot.seq.restore(snap)
        except StateError as e:
            raise bad_request(str(e)) from e
        slot.history = [int(t) for t in tokens]
        job.emit("done", {"id_slot": slot.id, "filename": job.filename, "n_restored": len(tokens),
                          "n_read": path.stat().st_size, "n_cells": slot.seq.n_cells,
                          "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3}})

    def _erase(self, slot: Slot, job: Job) -> None:
        n = len(slot.history)
        self._forget(slot)
        job.emit("done", {"id_slot": slot.id, "n_erased": n})

    # -- views (event loop; reads only) -----------------------------------------------------------
    def slots_view(self) -> list[dict]:
        return [{"id": s.id, "id_task": s.id_task, "n_ctx": s.seq.n_ctx, "is_processing": s.is_processing,
                 "n_past": len(s.history), "n_cells": s.seq.n_cells, "compressions": s.compressions}
                for s in self.slots]

    def prometheus(self) -> bytes:
        """/metrics in Prometheus' text format (prometheus-client), with llama-server's names."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self.metrics.lock:
            values = dict(self.metrics.values)
        values["llamacpp:n_decode_total"] = self.context.epoch
        helps = {**Metrics.COUNTERS, "llamacpp:n_decode_total": "llama_decode calls"}
        views = self.slots_view()
        gauges = {
            "llamakv:kv_cells_used": ("KV cells held by all slots", sum(v["n_cells"] for v in views)),
            "llamakv:slot_tokens": ("tokens of all slots' conversations, evicted ones included",
                                    sum(v["n_past"] for v in views)),
            "llamakv:n_ctx": ("KV cache size in cells, all slots", self.context.n_ctx),
            "llamacpp:requests_processing": ("requests being served", sum(v["is_processing"] for v in views)),
            "llamacpp:requests_deferred": ("requests waiting for a slot", len(self.waiting) + self.jobs.qsize()),
        }

        class Snapshot:  # a collector of the values read above
            def collect(self):
                for name, help_ in helps.items():
                    yield CounterMetricFamily(name, help_, value=values[name])
                for name, (help_, v) in gauges.items():
                    yield GaugeMetricFamily(name, help_, value=v)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Snapshot())
        return generate_latest(registry)
