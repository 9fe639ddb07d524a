"""Pooling and resizing of channels-last images as PyTorch computes them (the FID Inception and LPIPS backbones).

Every image tensor is ``[B, H, W, C]``; a window of ``k x k`` positions moves by ``stride``; ``padding`` pads both
sides of both spatial axes; the output side is ``(n + 2 padding - k) // stride + 1`` (PyTorch's floor mode).

- ``max_pool``: the window's maximum; padded positions never win (``F.max_pool2d``);
- ``avg_pool``: the mean over the window's positions inside the image (``F.avg_pool2d(...,
  count_include_pad=False)``, TensorFlow's average pool, which pytorch-fid's FID blocks use);
- ``resize_bilinear``: ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` (no antialiasing): output
  row ``i`` reads source coordinate ``s = max((i + 1/2) H / size - 1/2, 0)`` as ``(1 - f) x[⌊s⌋] + f x[⌊s⌋ + 1]``,
  ``f = s - ⌊s⌋`` (the last row stands in for ``⌊s⌋ + 1`` past the edge); the same along columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _window(x: jax.Array, k: int, stride: int, padding: int, fn: str) -> tuple:
    if x.ndim != 4:
        raise ValueError(f"{fn}: x must be [B, H, W, C], got shape {tuple(x.shape)}.")
    if min(x.shape[1], x.shape[2]) + 2 * padding < k:
        raise ValueError(f"{fn}: a {x.shape[1]}x{x.shape[2]} input is smaller than the {k}x{k} window; use larger "
                         "images.")
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return (1, k, k, 1), (1, stride, stride, 1), pads


def max_pool(x: jax.Array, k: int, stride: int, padding: int = 0) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H', W', C]``: the maximum of each window (module docstring)."""
    dims, strides, pads = _window(x, k, stride, padding, "max_pool")
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pads)


def avg_pool(x: jax.Array, k: int, stride: int, padding: int = 0) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H', W', C]``: each window's mean over its positions inside the image."""
    dims, strides, pads = _window(x, k, stride, padding, "avg_pool")
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pads)
    count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add, dims, strides, pads)
    return total / count


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float64: row ``i`` holds the two weights of output position ``i`` (module docstring)."""
    source = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = source - low
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), high), frac)
    return m


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, size[0], size[1], C]`` by PyTorch's bilinear interpolation (module docstring)."""
    if x.ndim != 4:
        raise ValueError(f"resize_bilinear: x must be [B, H, W, C], got shape {tuple(x.shape)}.")
    rows = jnp.asarray(bilinear_matrix(x.shape[1], size[0]), x.dtype)
    cols = jnp.asarray(bilinear_matrix(x.shape[2], size[1]), x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
