"""The per-step decisions of 6Bit-Diffusion as pure functions of arrays (spec ``video_dit_mixed_precision_tdc.md``).

Every statistic is taken over the whole velocity batch (both classifier-free guidance halves), so the halves share
their decisions (spec §3.6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.video_mixed.config import FLOAT, INT8, NVFP4


def relative_l1(delta: jax.Array, reference: jax.Array) -> jax.Array:
    """``‖delta‖₁ / ‖reference‖₁`` (float32 scalar): Γ = ‖Y − X‖₁ / ‖X‖₁ (Eq. 3) with ``delta = Y − X``, and TDC's
    ``e = ‖δ_t′ − δ_t″‖₁ / ‖δ_t″‖₁``."""
    num = jnp.sum(jnp.abs(delta.astype(jnp.float32)))
    return num / jnp.maximum(jnp.sum(jnp.abs(reference.astype(jnp.float32))), jnp.finfo(jnp.float32).tiny)


def outlier_ratio(x: jax.Array) -> jax.Array:
    """PDR's ``ρ = max|x| / mean|x|`` of a linear's input ``x [..., in]`` (float32 scalar, §3.4)."""
    a = jnp.abs(x.astype(jnp.float32))
    return jnp.max(a) / jnp.maximum(jnp.mean(a), jnp.finfo(jnp.float32).tiny)


def predicted_routes(gamma: jax.Array, gamma_valid: jax.Array, alpha: jax.Array, beta: jax.Array,
                     tau_q: jax.Array) -> jax.Array:
    """DMPQ's routing rule (§3.2) for one block: ``Ê_l = α_l Γ_{t−1} + β_l`` (``alpha, beta [L]``), NVFP4 where
    ``Ê_l <= τ_q``, INT8 elsewhere and wherever Γ_{t−1} is undefined (``gamma_valid`` False: step 0, or after a
    skip under PDR). Returns int32 routes ``[L]``."""
    nvfp4 = jnp.logical_and(gamma_valid, alpha * gamma + beta <= tau_q)
    return jnp.where(nvfp4, NVFP4, INT8).astype(jnp.int32)


def purified_route(route: jax.Array, x: jax.Array, ratio: jax.Array) -> jax.Array:
    """PDR's outlier fallback: ``FLOAT`` where the input's ``ρ > ratio`` (strict), else ``route``."""
    return jnp.where(outlier_ratio(x) > ratio, FLOAT, route).astype(jnp.int32)


def tdc_skip(e: jax.Array, e_valid: jax.Array, e_acc: jax.Array, run: jax.Array, tau_c: jax.Array,
             max_skips: jax.Array) -> jax.Array:
    """The Temporal Delta Cache's skip test for one block (§3.3): ``e`` defined, ``E_acc + e < τ_c`` (strict, so
    ``τ_c = 0`` never skips) and fewer than ``max_skips`` consecutive skips so far (``run``)."""
    return jnp.logical_and(jnp.logical_and(e_valid, e_acc + e < tau_c), run < max_skips)
