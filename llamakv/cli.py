"""`llamakv` command line: compress a long prompt's KV cache, then answer a question from it."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import resources

from .errors import LlamaKVError
from .generation import json_grammar
from .eval.run import add_eval_parser
from .flags import add_llama_flags, llama_kwargs
from .models import add_models_parser, models_command
from .rpc import add_rpc_parser
from .scoring import AGGREGATIONS, PRESSES, make_press

_SPLIT = "\x00llamakv-question\x00"


def _data(name: str) -> str:
    return resources.files("llamakv").joinpath("data", name).read_text(encoding="utf-8")


class Progress:
    """Prefill progress on stderr (tqdm): redrawn in place on a terminal, a line every 10 s
    otherwise; nothing for prompts under 256 tokens or when quiet."""

    def __init__(self, label: str, quiet: bool = False):
        self.label, self.quiet = label, quiet
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet or total < 256:
            return
        if self.bar is None:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(total=total, desc=self.label, unit="tok", file=sys.stderr,
                            mininterval=0.1 if tty else 10.0, dynamic_ncols=tty)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()
            self.bar = None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_pos", nargs="?", metavar="MODEL",
                   help="GGUF file or model name from models.toml (default: smollm2-135m-instruct)")
    p.add_argument("-m", "--model", help="same as MODEL")
    add_llama_flags(p)
    p.add_argument("-n", "--n-predict", type=int, default=128, help="most tokens of the answer (default 128)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy, the default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--top-k", type=int, default=40, help="top-k (default 40; with --temp > 0)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p (default 0: off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repeat penalty (default 1: off)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the repeat penalty looks back on (64)")
    p.add_argument("--grammar", metavar="GBNF", default="",
                   help="a GBNF grammar the answer must match (llama.cpp's grammar sampler)")
    p.add_argument("--json-schema", metavar="SCHEMA", default=None,
                   help="a JSON schema (text) the answer must be valid against")
    p.add_argument("--no-chat", action="store_true",
                   help="plain text instead of the model's chat template")
    p.add_argument("--budget", type=int, default=None,
                   help="cells the prompt and the answer stream through (default: the cache, -c); a prompt "
                        "longer than that is compressed while it is prefilled, and the answer is compressed "
                        "instead of stopping when the cache is full")
    p.add_argument("--target", type=int, default=None,
                   help="cells left after each compression of a bounded cache (default half the budget)")
    p.add_argument("--compress-every", type=int, default=None,
                   help="also compress the answer's cache every N generated tokens")
    p.add_argument("--json", action="store_true", help="print the report and answer as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's own logs")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llamakv",
        description="Expected Attention KV-cache compression for llama.cpp GGUF models: prefill a long "
                    "prompt, evict the KV cells future tokens will attend to least, keep generating.")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "compress", help="prefill a prompt, compress its KV cache, answer a question",
        description="Prefill a prompt (a bundled sample document by default), compress the KV cache to "
                    "(1 - ratio) of its cells with Expected Attention, then answer --question from the "
                    "compressed cache. Example: llamakv compress model.gguf --ratio 0.5 -f report.txt "
                    "--question 'Who signed it?'")
    _add_model_args(c)
    c.add_argument("-r", "--ratio", type=float, default=0.5,
                   help="fraction of the prompt's cells to evict, in [0, 1) (default 0.5)")
    src = c.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="the prompt text")
    src.add_argument("-f", "--file", help="read the prompt from a file")
    c.add_argument("-q", "--question", help="asked after compression (default with the sample "
                                            "document: its sample question)")
    c.add_argument("--question-aware", action="store_true",
                   help="compress with --question in view: it is decoded after the prompt for the scoring only "
                        "(and at each compression of a streamed prompt), the cells it attends to are kept next "
                        "to the method's choice, then it is asked as usual. Default: query-agnostic, the cache "
                        "serves any question (e.g. a saved state)")
    c.add_argument("--save", metavar="PATH", help="save the compressed state here (reload with `llamakv ask`)")
    c.add_argument("--method", default="ea_keydiff", type=_method,
                   help=f"scoring method: {', '.join(sorted(PRESSES))}, with settings of its own if wanted as "
                        f"NAME:KEY=VALUE[:KEY=VALUE...] (default ea_keydiff: Expected Attention and KeyDiff)")
    c.add_argument("--aggregation", default="mean", choices=AGGREGATIONS,
                   help="how per-head scores become one score per cell (default mean; ea_keydiff and the "
                        "question's guidance combine per cell, with mean)")
    c.add_argument("--n-future", type=int, default=512, help="future positions RoPE is averaged over")
    c.add_argument("--epsilon", type=float, default=0.0,
                   help="added to attention before the value norm (default 0, chosen by benchmarks/quality)")
    c.add_argument("--n-sink", type=int, default=4, help="first positions never evicted (default 4)")
    c.add_argument("--full-covariance", action="store_true", help="full query covariance (default diagonal)")
    c.add_argument("--stats-window", type=int, default=None, metavar="N",
                   help="query statistics from the last N tokens of the prompt only (default: all)")
    c.add_argument("--stats-sample", type=_non_negative, default=2048, metavar="N",
                   help="query statistics from about N tokens: whole ubatches spread over the prompt (default "
                        "2048; 0: every token). On a GPU each captured ubatch costs a synchronisation per layer")
    c.add_argument("--no-compact", action="store_true",
                   help="do not move kept cells together (n_kv, hence decode cost, stays as before)")

    a = sub.add_parser("ask", help="load a state saved by `compress --save` and answer a question",
                       description="Load a compressed state and answer a question from it.")
    a.add_argument("state", help="file written by `llamakv compress --save`")
    _add_model_args(a)
    a.add_argument("-q", "--question", required=True, help="the question")

    add_models_parser(sub)
    add_eval_parser(sub)
    from .server import add_serve_parser
    add_serve_parser(sub)
    add_rpc_parser(sub)
    return ap


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _method(spec: str) -> str:
    try:
        make_press(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def _open_session(args, *, n_sink: int = 4, full_covariance: bool = False):
    from .session import KVSession

    model = args.model or args.model_pos
    return KVSession.from_model(model, **llama_kwargs(args), seed=args.seed, verbose=args.verbose,
                                n_sink=n_sink, full_covariance=full_covariance,
                                stats_window=getattr(args, "stats_window", None),
                                stats_sample=getattr(args, "stats_sample", 2048) or None)


def _split_prompt(session, context: str | None, chat: bool) -> tuple[str | None, str]:
    """(text to prefill before compression, template for what follows: {question})"""
    if chat and session.llama.metadata.get("tokenizer.chat_template"):
        full = session.chat_prompt([{"role": "user", "content": (context or "") + "\n\n" + _SPLIT}])
        before, after = full.split(_SPLIT)
        return before, "{question}" + after
    return context, "\n\nQuestion: {question}\nAnswer:"


def _sampling(args) -> dict:
    """The answer's sampler settings from the command line (generation.Sampling's fields)."""
    grammar = args.grammar
    if args.json_schema:
        try:
            grammar = json_grammar(json.loads(args.json_schema))
        except (ValueError, TypeError) as e:
            raise LlamaKVError(f"--json-schema is not a JSON schema llama.cpp's converter accepts: {e}") from e
    return dict(top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                repeat_last_n=args.repeat_last_n, grammar=grammar)


def _answer(session, template: str, question: str, args) -> str:
    pieces = []
    stream = not args.json and sys.stdout.isatty()
    budget = args.budget or session.n_ctx  # never stop on a full cache: compress instead
    for piece in session.stream(template.format(question=question), max_tokens=args.n_predict,
                                temperature=args.temp, seed=args.seed, budget=budget, target=args.target,
                                compress_every=args.compress_every, **_sampling(args)):
        pieces.append(piece)
        if stream:
            print(piece, end="", flush=True)
    if stream:
        print()
    return "".join(pieces).strip()


def cmd_compress(args) -> int:
    if not 0.0 <= args.ratio < 1.0:
        raise LlamaKVError(f"--ratio must be in [0, 1), got {args.ratio}")
    question = args.question
    if args.prompt is not None:
        context = args.prompt
    elif args.file is not None:
        if not os.path.isfile(args.file):
            raise LlamaKVError(f"no such prompt file: {args.file}")
        with open(args.file, encoding="utf-8", errors="replace") as f:
            context = f.read()
    else:
        context = _data("sample_document.txt")
        question = question or _data("sample_question.txt").strip()
    if not context.strip():
        raise LlamaKVError("the prompt is empty")
    if args.question_aware and not question:
        raise LlamaKVError("--question-aware needs a --question")

    session = _open_session(args, n_sink=args.n_sink, full_covariance=args.full_covariance)
    method_kw = dict(n_future_positions=args.n_future, epsilon=args.epsilon, full_covariance=args.full_covariance)
    press = session.press = make_press(args.method, expected_attention=method_kw)  # also a streamed prompt's
    before, template = _split_prompt(session, context, not args.no_chat)
    tokens = session.tokenize(before)
    budget = args.budget
    if budget is None and len(tokens) > session.n_ctx - args.n_predict - 64:
        budget = session.n_ctx
        if not args.json:
            print(f"llamakv: the prompt ({len(tokens)} tokens) does not fit the cache with room for the answer: "
                  f"streaming it through {budget} cells (-c / --budget)", file=sys.stderr)
    guide = session.tokenize(template.format(question=question)) if args.question_aware else None
    t0 = time.perf_counter()
    session.prefill(tokens, progress=Progress("prefill", quiet=args.json), budget=budget, target=args.target,
                    question=guide)
    prefill_s = time.perf_counter() - t0
    streamed = len(session.reports)
    report = session.compress(args.ratio, press=press, aggregation=args.aggregation,
                              compact=not args.no_compact, question=guide)
    saved = None
    if args.save:
        saved = session.save(args.save, extra={"template": template})
    if not args.json:
        print(f"prompt        {len(tokens)} tokens, prefill {prefill_s:.1f} s "
              f"({len(tokens) / prefill_s:.0f} tok/s)"
              + (f", {streamed} compressions while prefilling through {budget} cells" if streamed else ""))
        print(report.format())
        if saved:
            print(f"saved         {args.save} ({saved / 2**20:.1f} MiB)")
    answer = None
    if question:
        if not args.json:
            print(f"question      {question}")
            if sys.stdout.isatty():
                print("answer        ", end="", flush=True)  # streamed after the label
        answer = _answer(session, template, question, args)
        if not args.json and not sys.stdout.isatty():
            print(f"answer        {answer}")
    if args.json:
        print(json.dumps({"prompt_tokens": len(tokens), "prefill_s": prefill_s,
                          "report": report.as_dict(), "question": question, "answer": answer,
                          "prefill_compressions": [r.as_dict() for r in session.reports[:streamed]],
                          "saved": args.save}, indent=1))
    return 0


def cmd_ask(args) -> int:
    session = _open_session(args)
    extra = session.load(args.state)
    loaded_cells = session.n_cells
    template = extra.get("template") or "\n\nQuestion: {question}\nAnswer:"
    answer = _answer(session, template, args.question, args)
    if args.json:
        print(json.dumps({"question": args.question, "answer": answer, "loaded_cells": loaded_cells}))
    elif not sys.stdout.isatty():
        print(answer)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compress":
            return cmd_compress(args)
        if args.command == "ask":
            return cmd_ask(args)
        if args.command in ("eval", "serve", "rpc-server"):
            return args.func(args)
        if args.command == "models":
            return models_command(args)
    except (LlamaKVError, ValueError) as e:
        print(f"llamakv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
