"""Scoring methods ("presses") and the aggregation of per-head scores into one score per cell.

A press looks at the cache (keys after RoPE and values, read from the sequence state, or for
Expected Attention on a GPU from the cache tensors where they lie: device.py), the query
statistics, the window of recent queries and the model's rope, and returns scores per (layer,
KV head, cell): higher means keep. llama.cpp frees whole cells (every layer and head of a token
at once), so `aggregate` turns those scores into one score per cell through an explicit policy.
Presses that combine other presses per cell (ea_keydiff, the default; a question's guidance)
return one score per cell themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from . import _shim
from .cache import LayerTensor, SeqState
from .errors import LlamaKVError
from .rope import RopeParams
from .stats import QueryStats

if TYPE_CHECKING:
    from .device import DeviceCells


@dataclass
class ScoreInputs:
    state: SeqState | None   # the sequence's cells as llama.cpp holds them (None: scored where they lie, `device`)
    stats: QueryStats        # pre-RoPE query statistics
    rope: Callable[[int], RopeParams]
    next_pos: int            # position the next token will take
    n_head: int
    n_head_kv: int
    head_dim: int
    n_sink: int
    window_q: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0, 0), np.float32))  # [n_layer, W, n_head, d]
    window_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [W]
    window_slots: np.ndarray | None = None  # window_q's entries in window_pos's order (None: as they are)
    n_future: int = 0        # future positions whose queries will read the cells, if the caller knows (0: the press's default)
    keep_fraction: float = 1.0  # share of the scored cells the caller will keep, if it knows (1: unknown)
    surprisal: np.ndarray | None = None     # [n_cells] −log p of each cell's token given the prompt before it (NaN: unknown)
    sentence_end: np.ndarray | None = None  # [n_cells] bool: the cell's token ends a sentence
    # the attention logit of each scored layer, as llama.cpp computes it (capture.LayerAttention):
    # softcap tanh(scale q.k / softcap) of a rotated query q; None: scale 1/sqrt(head_dim), no cap
    logit_scale: np.ndarray | None = None   # [n_layer]
    softcap: np.ndarray | None = None       # [n_layer], 0 where there is none
    sink_logits: np.ndarray | None = None   # [n_layer, n_head] learned sink logits, NaN rows where none
    device: "DeviceCells | None" = None     # the cells in the cache tensors of a device, instead of `state`
    n_device_layers: int = 0                # the layers scored there

    def scale(self, layer: int) -> float:
        """The factor of q.k in the layer's attention logit."""
        return 1.0 / math.sqrt(self.head_dim) if self.logit_scale is None else float(self.logit_scale[layer])

    def cap(self, layer: int) -> float:
        return 0.0 if self.softcap is None else float(self.softcap[layer])

    def sinks(self, layer: int) -> np.ndarray | None:
        if self.sink_logits is None or np.isnan(self.sink_logits[layer]).all():
            return None
        return np.ascontiguousarray(self.sink_logits[layer], dtype=np.float32)

    @classmethod
    def from_arrays(cls, keys: np.ndarray, vnorm: np.ndarray, pos: np.ndarray, **kw) -> "ScoreInputs":
        """Inputs from plain arrays (keys [n, n_layer, n_head_kv, head_dim] after RoPE, value norms
        [n, n_layer, n_head_kv], positions) instead of a cache state: to score keys that come from
        elsewhere, e.g. another implementation. Other fields as in the constructor."""
        n, n_layer, n_head_kv, head_dim = keys.shape
        header = np.zeros(12, dtype=np.uint8)
        k = [LayerTensor(0, header, np.ascontiguousarray(keys[:, i], dtype=np.float32).reshape(n, -1).view(np.uint8),
                         False) for i in range(n_layer)]
        state = SeqState.from_layers(pos, k, [])
        inputs = cls(state=state, n_head_kv=n_head_kv, head_dim=head_dim, **kw)
        inputs.__dict__["vnorm"] = np.asarray(vnorm, dtype=np.float32)  # the cached property's value
        return inputs

    @property
    def pos(self) -> np.ndarray:
        return self.state.pos if self.device is None else self.device.pos

    @property
    def n_layer(self) -> int:
        return len(self.state.k) if self.device is None else self.n_device_layers

    @property
    def n_cells(self) -> int:
        return self.state.n_cells if self.device is None else self.device.n_cells

    def layer_keys(self, layer: int) -> np.ndarray:
        """Keys after RoPE of one layer as float32 [n_cells, n_head_kv, head_dim]."""
        lt = self.state.k[layer]
        per_row = self.n_head_kv * self.head_dim
        out = np.empty((self.n_cells, per_row), dtype=np.float32)
        if self.n_cells:
            err = _shim.load().lib.llamakv_rows_to_float(
                _shim.ptr("uint8_t *", lt.data), lt.type, lt.row_bytes, self.n_cells, per_row, _shim.ptr("float *", out))
            if err:
                raise LlamaKVError(f"cannot read keys of ggml type {lt.type}")
        return out.reshape(self.n_cells, self.n_head_kv, self.head_dim)

    @property
    def keys(self) -> np.ndarray:
        """All keys [n_cells, n_layer, n_head_kv, head_dim] float32 (tests, comparisons)."""
        return np.stack([self.layer_keys(layer) for layer in range(self.n_layer)], axis=1)

    def _value_norms(self, layer: int, out: np.ndarray) -> None:
        lt = self.state.v[layer]
        if self.n_cells and _shim.load().lib.llamakv_value_norms(
                _shim.ptr("uint8_t *", lt.data), lt.type, lt.row_bytes, self.n_cells, self.n_head_kv,
                self.head_dim, int(lt.transposed), _shim.ptr("float *", out)):
            raise LlamaKVError(f"cannot read values of ggml type {lt.type}")

    @cached_property
    def vnorm(self) -> np.ndarray:
        """L2 norm of each value head [n_cells, n_layer, n_head_kv]."""
        out = np.empty((self.n_layer, self.n_cells, self.n_head_kv), dtype=np.float32)
        _shim.parallel_map(lambda layer: self._value_norms(layer, out[layer]), range(self.n_layer))
        return out.transpose(1, 0, 2)

    def layer_vnorm(self, layer: int, out: np.ndarray | None = None) -> np.ndarray:
        """One layer's value norms [n_cells, n_head_kv] (`vnorm[:, layer]`, without computing the
        other layers' when `vnorm` was not asked for; into `out` if given)."""
        if "vnorm" in self.__dict__:
            return self.vnorm[:, layer]
        out = np.empty((self.n_cells, self.n_head_kv), dtype=np.float32) if out is None else out
        self._value_norms(layer, out)
        return out

    def window_queries(self, layer: int) -> np.ndarray:
        """The recent queries of one layer after RoPE, float32 [W, n_head, head_dim]."""
        if len(self.window_pos) == 0:
            raise LlamaKVError("no recent queries were captured (prefill with capture enabled)")
        q = self.window_q[layer] if self.window_slots is None else self.window_q[layer][self.window_slots]
        rope = self.rope(layer)
        return (q if rope is None else rope.rotate(q, self.window_pos)).astype(np.float32)


class Press(Protocol):
    name: str

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        """Scores [n_layer, n_head_kv, n_cells], or [n_cells] for a press that combines per cell;
        higher = more worth keeping."""


def _group_mean(a: np.ndarray, n_head_kv: int) -> np.ndarray:
    """[n_head, ...] -> [n_head_kv, ...]: mean over each GQA group."""
    return a.reshape(n_head_kv, a.shape[0] // n_head_kv, *a.shape[1:]).mean(axis=1)


def _not_sink(inputs: ScoreInputs) -> np.ndarray:
    return inputs.pos >= inputs.n_sink


def _sinks_inf(scores: np.ndarray, inputs: ScoreInputs) -> np.ndarray:
    scores[:, :, ~_not_sink(inputs)] = np.inf
    return scores


@dataclass
class ExpectedAttention:
    """Expected Attention (Devoto et al., 2025, "Expected Attention: KV cache compression by
    estimating attention from future queries distribution"): future queries ~ N(mu, Sigma) from
    pre-RoPE statistics, RoPE averaged over the next `n_future_positions` (more for a streamed
    prompt, see KVSession.prefill), closed-form
    log E[exp(qᵀk/√d)] = mu'ᵀk/√d + kᵀΣ'k/(2d), softmax per query head, mean over each GQA
    group, times the value norm."""

    n_future_positions: int = 512
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    full_covariance: bool = False
    name: str = "expected_attention"

    def _folded(self, inputs: ScoreInputs):
        """The mean rotation folded into the statistics, for every layer at once (numpy on small
        arrays holds the GIL; per layer inside the thread pool it serialised the layers):
        z = kᵀ(w + dq∘k) + Σ_p c_p k_a k_b, as one weight row per (layer, head) over the features
        [k, k∘k, k_a k_b] (in the kernel's pair-major order), m [n_layer, n_head, 2 d + P].

        With R̄ = mean rotation, per pair (a, b) k̄_a = A k_a + B k_b, k̄_b = -B k_a + A k_b; then
        μᵀk̄ = k_a (Aμ_a - Bμ_b) + k_b (Bμ_a + Aμ_b) and, with a diagonal variance σ,
        σ_a k̄_a² + σ_b k̄_b² = k_a²(σ_a A² + σ_b B²) + k_b²(σ_a B² + σ_b A²) + 2AB(σ_a - σ_b) k_a k_b."""
        d = inputs.head_dim
        ropes = [inputs.rope(layer) for layer in range(inputs.n_layer)]  # None: a layer without rope
        rotary = [r for r in ropes if r is not None]
        a, b = rotary[0].pair_dims() if rotary else (np.zeros(0, int), np.zeros(0, int))
        if any(not (np.array_equal(a, r.pair_dims()[0]) and np.array_equal(b, r.pair_dims()[1])) for r in rotary):
            raise LlamaKVError("the rotated dimensions differ between layers; llamakv does not support that")
        rotations = {None: (np.ones(len(a)), np.zeros(len(a)))}  # no rope: R̄ = I
        for r in set(rotary):
            rotations[r] = r.mean_rotation(inputs.next_pos, self.horizon(inputs))
        A = np.stack([rotations[r][0] for r in ropes])[:, None, :]  # [n_layer, 1, P]
        B = np.stack([rotations[r][1] for r in ropes])[:, None, :]
        # log E[exp(s x)] = s m + s² v / 2 for x = qᵀk ~ N(m, v), s the layer's logit scale
        s = np.array([inputs.scale(layer) for layer in range(inputs.n_layer)])[:, None, None]
        mu = inputs.stats.mean
        w = mu * s
        w[..., a] = (A * mu[..., a] - B * mu[..., b]) * s
        w[..., b] = (B * mu[..., a] + A * mu[..., b]) * s
        dq = np.zeros_like(w)
        c = np.zeros(w.shape[:2] + (len(a),))
        if self.use_covariance and not self.full_covariance:
            var = inputs.stats.variance()
            half = s * s / 2
            dq = var * half
            dq[..., a] = (var[..., a] * A**2 + var[..., b] * B**2) * half
            dq[..., b] = (var[..., a] * B**2 + var[..., b] * A**2) * half
            c = 2 * A * B * (var[..., a] - var[..., b]) * half
        # pair-major order for the kernel: the dims of pair p at p and P + p, then the unrotated ones
        perm = np.concatenate([a, b, np.setdiff1d(np.arange(d), np.concatenate([a, b]))])
        m = np.concatenate([w[..., perm], dq[..., perm], c], axis=-1)
        return np.ascontiguousarray(m, dtype=np.float32), np.ascontiguousarray(perm, dtype=np.int32), len(a)

    def device_unsupported(self) -> str:
        """Why these scores cannot be computed on the cache's device ("" if they can)."""
        return "the full covariance" if self.use_covariance and self.full_covariance else ""

    def mean_shares(self, inputs: ScoreInputs, keydiff_sums: np.ndarray | None = None,
                    anchor_sample: int = 0) -> np.ndarray:
        """aggregate(score(...), "mean"): one score per cell; on the cache's device the per-head
        scores are aggregated there. Other arguments as in score()."""
        if inputs.device is None or not inputs.n_cells or not _not_sink(inputs).any():
            return aggregate(self.score(inputs, keydiff_sums, anchor_sample), "mean")
        scored = np.ascontiguousarray(_not_sink(inputs), dtype=np.uint8)
        return self._score_on_device(inputs, self._folded(inputs), scored, keydiff_sums, anchor_sample,
                                     mean_only=True).astype(np.float64)

    def _score_on_device(self, inputs: ScoreInputs, folded, scored: np.ndarray, keydiff_sums: np.ndarray | None,
                         anchor_sample: int, mean_only: bool = False) -> np.ndarray:
        """score() from the cache tensors where they lie (device.DeviceCache.ea_scores): the folded
        weights back in the keys' stored order of dimensions, RoPE's pairs by their layout."""
        m, perm, n_pairs = folded
        d = inputs.head_dim
        w = np.empty((inputs.n_layer, inputs.n_head, 2 * d + n_pairs), dtype=np.float32)
        w[..., perm] = m[..., :d]
        w[..., d + perm] = m[..., d:2 * d]
        w[..., 2 * d:] = m[..., 2 * d:]
        a, b = perm[:n_pairs], perm[n_pairs:2 * n_pairs]
        p = np.arange(n_pairs)
        if n_pairs == 0 or (np.array_equal(a, p) and np.array_equal(b, p + n_pairs)):
            kind = 1
        elif np.array_equal(a, 2 * p) and np.array_equal(b, 2 * p + 1):
            kind = 2
        else:
            raise LlamaKVError("RoPE's pairs are laid out in a way the device scoring does not know")
        anchor_cells = None
        if keydiff_sums is not None:
            anchor_cells = anchor_sample_cells(scored, anchor_sample)
        return inputs.device.cache.ea_scores(inputs, w, n_pairs, kind, scored, self.use_vnorm, self.epsilon,
                                             anchor_cells, keydiff_sums, mean_only)

    def horizon(self, inputs: ScoreInputs) -> int:
        """Future positions RoPE is averaged over: `n_future_positions`, or more where the caller
        knows that queries much further on will read the cells (a streamed prompt)."""
        return max(self.n_future_positions, inputs.n_future)

    def layer_logits(self, inputs: ScoreInputs, layer: int, folded=None, out: np.ndarray | None = None,
                     anchor: np.ndarray | None = None, keydiff: np.ndarray | None = None) -> np.ndarray:
        """z [n_head, n_cells]: the expected log attention logit of each query head for each key
        (`folded`: `_folded(inputs)`, when scoring every layer; into `out` if given). With `anchor`
        [n_head_kv, head_dim] also KeyDiff's scores into `keydiff` [n_head_kv, n_cells], from the
        same read of the keys."""
        m, perm, n_pairs = folded or self._folded(inputs)
        n = inputs.n_cells
        z = np.empty((inputs.n_head, n), dtype=np.float32) if out is None else out
        lt = inputs.state.k[layer]
        ffi = _shim.load().ffi
        if anchor is not None:
            anchor = np.ascontiguousarray(anchor[:, perm], dtype=np.float32)  # the kernel's order of dimensions
        if n:
            err = _shim.load().lib.llamakv_ea_logits(
                _shim.ptr("uint8_t *", lt.data), lt.type, lt.row_bytes, n, inputs.n_head, inputs.n_head_kv,
                inputs.head_dim, _shim.ptr("float *", m[layer]), _shim.ptr("int32_t *", perm), n_pairs,
                ffi.NULL if anchor is None else _shim.ptr("float *", anchor),
                ffi.NULL if anchor is None else _shim.ptr("float *", keydiff), _shim.ptr("float *", z))
            if err:
                raise LlamaKVError(f"cannot score keys of ggml type {lt.type}")
        if self.use_covariance and self.full_covariance:
            group = inputs.n_head // inputs.n_head_kv
            keys = inputs.layer_keys(layer)
            rope = inputs.rope(layer)
            k_bar = keys if rope is None else rope.unrotate_mean(keys, inputs.next_pos, self.horizon(inputs))
            k_bar = np.repeat(k_bar, group, axis=1).transpose(1, 0, 2)  # [n_head, n, d]
            cov = inputs.stats.covariance()[layer].astype(np.float32)  # [n_head, d, d]
            z += np.einsum("hnd,hde,hne->hn", k_bar, cov, k_bar, optimize=True) * (inputs.scale(layer) ** 2 / 2)
        cap = inputs.cap(layer)
        if cap > 0:
            # a soft-capped logit c tanh(x / c) (Gemma 2) has no closed-form expectation of its exp:
            # the cap is applied to the uncapped closed form, exact where the query's spread
            # is small next to c (typical logits are far below Gemma 2's c = 50)
            np.multiply(np.tanh(z / cap), cap, out=z)
        return z

    def score(self, inputs: ScoreInputs, keydiff_sums: np.ndarray | None = None, anchor_sample: int = 0) -> np.ndarray:
        """Scores [n_layer, n_head_kv, n_cells]. With `keydiff_sums` [n_layer, n_cells], also KeyDiff's
        scores summed over each layer's KV heads, from the same read of the keys, its anchor from
        about `anchor_sample` cells (0: all)."""
        n = inputs.n_cells
        scored = np.ascontiguousarray(_not_sink(inputs), dtype=np.uint8)
        if not scored.any():
            if keydiff_sums is not None:
                keydiff_sums[:] = np.inf
            return np.full((inputs.n_layer, inputs.n_head_kv, n), np.inf, dtype=np.float32)
        folded = self._folded(inputs)
        if inputs.device is not None:
            return self._score_on_device(inputs, folded, scored, keydiff_sums, anchor_sample)
        out = np.empty((inputs.n_layer, inputs.n_head_kv, n), dtype=np.float32)  # every entry written below
        lib, ffi = _shim.load().lib, _shim.load().ffi

        def score_layer(layer: int) -> None:
            # all in C, so the layers run in parallel without the GIL, and reading one layer's
            # values (memory-bound) overlaps another's logits (compute-bound)
            anchor = keydiff = None
            if keydiff_sums is not None:
                anchor = key_anchor(inputs, layer, scored, anchor_sample)
                keydiff = _shim.scratch("keydiff", (inputs.n_head_kv, n))
            z = self.layer_logits(inputs, layer, folded, _shim.scratch("logits", (inputs.n_head, n)), anchor, keydiff)
            if keydiff is not None:
                keydiff.sum(axis=0, out=keydiff_sums[layer])
            v, stride = ffi.NULL, 0
            if self.use_vnorm:  # [n_cells, n_head_kv], rows `stride` floats apart
                vl = inputs.layer_vnorm(layer, _shim.scratch("vnorm", (n, inputs.n_head_kv)))
                vl = vl if vl.strides[1] == vl.itemsize else np.ascontiguousarray(vl)
                v, stride = ffi.cast("float *", vl.ctypes.data), vl.strides[0] // vl.itemsize
            sinks = inputs.sinks(layer)
            if lib.llamakv_ea_attention(_shim.ptr("float *", z), n, inputs.n_head, inputs.n_head_kv,
                                        _shim.ptr("uint8_t *", scored),
                                        ffi.NULL if sinks is None else _shim.ptr("float *", sinks),
                                        v, stride, self.epsilon, _shim.ptr("float *", out[layer])):
                raise LlamaKVError("out of memory while scoring")

        _shim.parallel_map(score_layer, range(inputs.n_layer))
        return out


@dataclass
class StreamingLLM:
    """StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention
    Sinks"): keep the sink tokens and the most recent window; what context shift amounts to."""

    name: str = "streaming_llm"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        s = np.broadcast_to(inputs.pos.astype(np.float32), (inputs.n_layer, inputs.n_head_kv, inputs.n_cells))
        return _sinks_inf(s.copy(), inputs)


@dataclass
class RandomPress:
    """Random eviction (the floor any method must beat); seeded, one draw per cell."""

    seed: int = 0
    name: str = "random"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        r = np.random.default_rng(self.seed).random(inputs.n_cells).astype(np.float32)
        s = np.broadcast_to(r, (inputs.n_layer, inputs.n_head_kv, inputs.n_cells)).copy()
        return _sinks_inf(s, inputs)


@dataclass
class KNorm:
    """KNorm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression"): keys with a small L2 norm draw attention; keep the smallest norms."""

    name: str = "knorm"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        s = np.stack([-np.linalg.norm(inputs.layer_keys(layer), axis=-1).T for layer in range(inputs.n_layer)])
        return _sinks_inf(s.astype(np.float32), inputs)


@dataclass
class KeyDiff:
    """KeyDiff (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context
    LLM Inference in Resource-Constrained Environments"): keep the keys least similar (cosine) to
    the head's mean key direction."""

    name: str = "keydiff"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        scored = np.ascontiguousarray(_not_sink(inputs), dtype=np.uint8)
        out = np.empty((inputs.n_layer, inputs.n_head_kv, inputs.n_cells), dtype=np.float32)
        lib = _shim.load().lib

        def score_layer(layer: int) -> None:  # in C: numpy's float32 copy of every key was slow
            lt = inputs.state.k[layer]
            anchor = key_anchor(inputs, layer, scored)
            if inputs.n_cells and lib.llamakv_keydiff_scores(
                    _shim.ptr("uint8_t *", lt.data), lt.type, lt.row_bytes, inputs.n_cells, inputs.n_head_kv,
                    inputs.head_dim, _shim.ptr("float *", anchor), _shim.ptr("float *", out[layer])):
                raise LlamaKVError(f"cannot read keys of ggml type {lt.type}")

        _shim.parallel_map(score_layer, range(inputs.n_layer))
        return _sinks_inf(out, inputs)


def key_anchor(inputs: ScoreInputs, layer: int, scored: np.ndarray, sample: int = 0) -> np.ndarray:
    """KeyDiff's anchor [n_head_kv, head_dim]: the normalised mean of the normalised keys of the scored
    cells (uint8 mask), from every cell or, with `sample`, from every k-th, at least `sample` cells."""
    lt = inputs.state.k[layer]
    anchor = np.zeros((inputs.n_head_kv, inputs.head_dim), dtype=np.float32)
    stride = max(1, inputs.n_cells // sample) if sample else 1
    if inputs.n_cells and _shim.load().lib.llamakv_key_anchor(
            _shim.ptr("uint8_t *", lt.data), lt.type, lt.row_bytes, inputs.n_cells, inputs.n_head_kv,
            inputs.head_dim, _shim.ptr("uint8_t *", scored), stride, _shim.ptr("float *", anchor)):
        raise LlamaKVError(f"cannot read keys of ggml type {lt.type}")
    return anchor


def anchor_sample_cells(scored: np.ndarray, sample: int = 0) -> np.ndarray:
    """The cells key_anchor averages (llamakv_key_anchor's sample): every k-th from k // 2 on that
    is scored (any, if none is), k = n // sample (1 without a sample); all cells if that leaves none."""
    n = len(scored)
    stride = max(1, n // sample) if sample else 1
    for st in (stride, 1):
        cells = np.arange(st // 2, n, st)
        if scored.any():
            cells = cells[scored[cells] != 0]
        if len(cells):
            return cells.astype(np.int32)
    return np.zeros(0, dtype=np.int32)


def _rank_percentile(x: np.ndarray) -> np.ndarray:
    """Rank of each finite entry among the finite ones, in (0, 1]; infinite entries stay as they are."""
    out = np.array(x, dtype=np.float64)
    finite = np.isfinite(out)
    order = np.argsort(out[finite], kind="stable")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1) / max(len(order), 1)
    out[finite] = ranks
    return out


def _cell_ranks(scores: np.ndarray) -> np.ndarray:
    """A press's scores as one rank percentile per cell ("mean" aggregation)."""
    return _rank_percentile(aggregate(scores, "mean"))


@dataclass
class ExpectedAttentionKeyDiff:
    """Expected Attention and KeyDiff combined per cell: each aggregated over layers and heads
    ("mean"; for KeyDiff, whose rows sum to <= 0, the plain mean), turned into rank percentiles,
    averaged with `weight` on Expected Attention. Expected Attention keeps what the prompt's typical
    query reads (recent, generic cells), KeyDiff keys that stand out from the rest (where a specific
    question can single them out); their mistakes differ. Both from one read of the keys, KeyDiff's
    anchor from about `anchor_sample` cells (0: every cell). One score per cell.

    Keeping a share f of the cells under 1/2, the weight is `weight`·2f (`scale_weight`). Why: a
    cell KeyDiff ranks first scores at least 1 − weight, and at most a share weight / (1 − weight)
    of the cells can score more, so it is kept whatever Expected Attention's rank while that share
    is under f. A fixed 0.3 guarantees it down to f = 0.43, not at 0.75 compression (f = 0.25),
    where the combination lost needles KeyDiff alone keeps; scaled, any weight under 1/3 does at
    every ratio. Measured at 0.75: better on both Qwen models, worse on SmolLM2-135M, which keeps
    more with the fixed weight (`scale_weight=False`; benchmarks/quality).

    With `surprising_share` s > 0 (0.1 measured; off by default: it costs the prefill the logits
    of every token, and at 0.75 it hurt both Qwen2.5-Coder models), the prompt's own surprisal
    joins (−log p of each token given the text before it; the session computes it when the press
    says `uses_surprisal`): each cell takes the mean surprisal of its sentence, and cells whose
    sentence ranks in the top share s score at least that rank, so that while the kept share is
    2s or more they stay whole. Why: a fact that stands out from its text (a needle in an essay) is
    read through its whole sentence, and the per-cell scores keep its rare tokens but drop the small
    words between them. Only ever a lift: predictable sentences are not pushed down (blending the
    rank in instead evicted the later needles of a multi-needle prompt, which the model has learnt
    to predict by then)."""

    weight: float = 0.3
    anchor_sample: int = 4096
    scale_weight: bool = True
    surprising_share: float = 0.0
    expected_attention: ExpectedAttention = field(default_factory=ExpectedAttention)
    name: str = "ea_keydiff"

    @property
    def uses_surprisal(self) -> bool:
        return self.surprising_share > 0

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        kd_sums = np.empty((inputs.n_layer, inputs.n_cells), dtype=np.float32)
        ea = _rank_percentile(self.expected_attention.mean_shares(inputs, kd_sums, self.anchor_sample))
        kd = kd_sums.sum(axis=0, dtype=np.float64)
        cells = np.full(inputs.n_cells, np.inf)  # sinks: infinite in Expected Attention's scores
        finite = np.isfinite(ea)
        weight = self.weight * min(1.0, 2.0 * inputs.keep_fraction) if self.scale_weight else self.weight
        cells[finite] = weight * ea[finite] + (1 - weight) * _rank_percentile(kd[finite])
        if self.uses_surprisal and inputs.surprisal is not None and np.isfinite(inputs.surprisal).any():
            sentence = _rank_percentile(sentence_surprisal(inputs.pos, inputs.surprisal, inputs.sentence_end)[finite])
            protected = sentence >= 1 - self.surprising_share  # False where unknown (NaN)
            cells[finite] = np.maximum(_rank_percentile(cells[finite]), np.where(protected, sentence, 0.0))
        return cells


def sentence_surprisal(pos: np.ndarray, surprisal: np.ndarray, sentence_end: np.ndarray) -> np.ndarray:
    """The mean surprisal of each cell's sentence: cells in position order, a sentence ending after
    each cell whose token ends one; unknown (NaN) surprisals left out, NaN for a sentence of none."""
    order = np.argsort(pos, kind="stable")
    sentence = np.concatenate(([0], np.cumsum(sentence_end[order][:-1])))
    s = surprisal[order].astype(np.float64)
    known = np.isfinite(s)
    total = np.bincount(sentence, np.where(known, s, 0.0))
    count = np.bincount(sentence, known)
    mean = np.divide(total, count, out=np.full(len(total), np.nan), where=count > 0)
    out = np.empty(len(pos))
    out[order] = mean[sentence]
    return out


def _window_attention(inputs: ScoreInputs, layer: int, last: int | None = None) -> np.ndarray:
    """Attention [n_head, n_cells] of the recent queries (or the `last` of them) to the cells,
    averaged over those queries: each query's softmax over the non-sink cells it may see
    (positions up to its own). In C (llamakv_window_attention), without the GIL."""
    q = inputs.window_queries(layer)  # [W, H, d]
    qpos = inputs.window_pos
    if last is not None:
        q, qpos = q[-last:], qpos[-last:]
    n_q, d, n = len(qpos), inputs.head_dim, inputs.n_cells
    group = inputs.n_head // inputs.n_head_kv
    rows = (q * np.float32(inputs.scale(layer))).reshape(n_q, inputs.n_head_kv, group, d).transpose(1, 2, 0, 3)
    rows = np.ascontiguousarray(rows, dtype=np.float32)  # each KV head's query rows together
    qpos = np.ascontiguousarray(qpos, dtype=np.int64)
    cell_pos = np.ascontiguousarray(inputs.pos, dtype=np.int64)
    scored = np.ascontiguousarray(_not_sink(inputs), dtype=np.uint8)
    out = np.empty((inputs.n_head, n), dtype=np.float32)
    lt = inputs.state.k[layer]
    if n and _shim.load().lib.llamakv_window_attention(
            _shim.ptr("uint8_t *", lt.data), lt.type, lt.row_bytes, n, inputs.n_head, inputs.n_head_kv, d,
            _shim.ptr("float *", rows), n_q, _shim.ptr("int64_t *", qpos), _shim.ptr("int64_t *", cell_pos),
            _shim.ptr("uint8_t *", scored), _shim.ptr("float *", out)):
        raise LlamaKVError(f"cannot score keys of ggml type {lt.type} with head_dim {d}")
    return out


@dataclass
class SnapKV:
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"):
    attention of the last `window` queries, averaged, max-pooled over neighbouring positions
    (`kernel`), mean over each GQA group."""

    window: int = 64
    kernel: int = 5
    name: str = "snapkv"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        order = np.argsort(inputs.pos, kind="stable")

        def score_layer(layer: int) -> np.ndarray:
            a = _window_attention(inputs, layer, self.window)  # [H, n]
            if self.kernel > 1:  # pool along positions, not cell order
                s = a[:, order]
                pad = self.kernel // 2
                p = np.pad(s, ((0, 0), (pad, pad)), constant_values=0.0)
                pooled = np.max(np.stack([p[:, i:i + s.shape[1]] for i in range(self.kernel)]), axis=0)
                a = np.empty_like(a)
                a[:, order] = pooled
            return _group_mean(a, inputs.n_head_kv)

        out = np.stack(_shim.parallel_map(score_layer, range(inputs.n_layer)))
        return _sinks_inf(out.astype(np.float32), inputs)


@dataclass
class TOVA:
    """TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): the attention the last query
    pays each cell, averaged over the heads of each GQA group."""

    name: str = "tova"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        out = np.stack(_shim.parallel_map(
            lambda layer: _group_mean(_window_attention(inputs, layer, 1), inputs.n_head_kv),
            range(inputs.n_layer)))
        return _sinks_inf(out.astype(np.float32), inputs)


@dataclass
class H2O:
    """H2O-style heavy hitters (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient
    Generative Inference of Large Language Models"): attention accumulated over the queries seen.
    Here over the window of recent queries llamakv keeps (not every query of the prompt): the sum,
    unpooled, so cells many recent queries looked at win."""

    name: str = "h2o"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        out = np.stack(_shim.parallel_map(
            lambda layer: _group_mean(_window_attention(inputs, layer) * len(inputs.window_pos), inputs.n_head_kv),
            range(inputs.n_layer)))
        return _sinks_inf(out.astype(np.float32), inputs)


@dataclass
class QuestionAware:
    """A known question's look at the cells, next to another press (query-aware compression
    where the question is known but not yet in its place, e.g. at the end of a prompt that streams
    through a bounded cache): the attention of the question's queries, SnapKV-style (mean over
    them, max-pooled over `kernel` positions), and the base press's scores, each aggregated per
    cell ("mean") and turned into rank percentiles; a cell scores the larger of the two, so it is
    kept if either ranks it high. (Letting the question nominate only its top 10% instead kept the
    next-token distributions closer on the RULER grid but lost 3 of the first 5 prose needles at 4x.) The
    question must be the newest `n_question` captured queries."""

    base: Press
    n_question: int
    kernel: int = 5
    name: str = ""

    def __post_init__(self):
        self.name = self.name or f"{self.base.name}+question"

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        base = _cell_ranks(self.base.score(inputs))
        asked = _cell_ranks(SnapKV(window=self.n_question, kernel=self.kernel).score(inputs))
        return np.maximum(base, asked)  # sinks: infinite in both


AGGREGATIONS = ("mean", "max", "votes")


def aggregate(scores: np.ndarray, policy: str = "mean", n_keep: int | None = None) -> np.ndarray:
    """One score per cell from scores [n_layer, n_head_kv, n_cells] (scores that are already one
    per cell, [n_cells], are returned as they are, as float64).

    Each (layer, head) row is first normalised to sum 1 over the scored cells, so that layers
    with large value norms do not outvote the others; then
      mean:  average share of attention the cell gets over all layers and heads;
      max:   the largest share any single head gives it (keeps what one head needs badly);
      votes: each head nominates its `n_keep` best cells; cells ranked by their number of
             votes, ties broken by the mean share.
    Cells with infinite scores (sinks) stay infinite.
    """
    if policy not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {policy!r}; choose one of {', '.join(AGGREGATIONS)}")
    if scores.ndim == 1:
        return scores.astype(np.float64)
    n_layer, n_head_kv, n = scores.shape
    finite = np.logical_and.reduce(_shim.parallel_map(lambda layer: np.isfinite(scores[layer]).all(axis=0),
                                                      range(n_layer)), initial=True)
    out = np.full(n, np.inf)
    n_finite = int(finite.sum())
    if n_finite == 0:
        return out
    k = n_finite if n_keep is None else int(min(max(n_keep, 0), n_finite))

    def layer_parts(layer: int):  # per layer, in parallel: [share summed over heads, max share, votes]
        if policy == "mean":  # no normalised copy: each head's row times 1 / its sum, accumulated
            rows = scores[layer]
            inv = 1.0 / np.maximum(rows.sum(axis=-1, where=finite, dtype=np.float64), 1e-30)
            acc = np.zeros(n, dtype=np.float64)
            for h in range(n_head_kv):
                acc += rows[h] * inv[h]
            return acc[finite], None, None
        s = scores[layer][:, finite].astype(np.float32)
        s /= np.maximum(s.sum(axis=-1, keepdims=True, dtype=np.float64), 1e-30).astype(np.float32)
        votes = np.zeros(n_finite)
        if policy == "votes" and k > 0:
            np.add.at(votes, np.argpartition(-s, k - 1, axis=-1)[:, :k].reshape(-1), 1.0)
        return s.sum(axis=0, dtype=np.float64), (s.max(axis=0) if policy == "max" else None), votes

    parts = _shim.parallel_map(layer_parts, range(n_layer))
    mean = np.sum([p[0] for p in parts], axis=0) / (n_layer * n_head_kv)
    if policy == "mean":
        out[finite] = mean
    elif policy == "max":
        out[finite] = np.max([p[1] for p in parts], axis=0)
    else:
        votes = np.sum([p[2] for p in parts], axis=0)
        out[finite] = votes + mean / max(mean.max(), 1e-30) * 0.5  # ties: mean share, < one vote
    return out


PRESSES = {
    "expected_attention": ExpectedAttention,
    "streaming_llm": StreamingLLM,
    "snapkv": SnapKV,
    "tova": TOVA,
    "h2o": H2O,
    "knorm": KNorm,
    "keydiff": KeyDiff,
    "ea_keydiff": ExpectedAttentionKeyDiff,
    "random": RandomPress,
}


def make_press(spec: str, expected_attention: dict | None = None, **kwargs) -> Press:
    """The press named by `spec` with its own settings `kwargs`; `expected_attention`: settings of
    Expected Attention (n_future_positions, epsilon, ...) for the presses that use it, ignored by the
    others. `spec` may carry settings of the press itself as NAME:KEY=VALUE[:KEY=VALUE...] (e.g.
    "ea_keydiff:weight=0.1"); the press is then named by the whole spec."""
    name, *options = spec.split(":")
    try:
        cls = PRESSES[name.replace("-", "_")]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(PRESSES)}") from None
    settable = {f.name: type(f.default) for f in cls.__dataclass_fields__.values()
                if type(f.default) in (bool, int, float)}  # numbers and switches, not names or sub-presses
    for option in options:
        key, _, value = option.partition("=")
        if key not in settable:
            raise ValueError(f"bad setting {option!r} in method {spec!r}: give KEY=VALUE with KEY one of "
                             f"{', '.join(settable) or '(none)'}")
        kwargs[key] = _setting(value, settable[key], option)
    if options:
        kwargs["name"] = spec
    ea = expected_attention or {}
    if cls is ExpectedAttention:
        return cls(**{**ea, **kwargs})
    if cls is ExpectedAttentionKeyDiff:
        return cls(**kwargs, expected_attention=ExpectedAttention(**ea))
    return cls(**kwargs)


def _setting(value: str, kind: type, option: str) -> bool | int | float:
    if kind is bool:
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
    else:
        try:
            return kind(value)
        except ValueError:
            pass
    want = {bool: "true or false", int: "an integer"}.get(kind, "a number")
    raise ValueError(f"bad value in {option!r}: give {want}")
