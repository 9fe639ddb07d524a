"""Scaled dot-product attention with grouped-query heads.

Shapes: ``B`` batch, ``T`` query length, ``S`` key length, ``H`` query heads,
``K`` key/value heads (``H % K == 0``), ``D`` head dim. A mask is a dense bool array
or a ``jquant.ops.mask.Mask`` description (causal, sliding window, band, arrow, padding, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.formats import Format, fake_quantize
from jquant.ops.dispatch import select_attention
from jquant.ops.mask import Mask


def causal_mask(
    q_positions: jax.Array,
    k_positions: jax.Array,
    k_valid: jax.Array | None = None,
    *,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean mask ``[B, T, S]``: query at position p sees keys at positions <= p.

    Args:
      q_positions: ``[B, T]`` absolute positions of the queries.
      k_positions: ``[B, S]`` absolute positions of the keys.
      k_valid: optional ``[B, S]`` bool, False for empty cache slots.
      sliding_window: if set, a query also ignores keys more than
        ``sliding_window - 1`` positions behind it (Mistral's convention).
    """
    q = q_positions[:, :, None]
    k = k_positions[:, None, :]
    mask = k <= q
    if sliding_window is not None:
        mask = mask & (k > q - sliding_window)
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    return mask


def dense_mask(mask: jax.Array | Mask, batch: int, q_len: int, k_len: int, q_offset: int | jax.Array = 0) -> jax.Array:
    """``mask`` as a bool ``[B, T, S]`` array: a ``Mask``'s ``dense(T, S, q_offset)`` or a dense ``[T, S]`` /
    ``[B, T, S]`` array, broadcast."""
    m = mask.dense(q_len, k_len, q_offset) if isinstance(mask, Mask) else mask
    if jnp.ndim(m) not in (2, 3):
        raise ValueError(f"attention: mask must be a Mask or a bool [B, T, S] / [T, S] array, got shape {jnp.shape(m)}.")
    try:
        return jnp.broadcast_to(jnp.asarray(m), (batch, q_len, k_len))
    except ValueError:
        raise ValueError(f"attention: mask shape {jnp.shape(m)} does not broadcast to [B, T, S] = "
                         f"{(batch, q_len, k_len)}; build it for these queries and keys.") from None


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | Mask,
    *,
    scale: float | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """``softmax(q k^T * scale + mask) v`` for grouped-query attention.

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, S, K, D]``.
      v: ``[B, S, K, D]``.
      mask: ``[B, T, S]`` (or ``[T, S]``) bool, True where attention is allowed, or a ``Mask``
        (``jquant.ops.mask``) evaluated for queries at positions ``q_offset ..`` and keys at ``0 .. S-1``.
      scale: logit scale, default ``D ** -0.5``.
      q_offset: the first query's position, for a ``Mask`` (a decode step's cache slot); ignored for arrays.

    Returns:
      ``[B, T, H, D]`` in ``q.dtype``. Logits and softmax are computed in at
      least float32. The path is chosen (and recorded) by ``jquant.ops.dispatch.select_attention``.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    if h % kv_heads:
        raise ValueError(f"attention: {h} query heads is not a multiple of {kv_heads} key/value heads.")
    groups = h // kv_heads
    scale = d**-0.5 if scale is None else scale
    kernel = select_attention(q, k, mask)
    if kernel is not None:
        return kernel.apply(q, k, v, mask, scale)
    mask = dense_mask(mask, b, t, k.shape[1], q_offset)
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.reshape(b, t, kv_heads, groups, d)
    logits = jnp.einsum(
        "btkgd,bskd->bkgts", qg, k, precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc_dtype
    )
    logits = logits * scale
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(acc_dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "bkgts,bskd->btkgd",
        probs.astype(v.dtype),
        v,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=acc_dtype,
    )
    return out.reshape(b, t, h, d).astype(q.dtype)


def attention_quantized_past(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_hat: jax.Array,
    v_hat: jax.Array,
    mask: jax.Array,
    k_quantized: jax.Array,
    v_quantized: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Attention where some (query, key) pairs read the quantized key/value instead of the exact one.

    The decode-simulated attention of WKVQuant §3.2 generalised to sink and window tokens:
    ``S = where(k_quantized, q k_hatᵀ, q kᵀ) * scale``, ``P = softmax(S)`` under ``mask``,
    ``O = (P ⊙ v_quantized) v_hat + (P ⊙ ¬v_quantized) v``. With the masks of
    ``KVCacheConfig.quantized_mask`` a full-sequence pass equals token-by-token decoding with
    that quantized cache.

    Args:
      q: ``[B, T, H, D]``; k, v, k_hat, v_hat: ``[B, S, K, D]``.
      mask, k_quantized, v_quantized: ``[B, T, S]`` bool.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    scale = d**-0.5 if scale is None else scale
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.reshape(b, t, kv_heads, groups, d)

    def scores(keys):
        return jnp.einsum("btkgd,bskd->bkgts", qg, keys, precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=acc_dtype)

    logits = jnp.where(k_quantized[:, None, None], scores(k_hat), scores(k)) * scale
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(acc_dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    vq = v_quantized[:, None, None]

    def mix(p, values):
        return jnp.einsum("bkgts,bskd->btkgd", p.astype(values.dtype), values, precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=acc_dtype)

    out = mix(jnp.where(vq, probs, 0), v_hat) + mix(jnp.where(vq, 0, probs), v)
    return out.reshape(b, t, h, d).astype(q.dtype)


def quantize_kv(x: jax.Array, quantizer, smoothing=None, *, sink: int = 0) -> jax.Array:
    """Fake-quantize keys or values ``[B, S, K, D]`` as a quantized KV cache stores them (straight-through).

    ``quantizer`` is a ``jquant.kv.KVQuantizer``, a ``jquant.kv.FormatKV`` or a jquant Format (per
    token and head along ``D``); ``smoothing`` is WKVQuant's (shift, scale) or None. The first
    ``sink`` tokens are returned exact (a cache never quantizes them, and channel-wise token
    blocks start after them). Equal to what a cache of that quantizer returns for the same entries.
    """
    if isinstance(quantizer, Format):
        quantized = fake_quantize(x[:, sink:], quantizer, axis=-1)
    else:
        quantized = quantizer.fake(x[:, sink:], smoothing)
    return jnp.concatenate([x[:, :sink], quantized], axis=1) if sink else quantized
