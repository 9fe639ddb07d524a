"""PCDVQ (Yue et al. 2025, arXiv 2506.05432): polar-decoupled VQ with Hessian-aware error feedback.

The format, the random Hadamard transform (SGR) and the data-free codebooks (DACC) are
``jquant.formats.polar``; this module chooses the codes. For a weight ``W [in, out]`` with input
Hessian ``H``:

1. ``W̃ = (H_n S_in)ᵀ W (S_out H_m)``, ``H̃ = (H_n S_in)ᵀ H (H_n S_in)``, ``W̄ = W̃ / s``
   (``s`` = RMS, spec §3.2);
2. BlockLDLQ over blocks of ``k`` rows (``jquant.algorithms.vq_core``) with PCD rounding as the
   block quantizer: direction = largest cosine, magnitude = nearest Lloyd–Max level (spec §3.3).
   **[inferred: spec §3.5, from the QuIP# lineage; the paper's text was not available.]**
   With ``candidates > 1`` the rounding is also Hessian-aware **[jquant's choice]**: the
   ``candidates`` most similar directions times every magnitude level are scored by the block's
   output error ``‖U_BB⁻ᵀ (v − r̂ d̂)‖²`` and the best pair is kept.

``simulate_parts`` quantizes only the directions or only the magnitudes (the paper's
sensitivity experiment). The end-to-end fine-tuning of spec §3.6 (scales and norm gains, codes frozen) is
``jquant.finetune.tune_continuous``; its per-layer step is not implemented.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jquant.algorithms.gptq_core import damped_factor
from jquant.algorithms.vq_core import feedback_sweep
from jquant.formats import _blocks as B
from jquant.formats.polar import PolarVQFormat, from_indices, nearest_polar, polar_scale
from jquant.formats.qarray import QArray

PARTS = ("both", "direction", "magnitude")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PCDVQConfig:
    """``damp``: fraction of ``mean(diag H̃)`` added to the diagonal; ``candidates``: directions
    re-scored with the Hessian metric (1 = plain PCD rounding); ``feedback``: BlockLDLQ error
    feedback (False = nearest rounding of every vector)."""

    damp: float = 0.01
    candidates: int = 8
    feedback: bool = True

    def __post_init__(self):
        if not 0 <= self.damp < 1:
            raise ValueError(f"PCDVQConfig.damp must be in [0, 1), got {self.damp}.")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 1:
            raise ValueError(f"PCDVQConfig.candidates must be a positive int, got {self.candidates!r}.")


def _round_block(rows: jax.Array, t: jax.Array, params, *, candidates: int) -> tuple[jax.Array, jax.Array]:
    """PCD rounding of the ``out`` vectors ``rows.T [out, k]``; returns ``(q_rows [k, out], [out, 2] codes)``."""
    c_d, c_r = params
    v = rows.T
    if candidates == 1:
        i_d, i_r = nearest_polar(v, c_d, c_r)
    else:
        _, top = jax.lax.top_k(v @ c_d.T, candidates)  # [out, c]
        cand = c_r[None, None, :, None] * c_d[top][:, :, None, :]  # [out, c, R, k]
        err = (v[:, None, None, :] - cand) @ t.T  # rows of T (v - q)
        best = jnp.argmin(jnp.sum(err * err, -1).reshape(v.shape[0], -1), axis=-1)
        i_d = jnp.take_along_axis(top, (best // c_r.shape[0])[:, None], 1)[:, 0].astype(jnp.int32)
        i_r = (best % c_r.shape[0]).astype(jnp.int32)
    q = c_r[i_r][:, None] * c_d[i_d]
    return q.T, jnp.stack([i_d, i_r], axis=-1)


@functools.lru_cache(maxsize=None)
def _block_quantizer(candidates: int):
    """One function object per ``candidates`` value, so the jitted sweep compiles once per shape."""
    return functools.partial(_round_block, candidates=candidates)


def _check(weight: jax.Array, fmt: PolarVQFormat, axis: int) -> None:
    if not isinstance(fmt, PolarVQFormat):
        raise ValueError(f"pcdvq needs a PolarVQFormat (e.g. 'pcdvq-d8-a14-b2'), got {fmt.name}.")
    fmt.check_shape(tuple(weight.shape), axis)


@functools.partial(jax.jit, static_argnums=(1,))
def _scaled_rotation(w: jax.Array, fmt: PolarVQFormat) -> tuple[jax.Array, jax.Array]:
    """``(W̄ = W̃ / s, s)`` (all-zero tensors or columns keep ``s = 0`` and ``W̄ = 0``)."""
    wt = fmt.rotate(w)
    s = polar_scale(wt, fmt)
    return wt / B.safe_divisor(s), s


@functools.partial(jax.jit, static_argnums=(1,))
def _rotate_hessian(h: jax.Array, fmt: PolarVQFormat) -> jax.Array:
    return fmt.rotate_hessian(h)


def pcdvq_quantize(weight: jax.Array, hessian: jax.Array | None, fmt: PolarVQFormat, *, axis: int = 0,
                   config: PCDVQConfig = PCDVQConfig()) -> QArray:
    """PCDVQ codes for ``weight [in, out]`` given the input Hessian ``hessian [in, in]`` (see module doc).

    ``hessian=None`` or ``config.feedback=False`` gives nearest PCD rounding (what ``quantize`` does).
    """
    _check(weight, fmt, axis)
    n, m = weight.shape
    k = fmt.vector_dim
    wbar, s = _scaled_rotation(jnp.asarray(weight, jnp.float32), fmt)
    params = tuple(jnp.asarray(c) for c in fmt.codebooks())
    if hessian is None or not config.feedback:
        i_d, i_r = jax.lax.map(lambda v: nearest_polar(v, *params), jnp.swapaxes(wbar.reshape(n // k, k, m), 1, 2))
    else:
        h = jnp.asarray(hessian, jnp.float32)
        if h.shape != (n, n):
            raise ValueError(f"pcdvq: Hessian shape {h.shape} does not match the weight's input size {n}.")
        _, w0, u, _ = damped_factor(_rotate_hessian(h, fmt), wbar, config.damp, what="pcdvq")
        round_block = _block_quantizer(min(config.candidates, 2 ** fmt.direction_bits))
        _, _, idx = feedback_sweep(w0, u, jnp.int32(0), params, round_block=round_block, d=k, n_blocks=n // k,
                                   n_idx=2)
        i_d, i_r = idx[..., 0], idx[..., 1]
    return from_indices(i_d, i_r, s, fmt, (n, m), jnp.dtype(weight.dtype).name)


@functools.partial(jax.jit, static_argnums=(1, 2))
def simulate_parts(weight: jax.Array, fmt: PolarVQFormat, parts: str) -> jax.Array:
    """The weight with only part of each vector quantized (nearest rounding, float32 ``[in, out]``).

    ``parts``: ``"direction"`` keeps each vector's exact norm, ``"magnitude"`` its exact
    direction, ``"both"`` equals ``dequantize(quantize(weight, fmt))``.
    """
    if parts not in PARTS:
        raise ValueError(f"simulate_parts: parts={parts!r} must be one of {PARTS}.")
    n, m = weight.shape
    k = fmt.vector_dim
    c_d, c_r = (jnp.asarray(c) for c in fmt.codebooks())
    wbar, s = _scaled_rotation(weight.astype(jnp.float32), fmt)
    v = jnp.swapaxes(wbar.reshape(n // k, k, m), 1, 2)  # [nv, out, k]
    i_d, i_r = jax.lax.map(lambda x: nearest_polar(x, c_d, c_r), v)
    r = jnp.linalg.norm(v, axis=-1, keepdims=True)
    direction = c_d[i_d] if parts != "magnitude" else v / jnp.where(r > 0, r, 1.0)
    magnitude = c_r[i_r][..., None] if parts != "direction" else r
    w = jnp.swapaxes(magnitude * direction, 1, 2).reshape(n, m) * s
    return fmt.unrotate(w)
