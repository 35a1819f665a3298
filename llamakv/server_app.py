"""The HTTP side of `llamakv serve`: a Starlette app over the Engine of llamakv.server.

Routes parse and check requests, queue jobs for the inference thread and turn its events into
llama-server / OpenAI shaped JSON or server-sent events (sse-starlette); the event loop never
waits on llama.cpp.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import time
import uuid

import llama_cpp
import numpy as np
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .errors import LlamaKVError
from .scoring import PRESSES
from .generation import Sampling, json_grammar
from .tools import ToolError, ToolPlan, history_message, style_of
from .server_engine import ApiError, Engine, Job, KVParams, bad_request, common_prefix

log = logging.getLogger("llamakv.server")

FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


def number_field(body: dict, names: tuple[str, ...], default, kind=float, lo=None, hi=None):
    for name in names:
        if name in body and body[name] is not None:
            v = body[name]
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
            if not ok or (isinstance(v, float) and math.isnan(v)):
                raise bad_request(f"{name} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
            v = kind(v)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise bad_request(f"{name} must be in [{lo}, {hi}], got {v!r}")
            return v
    return default


# llama-server's sampler fields: (name in the request, kind, flag default's attribute, lo, hi)
SAMPLER_FIELDS = [
    ("repeat_penalty", float, "repeat_penalty", 0.0, None),
    ("repeat_last_n", int, "repeat_last_n", -1, None),
    ("presence_penalty", float, "presence_penalty", -2.0, 2.0),
    ("frequency_penalty", float, "frequency_penalty", -2.0, 2.0),
    ("typical_p", float, "typical", 0.0, 1.0),
    ("top_n_sigma", float, "top_nsigma", None, None),
    ("min_keep", int, None, 0, None),
    ("mirostat", int, "mirostat", 0, 2),
    ("mirostat_tau", float, "mirostat_ent", 0.0, None),
    ("mirostat_eta", float, "mirostat_lr", 0.0, None),
    ("dry_multiplier", float, "dry_multiplier", 0.0, None),
    ("dry_base", float, "dry_base", 1.0, None),
    ("dry_allowed_length", int, "dry_allowed_length", 0, None),
    ("dry_penalty_last_n", int, "dry_penalty_last_n", -1, None),
    ("xtc_probability", float, "xtc_probability", 0.0, 1.0),
    ("xtc_threshold", float, "xtc_threshold", 0.0, 1.0),
]


def sampling_from(body: dict, args, api: str, engine: Engine) -> Sampling:
    """Sampling settings of a request; `api` "chat", "text" (OpenAI's chat and legacy completions)
    or "native" (llama-server's /completion) says how token probabilities are asked for.
    llama-server's own sampler fields are read on every endpoint, as llama-server does."""
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop must be a string or a list of non-empty strings")
    n = number_field(body, ("max_completion_tokens", "max_tokens", "n_predict"), args.n_predict, int, lo=-1)
    if body.get("n", 1) != 1:
        raise bad_request("only n = 1 is supported")
    seed = number_field(body, ("seed",), args.seed, int)
    want, n_probs = probs_wanted(body, api)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request("ignore_eos must be true or false")
    extra = {name: number_field(body, (name,), getattr(args, flag) if flag else 0, kind, lo=lo, hi=hi)
             for name, kind, flag, lo, hi in SAMPLER_FIELDS}
    if extra["repeat_last_n"] < 0:
        extra["repeat_last_n"] = engine.n_ctx_slot
    breakers = body.get("dry_sequence_breakers")
    if breakers is not None:
        if not isinstance(breakers, list) or not all(isinstance(x, str) and x for x in breakers):
            raise bad_request("dry_sequence_breakers must be a list of non-empty strings")
        extra["dry_sequence_breakers"] = tuple(breakers)
    return Sampling(logprobs=want, n_probs=n_probs, ignore_eos=ignore_eos, max_tokens=n if n >= 0 else -1,
                    temperature=number_field(body, ("temperature",), args.temp, lo=0.0),
                    top_k=number_field(body, ("top_k",), args.top_k, int, lo=0),
                    top_p=number_field(body, ("top_p",), args.top_p, lo=0.0, hi=1.0),
                    min_p=number_field(body, ("min_p",), args.min_p, lo=0.0, hi=1.0),
                    seed=seed if seed >= 0 else int.from_bytes(os.urandom(4), "little"), stop=stop,
                    logit_bias=logit_bias_from(body.get("logit_bias"), engine),
                    grammar=grammar_from(body, api, engine), **extra)


def logit_bias_from(raw, engine: Engine) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} or llama-server's [[token or text, bias or false], ...] (a text
    stands for each of its tokens; false bans)."""
    if raw is None:
        return ()
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, list) and all(isinstance(x, list) and len(x) == 2 for x in raw):
        pairs = raw
    else:
        raise bad_request("logit_bias must be an object {token: bias} or a list of [token, bias] pairs")
    n_vocab = engine.context.n_vocab
    out = []
    for key, bias in pairs:
        if bias is False:
            bias = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias):
            raise bad_request(f"logit_bias: the bias of {key!r} must be a number or false")
        if isinstance(key, int) and not isinstance(key, bool):
            tokens = [key]
        elif isinstance(key, str) and key.lstrip("-").isdigit():
            tokens = [int(key)]
        elif isinstance(key, str) and key:
            tokens = engine.tokenize(key, add_special=False)
        else:
            raise bad_request(f"logit_bias: {key!r} is neither a token id nor a text")
        for t in tokens:
            if not 0 <= t < n_vocab:
                raise bad_request(f"logit_bias: token {t} is not in [0, {n_vocab})")
            out.append((t, float(bias)))
    return tuple(out)


def grammar_from(body: dict, api: str, engine: Engine) -> str:
    """The GBNF the answer must match: `grammar` or `json_schema` (llama-server), or OpenAI's
    `response_format` ({"type": "json_object"} for any JSON object, {"type": "json_schema",
    "json_schema": {"schema": ...}}); checked by llama.cpp's grammar parser here (400 if refused)."""
    grammar, schema, any_json = body.get("grammar"), body.get("json_schema"), False
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise bad_request("response_format must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}")
        if fmt["type"] == "json_object":
            schema = fmt.get("schema")  # llama-server's extension
            any_json = schema is None
        elif fmt["type"] == "json_schema":
            inner = fmt.get("json_schema")
            schema = inner.get("schema") if isinstance(inner, dict) else None
            if not isinstance(schema, dict):
                raise bad_request("response_format.json_schema.schema must be a JSON schema object")
    if grammar is not None and not isinstance(grammar, str):
        raise bad_request("grammar must be a string (GBNF)")
    if schema is not None and not isinstance(schema, dict):
        raise bad_request("json_schema must be a JSON schema object")
    if sum(x is not None and x != "" for x in (grammar, schema)) + any_json > 1:
        raise bad_request("give one of grammar, json_schema and response_format")
    try:
        text = grammar or (json_grammar(schema) if schema is not None or any_json else "")
    except Exception as e:  # the converter raises several kinds on schemas it cannot express
        raise bad_request(f"the JSON schema cannot be turned into a grammar: {e}") from e
    if text and not engine.context.grammar_ok(text):
        raise bad_request("llama.cpp could not parse the grammar")
    return text


def probs_wanted(body: dict, api: str) -> tuple[bool, int]:
    """(report the sampled tokens' log-probabilities, how many alternatives with each)."""
    if api == "chat":
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise bad_request("logprobs must be true or false")
        top = number_field(body, ("top_logprobs",), 0, int, lo=0, hi=20)
        if top and not lp:
            raise bad_request("top_logprobs requires logprobs to be true")
        return bool(lp), top
    if api == "text":
        top = number_field(body, ("logprobs",), None, int, lo=0, hi=20)
        return top is not None, top or 0
    top = number_field(body, ("n_probs",), 0, int, lo=0, hi=100)
    return top > 0, top



def create_app(engine: Engine, api_key: str | None = None):
    args = engine.args

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        return body

    def check_model(body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, (str, type(None))):
            raise bad_request("model must be a string")
        if name and name not in engine.model_names and args.strict_model:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {engine.model_name!r} "
                                "(see /v1/models)", "not_found_error")

    def new_job(kind: str, **kw) -> Job:
        engine.n_task += 1
        return Job(kind=kind, loop=asyncio.get_running_loop(), id_task=engine.n_task, **kw)

    async def next_event(job: Job, request: Request):
        """The job's next event; a client found gone (checked every half second) cancels the job."""
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), 0.5)
            except asyncio.TimeoutError:
                event = None
            now = time.monotonic()
            if now - job.checked_at >= 0.5:
                job.checked_at = now
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise ClientGone()
            if event is not None:
                return event

    async def run_job(job: Job, request: Request) -> dict:
        engine.submit(job)
        try:
            kind, data = await next_event(job, request)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if kind == "error":
            raise data
        return data

    async def prompt_tokens(prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("the prompt is empty")
            return await asyncio.to_thread(engine.tokenize, prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            n_vocab = llama_cpp.llama_vocab_n_tokens(engine.vocab)
            if not all(0 <= t < n_vocab for t in prompt):
                raise bad_request(f"token ids must be in [0, {n_vocab})")
            return list(prompt)
        raise bad_request("prompt must be a non-empty string, a list of token ids, or a list of one of those")

    async def chat_tokens(body: dict, plan: ToolPlan | None) -> tuple[list[int], int | None]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("messages must be a non-empty list")
        clean = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise bad_request(f"messages[{i}] must be an object with a string role")
            content = msg.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise bad_request(f"messages[{i}].content: only text parts are supported")
                content = "".join(p["text"] for p in content)
            elif content is not None and not isinstance(content, str):
                raise bad_request(f"messages[{i}].content must be a string, a list of text parts, or null")
            try:
                clean.append(history_message({**msg, "content": content}, i, plan.style if plan else "generic"))
            except ToolError as e:
                raise bad_request(str(e)) from None
        if plan is not None:
            clean = plan.messages(clean)
        try:
            tools = plan.openai_tools() if plan is not None and plan.style != "generic" else None
            text = engine.context.chat_prompt(clean, tools=tools)
            # where the last user message begins: the query-agnostic mode compresses before it
            last = max((i for i, msg in enumerate(clean) if msg["role"] in ("user", "tool")), default=0)
            before = engine.context.chat_prompt(clean[:last], add_generation_prompt=False, tools=tools) if last else ""
        except LlamaKVError as e:
            raise bad_request(str(e)) from e
        except Exception as e:  # jinja2 raises its own errors on messages the template refuses
            raise bad_request(f"the chat template refused the messages: {e}") from e
        tokens = await asyncio.to_thread(engine.tokenize, text)
        split = None
        if before:
            split = common_prefix(await asyncio.to_thread(engine.tokenize, before), tokens)
        return tokens, split if split and split < len(tokens) else None

    def generation_job(body: dict, tokens: list[int], split: int | None, api: str) -> Job:
        id_slot = number_field(body, ("id_slot", "slot_id"), -1, int, lo=-1, hi=len(engine.slots) - 1)
        cache_prompt = body.get("cache_prompt", True)
        if not isinstance(cache_prompt, bool):
            raise bad_request("cache_prompt must be true or false")
        number_field(body, ("n_keep",), 0, int, lo=-1)  # accepted; eviction takes the place of context shift
        if not isinstance(body.get("stream", False), bool):
            raise bad_request("stream must be true or false")
        return new_job("generate", tokens=tokens, split=split, sampling=sampling_from(body, args, api, engine),
                       kv=KVParams.from_body(body, engine.defaults), id_slot=id_slot, cache_prompt=cache_prompt)

    async def finish(request: Request, job: Job, shape, done_marker: bool = True, tools: ToolPlan | None = None):
        """Run a generation job; `shape(event, data, state)` makes each response object. Errors of
        the prompt (too long, ...) come before the first byte, so they get a proper status."""
        body = request.state.body
        try:
            info = await run_job(job, request)
            state = {"id": uuid.uuid4().hex[:24], "created": int(time.time()), "start": info, "text": [],
                     "stream_options": body.get("stream_options"), "tools": tools}
            if not body.get("stream", False):
                while True:
                    kind, data = await next_event(job, request)
                    if kind == "text":
                        state["text"].append(data)
                    elif kind == "error":
                        raise data
                    else:
                        return JSONResponse(shape("done", data, state))
        except ClientGone:
            return PlainTextResponse("", status_code=499)

        async def events():
            try:
                first = shape("first", None, state)
                if first is not None:
                    yield {"data": json.dumps(first)}
                while True:
                    kind, data = await job.events.get()
                    if kind == "text":
                        obj = shape("text", data, state)
                        if obj is not None:  # None: held back (a tool call is parsed at the end)
                            yield {"data": json.dumps(obj)}
                    elif kind == "error":
                        yield {"data": json.dumps(data.body())}
                        return
                    else:
                        for obj in shape("last", data, state):
                            yield {"data": json.dumps(obj)}
                        if done_marker:
                            yield {"data": "[DONE]"}
                        return
            finally:
                job.cancelled.set()  # a client gone mid-stream frees the slot at the next token

        return EventSourceResponse(events(), sep="\n")

    def usage(d: dict) -> dict:
        return {"prompt_tokens": d["prompt_tokens"], "completion_tokens": d["n"],
                "total_tokens": d["prompt_tokens"] + d["n"],
                "prompt_tokens_details": {"cached_tokens": d["timings"]["cache_n"]}}

    def reason(d: dict) -> str:
        return "length" if d["finish_reason"] in ("length", "cancelled") else "stop"

    def joined(state) -> str:
        return "".join(p.text for p in state["text"])

    def probs_of(pieces) -> list:
        return [tp for p in pieces for tp in p.probs]

    def token_entry(token: int, logprob: float) -> dict:
        raw = engine.context.token_bytes(token)
        return {"id": token, "token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), "logprob": logprob}

    def chat_logprobs(probs) -> dict | None:
        """OpenAI's chat logprobs (llama-server's too: with the token ids)."""
        if not probs:
            return None
        return {"content": [{**token_entry(tp.token, tp.logprob),
                             "top_logprobs": [token_entry(t, lp) for t, lp in tp.top]} for tp in probs]}

    def text_logprobs(probs, offset: int) -> dict | None:
        """OpenAI's legacy completions logprobs: tokens, their logprobs, the alternatives, offsets."""
        if not probs:
            return None
        texts = [engine.token_text(tp.token) for tp in probs]
        offsets = list(np.cumsum([0] + [len(t) for t in texts[:-1]]) + offset)
        return {"tokens": texts, "token_logprobs": [tp.logprob for tp in probs],
                "top_logprobs": [{engine.token_text(t): lp for t, lp in tp.top} for tp in probs],
                "text_offset": [int(o) for o in offsets]}

    def chat_shape(event, data, state):
        base = {"id": "chatcmpl-" + state["id"], "created": state["created"], "model": engine.model_name}
        plan = state["tools"]
        if event == "done":
            content, calls = plan.parse(joined(state)) if plan else (joined(state), [])
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "logprobs": chat_logprobs(probs_of(state["text"])),
                      "finish_reason": "tool_calls" if calls else reason(data)}
            return {**base, "object": "chat.completion", "choices": [choice], "usage": usage(data),
                    "timings": data["timings"], "llamakv": data["llamakv"]}
        chunk = {**base, "object": "chat.completion.chunk"}
        if event == "first":
            return {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]}
        if event == "text":
            if plan:
                state.setdefault("held", []).append(data)
                return None
            choice = {"index": 0, "delta": {"content": data.text}, "finish_reason": None}
            if data.probs:
                choice["logprobs"] = chat_logprobs(data.probs)
            return {**chunk, "choices": [choice]}
        if not plan:
            return final_chunks(chunk, {"index": 0, "delta": {}, "finish_reason": reason(data)}, data, state)
        content, calls = plan.parse("".join(p.text for p in state.get("held", [])))
        delta = ({"tool_calls": [{**c, "index": i} for i, c in enumerate(calls)]} if calls
                 else {"content": content})
        first = {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        done = {"index": 0, "delta": {}, "finish_reason": "tool_calls" if calls else reason(data)}
        return [first] + final_chunks(chunk, done, data, state)

    def final_chunks(chunk, choice, data, state):
        out = [{**chunk, "choices": [choice], "timings": data["timings"], "llamakv": data["llamakv"]}]
        opts = state["stream_options"]
        if isinstance(opts, dict) and opts.get("include_usage"):
            out.append({**chunk, "choices": [], "usage": usage(data)})
        return out

    def text_shape(event, data, state):
        base = {"id": "cmpl-" + state["id"], "object": "text_completion", "created": state["created"],
                "model": engine.model_name}
        if event == "done":
            return {**base, "choices": [{"index": 0, "text": joined(state),
                                         "logprobs": text_logprobs(probs_of(state["text"]), 0),
                                         "finish_reason": reason(data)}], "usage": usage(data),
                    "timings": data["timings"], "llamakv": data["llamakv"]}
        if event == "first":
            return None
        if event == "text":
            lp = text_logprobs(data.probs, state.setdefault("offset", 0))
            state["offset"] += len(data.text)
            return {**base, "choices": [{"index": 0, "text": data.text, "logprobs": lp, "finish_reason": None}]}
        return final_chunks(base, {"index": 0, "text": "", "logprobs": None, "finish_reason": reason(data)},
                            data, state)

    def native_shape(event, data, state):
        slot = state["start"]["id_slot"]
        if event == "first":
            return None
        if event == "text":
            out = {"content": data.text, "stop": False, "id_slot": slot}
            if data.probs:
                out["completion_probabilities"] = chat_logprobs(data.probs)["content"]
            return out
        stop_type = {"stop": "word" if data["stopping_word"] else "eos"}.get(data["finish_reason"], "limit")
        final = {"content": joined(state) if event == "done" else "", "stop": True, "id_slot": slot,
                 "model": engine.model_name, "tokens_predicted": data["n"],
                 "tokens_evaluated": data["prompt_tokens"], "tokens_cached": data["timings"]["cache_n"],
                 "stop_type": stop_type, "stopping_word": data["stopping_word"], "truncated": False,
                 "timings": data["timings"], "llamakv": data["llamakv"]}
        probs = probs_of(state["text"])
        if event == "done" and probs:
            final["completion_probabilities"] = chat_logprobs(probs)["content"]
        return final if event == "done" else [final]

    async def chat(request: Request):
        body = request.state.body = await body_of(request)
        check_model(body)
        try:
            plan = ToolPlan.from_request(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"),
                                         style_of(engine.context.chat_template))
        except ToolError as e:
            raise bad_request(str(e)) from None
        tokens, split = await chat_tokens(body, plan)
        job = generation_job(body, tokens, split, "chat")
        if plan is not None:
            if job.sampling.grammar:
                raise bad_request("tools cannot be combined with response_format, grammar or json_schema")
            job.sampling.grammar = plan.grammar(json_grammar)
            if job.sampling.grammar and not engine.context.grammar_ok(job.sampling.grammar):
                raise ApiError(500, "the tools' grammar did not parse", "server_error")
        return await finish(request, job, chat_shape, tools=plan)

    async def completions(request: Request):
        body = request.state.body = await body_of(request)
        check_model(body)
        if "prompt" not in body:
            raise bad_request("prompt is required")
        if body.get("echo") or body.get("suffix") or body.get("best_of", 1) != 1:
            raise bad_request("echo, suffix and best_of are not supported")
        tokens = await prompt_tokens(body["prompt"])
        return await finish(request, generation_job(body, tokens, None, "text"), text_shape)

    async def completion(request: Request):
        body = request.state.body = await body_of(request)
        if "prompt" not in body:
            raise bad_request("prompt is required")
        tokens = await prompt_tokens(body["prompt"])
        return await finish(request, generation_job(body, tokens, None, "native"), native_shape, done_marker=False)

    async def tokenize(request: Request):
        body = await body_of(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise bad_request("content must be a string")
        add_special = body.get("add_special", False)
        parse_special = body.get("parse_special", True)
        toks = await asyncio.to_thread(engine.tokenize, content, bool(add_special), bool(parse_special))
        if body.get("with_pieces"):
            return JSONResponse({"tokens": [{"id": t, "piece": engine.detokenize([t])} for t in toks]})
        return JSONResponse({"tokens": toks})

    async def detokenize(request: Request):
        body = await body_of(request)
        toks = body.get("tokens", [])
        n_vocab = llama_cpp.llama_vocab_n_tokens(engine.vocab)
        if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab
                                                 for t in toks):
            raise bad_request(f"tokens must be a list of token ids in [0, {n_vocab})")
        return JSONResponse({"content": engine.detokenize(toks)})

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "llamakv",
            "meta": {"n_ctx": engine.context.n_ctx, "n_ctx_slot": engine.n_ctx_slot,
                     "path": str(engine.model_path), "architecture": engine.context.architecture}}]})

    async def props(request: Request):
        d = engine.defaults
        return JSONResponse({
            "default_generation_settings": {
                "n_ctx": engine.n_ctx_slot, "model": engine.model_name,
                "params": {"n_predict": args.n_predict, "temperature": args.temp, "top_k": args.top_k,
                           "top_p": args.top_p, "min_p": args.min_p, "seed": args.seed}},
            "total_slots": len(engine.slots), "model_path": str(engine.model_path),
            "chat_template": engine.llama.metadata.get("tokenizer.chat_template", ""),
            "build_info": f"llamakv (llama-cpp-python {llama_cpp.__version__})",
            "modalities": {"vision": False, "audio": False},
            "llamakv": {"ratio": d.ratio, "method": d.method, "aggregation": d.aggregation,
                        "min_tokens": d.min_tokens, "budget": d.budget, "query_aware": d.query_aware,
                        "methods": sorted(PRESSES)}})

    async def metrics(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(engine.prometheus(), media_type=CONTENT_TYPE_LATEST)

    async def slots(request: Request):
        return JSONResponse(engine.slots_view())

    async def slot_action(request: Request):
        try:
            id_slot = int(request.path_params["id"])
        except ValueError:
            raise bad_request("the slot id must be an integer") from None
        if not 0 <= id_slot < len(engine.slots):
            raise ApiError(404, f"no slot {id_slot} (slots 0..{len(engine.slots) - 1})", "not_found_error")
        action = request.query_params.get("action")
        if action not in ("save", "restore", "erase"):
            raise bad_request("action must be save, restore or erase (POST /slots/ID?action=save)")
        filename = ""
        if action != "erase":
            if not args.slot_save_path:
                raise ApiError(501, "slot save / restore needs --slot-save-path", "not_supported_error")
            filename = (await body_of(request)).get("filename")
            if not isinstance(filename, str) or not FILENAME.match(filename):
                raise bad_request("filename must be a plain file name (letters, digits, '.', '_', '-'; no folders)")
        data = await run_job(new_job(action, id_slot=id_slot, filename=filename), request)
        return JSONResponse(data)

    async def on_api_error(request, exc: ApiError):
        return error(exc)

    async def on_error(request, exc: Exception):
        log.exception("unexpected error")
        return error(ApiError(500, f"{type(exc).__name__}: {exc}", "server_error"))

    async def on_gone(request, exc):
        return PlainTextResponse("", status_code=499)

    async def on_http(request, exc):
        return error(ApiError(exc.status_code, exc.detail or "error",
                              "not_found_error" if exc.status_code == 404 else "invalid_request_error"))

    middleware = [Middleware(RequireKey, key=api_key)] if api_key else []

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.stop()

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/completions", completion, methods=["POST"]),
        Route("/completion", completion, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/props", props, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/slots", slots, methods=["GET"]),
        Route("/slots/{id}", slot_action, methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={ApiError: on_api_error, ClientGone: on_gone,
                                         HTTPException: on_http, Exception: on_error})


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class RequireKey:
    """ASGI middleware: every path but /health needs 'Authorization: Bearer KEY' (as llama-server)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["path"] != "/health"
                and dict(scope["headers"]).get(b"authorization") != self.expected):
            e = ApiError(401, "invalid API key", "authentication_error")
            await JSONResponse(e.body(), status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)
