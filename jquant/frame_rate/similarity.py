"""Similarity of neighbouring video frames, the signal both dynamic-frame-rate methods schedule on.

VGDFR (spec ``vgdfr.md`` §3.2(c)) reads ``s_d[i] = SSIM(f_i, f_{i+d})`` for ``d`` in {1, 2, 3}; DLFR-VAE (spec
``dlfr_vae.md`` §3.1) the content complexity of a chunk, ``C(S) = 1 / (n - 1) Σ_j (1 - SSIM(x_j, x_{j+1}))``.
SSIM is ``jquant.eval.image.ssim``: single-scale, 11-tap Gaussian window of sigma 1.5, 'valid' filtering,
averaged over pixels and channels, which is ``pytorch_msssim.ssim``'s default (the official VGDFR code's); a
padded SSIM gives slightly different scores and can flip merge decisions near a threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.eval.image import ssim


def neighbour_ssim(frames: jax.Array, distance: int = 1, *, data_range: float = 1.0) -> jax.Array:
    """``s_d [B, F - d]``: ``s_d[b, i] = SSIM(frames[b, i], frames[b, i + d])`` of clips ``frames [B, F, H, W, C]``
    (``data_range`` the span of the pixel values: 1 for [0, 1], 2 for [-1, 1]); frames must be at least 11 x 11."""
    frames = jnp.asarray(frames)
    if frames.ndim != 5:
        raise ValueError(f"neighbour_ssim: frames must be [batch, frames, height, width, channels], got shape "
                         f"{frames.shape}.")
    if isinstance(distance, bool) or not isinstance(distance, int) or not 1 <= distance < frames.shape[1]:
        raise ValueError(f"neighbour_ssim: distance must be an integer in [1, frames - 1 = {frames.shape[1] - 1}], "
                         f"got {distance!r}.")
    b, f = frames.shape[:2]
    first, second = frames[:, :-distance], frames[:, distance:]
    flat = lambda x: x.reshape(b * (f - distance), *frames.shape[2:])  # noqa: E731
    return ssim(flat(first), flat(second), data_range=data_range, reduction="none").reshape(b, f - distance)


def content_complexity(frames: jax.Array, *, data_range: float = 1.0) -> jax.Array:
    """``C [B]`` of clips (or chunks) ``frames [B, n, H, W, C]``, n >= 2: the mean of ``1 - SSIM`` over the ``n - 1``
    neighbouring pairs (DLFR-VAE §3.1): 0 for a still chunk, larger the more changes from frame to frame."""
    return jnp.mean(1.0 - neighbour_ssim(frames, 1, data_range=data_range), axis=1)
