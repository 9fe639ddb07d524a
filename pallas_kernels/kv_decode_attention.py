"""Decode attention over a packed quantized KV cache (KIVI / SKVQ / per-token RTN layouts, token-axis groups).

One query token per sequence attends over the cache's three segments (``jquant.kv.cache``): the exact ``sink``,
the packed rows and the exact ``recent`` window, with one softmax (spec SKVQ §6)::

    s_j = q · k_j / sqrt(D),   o = sum_j softmax(s)_j v_j

The kernel reads the packed rows as stored and never writes a dequantized key or value: program ``(b, h, i)``
(batch, KV head, block of ``block_tokens`` rows) loads the head's code bytes ``[T, D*bits/8]``, splits each byte
into its ``P = 8 / bits`` bit planes (plane ``r`` of packed column ``j`` is channel ``P*j + r``, the LSB-first
packing of ``jquant.formats.packing``), dequantizes ``x = code * s + z`` with the token's group scale and zero,
and returns flash-decoding partials of its block: the running maximum ``m [G]``, the sum ``l [G]`` of
``exp(s - m)`` and ``acc [G, D]`` of ``exp(s - m) v`` for the ``G`` query heads sharing the KV head. XLA merges the
partials with the few exact tokens (log-sum-exp) and restores the channel order. The query is passed plane-major
(``q[..., r*D/P + j] = q[..., P*j + r]``), so no code is ever reordered.

Bytes moved per sequence and layer: the packed codes (``L K D bits / 8``) and the scale/zero rows
(``L K D / group * 4`` for 16-bit metadata) of the quantized tokens, plus the exact ones, against ``2 L K D`` for a
bf16 cache: about 3.6x fewer at 4 bits with groups of 32, 6.4x at 2 bits.

Supported: ``KVQuantizer`` keys and values with ``axis="token"``, one ``group_size`` that divides ``head_dim`` and
is a multiple of ``P``, 2, 4 or 8 bits, no channel permutation, no smoothing and no key transform (keys cached after
RoPE); ``supports`` names what is not. ``jquant.kv.decode_attention.decode_attention`` is the reference, and the
tests compare the two in interpret mode. Not yet timed on a GPU, so nothing dispatches to it (docs/kernels.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jquant.kv.cache import LayerKVCache
from jquant.kv.decode_attention import exact_segments
from jquant.kv.quantizer import KVQuantizer

from ._common import interpret_mode, is_power_of_two

NAME = "kv_decode_attention"
SUPPORTED_BITS = (2, 4, 8)


def supports(cache: LayerKVCache, *, smoothing=(None, None), key_transform=None) -> str | None:
    """None when the kernel can read ``cache``, else the reason in words."""
    cfg = cache.config
    if cfg is None or cfg.key is None or cfg.value is None:
        return "the cache must quantize both keys and values"
    if any(s is not None for s in smoothing) or key_transform is not None:
        return "smoothing and key transforms (pre-RoPE caches) are not fused"
    d = cache.head_shape[1]
    for what, q in (("key", cfg.key), ("value", cfg.value)):
        if not isinstance(q, KVQuantizer) or q.axis != "token" or q.group_sizes is not None or q.perm is not None:
            return f"the {what} quantizer must be a KVQuantizer with token-axis groups of one size and no permutation"
        if q.bits not in SUPPORTED_BITS:
            return f"the {what} quantizer has {q.bits:g} bits; the kernel reads {SUPPORTED_BITS}"
        planes = 8 // int(q.bits)
        if d % q.group_size or q.group_size % planes or not is_power_of_two(d // planes):
            return (f"the {what} groups of {q.group_size} must divide head_dim={d} and hold whole bytes, and "
                    f"head_dim / {planes} must be a power of two")
    return None


def _plane_order(d: int, planes: int) -> np.ndarray:
    """``perm [D]``: the channel read at plane-major position ``r * D/P + j`` is ``P * j + r``."""
    return (np.arange(d // planes)[None, :] * planes + np.arange(planes)[:, None]).reshape(-1)


def _kernel(q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, valid_ref, m_ref, l_ref, acc_ref, *,
            k_meta, v_meta, d: int, g: int, t: int, rows: int):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row_ids = i * t + jnp.arange(t)
    live = row_ids < rows
    valid = plt.load(valid_ref.at[b, pl.ds(i * t, t)], mask=live, other=0) > 0  # [T]

    def planes_of(c_ref, s_ref, z_ref, meta):
        """The dequantized bit planes ``[P] x [T, D/P]`` of the head's block."""
        bits, group = meta
        p = 8 // bits
        width = d // p
        codes = plt.load(c_ref.at[b, pl.ds(i * t, t), pl.ds(h * width, width)], mask=live[:, None],
                         other=0).astype(jnp.int32)
        n_groups = d // group
        column_group = jnp.arange(width)[None, :] // (group // p)
        scale = zero = jnp.zeros((t, width), jnp.float32)
        for gi in range(n_groups):  # one [T] row of each group's scale/zero, broadcast to its columns
            s = plt.load(s_ref.at[b, pl.ds(i * t, t), h * n_groups + gi], mask=live, other=0).astype(jnp.float32)
            z = plt.load(z_ref.at[b, pl.ds(i * t, t), h * n_groups + gi], mask=live, other=0).astype(jnp.float32)
            here = column_group == gi
            scale = jnp.where(here, s[:, None], scale)
            zero = jnp.where(here, z[:, None], zero)
        mask = (1 << bits) - 1
        return [((codes >> (bits * r)) & mask).astype(jnp.float32) * scale + zero for r in range(p)]

    keys = planes_of(kc_ref, ks_ref, kz_ref, k_meta)
    kw = d // len(keys)
    logits = jnp.zeros((g, t), jnp.float32)
    for r, k_plane in enumerate(keys):
        q_plane = plt.load(q_ref.at[b, h, :, pl.ds(r * kw, kw)])  # [G, D/P] from the plane-major query
        logits = logits + jnp.sum(q_plane[:, None, :] * k_plane[None, :, :], axis=-1)
    logits = jnp.where(valid[None, :], logits * (d ** -0.5), -jnp.inf)
    m = jnp.max(logits, axis=1)
    shift = jnp.where(m > -jnp.inf, m, 0.0)
    p = jnp.where(valid[None, :], jnp.exp(logits - shift[:, None]), 0.0)
    plt.store(m_ref.at[b, h, i], m)
    plt.store(l_ref.at[b, h, i], jnp.sum(p, axis=1))
    values = planes_of(vc_ref, vs_ref, vz_ref, v_meta)
    vw = d // len(values)
    for r, v_plane in enumerate(values):
        plt.store(acc_ref.at[b, h, i, :, pl.ds(r * vw, vw)], jnp.sum(p[:, :, None] * v_plane[None, :, :], axis=1))


@functools.partial(jax.jit, static_argnames=("k_meta", "v_meta", "d", "block_tokens", "interpret"))
def _partials(q_k, k_store, v_store, valid, *, k_meta, v_meta, d: int, block_tokens: int, interpret: bool):
    """Block partials ``(m [B, K, nb, G], l [B, K, nb, G], acc [B, K, nb, G, D])`` of the packed rows;
    ``q_k [B, K, G, D]`` is the query in the key planes' order, ``acc`` comes out in the value planes' order."""
    b, kh, g, _ = q_k.shape
    rows = valid.shape[1]
    nb = -(-rows // block_tokens)
    kernel = functools.partial(_kernel, k_meta=k_meta, v_meta=v_meta, d=d, g=g, t=block_tokens, rows=rows)
    out_shape = (jax.ShapeDtypeStruct((b, kh, nb, g), jnp.float32), jax.ShapeDtypeStruct((b, kh, nb, g), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, nb, g, d), jnp.float32))
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(b, kh, nb), interpret=interpret,
                          compiler_params=plt.CompilerParams(num_warps=4, num_stages=2), name=NAME)(
        q_k, k_store.codes, k_store.scales, k_store.zeros, v_store.codes, v_store.scales, v_store.zeros, valid)


def kv_decode_attention(q: jax.Array, cache: LayerKVCache, length: jax.Array, *,
                        current: tuple[jax.Array, jax.Array] | None = None, block_tokens: int = 64,
                        interpret: bool | None = None) -> jax.Array:
    """``q [B, 1, H, D]`` over ``cache`` holding ``length`` tokens (scalar; the query's own included) ->
    ``[B, 1, H, D]`` in ``q.dtype``, equal to ``jquant.kv.decode_attention.decode_attention`` (softmax in float32).

    ``current``: the query token's exact ``(k, v)`` ``[B, 1, K, D]``, needed for a ``past_only`` cache.
    ``block_tokens`` (a power of two): packed rows per program. ``interpret`` defaults to True off-GPU.
    """
    reason = supports(cache)
    if reason is not None:
        raise ValueError(f"{NAME}: {reason}; use jquant.kv.decode_attention.decode_attention.")
    cfg = cache.config
    if cfg.past_only and current is None:
        raise ValueError(f"{NAME}: a past-only cache needs current=(k, v) of the query token.")
    if not is_power_of_two(block_tokens):
        raise ValueError(f"{NAME}: block_tokens={block_tokens} must be a power of two.")
    b, t, h, d = q.shape
    kh = cache.head_shape[0]
    if t != 1 or h % kh or d != cache.head_shape[1]:
        raise ValueError(f"{NAME}: q must be [B, 1, H, {cache.head_shape[1]}] with H a multiple of {kh} KV heads; "
                         f"got {q.shape}.")
    interpret = interpret_mode() if interpret is None else interpret
    length = jnp.asarray(length, jnp.int32)
    g = h // kh
    gp = 1 << (g - 1).bit_length()  # query heads per KV head, padded to a power of two
    qg = q.reshape(b, kh, g, d).astype(jnp.float32)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    k_planes = 8 // int(cfg.key.bits)
    v_order = _plane_order(d, 8 // int(cfg.value.bits))
    rows = cache.k.packed.shape[1]
    pos = cfg.sink + jnp.arange(rows, dtype=jnp.int32)
    valid = pos < cfg.quantized_end(cfg.key, length)
    if cfg.past_only:
        valid = valid & (pos != length - 1)
    valid = jnp.broadcast_to(valid.astype(jnp.int32), (b, rows))
    m, l, acc = _partials(qg[..., _plane_order(d, k_planes)], cache.k.packed, cache.v.packed, valid,
                          k_meta=(int(cfg.key.bits), cfg.key.group_size),
                          v_meta=(int(cfg.value.bits), cfg.value.group_size), d=d, block_tokens=block_tokens,
                          interpret=interpret)
    acc = acc[..., np.argsort(v_order)][:, :, :, :g]  # back to channel order, padding heads dropped
    m, l = m[..., :g], l[..., :g]
    # the exact tokens: sink, recent window and (past-only) the query's own key and value
    keys, values, ok = exact_segments(cache, length, current, jnp.float32)
    s = jnp.einsum("bkgd,bskd->bkgs", qg[:, :, :g], keys, precision=jax.lax.Precision.HIGHEST) * d ** -0.5
    s = jnp.where(ok, s, -jnp.inf)
    top = jnp.max(m, axis=2)  # [B, K, G]
    if s.shape[-1]:
        top = jnp.maximum(top, jnp.max(s, axis=-1))
    block_weight = jnp.exp(m - top[:, :, None])  # exp(-inf) = 0 for blocks without a valid row
    exact_weight = jnp.exp(s - top[..., None])
    total = jnp.sum(l * block_weight, axis=2) + jnp.sum(exact_weight, axis=-1)
    out = (jnp.sum(acc * block_weight[..., None], axis=2)
           + jnp.einsum("bkgs,bskd->bkgd", exact_weight, values, precision=jax.lax.Precision.HIGHEST))
    return (out / total[..., None]).reshape(b, 1, h, d).astype(q.dtype)
