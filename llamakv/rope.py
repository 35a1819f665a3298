"""The model's own RoPE, read from the graph's ROPE node, and its average over future positions.

Mirrors ggml's rope (ggml-cpu ops.cpp: rope_yarn, ggml_rope_yarn_corr_dims, rotate_pairs) so that
rotating a captured pre-RoPE query reproduces llama.cpp's post-RoPE tensor. Pair j of a head
rotates dimensions (2j, 2j+1) in NORM mode and (j, j + n_dims/2) in NEOX mode (offset by n_offs),
by the angle theta_j(p) = p * base^(-2j/n_dims) / factor_j, YaRN-corrected, scaled by mscale.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from .errors import UnsupportedModelError

ROPE_NORM = 0
ROPE_NEOX = 2


@dataclass(frozen=True)
class RopeParams:
    n_dims: int
    mode: int
    n_ctx_orig: int
    freq_base: float
    freq_scale: float
    ext_factor: float
    attn_factor: float
    beta_fast: float
    beta_slow: float
    n_offs: int = 0
    freq_factors: tuple | None = None

    @classmethod
    def from_op_params(cls, op_params, freq_factors=None) -> "RopeParams":
        """From the 16 int32 op_params of a ggml ROPE node (layout of ggml_rope_impl)."""
        p = [int(x) for x in op_params]
        f = lambda i: struct.unpack("<f", struct.pack("<i", p[i]))[0]  # noqa: E731
        mode = p[2]
        if mode not in (ROPE_NORM, ROPE_NEOX):
            raise UnsupportedModelError(
                f"rope mode {mode} (multi-section or vision rope) is not supported; "
                "llamakv supports NORM (llama) and NEOX (qwen2) rope"
            )
        return cls(
            n_dims=p[1], mode=mode, n_ctx_orig=p[4], freq_base=f(5), freq_scale=f(6),
            ext_factor=f(7), attn_factor=f(8), beta_fast=f(9), beta_slow=f(10), n_offs=p[15],
            freq_factors=None if freq_factors is None else tuple(float(x) for x in freq_factors),
        )

    @property
    def n_pairs(self) -> int:
        return self.n_dims // 2

    def pair_dims(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices (a, b) of the two dimensions each pair rotates."""
        j = np.arange(self.n_pairs)
        if self.mode == ROPE_NORM:
            return self.n_offs + 2 * j, self.n_offs + 2 * j + 1
        return self.n_offs + j, self.n_offs + j + self.n_pairs

    def _corr_dims(self) -> tuple[float, float]:
        def corr_dim(n_rot: float) -> float:
            return self.n_dims * math.log(self.n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(self.freq_base))

        start = math.floor(corr_dim(self.beta_fast))
        end = math.ceil(corr_dim(self.beta_slow))
        return max(0.0, start), min(self.n_dims - 1.0, end)

    def angles(self, positions) -> tuple[np.ndarray, float | np.ndarray]:
        """theta [n_pos, n_pairs] and the magnitude scale (scalar, or per pair with YaRN)."""
        pos = np.asarray(positions, dtype=np.float64)
        j = np.arange(self.n_pairs)
        inv_freq = self.freq_base ** (-2.0 * j / self.n_dims)
        if self.freq_factors is not None:
            inv_freq = inv_freq / np.asarray(self.freq_factors[: self.n_pairs])
        theta_extrap = pos[:, None] * inv_freq[None, :]
        theta = self.freq_scale * theta_extrap
        mscale = self.attn_factor
        if self.ext_factor != 0.0:
            low, high = self._corr_dims()
            y = (j - low) / max(0.001, high - low)  # i0/2 == j
            ramp = (1.0 - np.clip(y, 0.0, 1.0)) * self.ext_factor
            theta = theta * (1.0 - ramp) + theta_extrap * ramp
            mscale = mscale * (1.0 + 0.1 * math.log(1.0 / self.freq_scale))
        return theta, mscale

    def cos_sin(self, positions) -> tuple[np.ndarray, np.ndarray]:
        theta, mscale = self.angles(positions)
        return np.cos(theta) * mscale, np.sin(theta) * mscale

    def rotate(self, x: np.ndarray, positions) -> np.ndarray:
        """Apply RoPE to x [n_pos, ..., head_dim] (positions along the first axis)."""
        cos, sin = self.cos_sin(positions)
        shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
        cos, sin = cos.reshape(shape), sin.reshape(shape)
        a, b = self.pair_dims()
        out = np.array(x, dtype=np.float64, copy=True)
        xa, xb = x[..., a], x[..., b]
        out[..., a] = xa * cos - xb * sin
        out[..., b] = xa * sin + xb * cos
        return out

    def mean_rotation(self, start: int, n_future: int) -> tuple[np.ndarray, np.ndarray]:
        """R̄ = mean of R_t over t in [start, start + n_future): per pair [[A, -B], [B, A]].
        The angle is linear in t (theta = omega t), so the mean of exp(i omega t) is a geometric
        series: exp(i omega start) (1 - exp(i omega n)) / (n (1 - exp(i omega))), any horizon n."""
        theta, mscale = self.angles([1.0])
        omega = theta[0]
        n = max(int(n_future), 1)
        step = np.exp(1j * omega)
        small = np.abs(omega) < 1e-9  # no rotation over the horizon to speak of
        series = np.where(small, n, (1 - step ** n) / np.where(small, 1, 1 - step))
        mean = np.exp(1j * omega * start) * series / n * mscale
        return mean.real, mean.imag

    def unrotate_mean(self, keys: np.ndarray, start: int, n_future: int) -> np.ndarray:
        """R̄ᵀ k for keys [..., head_dim]: then mu'ᵀk = muᵀ(R̄ᵀk) and kᵀR̄ΣR̄ᵀk = (R̄ᵀk)ᵀΣ(R̄ᵀk)."""
        A, B = self.mean_rotation(start, n_future)
        a, b = self.pair_dims()
        out = np.array(keys, dtype=np.float32, copy=True)
        ka, kb = keys[..., a], keys[..., b]
        out[..., a] = A * ka + B * kb
        out[..., b] = -B * ka + A * kb
        return out


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Walsh-Hadamard matrix of size n (a power of two) in Sylvester's order, as
    llama.cpp builds it to rotate q and k before a quantized K cache (symmetric, its own inverse)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix needs a power of two, got {n}")
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)
