"""`llamakv eval`: answer quality under compression on RULER-style tasks, plus a KL proxy.

For each sample the context is prefilled once and snapshotted; every (method, ratio,
aggregation, mode) restores the snapshot, compresses, and answers greedily:
  agnostic (default): compress the context, then add the question and generate;
  aware: prefill context + question (all but its last token), compress keeping the question's
         cells (`protect_recent`), then feed the last token and generate, so that even the first
         answer token is computed from the compressed cache;
  guided: compress the context with the question decoded after it for the scoring only
          (`compress(question=...)`: the cells it attends to are kept next to the method's
          choice; then it is removed), then add the question and generate.
The full cache (ratio 0, method "full") is run once per sample. The KL proxy compares, token by
token, the next-token distributions of the full and the compressed cache over the full cache's
own answer (teacher-forced): first the distribution right after the question, then after each
of the next answer tokens (`--kl-tokens` in all).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from ..errors import LlamaKVError
from ..flags import add_llama_flags, llama_kwargs
from ..scoring import AGGREGATIONS, make_press
from .tasks import TASKS, Sample, expand_tasks, generate_samples, load_samples, score

SPLIT = "\x00llamakv-eval-question\x00"
MODES = ("agnostic", "aware", "guided")
CSV_FIELDS = ["model", "task", "sample", "method", "ratio", "aggregation", "mode", "score", "kl", "cells",
              "seconds", "n_tokens", "answer"]


# -- prompts -----------------------------------------------------------------------------------
def _tokens(session, text: str, first: bool) -> list[int]:
    """Tokens of text; a BOS only at the start of the sequence (and never twice)."""
    add_bos = first and bool(llama_cpp.llama_vocab_get_add_bos(session.vocab))
    toks = session.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
    if len(toks) >= 2 and toks[0] == toks[1] == session.llama.token_bos():
        toks = toks[1:]
    return toks


def split_prompt(session, sample_or_parts, chat: bool = True) -> tuple[str, str]:
    """(context part, question part) of a sample's prompt: the user's message is context +
    question under the model's chat template; the answer prefix follows the generation prompt."""
    if isinstance(sample_or_parts, Sample):
        context, question, prefix = (sample_or_parts.context, sample_or_parts.question,
                                     sample_or_parts.answer_prefix)
    else:
        context, question, prefix = sample_or_parts
    if chat and session.llama.metadata.get("tokenizer.chat_template"):
        full = session.chat_prompt([{"role": "user", "content": context + SPLIT + question}])
        before, after = full.split(SPLIT)
        return before, after + prefix
    return context, question + prefix


def encode(session, sample, chat: bool = True) -> tuple[list[int], list[int]]:
    before, after = split_prompt(session, sample, chat)
    return _tokens(session, before, True), _tokens(session, after, False)


def token_counter(session, chat: bool = True) -> Callable[[str, str, str], int]:
    def count(context: str, question: str, prefix: str) -> int:
        a, b = encode(session, (context, question, prefix), chat)
        return len(a) + len(b)
    return count


# -- one configuration ---------------------------------------------------------------------------
def _log_softmax(session) -> np.ndarray:
    n_vocab = llama_cpp.llama_vocab_n_tokens(session.vocab)
    ptr = llama_cpp.llama_get_logits_ith(session.ctx, -1)
    x = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def teacher_forced(session, prompt: Sequence[int], answer: Sequence[int]) -> np.ndarray:
    """Log-softmax after the prompt, then after each answer token: [len(answer) + 1, n_vocab]."""
    session.prefill(list(prompt))
    out = [_log_softmax(session)]
    for tok in answer:
        session.prefill([tok])
        out.append(_log_softmax(session))
    return np.stack(out).astype(np.float32)


def mean_kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over positions of KL(ref || got), from log-probabilities."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float((np.exp(ref) * (ref - got)).sum(axis=-1).mean())


def _answer(session, prompt: Sequence[int], max_tokens: int) -> str:
    """Greedy answer, as generated (not stripped: the KL proxy re-tokenizes it)."""
    return session.generate(list(prompt), max_tokens=max_tokens, temperature=0.0)


# -- the runner ---------------------------------------------------------------------------------
def run_eval(session, samples: Sequence[Sample], *, methods: Sequence[str] = ("ea_keydiff",),
             ratios: Sequence[float] = (0.0, 0.5), aggregations: Sequence[str] = ("mean",),
             modes: Sequence[str] = ("agnostic",), kl_tokens: int = 64, chat: bool = True,
             model: str = "?", press_kwargs: dict | None = None, max_new_tokens: int | None = None,
             log: Callable[[str], None] | None = None) -> list[dict]:
    """Score every sample with the full cache and every (method, ratio > 0, aggregation, mode);
    returns one row (CSV_FIELDS) per run. `max_new_tokens` overrides the tasks' own limits."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for a in aggregations:
        if a not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {a!r}; choose from {', '.join(AGGREGATIONS)}")
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"ratios must be in [0, 1), got {r}")
    methods = [m for m in methods if m != "full"]
    # press_kwargs are Expected Attention's settings (also inside ea_keydiff); unknown names fail here
    presses = {m: make_press(m, expected_attention=press_kwargs) for m in methods}
    # the prefill serves every method: the prompt's surprisal is computed if any of them reads it
    session.track_surprisal = any(getattr(p, "uses_surprisal", False) for p in presses.values())
    configs = [(m, r, a, mode) for m in methods for r in sorted(set(ratios)) if r > 0
               for a in aggregations for mode in modes]
    log = log or (lambda s: None)
    rows: list[dict] = []
    n_runs = len(samples) * (1 + len(configs))
    t_start = time.perf_counter()

    def emit(sample: Sample, i: int, method, ratio, agg, mode, answer, kl, cells, seconds) -> None:
        answer = answer.strip()
        s = score(sample.task, answer, sample.outputs)
        rows.append({"model": model, "task": sample.task, "sample": sample.index, "method": method,
                     "ratio": ratio, "aggregation": agg, "mode": mode, "score": s, "kl": kl, "cells": cells,
                     "seconds": round(seconds, 3), "n_tokens": sample.n_tokens, "answer": answer})
        done = len(rows)
        eta = (time.perf_counter() - t_start) / done * (n_runs - done)
        kl_s = "" if kl is None or (isinstance(kl, float) and math.isnan(kl)) else f", kl {kl:.4f}"
        log(f"[{i + 1}/{len(samples)} {sample.task}#{sample.index}] {method} ratio {ratio:g}"
            f"{f' {agg} {mode}' if method != 'full' else ''}: score {s:.0f}{kl_s}, {cells} cells, "
            f"{seconds:.1f} s | run {done}/{n_runs}, ETA {_fmt_s(eta)}")

    for i, sample in enumerate(samples):
        session.reset()
        ctx, q = encode(session, sample, chat)
        max_new = max_new_tokens or sample.max_new_tokens
        if len(ctx) + len(q) + max_new + max(kl_tokens, 1) > session.n_ctx:
            raise LlamaKVError(f"{sample.task}#{sample.index}: {len(ctx) + len(q)} prompt tokens + {max_new} to "
                               f"generate + {kl_tokens} KL tokens do not fit n_ctx {session.n_ctx}: raise -c")
        log(f"[{i + 1}/{len(samples)} {sample.task}#{sample.index}] prefilling {len(ctx)} tokens")
        t0 = time.perf_counter()
        session.prefill(ctx)
        log(f"[{i + 1}/{len(samples)} {sample.task}#{sample.index}] prefilled {len(ctx)} tokens "
            f"in {time.perf_counter() - t0:.1f} s (question and answer prefix: {len(q)} more)")
        snaps = {"agnostic": session.snapshot()}

        t0 = time.perf_counter()
        full_answer = _answer(session, q, max_new)
        full_s = time.perf_counter() - t0
        ref = answer_toks = None
        if kl_tokens > 0:
            answer_toks = _tokens(session, full_answer, False)[:kl_tokens - 1] if full_answer else []
            session.restore(snaps["agnostic"])
            ref = teacher_forced(session, q, answer_toks)
        emit(sample, i, "full", 0.0, "", "", full_answer, 0.0 if ref is not None else float("nan"),
             len(ctx) + len(q), full_s)

        if "aware" in modes and configs:
            log(f"[{i + 1}/{len(samples)} {sample.task}#{sample.index}] prefilling {len(ctx) + len(q) - 1} tokens "
                "(query-aware)")
            session.reset()
            session.prefill(ctx + q[:-1])
            snaps["aware"] = session.snapshot()

        for method, ratio, agg, mode in configs:
            session.restore(snaps["aware" if mode == "aware" else "agnostic"])
            t0 = time.perf_counter()
            kw = {"protect_recent": len(q) - 1} if mode == "aware" else {"question": q} if mode == "guided" else {}
            report = session.compress(ratio, press=presses[method], aggregation=agg, **kw)
            cells = session.n_cells
            compressed = session.snapshot() if ref is not None else None
            rest = q[-1:] if mode == "aware" else q
            answer = _answer(session, rest, max_new)
            seconds = time.perf_counter() - t0
            kl = float("nan")
            if ref is not None:
                session.restore(compressed)
                kl = mean_kl(ref, teacher_forced(session, rest, answer_toks))
            # the aggregation used: presses that combine per cell (ea_keydiff) use their own
            emit(sample, i, method, ratio, report.aggregation, mode, answer, kl, cells + len(rest), seconds)
    return rows


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def model_label(model) -> str:
    """How results name a model: a registry name as it is, a GGUF path by its file name."""
    if not model:
        return "smollm2-135m-instruct"
    return Path(model).stem if str(model).endswith(".gguf") else str(model)


# -- outputs --------------------------------------------------------------------------------
def write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_FIELDS})


def _config_key(r: dict) -> tuple:
    return (r["method"], float(r["ratio"]), r["aggregation"], r["mode"])


def summarize(rows: Sequence[dict]) -> tuple[list[str], list[tuple[tuple, dict]]]:
    """Tasks in order of appearance; per configuration (full first): mean score per task,
    'average' (mean of the task means), mean KL, mean cells, runs."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[_config_key(r)].append(r)
    out = []
    for key in sorted(groups, key=lambda k: (k[0] != "full", k[0], k[2], k[3], k[1])):
        g = groups[key]
        per_task = {t: float(np.mean([float(r["score"]) for r in g if r["task"] == t]))
                    for t in tasks if any(r["task"] == t for r in g)}
        kls = [float(r["kl"]) for r in g if r["kl"] not in ("", None) and not math.isnan(float(r["kl"]))]
        out.append((key, dict(per_task, average=float(np.mean(list(per_task.values()))),
                              kl=float(np.mean(kls)) if kls else float("nan"),
                              cells=float(np.mean([float(r["cells"]) for r in g])), runs=len(g))))
    return tasks, out


def markdown_table(rows: Sequence[dict], title: str = "") -> str:
    tasks, summary = summarize(rows)
    head = ["method", "ratio", "aggregation", "mode"] + tasks + ["average", "mean KL", "cells"]
    lines = ([f"### {title}", ""] if title else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, ratio, agg, mode), s in summary:
        cells = [method, f"{ratio:g}", agg or "-", mode or "-"]
        cells += [f"{s[t]:.1f}" if t in s else "" for t in tasks]
        cells += [f"**{s['average']:.1f}**", "" if math.isnan(s["kl"]) else f"{s['kl']:.4f}", f"{s['cells']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    n = len({(r["task"], r["sample"]) for r in rows})
    lines += ["", (f"Scores: RULER string match in percent (mean over {n} samples); average = mean of the task "
                  "columns; mean KL = KL(full || compressed) of next-token distributions over the full cache's "
                  "answer, nats per token; cells = KV cells in use when the answer starts.")]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, summary = summarize(rows)
    full = next((s for (m, *_), s in summary if m == "full"), None)
    lines: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for (method, ratio, agg, mode), s in summary:
        if method != "full":
            lines[(method, agg, mode)].append((ratio, s["average"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (method, agg, mode), pts in sorted(lines.items()):
        if full is not None:
            pts = [(0.0, full["average"])] + pts
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} ({agg}, {mode})")
    if full is not None:
        ax.axhline(full["average"], color="gray", lw=0.8, ls="--", label="full cache")
    ax.set_xlabel("compression ratio (fraction of cells evicted)")
    ax.set_ylabel("average score (%)")
    ax.set_ylim(-2, 102)
    finish_plot(fig, ax, title, path)


def finish_plot(fig, ax, title: str, path: Path) -> None:
    """The results plots' common ending: title, grid, legend, written as PNG and closed."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: Sequence[dict], out_dir: str | Path, name: str, title: str = "") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{name}.csv", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    write_csv(rows, paths["csv"])
    paths["md"].write_text(markdown_table(rows, title), encoding="utf-8")
    plot(rows, paths["png"], title)
    return paths


# -- command line ---------------------------------------------------------------------------
def _list(values: Sequence[str] | None, cast=str) -> list:
    out = []
    for v in values or ():
        out += [cast(x.strip()) for x in v.split(",") if x.strip()]
    return out


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """Register `llamakv eval` on the CLI's subparsers."""
    p = sub.add_parser(
        "eval", help="answer quality under compression on RULER-style tasks (and a KL proxy)",
        description="Generate RULER-style long-context tasks offline (or read them with --samples), prefill "
                    "each once, compress with every method x ratio x aggregation x mode, answer greedily, "
                    "score with RULER's string match, and write a CSV, a markdown table and a plot. "
                    "Example: llamakv eval --tasks niah_single_1,vt,qa_1 -n 2 --length 4096 --ratios 0,0.5")
    p.add_argument("model_pos", nargs="?", metavar="MODEL",
                   help="GGUF file or model name from models.toml (default: smollm2-135m-instruct)")
    p.add_argument("-m", "--model", help="same as MODEL")
    p.add_argument("--tasks", nargs="+", default=["niah_single_1,niah_multikey_1,vt,qa_1"],
                   help=f"comma-separated tasks or groups (all, niah, qa); default niah_single_1,niah_multikey_1,vt,qa_1; "
                        f"tasks: {', '.join(TASKS)}")
    p.add_argument("-n", "--n-samples", type=int, default=2, help="samples per task (default 2)")
    p.add_argument("--length", type=int, default=4096,
                   help="target tokens: prompt (chat template included) + tokens to generate (default 4096)")
    p.add_argument("--seed", type=int, default=42, help="seed of the task generator (default 42)")
    p.add_argument("--methods", nargs="+", default=["ea_keydiff"],
                   help="comma-separated presses (llamakv.scoring.PRESSES), each with settings of its own if wanted as "
                        "NAME:KEY=VALUE[:KEY=VALUE...] (e.g. ea_keydiff:weight=0.1); 'full' = the full cache, always run")
    p.add_argument("--ratios", nargs="+", default=["0,0.25,0.5,0.75"],
                   help="comma-separated fractions of cells to evict; 0 = the full cache (default 0,0.25,0.5,0.75)")
    p.add_argument("--aggregations", nargs="+", default=["mean"], help=f"comma-separated: {', '.join(AGGREGATIONS)} (default mean)")
    p.add_argument("--modes", nargs="+", default=["agnostic"],
                   help="agnostic (question after compression), aware (question in the cache, protected), guided "
                        "(question decoded for the scoring only, then after compression)")
    p.add_argument("--kl-tokens", type=int, default=64,
                   help="positions of the KL proxy per run (0: no KL; default 64)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on answer tokens (default: each task's own, as RULER: 128 NIAH, 30 VT, 120 CWE, "
                        "50 FWE, 32 QA)")
    p.add_argument("--out", default="benchmarks", help="directory for the results (default benchmarks/)")
    p.add_argument("--name", help="file name stem of the results (default eval-MODEL-LENGTH)")
    p.add_argument("--dump-samples", metavar="PATH", help="write the generated samples as JSONL")
    p.add_argument("--samples", metavar="PATH", help="read samples from JSONL instead of generating them")
    p.add_argument("--generate-only", action="store_true", help="only generate (and dump) the samples")
    add_llama_flags(p, ctx_default=None,
                    ctx_help="KV cache size in cells (default: the longest prompt + generation + KL tokens)")
    p.add_argument("--n-sink", type=int, default=4, help="first positions never evicted (default 4)")
    p.add_argument("--epsilon", type=float, default=None,
                   help="Expected Attention's epsilon (default: the press's, 0)")
    p.add_argument("--n-future", type=int, default=None,
                   help="Expected Attention's n_future_positions, RoPE's averaging horizon (default 512)")
    p.add_argument("--no-chat", action="store_true", help="plain text instead of the model's chat template")
    p.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's own logs")
    p.set_defaults(func=cmd_eval)
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_eval(args) -> int:
    from ..session import KVSession

    model = args.model or args.model_pos
    ratios = _list(args.ratios, float)
    methods, aggs, modes = _list(args.methods), _list(args.aggregations), _list(args.modes)
    if args.n_samples < 1:
        raise LlamaKVError("--n-samples must be at least 1")
    for m in methods:
        if m != "full":
            make_press(m)  # fail before loading anything
    samples = load_samples(args.samples) if args.samples else None
    tasks = expand_tasks(_list(args.tasks)) if samples is None else None
    if samples and all(s.n_tokens > 0 for s in samples):
        longest = max(s.n_tokens + s.max_new_tokens for s in samples)
    else:  # samples from elsewhere may not say how long they are
        longest = args.length
    n_ctx = args.ctx_size or (longest + max(args.kl_tokens, 1) + 64)
    session = KVSession.from_model(model, **{**llama_kwargs(args), "n_ctx": n_ctx}, verbose=args.verbose,
                                   n_sink=args.n_sink)
    chat = not args.no_chat
    if samples is None:
        t0 = time.perf_counter()
        samples = generate_samples(tasks, args.n_samples, args.length, token_counter(session, chat),
                                   seed=args.seed, progress=_log)
        _log(f"generated {len(samples)} samples in {time.perf_counter() - t0:.1f} s")
    if args.dump_samples:
        from .tasks import dump_samples
        dump_samples(samples, args.dump_samples)
        _log(f"samples written to {args.dump_samples}")
    if args.generate_only:
        return 0
    label = model_label(model)
    settings = (("epsilon", args.epsilon), ("n_future_positions", args.n_future))
    rows = run_eval(session, samples, methods=methods, ratios=ratios, aggregations=aggs, modes=modes,
                    kl_tokens=args.kl_tokens, chat=chat, model=label, max_new_tokens=args.max_new_tokens,
                    log=_log, press_kwargs={k: v for k, v in settings if v is not None})
    name = args.name or f"eval-{label}-{args.length}"
    title = f"{label}, {args.length} tokens, {len(samples)} samples"
    paths = write_results(rows, args.out, name, title)
    print(markdown_table(rows, title))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
