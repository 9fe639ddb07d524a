"""VGDFR's compression step on one clip (spec ``vgdfr.md`` §3.2(e, f)): merge the decoded clean-latent estimate's
frames in pixel space, re-encode, re-noise with the initial noise.

Merging (the "alignment" with the denoised counterpart: noisy latents are never averaged): each kept frame of a
``MergePlan`` becomes the mean of its group, the other frames are dropped::

    f'_k = (1 / |G_k|) Σ_{v ∈ G_k} f_v                                  f [B, T_v, H, W, C] -> f' [B, T', H, W, C]

Re-noising (§3.2(f)) at the noise level ``σ_K`` where sampling resumes, with the *original* noise ``ε₀`` of step 0
at the kept latent indices (not fresh noise)::

    z' = σ_K ε₀[:, kept_latents] + (1 - σ_K) z_merged,    z_merged = scale · mode(Enc(f'))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jquant.frame_rate.schedule import MergePlan


def merge_weights(plan: MergePlan) -> np.ndarray:
    """``A [T', T_v]`` float32: row ``k`` averages merge group ``k`` (a one-hot row for an unmerged frame)."""
    a = np.zeros((len(plan.groups), plan.frames), np.float32)
    for k, group in enumerate(plan.groups):
        a[k, list(group)] = 1.0 / len(group)
    return a


def merge_frames(frames: jax.Array, plan: MergePlan) -> jax.Array:
    """``frames [B, T_v, H, W, C]`` -> ``[B, T', H, W, C]``: each kept frame the mean of its merge group."""
    _check_frames(frames, plan, "merge_frames")
    return _apply(frames, jnp.asarray(merge_weights(plan)))


def _check_frames(frames: jax.Array, plan: MergePlan, fn: str) -> None:
    if frames.ndim != 5 or frames.shape[1] != plan.frames:
        raise ValueError(f"{fn}: frames must be [B, {plan.frames}, H, W, C] (the plan's clip length), got "
                         f"{tuple(frames.shape)}.")


def _apply(frames: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.einsum("kt,bthwc->bkhwc", weights, frames.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def renoise(merged_latents: jax.Array, noise: jax.Array, plan: MergePlan, sigma: float | jax.Array) -> jax.Array:
    """``z' = σ ε₀[:, kept_latents] + (1 - σ) z_merged``: ``merged_latents [B, T', h, w, L]``, ``noise`` the initial
    noise ``[B, T_l, h, w, L]`` -> ``[B, T', h, w, L]`` float32."""
    kept = np.asarray(plan.kept_latents)
    if noise.shape[1] != plan.latent_frames or merged_latents.shape[1] != len(kept):
        raise ValueError(f"renoise: noise must have the plan's {plan.latent_frames} latent frames and merged_latents "
                         f"its {len(kept)} kept ones; got {noise.shape[1]} and {merged_latents.shape[1]}.")
    return _renoise(merged_latents, noise[:, kept], sigma)


def _renoise(merged_latents: jax.Array, kept_noise: jax.Array, sigma) -> jax.Array:
    sigma = jnp.asarray(sigma, jnp.float32)
    return sigma * kept_noise.astype(jnp.float32) + (1 - sigma) * merged_latents.astype(jnp.float32)


def compress_latents(frames: jax.Array, noise: jax.Array, sigma: float | jax.Array, plan: MergePlan, vae) -> jax.Array:
    """The compression module on one clip's decoded clean-latent estimate ``frames [B, T_v, H, W, C]`` in ``[-1, 1]``
    (``Dec(x̂₀)``, e.g. by the half-resolution compression VAE): merge by ``plan`` in pixel space, encode with
    ``vae.latents`` (posterior mode x scaling factor, as the pipeline scales latents) and re-noise with ``noise`` (the
    initial noise ``[B, T_l, h, w, L]``) at ``sigma``. Returns ``[B, T', h, w, L]``."""
    _check_frames(frames, plan, "compress_latents")
    return compress_with(frames, noise, sigma, jnp.asarray(merge_weights(plan)),
                         jnp.asarray(plan.kept_latents, jnp.int32), vae)


def compress_with(frames: jax.Array, noise: jax.Array, sigma, weights: jax.Array, kept_latents: jax.Array,
                  vae) -> jax.Array:
    """``compress_latents`` with the plan as arrays (``merge_weights`` ``[T', T_v]`` and the kept latent indices
    ``[T']``), so one compiled program serves every plan of a length ``T'``."""
    return _renoise(vae.latents(_apply(frames, weights)), jnp.take(noise, kept_latents, axis=1), sigma)
