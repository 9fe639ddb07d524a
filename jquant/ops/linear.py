"""Linear algebra entry points: `linear`, `dot_general`, `embedding_lookup`.

Weights follow the JAX convention ``[in, out]`` (``[E, in, out]`` for stacked
expert weights), the transpose of PyTorch's ``nn.Linear.weight``. A weight
may be a ``QArray``; an activation format quantizes the input dynamically
(per token along the last axis). See ``jquant.ops.dispatch`` for how the
implementation is chosen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.formats import Format, QArray, dequantize, fake_quantize
from jquant.ops.dispatch import select_kernel


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


def as_array(w: jax.Array | QArray, dtype: jnp.dtype) -> jax.Array:
    """``w`` itself, or its dequantized values in ``dtype`` if it is a ``QArray``."""
    return dequantize(w, dtype) if isinstance(w, QArray) else w


def quantize_activation(x: jax.Array, fmt: Format, scale: jax.Array | None = None) -> jax.Array:
    """Fake-quantize ``x [..., in]`` along its last axis with a straight-through gradient.

    Without ``scale`` the format computes its scales from ``x`` (dynamic); a
    per-tensor format then takes one scale per sequence of a ``[B, T, in]`` input
    (the leading axis), so a request's quantization does not depend on what it is
    batched with (MambaQuant spec §3.1: min/max per sample). With a calibrated
    scalar ``scale`` (static, per-tensor integer formats) the codes are
    ``round(x / scale)`` clipped to the format's range.
    """
    if scale is None:
        if getattr(fmt, "granularity", None) == "tensor" and x.ndim >= 3:
            return jax.vmap(lambda xb: fake_quantize(xb, fmt, axis=-1))(x)
        return fake_quantize(x, fmt, axis=-1)
    xs = jax.lax.stop_gradient(x)
    q = fmt.quantize_with_scales(xs, jnp.reshape(scale, (1,) * x.ndim), axis=-1)
    return jax.lax.stop_gradient(dequantize(q, x.dtype)) + (x - xs)


def linear(
    x: jax.Array,
    w: jax.Array | QArray,
    b: jax.Array | None = None,
    *,
    activation: Format | None = None,
    activation_scale: jax.Array | None = None,
) -> jax.Array:
    """``y = Q_a(x) @ w + b``.

    Args:
      x: activations ``[..., in]``.
      w: weight ``[in, out]``, an array or a ``QArray`` quantized along axis 0.
      b: optional bias ``[out]``.
      activation: optional activation format; ``x`` is quantized with it along
        its last axis (per token for per-channel formats), with a
        straight-through gradient.
      activation_scale: a calibrated (static) scalar scale for ``activation``.

    Returns:
      ``[..., out]`` in ``x.dtype``.
    """
    kernel = select_kernel(x, w, activation, activation_scale)
    if kernel is not None:
        return kernel.apply(x, w, b, activation)
    if activation is not None:
        x = quantize_activation(x, activation, activation_scale)
    w = as_array(w, x.dtype)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"linear: activation feature size {x.shape[-1]} does not match the weight's "
            f"input size {w.shape[0]} (weight shape {w.shape}, expected layout [in, out])."
        )
    y = dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    if b is not None:
        y = y + b.astype(y.dtype)
    return y


def embedding_lookup(table: jax.Array | QArray, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows of ``table [V, D]`` (an array or a ``QArray``) at integer ``ids [...]`` -> ``[..., D]`` in ``dtype``."""
    return jnp.take(as_array(table, dtype), ids, axis=0).astype(dtype)
