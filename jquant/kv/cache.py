"""A dense key/value cache as a pytree.

The cache is a plain value threaded through the model call
(``logits, cache = model(tokens, cache=cache)``), so decoding is a pure
function that ``jit`` compiles once per (batch, chunk length).

Shapes: ``B`` batch, ``S`` cache capacity, ``K`` key/value heads, ``D`` head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKVCache:
    """One attention layer's cache: ``k``, ``v`` of shape ``[B, S, K, D]``."""

    k: jax.Array
    v: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def update(self, k_new: jax.Array, v_new: jax.Array, start: jax.Array) -> tuple[LayerKVCache, jax.Array, jax.Array]:
        """Write ``k_new``/``v_new`` ``[B, T, K, D]`` at slots ``start .. start+T-1``.

        Returns the new cache and the full keys and values ``[B, S, K, D]``
        to attend over (slots at or beyond ``start + T`` hold stale data and
        must be masked by the caller).
        """
        zero = jnp.zeros((), jnp.int32)
        index = (zero, jnp.asarray(start, jnp.int32), zero, zero)
        k = jax.lax.dynamic_update_slice(self.k, k_new.astype(self.k.dtype), index)
        v = jax.lax.dynamic_update_slice(self.v, v_new.astype(self.v.dtype), index)
        return LayerKVCache(k=k, v=v), k, v


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """All layers' caches plus ``length``, the number of filled slots (int32 scalar)."""

    layers: tuple[LayerKVCache, ...]
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity


def init_cache(
    *, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype: jnp.dtype
) -> KVCache:
    """An empty cache with room for ``capacity`` tokens per sequence."""
    if capacity <= 0:
        raise ValueError(f"init_cache: capacity must be positive, got {capacity}.")
    shape = (batch, capacity, kv_heads, head_dim)
    layers = tuple(
        LayerKVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)) for _ in range(num_layers)
    )
    return KVCache(layers=layers, length=jnp.zeros((), jnp.int32))
