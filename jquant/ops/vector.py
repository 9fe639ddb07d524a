"""The XLA path of PCDVQ weights (``PolarVQFormat``): rotate the activations, look up, multiply.

``y = x W`` with ``W = s · S_in H_n Ŵ̄ H_mᵀ S_out`` (``jquant.formats.polar``) is computed as
spec §3.7 step 7 does at run time::

    y = fwht(fwht(x ⊙ S_in) @ (s · Ŵ̄), inverse) ⊙ S_out

so the Hadamard transforms cost ``O(n log n)`` per token on the activations instead of
``O(n m log n)`` on the weight, and ``Ŵ̄`` is decoded by one gather per codebook (lookup, then a
float matmul). Registered with ``jquant.ops.dispatch`` as the kernel ``"pcdvq-xla-rht"`` for
polar weights without an activation format; ``force_path("xla")`` gives the reference path
(dequantize the whole weight, then matmul). Plain ``CodebookFormat`` weights need no kernel:
the XLA path's dequantize is already a lookup.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.formats import PolarVQFormat, QArray
from jquant.numerics.hadamard import fwht
from jquant.ops.dispatch import Kernel, register_kernel
from jquant.ops.linear import dot_general

KERNEL_NAME = "pcdvq-xla-rht"


def polar_linear(x: jax.Array, w: QArray, b: jax.Array | None = None) -> jax.Array:
    """``x [..., in] @ W [in, out] (+ b)`` for a ``PolarVQFormat`` QArray, in ``x.dtype``."""
    fmt: PolarVQFormat = w.format
    n, m = w.shape
    if x.shape[-1] != n:
        raise ValueError(f"linear: activation feature size {x.shape[-1]} does not match the weight's input size {n} "
                         f"(weight shape {w.shape}, expected layout [in, out]).")
    if fmt.rht:
        x = fwht(x * jnp.asarray(fmt.signs(n, 0), x.dtype), axis=-1)
    y = dot_general(x, fmt.decode_rotated(w), (((x.ndim - 1,), (0,)), ((), ())))
    if fmt.rht:
        y = fwht(y, axis=-1, inverse=True) * jnp.asarray(fmt.signs(m, 1), y.dtype)
    return y if b is None else y + b.astype(y.dtype)


def _accepts(x, w, activation) -> bool:
    return isinstance(w.format, PolarVQFormat) and activation is None


register_kernel(Kernel(KERNEL_NAME, _accepts, lambda x, w, b, activation: polar_linear(x, w, b)))
