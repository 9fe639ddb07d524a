"""Decode attention read straight from a quantized cache's segments: the reference for a fused kernel.

One query token per sequence attends over the three segments the cache stores (``jquant.kv.cache``):
``sink`` (exact), the packed rows (dequantized here, in a kernel in registers), and the ``recent``
window (exact), with one softmax across all of them (spec SKVQ §6, WKVQuant §6)::

    s_j = q · k_j / sqrt(D)   over j in sink ∪ [sink, q_end) ∪ [q_end, L)
    o   = sum_j softmax(s)_j v_j

Keys cached before RoPE are rotated after dequantization by ``key_transform(keys, positions)``.
With ``past_only`` the current token's own key/value come from ``current`` (exact).

Memory traffic per layer and sequence (what a kernel must move): the packed codes and scale/zero
rows of the ``L - sink - R`` quantized tokens (``bits_per_element`` of the quantizer), plus
``(sink + R) * K * D`` exact elements, against ``L * K * D`` bf16 elements for a dense cache.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jquant.kv.cache import KVCacheConfig, KVStore, LayerKVCache


def _segments(store: KVStore, cfg: KVCacheConfig, q, length: jax.Array, dtype, smooth, shape, *, packed: bool = True):
    """``(values [B, N, K, D], positions [N], valid [N])`` per segment of one tensor (``packed=False``: the exact
    segments only)."""
    (b, rows), (k, d) = store.packed.shape[:2], shape
    segments = []
    if cfg.sink:
        pos = jnp.arange(cfg.sink, dtype=jnp.int32)
        segments.append((store.sink.astype(dtype), pos, pos < length))
    end = cfg.quantized_end(q, length)
    if packed:
        deq = q.decode(store.packed, (b, rows * q.block, k, d), smooth, dtype)
        pos = cfg.sink + jnp.arange(rows * q.block, dtype=jnp.int32)
        segments.append((deq, pos, pos < end))
    r = cfg.recent_length(q)
    if r:
        pos = length - r + jnp.arange(r, dtype=jnp.int32)
        segments.append((store.recent.astype(dtype), pos, (pos >= end) & (pos >= cfg.sink) & (pos >= 0)))
    return segments


def exact_segments(cache: LayerKVCache, length: jax.Array, current: tuple[jax.Array, jax.Array] | None,
                   dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The tokens a cache with token-axis quantizers holds exactly: ``(keys [B, E, K, D], values [B, E, K, D],
    valid [E])`` in ``dtype``: the sink, the recent window and, for a ``past_only`` cache, the query's own ``current``
    key and value (its cached copy masked). What a fused kernel over the packed rows leaves to XLA."""
    cfg = cache.config
    b = cache.k.packed.shape[0]

    def joined(store, q):
        segments = _segments(store, cfg, q, length, dtype, None, cache.head_shape, packed=False)
        if not segments:
            return jnp.zeros((b, 0, *cache.head_shape), dtype), jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)
        x, pos, ok = zip(*segments)
        return jnp.concatenate(x, axis=1), jnp.concatenate(pos), jnp.concatenate(ok)

    keys, pos, ok = joined(cache.k, cfg.key)
    values, _, _ = joined(cache.v, cfg.value)
    if cfg.past_only:
        ok = ok & (pos != length - 1)
        keys = jnp.concatenate([keys, current[0].astype(dtype)], axis=1)
        values = jnp.concatenate([values, current[1].astype(dtype)], axis=1)
        ok = jnp.append(ok, True)
    return keys, values, ok


def decode_attention(
    q: jax.Array,
    cache: LayerKVCache,
    length: jax.Array,
    *,
    current: tuple[jax.Array, jax.Array] | None = None,
    smoothing=(None, None),
    key_transform: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """``q [B, 1, H, D]`` over a quantized layer cache holding ``length`` tokens (the query's own included).

    ``current``: the query token's exact ``(k, v)`` ``[B, 1, K, D]`` (needed with ``past_only``, where they
    replace the cached copy). Returns ``[B, 1, H, D]`` in ``q.dtype``; softmax in float32.
    """
    cfg = cache.config
    if cfg is None or cfg.key is None or cfg.value is None:
        raise ValueError("decode_attention: the cache must quantize both keys and values (a KVCacheConfig with key and value).")
    if cfg.past_only and current is None:
        raise ValueError("decode_attention: a past-only cache needs current=(k, v) of the query token.")
    b, t, h, d = q.shape
    if t != 1:
        raise ValueError(f"decode_attention: one query token per sequence, got {t}.")
    length = jnp.asarray(length, jnp.int32)
    keys = _segments(cache.k, cfg, cfg.key, length, q.dtype, smoothing[0], cache.head_shape)
    values = _segments(cache.v, cfg, cfg.value, length, q.dtype, smoothing[1], cache.head_shape)
    k_all = jnp.concatenate([s[0] for s in keys], axis=1)
    k_pos = jnp.concatenate([s[1] for s in keys])
    k_ok = jnp.concatenate([s[2] for s in keys])
    v_all = jnp.concatenate([s[0] for s in values], axis=1)
    v_pos = jnp.concatenate([s[1] for s in values])
    v_ok = jnp.concatenate([s[2] for s in values])
    if cfg.past_only:  # the query's own exact key/value, as one more segment; its cached copy is masked
        k_ok, v_ok = k_ok & (k_pos != length - 1), v_ok & (v_pos != length - 1)
        k_all = jnp.concatenate([k_all, current[0].astype(q.dtype)], axis=1)
        v_all = jnp.concatenate([v_all, current[1].astype(q.dtype)], axis=1)
        k_pos, v_pos = jnp.append(k_pos, length - 1), jnp.append(v_pos, length - 1)
        k_ok, v_ok = jnp.append(k_ok, True), jnp.append(v_ok, True)
    if key_transform is not None:
        k_all = key_transform(k_all, jnp.broadcast_to(k_pos, (b, k_pos.shape[0])))
    kv_heads = k_all.shape[2]
    qg = q.reshape(b, kv_heads, h // kv_heads, d).astype(jnp.float32)
    logits = jnp.einsum("bkgd,bskd->bkgs", qg, k_all.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * d**-0.5
    logits = jnp.where(k_ok, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    # keys and values may list positions in different orders: gather each key's value by position
    order = jnp.argmax((v_pos[None, :] == k_pos[:, None]) & v_ok[None, :], axis=1)
    out = jnp.einsum("bkgs,bskd->bkgd", probs, jnp.take(v_all, order, axis=1).astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, 1, h, d).astype(q.dtype)
