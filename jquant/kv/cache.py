"""A key/value cache as a pytree, dense or quantized.

The cache is a plain value threaded through the model call
(``logits, cache = model(tokens, cache=cache)``), so decoding is a pure
function that ``jit`` compiles once per (batch, chunk length).

A quantized cache stores each layer's keys and values as ``QArray`` s quantized
along the head dimension (one scale, and zero point for asymmetric formats, per
token and head: ``int4-asym`` is the per-head asymmetric KV4 of QuaRot/OSTQuant).
New entries are quantized once when written; attention reads the dequantized
values, which equal ``dequantize(quantize(k))`` of the un-cached path exactly.

Shapes: ``B`` batch, ``S`` cache capacity, ``K`` key/value heads, ``D`` head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jquant.formats import Format, QArray, dequantize, get_format, quantize
from jquant.formats.qarray import CHILDREN

KV = jax.Array | QArray


def _write(slot: KV, new: jax.Array, start: jax.Array) -> KV:
    """``new [B, T, K, D]`` written into ``slot [B, S, K, D]`` at positions ``start ..`` (quantized if ``slot`` is)."""
    zero = jnp.zeros((), jnp.int32)
    index = (zero, jnp.asarray(start, jnp.int32), zero, zero)
    if not isinstance(slot, QArray):
        return jax.lax.dynamic_update_slice(slot, new.astype(slot.dtype), index)
    q = quantize(new, slot.format, axis=3)
    children = {
        name: jax.lax.dynamic_update_slice(getattr(slot, name), getattr(q, name), index)
        for name in CHILDREN
        if getattr(slot, name) is not None
    }
    return dataclasses.replace(slot, **children)


def _read(slot: KV, dtype: jnp.dtype) -> jax.Array:
    return dequantize(slot, dtype) if isinstance(slot, QArray) else slot


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKVCache:
    """One attention layer's cache: ``k``, ``v`` of logical shape ``[B, S, K, D]`` (arrays or ``QArray`` s)."""

    k: KV
    v: KV

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def kv_format(self) -> Format | None:
        """The format entries are stored in (None: dense)."""
        return self.k.format if isinstance(self.k, QArray) else None

    def update(self, k_new: jax.Array, v_new: jax.Array, start: jax.Array) -> tuple[LayerKVCache, jax.Array, jax.Array]:
        """Write ``k_new``/``v_new`` ``[B, T, K, D]`` at slots ``start .. start+T-1``.

        Returns the new cache and the full keys and values ``[B, S, K, D]`` in
        ``k_new.dtype`` to attend over (slots at or beyond ``start + T`` hold stale
        data and must be masked by the caller).
        """
        k = _write(self.k, k_new, start)
        v = _write(self.v, v_new, start)
        return LayerKVCache(k=k, v=v), _read(k, k_new.dtype), _read(v, v_new.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """All layers' caches plus ``length``, the number of filled slots (int32 scalar)."""

    layers: tuple[LayerKVCache, ...]
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity


def _empty(shape: tuple[int, ...], dtype: jnp.dtype, fmt: Format | None) -> KV:
    zeros = jnp.zeros(shape, dtype)
    return zeros if fmt is None else quantize(zeros, fmt, axis=3)


def init_cache(
    *,
    num_layers: int,
    batch: int,
    capacity: int,
    kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype,
    kv_formats: tuple[Format | str | None, ...] | Format | str | None = None,
) -> KVCache:
    """An empty cache with room for ``capacity`` tokens per sequence.

    ``kv_formats``: None (dense, ``dtype``), one format for every layer, or one per
    layer (None entries stay dense). Formats quantize along the head dimension.
    """
    if capacity <= 0:
        raise ValueError(f"init_cache: capacity must be positive, got {capacity}.")
    if not isinstance(kv_formats, tuple):
        kv_formats = (kv_formats,) * num_layers
    if len(kv_formats) != num_layers:
        raise ValueError(f"init_cache: kv_formats has {len(kv_formats)} entries for {num_layers} layers.")
    shape = (batch, capacity, kv_heads, head_dim)
    layers = []
    for i, fmt in enumerate(kv_formats):
        fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        if fmt is not None:
            try:
                fmt.check_shape(shape, 3)
            except ValueError as err:
                raise ValueError(f"init_cache: layer {i} KV format {fmt.name} cannot hold head_dim={head_dim}: {err}") from None
        layers.append(LayerKVCache(k=_empty(shape, dtype, fmt), v=_empty(shape, dtype, fmt)))
    return KVCache(layers=tuple(layers), length=jnp.zeros((), jnp.int32))
