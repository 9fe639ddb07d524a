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


def merge_frames(frames: jax.Array, plan: MergePlan) -> jax.Array:
    """``frames [B, T_v, H, W, C]`` -> ``[B, T', H, W, C]``: each kept frame the mean of its merge group."""
    if frames.ndim != 5 or frames.shape[1] != plan.frames:
        raise ValueError(f"merge_frames: frames must be [B, {plan.frames}, H, W, C] (the plan's clip length), got "
                         f"{tuple(frames.shape)}.")
    out = [frames[:, g[0]] if len(g) == 1 else jnp.mean(frames[:, list(g)], axis=1) for g in plan.groups]
    return jnp.stack(out, axis=1)


def renoise(merged_latents: jax.Array, noise: jax.Array, plan: MergePlan, sigma: float | jax.Array) -> jax.Array:
    """``z' = σ ε₀[:, kept_latents] + (1 - σ) z_merged``: ``merged_latents [B, T', h, w, L]``, ``noise`` the initial
    noise ``[B, T_l, h, w, L]`` -> ``[B, T', h, w, L]`` float32."""
    kept = np.asarray(plan.kept_latents)
    if noise.shape[1] != plan.latent_frames or merged_latents.shape[1] != len(kept):
        raise ValueError(f"renoise: noise must have the plan's {plan.latent_frames} latent frames and merged_latents "
                         f"its {len(kept)} kept ones; got {noise.shape[1]} and {merged_latents.shape[1]}.")
    sigma = jnp.asarray(sigma, jnp.float32)
    return sigma * noise[:, kept].astype(jnp.float32) + (1 - sigma) * merged_latents.astype(jnp.float32)


def compress_latents(frames: jax.Array, noise: jax.Array, sigma: float | jax.Array, plan: MergePlan, vae) -> jax.Array:
    """The compression module on one clip's decoded clean-latent estimate ``frames [B, T_v, H, W, C]`` in ``[-1, 1]``
    (``Dec(x̂₀)``, e.g. by the half-resolution compression VAE): merge by ``plan`` in pixel space, encode with
    ``vae.latents`` (posterior mode x scaling factor, as the pipeline scales latents) and re-noise with ``noise`` (the
    initial noise ``[B, T_l, h, w, L]``) at ``sigma``. Returns ``[B, T', h, w, L]``."""
    return renoise(vae.latents(merge_frames(frames, plan)), noise, plan, sigma)
