"""Linear algebra entry points: `linear`, `dot_general`, `embedding_lookup`.

Weights follow the JAX convention ``[in, out]`` (``[E, in, out]`` for stacked
expert weights), the transpose of PyTorch's ``nn.Linear.weight``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_general(
    x: jax.Array,
    w: jax.Array,
    dimension_numbers: jax.lax.DotDimensionNumbers,
    *,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """``jax.lax.dot_general`` with both operands cast to the activation dtype.

    The product accumulates in ``out_dtype`` (default: ``x.dtype``), so a bf16
    model computes in bf16 with whatever accumulation XLA picks on the backend
    and a float64 model stays in float64 end to end.
    """
    dtype = out_dtype or x.dtype
    return jax.lax.dot_general(
        x.astype(dtype),
        w.astype(dtype),
        dimension_numbers,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=dtype,
    )


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """``y = x @ w + b``.

    Args:
      x: activations ``[..., in]``.
      w: weight ``[in, out]``.
      b: optional bias ``[out]``.

    Returns:
      ``[..., out]`` in ``x.dtype``.
    """
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"linear: activation feature size {x.shape[-1]} does not match the weight's "
            f"input size {w.shape[0]} (weight shape {w.shape}, expected layout [in, out])."
        )
    y = dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    if b is not None:
        y = y + b.astype(y.dtype)
    return y


def embedding_lookup(table: jax.Array, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows of ``table [V, D]`` at integer ``ids [...]`` -> ``[..., D]`` in ``dtype``."""
    return jnp.take(table, ids, axis=0).astype(dtype)
