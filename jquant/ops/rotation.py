"""Online rotations applied to activations at run time (QuaRot / OSTQuant "online Hadamard").

The offline half of each rotation is folded into the weights by ``jquant.transforms``;
this module is the run-time half, called by the model layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.numerics.hadamard import fwht


def online_hadamard(x: jax.Array, size: int | None = None) -> jax.Array:
    """``x [..., n] -> [x, 0] H_size / √size`` along the last axis (row-vector convention).

    ``size`` (default ``n``) is the Hadamard order; a larger ``size`` zero-pads ``x`` first
    (the padding documented in ``jquant.transforms.rotate``), so the consuming linear must
    have ``size`` input rows. Computed by :func:`jquant.transforms.fwht` in at least float32,
    returned in ``x.dtype``.
    """
    n = x.shape[-1]
    size = n if size is None else size
    if size < n:
        raise ValueError(f"online_hadamard: size={size} is smaller than the feature size {n}.")
    if size > n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - n)])
    return fwht(x, axis=-1)


def block_hadamard(x: jax.Array, block: int) -> jax.Array:
    """``x [..., n] -> x (I_{n/B} ⊗ H_B / √B)``: an orthonormal Hadamard of order ``B = block`` on each of the
    ``n / B`` consecutive channel blocks (6Bit-Diffusion's online "block Hadamard-128", spec §3.1); ``n`` must
    be a multiple of ``block``. Computed by :func:`jquant.transforms.fwht` in at least float32, returned in
    ``x.dtype``.
    """
    n = x.shape[-1]
    if block < 1 or n % block:
        raise ValueError(f"block_hadamard: the feature size {n} is not a multiple of block={block}.")
    blocks = x.reshape(*x.shape[:-1], n // block, block)
    return fwht(blocks, axis=-1).reshape(x.shape)
