"""Model size and latency measurements.

Sizes count *every array leaf* of a pytree: weights, but also quantization
metadata (scales, zero points, codebooks) and any buffers. Storage is counted as
stored: a packed ``uint8`` holding two int4 values counts 1 byte; a native
sub-byte dtype (``jnp.int4``, ``float4_e2m1fn``) counts its bit width, i.e.
``ceil(size * bits / 8)`` bytes per leaf, not numpy's 1-byte itemsize.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def _array_leaves(tree: Any) -> list[Any]:
    """Array leaves of a pytree; for an ``nnx.Module``, of its state minus RNG state."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Not(nnx.RngState))
    return [leaf for leaf in jax.tree.leaves(tree) if isinstance(leaf, _ARRAY_TYPES)]


def dtype_bits(dtype: Any) -> int:
    """Storage bits per element: 4 for int4/float4, 16 for bfloat16, 8 for bool."""
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return int(jnp.iinfo(dtype).bits)
    if jnp.issubdtype(dtype, jnp.floating):
        return int(jnp.finfo(dtype).bits)
    return dtype.itemsize * 8


def _leaf_bytes(leaf: Any) -> int:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return int(jax.random.key_data(leaf).nbytes)
    return math.ceil(math.prod(leaf.shape) * dtype_bits(leaf.dtype) / 8)


def param_bytes(tree: Any) -> int:
    """Bytes of every array leaf of ``tree`` (pytree, ``nnx.State`` or ``nnx.Module``).

    Accepts abstract leaves (``jax.ShapeDtypeStruct``, e.g. from ``nnx.eval_shape``).
    Non-array leaves (Python scalars, None) are ignored. See the module docstring
    for how packed and sub-byte storage is counted.
    """
    return sum(_leaf_bytes(leaf) for leaf in _array_leaves(tree))


def param_count(tree: Any) -> int:
    """Number of elements over every array leaf of ``tree`` (same leaves as :func:`param_bytes`)."""
    return sum(math.prod(leaf.shape) for leaf in _array_leaves(tree))


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock latency in milliseconds over ``iters`` timed calls."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    iters: int


def measure_latency(fn: Callable[..., Any], *args: Any, warmup: int = 2, iters: int = 10
                    ) -> LatencyResult:
    """Time ``fn(*args)`` until its outputs are ready (``jax.block_until_ready``).

    ``warmup`` untimed calls come first (compilation, caches); then ``iters``
    timed calls.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}.")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}.")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    t = np.array(times)
    return LatencyResult(median_ms=float(np.median(t)), p90_ms=float(np.percentile(t, 90)),
                         mean_ms=float(t.mean()), min_ms=float(t.min()), iters=iters)
