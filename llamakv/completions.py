"""llama-cpp-python's completion calls on a KVSession.

`create_completion` and `create_chat_completion` take `Llama`'s arguments, with its defaults, and
return its shapes (a dict, or with `stream=True` an iterator of chunk dicts), so code written for
a `Llama` runs on a session. Compression is what they add: `ratio` compresses the prompt's cells
before the answer is generated, `budget` (and `target`) streams the prompt and the answer through
a bounded cache. Each call starts from an empty cache.

Not taken (a clear error instead of a silent difference): `suffix`, `echo`, token `logprobs`,
`functions`/`tools` (use `llamakv serve`, whose chat endpoint renders tools), custom
`logits_processor` and `stopping_criteria`. `tfs_z` is accepted and, as in llama.cpp, which
dropped tail-free sampling, has no effect.
"""
from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Iterator, Sequence as Seq

from .generation import Bound, Generation, Sampling, generate, json_grammar

if TYPE_CHECKING:
    from .session import KVSession


def _unsupported(**given) -> None:
    for name, value in given.items():
        if value not in (None, False, [], ()):
            raise NotImplementedError(f"{name} is not supported on a KVSession (llamakv serve's endpoints "
                                      f"cover more of the OpenAI API)")


def _grammar_text(grammar, response_format: dict | None) -> str:
    """GBNF from a LlamaGrammar (or its text) or an OpenAI response_format."""
    if grammar is not None:
        return grammar if isinstance(grammar, str) else str(getattr(grammar, "_grammar", ""))
    if response_format and response_format.get("type") == "json_object":
        return json_grammar(response_format.get("schema"))
    if response_format and response_format.get("type") == "json_schema":
        return json_grammar((response_format.get("json_schema") or {}).get("schema"))
    return ""


def _sampling(*, max_tokens, temperature, top_p, min_p, typical_p, stop, frequency_penalty, presence_penalty,
              repeat_penalty, top_k, seed, mirostat_mode, mirostat_tau, mirostat_eta, logit_bias, grammar,
              n_ctx: int) -> Sampling:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return Sampling(max_tokens=n_ctx if max_tokens is None or max_tokens <= 0 else int(max_tokens),
                    temperature=temperature, top_p=top_p, min_p=min_p, typical_p=typical_p, top_k=top_k,
                    stop=stops, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                    repeat_penalty=repeat_penalty, seed=seed if seed is not None else int(time.time()),
                    mirostat=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
                    logit_bias=tuple((int(t), float(b)) for t, b in (logit_bias or {}).items()), grammar=grammar)


def _run(session: "KVSession", tokens: list[int], sampling: Sampling, ratio: float | None, budget: int | None,
         target: int | None) -> tuple[Generation, Iterator[str]]:
    """Prefill `tokens` into an empty cache (compressed or bounded as asked) and the generation
    with the iterator of its text pieces."""
    session.reset()
    bound = None
    if budget is not None:
        budget, target = session.compressor.bounds(session.seq, budget, target)
        bound = Bound(session.compressor, budget, target, None, 128)
    session.prefill(tokens, budget=budget, target=target)
    if ratio is not None:
        session.compress(ratio)
    session.seq.track_surprisal = session.track_surprisal
    gen = Generation(session.seq, sampling, bound=bound, prompt=tokens)

    def pieces() -> Iterator[str]:
        for _, piece in generate(session.context, [gen]):
            if piece.text:
                yield piece.text

    return gen, pieces()


def _usage(n_prompt: int, gen: Generation) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": gen.n, "total_tokens": n_prompt + gen.n}


def _reason(gen: Generation) -> str:
    return "stop" if gen.finish_reason == "stop" else "length"


def create_completion(session: "KVSession", prompt: str | list[int], suffix: str | None = None,
                      max_tokens: int | None = 16, temperature: float = 0.8, top_p: float = 0.95,
                      min_p: float = 0.05, typical_p: float = 1.0, logprobs: int | None = None, echo: bool = False,
                      stop: str | Seq[str] | None = None, frequency_penalty: float = 0.0,
                      presence_penalty: float = 0.0, repeat_penalty: float = 1.0, top_k: int = 40,
                      stream: bool = False, seed: int | None = None, tfs_z: float = 1.0, mirostat_mode: int = 0,
                      mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: str | None = None,
                      stopping_criteria=None, logits_processor=None, grammar=None,
                      logit_bias: dict[int, float] | None = None, *, ratio: float | None = None,
                      budget: int | None = None, target: int | None = None):
    """Llama.create_completion's arguments and result, on the session's cache (module docstring)."""
    _unsupported(suffix=suffix, echo=echo, logprobs=logprobs, stopping_criteria=stopping_criteria,
                 logits_processor=logits_processor)
    tokens = session.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
    sampling = _sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p,
                         typical_p=typical_p, stop=stop, frequency_penalty=frequency_penalty,
                         presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, top_k=top_k, seed=seed,
                         mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
                         logit_bias=logit_bias, grammar=_grammar_text(grammar, None), n_ctx=session.n_ctx)
    head = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
            "model": model or session.llama.model_path}
    gen, pieces = _run(session, tokens, sampling, ratio, budget, target)
    if stream:
        def chunks():
            for text in pieces:
                yield {**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}]}
            yield {**head, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": _reason(gen)}]}
        return chunks()
    text = "".join(pieces)
    return {**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": _reason(gen)}],
            "usage": _usage(len(tokens), gen)}


def create_chat_completion(session: "KVSession", messages: list[dict], functions=None, function_call=None,
                           tools=None, tool_choice=None, temperature: float = 0.2, top_p: float = 0.95,
                           top_k: int = 40, min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False,
                           stop: str | Seq[str] | None = None, seed: int | None = None,
                           response_format: dict | None = None, max_tokens: int | None = None,
                           presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                           repeat_penalty: float = 1.0, tfs_z: float = 1.0, mirostat_mode: int = 0,
                           mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: str | None = None,
                           logits_processor=None, grammar=None, logit_bias: dict[int, float] | None = None,
                           logprobs: bool | None = None, top_logprobs: int | None = None, *,
                           ratio: float | None = None, budget: int | None = None, target: int | None = None):
    """Llama.create_chat_completion's arguments and result, the messages rendered with the model's
    own chat template, on the session's cache (module docstring)."""
    _unsupported(functions=functions, function_call=function_call, tools=tools, tool_choice=tool_choice,
                 logits_processor=logits_processor, logprobs=logprobs, top_logprobs=top_logprobs)
    if response_format and response_format.get("type") not in ("text", "json_object", "json_schema"):
        raise ValueError(f"unknown response_format type {response_format.get('type')!r}")
    text_prompt = session.chat_prompt(messages)
    tokens = session.context.tokenize(text_prompt, add_bos=True, special=True)
    sampling = _sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p,
                         typical_p=typical_p, stop=stop, frequency_penalty=frequency_penalty,
                         presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, top_k=top_k, seed=seed,
                         mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
                         logit_bias=logit_bias, grammar=_grammar_text(grammar, response_format),
                         n_ctx=session.n_ctx)
    head = {"id": f"chatcmpl-{uuid.uuid4()}", "created": int(time.time()), "model": model or session.llama.model_path}
    gen, pieces = _run(session, tokens, sampling, ratio, budget, target)
    if stream:
        def chunks():
            def chunk(delta: dict, reason: str | None) -> dict:
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            yield chunk({"role": "assistant"}, None)
            for text in pieces:
                yield chunk({"content": text}, None)
            yield chunk({}, _reason(gen))
        return chunks()
    content = "".join(pieces)
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                         "finish_reason": _reason(gen)}],
            "usage": _usage(len(tokens), gen)}


__all__ = ["create_completion", "create_chat_completion"]
