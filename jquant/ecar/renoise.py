"""Token maps between ECAR's stages: area down-sampling (training targets) and Pyramid Flow's up-sample + re-noise
step (spec ecar.md §3.3; ``pyramid_dit_for_video_gen_pipeline.py``: ``sample_block_noise`` and the stage fix).

Maps are channels last, ``[B, r, r, C]``. With ``s0 = 1 − e`` the signal coefficient at the un-corrected start of the
next stage::

    Y_{s+1}^start = α Up₂(Y_s^end) + β n′,   n′ per channel and 2x2 block ~ N(0, (1 + γ) I₄ − γ 1₄1₄ᵀ)

(``α``, ``β``: ``stages.renoise_alpha`` / ``renoise_beta``). For γ = 1/3 the block noise sums to zero in every
block, so it leaves the block means ``α Y_s^end`` of the nearest up-sampling unchanged and breaks its blockiness.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.ecar.stages import GAMMA, renoise_alpha, renoise_beta


def area_down(x: jax.Array, size: int) -> jax.Array:
    """Average-pool ``x [B, h, h, C]`` to ``[B, size, size, C]`` (``size`` divides ``h``): ``M_s = AreaDown(x, r_s)``."""
    b, h, w, c = x.shape
    f = h // size
    return x.reshape(b, size, f, size, f, c).mean(axis=(2, 4))


def upsample2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour ×2: ``[B, r, r, C] -> [B, 2r, 2r, C]``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def block_covariance(gamma: float = GAMMA) -> jax.Array:
    """``(1 + γ) I₄ − γ 1₄1₄ᵀ`` (float32 ``[4, 4]``): the covariance of one 2x2 block of ``n′`` (row-major)."""
    return (1.0 + gamma) * jnp.eye(4, dtype=jnp.float32) - gamma * jnp.ones((4, 4), jnp.float32)


def block_noise(key: jax.Array, shape: tuple[int, int, int, int], gamma: float = GAMMA) -> jax.Array:
    """``n′ [B, H, W, C]`` (``H``, ``W`` even): per channel and 2x2 block a draw of ``N(0, block_covariance)``, the 4
    entries laid out row-major in the block (Pyramid Flow's ``(p q)`` order). The covariance ``(1 + γ) I − γ J``
    (``J = 1₄1₄ᵀ``) is singular at γ = 1/3, so the draw is ``sqrt(1 + γ) (z − z̄ 1) + sqrt(1 − 3γ) z̄ 1`` from
    ``z ~ N(0, I₄)`` (its covariance is ``(1 + γ)(I − J/4) + (1 − 3γ) J/4``), not a Cholesky factor."""
    if not 0 <= gamma <= 1.0 / 3.0:
        raise ValueError(f"block_noise: gamma={gamma!r} must be in [0, 1/3] (the covariance is not positive "
                         "semi-definite above 1/3).")
    b, h, w, c = shape
    z = jax.random.normal(key, (b, h // 2, w // 2, c, 4), jnp.float32)
    mean = jnp.mean(z, axis=-1, keepdims=True)
    n = jnp.sqrt(1.0 + gamma) * (z - mean) + jnp.sqrt(1.0 - 3.0 * gamma) * mean
    return n.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, c)


def renoise(y_end: jax.Array, noise: jax.Array, s0: float, gamma: float = GAMMA) -> jax.Array:
    """``α Up₂(y_end) + β noise`` for ``y_end [B, r, r, C]`` and block noise ``noise [B, 2r, 2r, C]``."""
    return renoise_alpha(s0, gamma) * upsample2(y_end) + renoise_beta(s0, gamma) * noise
