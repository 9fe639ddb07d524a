"""The format-independent functions: quantize, dequantize, fake_quantize, bit accounting.

All are pure and jit-able (``fmt`` and ``axis`` are static). ``quantize`` and
``dequantize`` jit themselves, so eager calls compile once per format, shape and axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

from jquant.formats._blocks import normalize_axis
from jquant.formats.qarray import Format, QArray


def check_finite(x: jax.Array, what: str = "x") -> jax.Array:
    """Raises ``ValueError`` if a concrete ``x`` holds NaN or Inf; returns ``x``.

    Under ``jit`` (a tracer) nothing can be checked and ``x`` is returned unchanged;
    non-finite values then propagate into scales and codes (the result is undefined
    for those groups). ``quantize`` calls this on every concrete input.
    """
    if isinstance(x, jax.core.Tracer):
        return x
    bad = int(_count_nonfinite(x))
    if bad:
        raise ValueError(
            f"quantize: {what} of shape {tuple(x.shape)} has {bad} non-finite values (NaN or Inf); "
            f"scales computed from them would be NaN. Fix the producer of {what}, or replace them "
            f"(e.g. jnp.nan_to_num) before quantizing.")
    return x


@jax.jit
def _count_nonfinite(x):
    return jnp.sum(~jnp.isfinite(x))


def _resolve(fmt) -> Format:
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str):
        from jquant.formats.registry import get_format
        return get_format(fmt)
    raise TypeError(f"quantize: fmt must be a jquant Format or a registered name, got {fmt!r}.")


@functools.partial(jax.jit, static_argnums=(2, 3))
def _encode(x, key, fmt, axis):
    """The encode and the number of non-finite inputs, in one compiled call."""
    return fmt.encode(x, axis, key), _count_nonfinite(x)


@functools.partial(jax.jit, static_argnums=(1,))
def _decode(q, dtype):
    return q.format.decode(q).astype(dtype)


@jax.jit
def _codes_of(q):
    return q.format.codes_of(q)


def quantize(x: jax.Array, fmt: Format | str, *, axis: int, key: jax.Array | None = None) -> QArray:
    """Quantizes ``x`` with format ``fmt`` along ``axis`` and returns a validated ``QArray``.

    ``axis`` is the contraction axis (weights ``[in, out]``: 0; experts ``[E, in, out]``:
    1; activations ``[..., in]``: -1): groups/blocks run along it and sub-byte codes are
    packed along it. ``key`` is only for ``rounding="stochastic"`` formats.
    Raises on a non-floating ``x``, a bad axis, a shape the format cannot hold, and on
    NaN/Inf in a concrete (non-traced) ``x``. Works under ``jit``/``grad``; under
    ``vmap`` the static ``shape`` would describe one slice, so quantize the stacked
    array along its contraction axis instead (e.g. experts ``[E, in, out]`` with axis=1).
    """
    fmt = _resolve(fmt)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize: x must be a floating array, got dtype {x.dtype}.")
    axis = normalize_axis(axis, x.ndim, f"quantize({fmt.name})")
    fmt.check_shape(tuple(x.shape), axis)
    q, bad = _encode(x, key, fmt, axis)
    if not isinstance(bad, jax.core.Tracer) and int(bad):  # concrete only outside a trace
        check_finite(x)  # raises with the message
    return dataclasses.replace(q, dtype=jnp.dtype(x.dtype).name).validate()


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """The reference decode of ``q`` in ``dtype`` (default: the original dtype ``q.dtype``).

    Values are computed in float32 and cast once at the end.
    """
    if not isinstance(q, QArray):
        raise TypeError(f"dequantize: expected a QArray, got {type(q).__name__}.")
    return _decode(q, jnp.dtype(dtype or q.dtype))


def unpack_codes(q: QArray) -> jax.Array:
    """The stored codes unpacked to the logical shape (see each format's ``codes_of``)."""
    return _codes_of(q)


def bits_per_element(q: QArray) -> float:
    """Stored bits per logical element: 8 * (bytes of all array children) / size."""
    return q.bits_per_element


def fake_quantize(x: jax.Array, fmt: Format | str, *, axis: int,
                  straight_through: bool | Literal["identity", "clipped"] = True,
                  key: jax.Array | None = None) -> jax.Array:
    """``dequantize(quantize(x))`` in ``x``'s dtype, with a gradient estimator.

    ``straight_through``: ``True`` / ``"identity"``: d out / d x = 1 (STE);
    an integer format with ``range_gradient=True`` then also passes gradients through its
    per-group range (``IntFormat.range_surrogate``, the training quantizer of OSTQuant);
    ``"clipped"``: 1 where x lies inside the representable interval of its group
    ``[lo, hi]`` (the format's smallest and largest dequantized values), else 0;
    ``False``: no estimator (the zero gradient of a step function).
    The forward value is exactly the dequantized value in every mode.
    """
    fmt = _resolve(fmt)
    x = jnp.asarray(x)
    q = quantize(jax.lax.stop_gradient(x), fmt, axis=axis, key=key)
    xq = jax.lax.stop_gradient(dequantize(q, x.dtype))
    if straight_through is False:
        return xq
    if straight_through is True or straight_through == "identity":
        if getattr(fmt, "range_gradient", False):
            g = fmt.range_surrogate(x, normalize_axis(axis, x.ndim, "fake_quantize")).astype(x.dtype)
            return xq + (g - jax.lax.stop_gradient(g))
        return xq + (x - jax.lax.stop_gradient(x))
    if straight_through == "clipped":
        lo, hi = fmt.value_range(q)
        mask = jax.lax.stop_gradient(((x >= lo) & (x <= hi)).astype(x.dtype))
        return xq + (x - jax.lax.stop_gradient(x)) * mask
    raise ValueError(
        f"fake_quantize: straight_through={straight_through!r} must be True, False, "
        f"'identity' or 'clipped'.")
