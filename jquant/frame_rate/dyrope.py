"""Choosing VGDFR's DyRoPE set G for a model (spec ``vgdfr.md`` §3.2(g), §7.1): the official G is HunyuanVideo's and
comes from a per-layer preference analysis its code does not contain. This reproduces the analysis on one clip::

    x = σ ε + (1 - σ) x₀                       [B, T_l, h, w, L]   (a clean latent x₀, e.g. a fixed-rate sample)
    v_ref = v(x)[:, kept]                                            (the uncompressed model, full-length RoPE)
    e(S) = ‖v(x[:, kept]; blocks S global) - v_ref‖ / ‖v_ref‖       (the shortened latent, DyRoPE with set S)
    G = {b : e({b}) < e(∅)}                                          (blocks whose true positions lower the error)

The shortened latent takes the kept frames themselves (no pixel-space merge), so the error isolates the positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jquant.frame_rate.schedule import MergePlan
from jquant.module_jit import module_jit


@functools.partial(module_jit, static_argnames=("blocks",))
def _velocity(transformer, x, sigmas, cond, positions, blocks):
    if positions is None:
        return transformer.flow_velocity(x, sigmas, *cond)
    return transformer.flow_velocity(x, sigmas, *cond, global_frame_positions=positions, global_blocks=blocks)


def global_block_errors(transformer, clean: jax.Array, noise: jax.Array, sigma: float, plan: MergePlan,
                        cond: tuple) -> tuple[float, np.ndarray]:
    """``(e(∅), [e({b}) for every block b])`` (module docstring) on ``clean`` and ``noise`` ``[B, T_l, h, w, L]`` at
    noise level ``sigma`` with the transformer's text arguments ``cond``; blocks numbered double first, then single."""
    if clean.shape != noise.shape or clean.shape[1] != plan.latent_frames:
        raise ValueError(f"global_block_errors: clean and noise must both be [B, {plan.latent_frames}, h, w, L] (the "
                         f"plan's latent frames), got {clean.shape} and {noise.shape}.")
    kept = np.asarray(plan.kept_latents)
    x = sigma * noise + (1 - sigma) * clean
    sigmas = jnp.full((x.shape[0],), sigma, jnp.float32)
    ref = np.asarray(_velocity(transformer, x, sigmas, cond, None, ()))[:, kept]
    positions = jnp.asarray(kept, jnp.float32)

    def error(blocks: tuple[int, ...]) -> float:
        v = np.asarray(_velocity(transformer, x[:, kept], sigmas, cond, positions, blocks))
        return float(np.linalg.norm(v - ref) / np.linalg.norm(ref))

    n = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    return error(()), np.array([error((b,)) for b in range(n)])


def choose_global_blocks(transformer, clean: jax.Array, noise: jax.Array, sigma: float, plan: MergePlan,
                         cond: tuple) -> tuple[int, ...]:
    """G = the blocks whose global positions alone lower the shortened latent's velocity error (module docstring)."""
    local, per_block = global_block_errors(transformer, clean, noise, sigma, plan, cond)
    return tuple(int(b) for b in np.flatnonzero(per_block < local))
