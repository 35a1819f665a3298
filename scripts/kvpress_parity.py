#!/usr/bin/env python3
"""Parity of llamakv's Expected Attention with the reference implementation (NVIDIA kvpress).

Needs torch, transformers (< 5.3), gguf and kvpress 0.5.5 next to llamakv (see
benchmarks/kvpress_parity.md for the venv). Both sides run in this one process: llamakv through
llama.cpp on the GGUF, kvpress through transformers on the same GGUF dequantized to float32.

Scores (default): the same token ids go through both; per (layer, KV head) the Spearman rank
correlation of the two score vectors over the non-sink cells and the overlap of the cells each
keeps at 50%, for several settings, plus the intermediate quantities (query statistics, keys after
RoPE, value norms) and our formula evaluated on kvpress's inputs, to say where differences come
from:

    python scripts/kvpress_parity.py [--prompt-file F] [--max-tokens N] [--json out.json]

Samples: RULER-style samples (JSONL lines {"task", "index", "context", "question", "answer_prefix",
"outputs": [refs], ...}) through kvpress's pipeline (full cache, ExpectedAttentionPress and its
head-adaptive form AdaKVPress(ExpectedAttentionPress)) and through llamakv (full cache, compress),
on the same token ids (kvpress's chat-template split: the context is prefilled and compressed,
then question + answer prefix), greedy, scored with RULER's string_match_all / string_match_part:

    python scripts/kvpress_parity.py --samples s.jsonl --ratios 0.25 0.5 --csv out.csv
    python scripts/kvpress_parity.py --write-niah s.jsonl   # hand-made needle-in-a-haystack samples
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import sys
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws progress bars
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# llama.cpp's libraries before numpy and torch (README, GPU)
import llamakv  # noqa: F401  isort: skip
import numpy as np

from llamakv import KVSession
from llamakv.eval.tasks import load_samples, string_match_all, string_match_part
from llamakv.models import resolve_model
from llamakv.rope import ROPE_NORM
from llamakv.scoring import PRESSES, ExpectedAttention, ScoreInputs, aggregate, make_press

N_SINK = 4


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# -- rank statistics ---------------------------------------------------------------------------
def ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def keep_overlap(a: np.ndarray, b: np.ndarray, keep: float = 0.5) -> float:
    """Fraction of the cells a keeps (its top `keep`) that b keeps too."""
    k = round(keep * len(a))
    return len(np.intersect1d(np.argsort(-a)[:k], np.argsort(-b)[:k])) / k


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-row Spearman and 50% overlap of two score arrays [..., n]."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    rho = np.array([spearman(x, y) for x, y in zip(a2, b2)]).reshape(a.shape[:-1])
    ov = np.array([keep_overlap(x, y) for x, y in zip(a2, b2)]).reshape(a.shape[:-1])
    return {"spearman": rho, "overlap": ov}


def summary(c: dict) -> str:
    r, o = c["spearman"], c["overlap"]
    return (f"Spearman mean {r.mean():.4f} median {np.median(r):.4f} min {r.min():.4f}; "
            f"top-50% overlap mean {o.mean():.4f} min {o.min():.4f}")


# -- the kvpress side ---------------------------------------------------------------------------
def load_hf(path: Path, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    log(f"transformers loaded {path.name} (dequantized to float32) in {time.perf_counter() - t0:.1f} s")
    return tok, model


def llama_order(head_dim: int, rope_mode: int) -> np.ndarray:
    """Index map from transformers' head dimensions to llama.cpp's: llama[i] = hf[perm[i]]. For
    NORM-rope models (llama) GGUF conversion permutes Q/K rows so that llama.cpp's pairs (2j, 2j+1)
    match transformers' rotate-half pairs (j, j + d/2), and transformers undoes it on load; NEOX-rope
    models (qwen2) keep the order."""
    i = np.arange(head_dim)
    return (i % 2) * (head_dim // 2) + i // 2 if rope_mode == ROPE_NORM else i


@contextlib.contextmanager
def llama_cpp_numerics(model):
    """Make transformers compute like llama.cpp's CPU backend does on this GGUF, where it differs
    from float32: the inputs of the Q4_1 matrix products are quantized to Q8_1 (blocks of 32,
    scale amax/127 stored as fp16), and attention reads Q, K and V as fp16 (F16 KV cache; the
    query converted to fp16 for K·Q) and the softmax as fp16 (for V·softmax). Written for Q4_1
    layer weights (SmolLM2's file); other weight types pair with other activation types (Q4_K with
    Q8_K, blocks of 256), which this does not model."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def q8_1(module, args):
        x = args[0]
        b = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
        d = b.abs().amax(dim=-1, keepdim=True) / 127
        q = torch.round(b / torch.where(d > 0, d, torch.ones_like(d)))
        d16 = d.half().float()
        # Q4_1·Q8_1 adds each block's min m times the Q8_1 block sum s = fp16(d·Σq), not the sum of
        # the dequantized values: keep the difference for the forward hook
        module._q8_sum_err = (d * q.sum(-1, keepdim=True)).half().float().squeeze(-1) - d16.squeeze(-1) * q.sum(-1)
        return ((q * d16).reshape(x.shape),) + tuple(args[1:])

    def q8_1_sums(module, args, output):
        if getattr(module, "_q4_1_min", None) is None:  # the block minimum of a Q4_1 row is its m
            w = module.weight
            module._q4_1_min = w.reshape(w.shape[0], w.shape[1] // 32, 32).amin(dim=-1)
        return output + module._q8_sum_err @ module._q4_1_min.T

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        rep = query.shape[1] // key.shape[1]
        k = key.half().float().repeat_interleave(rep, dim=1)
        v = value.half().float().repeat_interleave(rep, dim=1)
        s = (query.half().float() @ k.transpose(-1, -2)) * scaling
        nq, nk = s.shape[-2:]
        causal = torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq)
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1).half().float()
        return (p @ v).transpose(1, 2).contiguous(), None

    layers = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_pre_hook(q8_1) for m in layers] + [m.register_forward_hook(q8_1_sums) for m in layers]
    name = model.config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS[name]
    ALL_ATTENTION_FUNCTIONS[name] = attention
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS[name] = original
        for h in hooks:
            h.remove()
        for m in layers:
            m._q8_sum_err = m._q4_1_min = None


def kvpress_scores(model, token_ids: list[int], epsilons: tuple[float, ...], rope_mode: int,
                   emulate: bool = False) -> dict:
    """ExpectedAttentionPress.score per layer on one prefill of token_ids, from kvpress's own
    forward hook (compression ratio irrelevant: the recorder returns the cache unchanged), and
    the inputs it saw: pre-RoPE query statistics, keys after RoPE and value norms, in llama.cpp's
    dimension order."""
    import torch
    from kvpress import BasePress, ExpectedAttentionPress
    from kvpress.utils import get_prerope_query_states
    from transformers import DynamicCache

    presses = {eps: ExpectedAttentionPress(compression_ratio=0.5, epsilon=eps, n_sink=N_SINK) for eps in epsilons}
    cfg = model.config
    n_layer, d = cfg.num_hidden_layers, cfg.head_dim
    perm = llama_order(d, rope_mode)
    out = {f"scores_eps{eps:g}": [None] * n_layer for eps in epsilons}
    out.update(keys=[None] * n_layer, vnorm=[None] * n_layer, q_mean=[None] * n_layer,
               q_var=[None] * n_layer, q_cov=[None] * n_layer, q_count=[None] * n_layer)

    class Recorder(BasePress):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            li = module.layer_idx
            for eps, press in presses.items():
                s = press.score(module, hidden_states, keys, values, attentions, kwargs)
                out[f"scores_eps{eps:g}"][li] = s[0, :, N_SINK:].double().numpy()
            q = get_prerope_query_states(module, hidden_states[:, N_SINK:])[0].double()  # [h, n-4, d]
            q = q[..., perm]
            mu = q.mean(dim=1)
            c = q - mu[:, None]
            out["q_mean"][li] = mu.numpy()
            out["q_var"][li] = (c * c).mean(dim=1).numpy()
            out["q_cov"][li] = (torch.einsum("hni,hnj->hij", c, c) / q.shape[1]).numpy()
            out["q_count"][li] = q.shape[1]
            out["keys"][li] = keys[0][..., perm].permute(1, 0, 2).float().numpy()  # [n, hk, d]
            out["vnorm"][li] = values[0].norm(dim=-1).T.double().numpy()  # [n, hk]
            return keys, values

    t0 = time.perf_counter()
    numerics = llama_cpp_numerics(model) if emulate else contextlib.nullcontext()
    with torch.inference_mode(), numerics, Recorder()(model):
        model.model(input_ids=torch.tensor([token_ids]), past_key_values=DynamicCache())
    log(f"kvpress{' (llama.cpp numerics emulated)' if emulate else ''}: prefill + scoring of {len(token_ids)} "
        f"tokens in {time.perf_counter() - t0:.1f} s")
    res = {k: np.stack(v) for k, v in out.items() if k != "q_count"}
    res["q_count"] = np.array(out["q_count"])
    res["keys"] = res["keys"].transpose(1, 0, 2, 3)  # [n, layer, hk, d] like ScoreInputs
    res["vnorm"] = res["vnorm"].transpose(1, 0, 2)  # [n, layer, hk]
    return res


class ArrayStats:
    """Query statistics given as arrays, with the interface of llamakv.stats.QueryStats."""

    def __init__(self, mean, var, cov):
        self.mean, self._var, self._cov = mean, var, cov

    def variance(self):
        return self._var

    def covariance(self):
        return self._cov


# -- the parity run ------------------------------------------------------------------------------
def run_parity(args) -> dict:
    path = resolve_model(args.model)
    text = Path(args.prompt_file).read_text() if args.prompt_file else \
        resources.files("llamakv").joinpath("data/sample_document.txt").read_text()

    s = KVSession.from_model(path, n_ctx=args.n_ctx, n_threads=args.threads, full_covariance=True, n_sink=N_SINK)
    tokens = s.tokenize(text)[: args.max_tokens]
    n = len(tokens)
    t0 = time.perf_counter()
    s.prefill(tokens)
    log(f"llamakv: prefill of {n} tokens in {time.perf_counter() - t0:.1f} s")
    ours = s.score_inputs()
    order = np.argsort(ours.pos)
    if not np.array_equal(ours.pos[order], np.arange(n)):
        raise SystemExit(f"expected one captured cell per position 0..{n - 1}, got {len(ours.pos)} cells")
    if not np.array_equal(order, np.arange(n)):
        ours = ScoreInputs.from_arrays(ours.keys[order], ours.vnorm[order], ours.pos[order], stats=ours.stats,
                                       rope=ours.rope, next_pos=ours.next_pos, n_head=ours.n_head, n_sink=ours.n_sink)
    L, hk, d, h = ours.n_layer, ours.n_head_kv, ours.head_dim, ours.n_head

    tok, model = load_hf(path, args.threads)
    hf_ids = tok.encode(text, add_special_tokens=False)
    cfg = model.config
    rope0 = ours.rope(0)
    hf_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    facts = {
        "model": str(path), "n_tokens": n, "n_layer": L, "n_head": h, "n_head_kv": hk, "head_dim": d,
        "same_tokenization": tokens in (hf_ids[:n], [tok.bos_token_id] + hf_ids[:n - 1]),
        "rope_llama_cpp": {"mode": rope0.mode, "freq_base": rope0.freq_base, "freq_scale": rope0.freq_scale,
                           "ext_factor": rope0.ext_factor, "freq_factors": rope0.freq_factors is not None},
        "rope_transformers": {"rope_theta": hf_theta},
        "query_count_llama_cpp": ours.stats.count.tolist()[:1],
    }
    theirs = kvpress_scores(model, tokens, (0.0, 0.01), rope0.mode)
    facts["query_count_kvpress"] = theirs["q_count"].tolist()[:1]
    emu = kvpress_scores(model, tokens, (0.0,), rope0.mode, emulate=True) if args.emulate else None

    def as_inputs(t: dict) -> ScoreInputs:
        return ScoreInputs.from_arrays(t["keys"], t["vnorm"], np.arange(n), rope=ours.rope,
                                       stats=ArrayStats(t["q_mean"], t["q_var"], t["q_cov"]), next_pos=n, n_head=h,
                                       n_sink=N_SINK)

    hf_inputs = as_inputs(theirs)
    ours_keys = ours.keys  # read once from the cache state

    def mix(keys=None, vnorm=None, stats=None) -> ScoreInputs:
        """kvpress's inputs with some pieces replaced by llamakv's."""
        return ScoreInputs.from_arrays(ours_keys if keys else hf_inputs.keys,
                                       ours.vnorm if vnorm else hf_inputs.vnorm,
                                       hf_inputs.pos, stats=ours.stats if stats else hf_inputs.stats, rope=ours.rope,
                                       next_pos=n, n_head=h, n_sink=N_SINK)

    def ea(inputs, **kw):
        return ExpectedAttention(**kw).score(inputs)[:, :, N_SINK:].astype(np.float64)

    kv0, kv1 = theirs["scores_eps0"], theirs["scores_eps0.01"]
    t0 = time.perf_counter()
    ours_default = ea(ours, epsilon=0.01)  # diagonal covariance, epsilon 0.01: llamakv's defaults when measured
    ours_diag0 = ea(ours, epsilon=0.0)
    ours_full0 = ea(ours, epsilon=0.0, full_covariance=True)
    ours_full1 = ea(ours, epsilon=0.01, full_covariance=True)
    log(f"llamakv scoring (4 settings) in {time.perf_counter() - t0:.1f} s")
    comps = {
        "shipped: llamakv defaults (diag cov, eps 0.01) vs kvpress defaults (full cov, eps 0)":
            compare(ours_default, kv0),
        "eps matched (0), llamakv diag cov vs kvpress full cov": compare(ours_diag0, kv0),
        "eps 0.01 both, llamakv diag cov vs kvpress full cov": compare(ours_default, kv1),
        "matched: full cov, eps 0 both": compare(ours_full0, kv0),
        "matched: full cov, eps 0.01 both": compare(ours_full1, kv1),
        "implementation: llamakv's formula on kvpress's inputs (full cov, eps 0) vs kvpress":
            compare(ea(hf_inputs, epsilon=0.0, full_covariance=True), kv0),
        "inputs: kvpress's inputs but llamakv's keys": compare(ea(mix(keys=1), epsilon=0.0, full_covariance=True), kv0),
        "inputs: kvpress's inputs but llamakv's value norms":
            compare(ea(mix(vnorm=1), epsilon=0.0, full_covariance=True), kv0),
        "inputs: kvpress's inputs but llamakv's query statistics":
            compare(ea(mix(stats=1), epsilon=0.0, full_covariance=True), kv0),
        "within llamakv: diag vs full cov (eps 0)": compare(ours_diag0, ours_full0),
        "within llamakv: eps 0.01 vs 0 (diag cov)": compare(ours_default, ours_diag0),
    }
    # the expected logits before the softmax, per query head (no value norms, no GQA mean)
    ea_full = ExpectedAttention(full_covariance=True)
    lo = np.stack([ea_full.layer_logits(ours, li)[:, N_SINK:] for li in range(L)])
    lh = np.stack([ea_full.layer_logits(hf_inputs, li)[:, N_SINK:] for li in range(L)])
    comps["logits per query head (full cov): llamakv inputs vs kvpress inputs"] = compare(lo, lh)
    if emu is not None:
        le = np.stack([ea_full.layer_logits(as_inputs(emu), li)[:, N_SINK:] for li in range(L)])
        comps["emulated: matched (full cov, eps 0) vs kvpress with llama.cpp numerics"] = \
            compare(ours_full0, emu["scores_eps0"])
        comps["emulated: llamakv's formula on kvpress's inputs with llama.cpp numerics vs kvpress fp32"] = \
            compare(ea(as_inputs(emu), epsilon=0.0, full_covariance=True), kv0)
        comps["emulated: logits per query head, llamakv inputs vs kvpress inputs with llama.cpp numerics"] = \
            compare(lo, le)
    # how much of each score ranking is the value-norm ranking
    vn_o = ours.vnorm[N_SINK:].transpose(1, 2, 0).astype(np.float64)
    vn_h = theirs["vnorm"][N_SINK:].transpose(1, 2, 0)
    comps["value norm alone vs llamakv defaults"] = compare(vn_o, ours_default)
    comps["value norm alone vs kvpress eps 0"] = compare(vn_h, kv0)
    comps["value norm alone vs kvpress eps 0.01"] = compare(vn_h, kv1)

    # one decision per cell (llamakv's aggregation) from either side's per-head scores
    def cells(x):
        full = np.full((L, hk, n), np.inf)
        full[:, :, N_SINK:] = x
        return aggregate(full, "mean")[N_SINK:]

    cell_cmp = {
        "cells (mean aggregation): shipped": compare(cells(ours_default)[None], cells(kv0)[None]),
        "cells (mean aggregation): matched full cov eps 0": compare(cells(ours_full0)[None], cells(kv0)[None]),
        "cells (mean aggregation): eps 0.01 both, llamakv diag": compare(cells(ours_default)[None], cells(kv1)[None]),
    }

    # intermediate quantities, per layer: relative L2 errors [L, heads] of llamakv's against t's
    ko = ours.keys.astype(np.float64)

    def rel_errors(t: dict) -> dict:
        kh = t["keys"].astype(np.float64)
        rel = lambda a, b, ax: np.linalg.norm(a - b, axis=ax) / np.linalg.norm(b, axis=ax)
        return {"key": rel(ko, kh, (0, 3)), "key_cos": (ko * kh).sum(-1) / (np.linalg.norm(ko, axis=-1)
                                                                          * np.linalg.norm(kh, axis=-1) + 1e-30),
                "vnorm": rel(ours.vnorm, t["vnorm"], 0), "mean": rel(ours.stats.mean, t["q_mean"], -1),
                "var": rel(ours.stats.variance(), t["q_var"], -1),
                "cov": rel(ours.stats.covariance(), t["q_cov"], (-2, -1))}

    err = rel_errors(theirs)
    err_emu = rel_errors(emu) if emu is not None else None
    key_cos, key_rel, vn_rel, mu_rel, var_rel, cov_rel = (err[k] for k in ("key_cos", "key", "vnorm", "mean",
                                                                            "var", "cov"))
    per_layer = []
    shipped = comps["shipped: llamakv defaults (diag cov, eps 0.01) vs kvpress defaults (full cov, eps 0)"]
    matched = comps["matched: full cov, eps 0 both"]
    impl = comps["implementation: llamakv's formula on kvpress's inputs (full cov, eps 0) vs kvpress"]
    for li in range(L):
        per_layer.append({
            "layer": li,
            "shipped_rho_mean": float(shipped["spearman"][li].mean()),
            "shipped_overlap_mean": float(shipped["overlap"][li].mean()),
            "matched_rho_mean": float(matched["spearman"][li].mean()),
            "matched_rho_min": float(matched["spearman"][li].min()),
            "matched_overlap_mean": float(matched["overlap"][li].mean()),
            "impl_rho_min": float(impl["spearman"][li].min()),
            "logit_rho_min": float(comps["logits per query head (full cov): llamakv inputs vs kvpress inputs"]
                                   ["spearman"][li].min()),
            "key_cos_median": float(np.median(key_cos[:, li])), "key_cos_min": float(key_cos[:, li].min()),
            "key_rel_err": float(key_rel[li].mean()), "vnorm_rel_err": float(vn_rel[li].mean()),
            "q_mean_rel_err": float(mu_rel[li].mean()), "q_var_rel_err": float(var_rel[li].mean()),
            "q_cov_rel_err": float(cov_rel[li].mean()),
        })
        if emu is not None:
            per_layer[-1].update({
                "emu_rho_min": float(comps["emulated: matched (full cov, eps 0) vs kvpress with llama.cpp numerics"]
                                     ["spearman"][li].min()),
                "emu_key_rel_err": float(err_emu["key"][li].mean()),
                "emu_vnorm_rel_err": float(err_emu["vnorm"][li].mean()),
                "emu_q_cov_rel_err": float(err_emu["cov"][li].mean()),
            })
    return {"facts": facts, "comparisons": comps, "cells": cell_cmp, "per_layer": per_layer}


def print_parity(res: dict) -> None:
    f = res["facts"]
    print(f"model {Path(f['model']).name}: {f['n_layer']} layers, {f['n_head']} query / {f['n_head_kv']} KV heads, "
          f"head_dim {f['head_dim']}; {f['n_tokens']} tokens")
    print(f"same ids from transformers' tokenizer: {f['same_tokenization']}; rope llama.cpp {f['rope_llama_cpp']}, "
          f"transformers {f['rope_transformers']}")
    print(f"queries in the statistics (layer 0): llamakv {f['query_count_llama_cpp']}, kvpress "
          f"{f['query_count_kvpress']}")
    print("\nPer (layer, KV head) unless said otherwise; cells = the non-sink prompt cells.\n")
    print("| comparison | Spearman mean | median | min | top-50% overlap mean | min |")
    print("|---|---|---|---|---|---|")
    for name, c in {**res["comparisons"], **res["cells"]}.items():
        r, o = c["spearman"], c["overlap"]
        print(f"| {name} | {r.mean():.4f} | {np.median(r):.4f} | {r.min():.4f} | {o.mean():.4f} | {o.min():.4f} |")
    print("\nPer layer (rho = Spearman, mean / min over the 3 KV heads; rel = relative L2 error llamakv vs "
          "kvpress, mean over heads):\n")
    cols = ["layer", "shipped_rho_mean", "shipped_overlap_mean", "matched_rho_mean", "matched_rho_min",
            "matched_overlap_mean", "impl_rho_min", "logit_rho_min", "key_cos_median", "key_cos_min",
            "key_rel_err", "vnorm_rel_err", "q_mean_rel_err", "q_var_rel_err", "q_cov_rel_err"]
    cols += [c for c in ("emu_rho_min", "emu_key_rel_err", "emu_vnorm_rel_err", "emu_q_cov_rel_err")
             if c in res["per_layer"][0]]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in res["per_layer"]:
        print("| " + " | ".join(str(row[c]) if c == "layer" else f"{row[c]:.4f}" for c in cols) + " |")


def to_json(res: dict) -> dict:
    def conv(x):
        if isinstance(x, np.ndarray):
            return x.tolist()
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        return x
    return conv(res)


# -- benchmark samples ----------------------------------------------------------------------------
def task_metric(task: str) -> str:
    return "part" if "qa" in task else "all"  # RULER scores its QA tasks with string_match_part


def run_samples(args) -> None:
    import torch
    from kvpress import AdaKVPress, ExpectedAttentionPress
    from transformers import pipeline

    samples = load_samples(args.samples)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = {"kvpress:full", "kvpress:expected_attention", "kvpress:adakv_expected_attention",
             "llamakv:full", "llamakv:expected_attention_max"}
    known |= {f"llamakv:{p}{q}" for p in PRESSES for q in ("", "+question")}
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        raise SystemExit(f"unknown method(s) {bad}; choose from {sorted(known)}")
    path = resolve_model(args.model)
    tok, model = load_hf(path, args.threads)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    ratios = [r for r in args.ratios if r > 0]

    prepared = []
    for smp in samples:
        ids = pipe.preprocess(smp.context, [smp.question], smp.answer_prefix, max_context_length=10**9)
        prepared.append((ids["context_ids"][0].tolist(), ids["questions_ids"][0][0].tolist()))
    session = None
    if any(m.startswith("llamakv") for m in methods):
        need = max(len(c) + len(q) for c, q in prepared) + args.max_new_tokens + 16
        session = KVSession.from_model(path, n_ctx=int(math.ceil(need / 256) * 256), n_threads=args.threads)

    rows = []
    fields = ["engine", "method", "ratio", "epsilon", "task", "index", "context_tokens", "kv_kept", "metric",
              "string_match_all", "string_match_part", "score", "prefill_s", "seconds", "answer"]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(args.csv, "w", newline="")) if args.csv else sys.stdout
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()

        def record(engine, method, ratio, eps, smp, ctx, kept, answer, prefill_s, secs):
            refs = smp.outputs
            sm_all, sm_part = string_match_all(answer, refs) / 100, string_match_part(answer, refs) / 100
            metric = task_metric(smp.task)
            row = {"engine": engine, "method": method, "ratio": ratio, "epsilon": eps, "task": smp.task,
                   "index": smp.index, "context_tokens": len(ctx), "kv_kept": kept, "metric": metric,
                   "string_match_all": sm_all, "string_match_part": sm_part,
                   "score": 100 * (sm_part if metric == "part" else sm_all), "prefill_s": prefill_s,
                   "seconds": round(secs, 2), "answer": answer.strip()}
            writer.writerow(row)
            out.flush()
            rows.append(row)
            log(f"  {engine:8s} {method:28s} r={ratio:<5g} {row['score']:5.0f}  {answer.strip()[:60]!r}")

        for i, (smp, (ctx, q)) in enumerate(zip(samples, prepared), 1):
            log(f"[{i}/{len(samples)}] {smp.task} #{smp.index}: {len(ctx)} context tokens, "
                f"refs {smp.outputs}")
            for method in methods:
                engine, name = method.split(":")
                if engine != "kvpress":
                    continue
                for ratio in ([0.0] if name == "full" else ratios):
                    press = None
                    if name == "expected_attention":
                        press = ExpectedAttentionPress(compression_ratio=ratio, epsilon=args.epsilon)
                    elif name == "adakv_expected_attention":
                        press = AdaKVPress(ExpectedAttentionPress(compression_ratio=ratio, epsilon=args.epsilon))
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        ans = pipe(smp.context, question=smp.question, answer_prefix=smp.answer_prefix,
                                   press=press, max_new_tokens=args.max_new_tokens)["answer"]
                    kept = len(ctx) if press is None else len(ctx) - int(len(ctx) * ratio)  # per KV head
                    record(engine, name, ratio, None if press is None else args.epsilon, smp, ctx, kept, ans,
                           None, time.perf_counter() - t0)
            if session is None:
                continue
            t0 = time.perf_counter()
            session.reset()
            session.prefill(ctx)
            snap = session.snapshot()
            prefill_s = round(time.perf_counter() - t0, 2)
            for method in methods:
                engine, name = method.split(":")
                if engine != "llamakv":
                    continue
                press_name = name.removesuffix("+question").removesuffix("_max")
                for ratio in ([0.0] if name == "full" else ratios):
                    t0 = time.perf_counter()
                    session.restore(snap)
                    if ratio > 0:  # each press with its defaults; "+question": guided by the question
                        session.compress(ratio, press=make_press(press_name),
                                         aggregation="max" if name.endswith("_max") else "mean",
                                         question=q if name.endswith("+question") else None)
                    kept = session.n_cells
                    ans = session.generate(q, max_tokens=args.max_new_tokens, temperature=0.0)
                    eps = session.press.epsilon if press_name == "expected_attention" and ratio > 0 else None
                    record(engine, name, ratio, eps, smp, ctx, kept, ans, prefill_s, time.perf_counter() - t0)
    groups = {}
    for r in rows:
        groups.setdefault((r["engine"], r["method"], r["ratio"]), []).append(r["score"])
    log("\nmean score per engine / method / ratio:")
    for (engine, method, ratio), v in groups.items():
        log(f"  {engine:8s} {method:26s} {ratio:<5g} {np.mean(v):6.1f}  (n={len(v)})")


# -- hand-made samples ------------------------------------------------------------------------------
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def write_niah(path: Path, n_words: int = 1500, seed: int = 0) -> None:
    """A few needle-in-a-haystack samples in the sample format: a magic number hidden at several
    depths of a repetitive noise haystack, and one in the bundled prose document."""
    rng = random.Random(seed)
    doc = resources.files("llamakv").joinpath("data/sample_document.txt").read_text()
    noise = (NOISE * (n_words // len(NOISE.split()) + 1)).split(". ")
    lines = []
    for idx, (hay, depth) in enumerate([("noise", 0.25), ("noise", 0.75), ("document", 0.5)]):
        key = rng.choice(["quiet-harbor", "amber-falcon", "silent-meadow", "copper-lantern"]) + f"-{idx}"
        value = str(rng.randint(1_000_000, 9_999_999))
        needle = f"One of the special magic numbers for {key} is: {value}."
        parts = noise if hay == "noise" else doc.split(". ")
        at = int(depth * len(parts))
        context = ". ".join(parts[:at] + [needle.rstrip(".")] + parts[at:])
        lines.append(json.dumps({
            "task": f"niah_single_{hay}", "index": idx, "context": context,
            "question": f"What is the special magic number for {key} mentioned in the provided text?",
            "answer_prefix": f" The special magic number for {key} mentioned in the provided text is",
            "outputs": [value], "n_tokens": None, "depth": depth}))
    path.write_text("\n".join(lines) + "\n")
    log(f"wrote {len(lines)} samples to {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF path or registry name (default: SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-file", help="parity prompt (default: the bundled sample document)")
    ap.add_argument("--max-tokens", type=int, default=4000, help="truncate the parity prompt to this many tokens")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--json", help="write the parity results (per layer and head) here")
    ap.add_argument("--no-emulate", dest="emulate", action="store_false",
                    help="skip the second kvpress run with llama.cpp's numerics emulated in transformers")
    ap.add_argument("--samples", help="JSONL benchmark samples: run the pipelines on them instead")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    ap.add_argument("--epsilon", type=float, default=0.01, help="epsilon of kvpress's Expected Attention presses")
    ap.add_argument("--methods", default="kvpress:full,kvpress:expected_attention,kvpress:adakv_expected_attention,"
                    "llamakv:full,llamakv:expected_attention")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--csv", help="per-sample results (default: stdout)")
    ap.add_argument("--write-niah", help="write hand-made needle-in-a-haystack samples to this JSONL and exit")
    args = ap.parse_args(argv)

    if args.write_niah:
        write_niah(Path(args.write_niah))
        return 0
    if any(not 0 <= r < 1 for r in args.ratios):
        ap.error("ratios must be in [0, 1)")
    if args.samples:
        run_samples(args)
        return 0
    res = run_parity(args)
    print_parity(res)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
