"""Linear algebra entry points: `linear`, `dot_general`, `embedding_lookup`, and RMS's channel split
(`split_leading_channel`, `add_side_branch`).

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


ActivationFormat = Format | tuple[Format | None, ...]
"""One activation format, or one per group (None: that group's inputs stay in floating point)."""


def quantize_activation(x: jax.Array, fmt: ActivationFormat, scale: jax.Array | None = None,
                        groups: jax.Array | None = None) -> jax.Array:
    """Fake-quantize ``x [..., in]`` along its last axis, per group where the site is grouped.

    ``fmt`` may be a tuple of per-group formats and ``scale`` a per-group table ``[G]`` of static
    scales; then ``groups`` (int ids broadcastable to ``x.shape[:-1]``: a modality per token, or a
    timestep bucket per sample) picks, token by token, the format and scale applied. Every group is
    computed and selected with ``where``, so the choice is data, not a recompilation.
    """
    table = scale is not None and jnp.ndim(scale) == 1
    if not isinstance(fmt, tuple) and not table:
        return _quantize_one(x, fmt, scale)
    num_groups = len(fmt) if isinstance(fmt, tuple) else scale.shape[0]
    if groups is None:
        raise ValueError(f"this site quantizes its inputs per group ({num_groups} groups); its call must pass "
                         "groups= (int ids per token, or per sample for a timestep bucket).")
    ids = jnp.broadcast_to(groups, x.shape[:-1])[..., None]
    out = x
    for g in range(num_groups):
        f = fmt[g] if isinstance(fmt, tuple) else fmt
        if f is not None:
            out = jnp.where(ids == g, _quantize_one(x, f, scale[g] if table else scale), out)
    return out


def _quantize_one(x: jax.Array, fmt: Format, scale: jax.Array | None = None) -> jax.Array:
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
    activation: ActivationFormat | None = None,
    activation_scale: jax.Array | None = None,
    groups: jax.Array | None = None,
) -> jax.Array:
    """``y = Q_a(x) @ w + b``.

    Args:
      x: activations ``[..., in]``.
      w: weight ``[in, out]``, an array or a ``QArray`` quantized along axis 0.
      b: optional bias ``[out]``.
      activation: optional activation format; ``x`` is quantized with it along
        its last axis (per token for per-channel formats), with a
        straight-through gradient.
      activation_scale: a calibrated (static) scalar scale for ``activation``, or a table ``[G]`` of them.
      groups: int group ids broadcastable to ``x.shape[:-1]``; needed when ``activation`` is a tuple of
        per-group formats or ``activation_scale`` a per-group table (``quantize_activation``).

    Returns:
      ``[..., out]`` in ``x.dtype``.
    """
    grouped = isinstance(activation, tuple) or (activation_scale is not None and jnp.ndim(activation_scale) == 1)
    kernel = None if grouped else select_kernel(x, w, activation, activation_scale)
    if kernel is not None:
        return kernel.apply(x, w, b, activation)
    if activation is not None:
        x = quantize_activation(x, activation, activation_scale, groups)
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


def split_leading_channel(x: jax.Array, active: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MQuant's rotation magnitude suppression (RMS, §3.4): separate input channel 0 from the quantized GEMM.

    After an online deterministic Hadamard, ``x' = x H`` has ``x'[:, 0] = √d · mean_j x[:, j]`` (Eq. 7), which can
    dominate a per-tensor activation scale. ``x' [..., in]`` -> ``(main [..., in], lead [..., 1])``: ``main`` is
    ``x'`` with channel 0 zeroed and ``lead = x'[..., :1]`` when ``active`` is 1 (``x' W = main W + lead W[0]``
    when ``W[0] = 0``); with ``active`` 0, ``main = x'`` and ``lead = 0``. ``active``: a 0/1 scalar (data, so
    which layers split is a checkpoint value, not a static attribute).
    """
    lead = x[..., :1] * jnp.asarray(active, x.dtype)
    return x.at[..., 0].set(x[..., 0] - lead[..., 0]), lead


def add_side_branch(y: jax.Array, lead: jax.Array, side: jax.Array) -> jax.Array:
    """``y [..., out] + lead [..., 1] · side [out]``: RMS's float rank-1 side branch (``y = X'_{:,1:} W'_{1:} +
    X'_{:,0} W'_0``, spec §3.4), computed in ``y``'s dtype."""
    return y + lead.astype(y.dtype) * side.astype(y.dtype)


def embedding_lookup(table: jax.Array | QArray, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows of ``table [V, D]`` (an array or a ``QArray``) at integer ``ids [...]`` -> ``[..., D]`` in ``dtype``."""
    return jnp.take(as_array(table, dtype), ids, axis=0).astype(dtype)
