"""Shape helpers shared by the formats: axes, scale groups, padding.

Every format groups elements along one axis (the contraction axis) and keeps
its stored arrays at the logical rank ("generic broadcast" shapes): a child
array has the logical shape except that reduced axes have size 1 and the
grouped axis has ``n // group`` entries.  These helpers build and undo that.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

GRANULARITIES = ("tensor", "channel", "token", "group")
SCALE_DTYPES = ("float16", "bfloat16", "float32")


def normalize_axis(axis: int, ndim: int, what: str = "quantize") -> int:
    """Returns ``axis`` as a non-negative int, or raises naming the rank."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{what}: axis must be an int, got {axis!r}.")
    if ndim == 0:
        raise ValueError(
            f"{what}: cannot quantize a scalar (rank 0); reshape it to rank >= 1 first."
        )
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{what}: axis={axis} is out of range for an array of rank {ndim}; "
            f"use an axis in [{-ndim}, {ndim - 1}] (weights [in, out] use axis=0, "
            f"stacked experts [E, in, out] axis=1, activations [..., in] axis=-1)."
        )
    return int(axis) % ndim


def resolve_granularity(owner: str, granularity: str | None, group_size: int | None) -> str:
    """Checks a (granularity, group_size) pair and returns the canonical granularity.

    ``None`` means "group" when a group size is given, else "channel". "token" is an
    alias of "channel": both reduce over the quantization axis only (one scale per
    output channel of a weight, one per token of an activation).
    """
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
            raise ValueError(f"{owner}: group_size must be a positive int, got {group_size!r}.")
    if granularity is None:
        return "group" if group_size is not None else "channel"
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"{owner}: granularity={granularity!r} is not one of {GRANULARITIES}."
        )
    if granularity == "group" and group_size is None:
        raise ValueError(f"{owner}: granularity='group' needs a group_size (e.g. group_size=128).")
    if granularity != "group" and group_size is not None:
        raise ValueError(
            f"{owner}: group_size={group_size} only applies to granularity='group', "
            f"got granularity={granularity!r}; drop one of the two."
        )
    return "channel" if granularity == "token" else granularity


def check_scale_dtype(owner: str, scale_dtype: str) -> None:
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"{owner}: scale_dtype={scale_dtype!r} is not one of {SCALE_DTYPES}.")


def check_group_divides(name: str, shape: tuple[int, ...], axis: int, group: int) -> None:
    """Raises when ``group`` does not divide ``shape[axis]``, suggesting a fix."""
    n = shape[axis]
    if n % group:
        fits = [g for g in (256, 128, 64, 32, 16, 8, 4, 2) if g <= n and n % g == 0]
        hint = f"e.g. {fits[0]}" if fits else "a divisor of the length"
        raise ValueError(
            f"{name}: group_size={group} does not divide the length {n} of axis {axis} "
            f"(array shape {shape}). Fix: use a group size that divides {n} ({hint}), "
            f"or pad axis {axis} to a multiple of {group}."
        )


def scale_shape(shape: tuple[int, ...], axis: int, granularity: str, group: int | None) -> tuple[int, ...]:
    """Generic-broadcast shape of one scale per group."""
    if granularity == "tensor":
        return (1,) * len(shape)
    out = list(shape)
    out[axis] = 1 if granularity == "channel" else shape[axis] // group
    return tuple(out)


def with_axis(shape: tuple[int, ...], axis: int, n: int) -> tuple[int, ...]:
    out = list(shape)
    out[axis] = n
    return tuple(out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _extreme(x: jax.Array, axis: int, largest: bool) -> jax.Array:
    return jnp.max(x, axis=axis) if largest else jnp.min(x, axis=axis)


@_extreme.defjvp
def _extreme_jvp(axis: int, largest: bool, primals, tangents):
    (x,), (t,) = primals, tangents
    first = (jnp.argmax if largest else jnp.argmin)(x, axis=axis, keepdims=True)
    return _extreme(x, axis, largest), jnp.squeeze(jnp.take_along_axis(t, first, axis=axis), axis)


def max_first(x: jax.Array, axis: int) -> jax.Array:
    """``jnp.max(x, axis)`` whose derivative is that of the first element attaining the maximum.

    ``jnp.max``'s derivative spreads the cotangent over ``x == max`` divided by the number of such elements; where
    XLA recomputes ``x`` for the backward pass with other rounding (seen on CPU at ``xla_backend_optimization_level
    =0``, learning WKVQuant's key smoothing), no element equals the maximum and the gradient is 0 / 0 = NaN. Here the
    cotangent goes to ``argmax`` (the same as ``jnp.max``'s wherever the maximum is unique), never NaN.
    """
    return _extreme(x, axis, True)


def min_first(x: jax.Array, axis: int) -> jax.Array:
    """``jnp.min(x, axis)`` with the derivative of the first element attaining the minimum (see ``max_first``)."""
    return _extreme(x, axis, False)


def group_reduce(x: jax.Array, axis: int, granularity: str, group: int | None,
                 op: Callable = jnp.max) -> jax.Array:
    """Reduces ``x`` to ``scale_shape`` with ``op`` (``jnp.max``, ``jnp.min``, ``jnp.sum``)."""
    if granularity == "tensor":
        return op(x, axis=None, keepdims=True)
    if granularity == "channel":
        return op(x, axis=axis, keepdims=True)
    shape = x.shape
    xb = x.reshape(shape[:axis] + (shape[axis] // group, group) + shape[axis + 1:])
    return op(xb, axis=axis + 1)


def expand(s: jax.Array, axis: int, n: int) -> jax.Array:
    """Broadcast-ready version of a per-group array along ``axis`` of length ``n``.

    A size-1 or full-length axis broadcasts as is; ``n // k`` groups are repeated.
    """
    k = s.shape[axis]
    if k in (1, n):
        return s
    e = jnp.expand_dims(s, axis + 1)
    e = jnp.broadcast_to(e, s.shape[:axis] + (k, n // k) + s.shape[axis + 1:])
    return e.reshape(s.shape[:axis] + (n,) + s.shape[axis + 1:])


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pads ``x`` along ``axis`` to a multiple of ``multiple``."""
    n = x.shape[axis]
    extra = -n % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def crop_axis(x: jax.Array, axis: int, n: int) -> jax.Array:
    """First ``n`` entries along ``axis`` (a size-1 axis is left to broadcast)."""
    if x.shape[axis] in (1, n):
        return x
    return jax.lax.slice_in_dim(x, 0, n, axis=axis)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def store_scale(s: jax.Array, scale_dtype: str) -> jax.Array:
    """Rounds float32 scales to the stored dtype, saturating at its largest finite value."""
    dt = jnp.dtype(scale_dtype)
    return jnp.minimum(s, float(jnp.finfo(dt).max)).astype(dt)


def safe_divisor(s32: jax.Array) -> jax.Array:
    """Replaces zero scales by 1 so that all-zero groups encode to code 0 without NaN."""
    return jnp.where(s32 > 0, s32, jnp.ones_like(s32))


def num_elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
