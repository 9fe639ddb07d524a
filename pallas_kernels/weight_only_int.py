"""W4A16 / W8A16: float activations times integer weight codes, dequantized in registers.

``y[M, N] = x[M, K] @ W`` with ``W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]`` where
``q`` are the ``IntFormat`` codes of a ``QArray`` quantized along K (axis 0),
``g(k) = k // group_size`` (one group for per-channel scales) and ``z = 0`` for
symmetric formats. Each loop step loads a ``[block_k, block_n]`` code tile (4-bit:
``block_k / 2`` packed rows), one scale (and zero) row, dequantizes to the
activation dtype and accumulates ``x_tile @ W_tile`` in float32.

Cost (bits b, group size G, scales 16-bit, zeros 8-bit):

- bytes moved: ``K*N*b/8`` codes + ``K/G*N*(2 + 1 if asym)`` scales/zeros
  + ``M*K*2`` activations + ``M*N*2`` output (bf16). At ``M = 1`` the codes dominate:
  4.125 bits per weight for int4-g128 versus 16 for bf16, a 3.9x bandwidth limit.
- flops: ``2*M*N*K`` (tensor cores, bf16) plus ``~3*K*N*ceil(M/block_m)`` dequant ops.

With ``block_m = 1`` (the GEMV variant for M = 1) there is no tensor-core dot: each
step does an elementwise multiply-add into a ``[block_k, block_n]`` float32
accumulator that is reduced over K once at the end. Decode (M <= 16) is memory bound; large M is compute bound and the in-loop
dequant (repeated for every M tile) makes the kernel lose to a bf16 ``jnp.dot``,
which is why ``jquant.ops`` dispatch only picks it where the GPU table says it wins.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jquant.formats import IntFormat, QArray, dequantize
from ._common import (TileConfig, check_activation, check_tiles, launch,
                                    even_odd_split, interpret_mode, pad_rows,
                                    sign_extend_4bit)

NAME = "pallas-weight-only-int"
SUPPORTED_BITS = (4, 8)


def supports(w: QArray) -> bool:
    """Whether this kernel can take ``w`` (2-D ``[K, N]`` IntFormat 4/8-bit, channel or group scales, axis 0)."""
    fmt = w.format
    return (isinstance(w, QArray) and isinstance(fmt, IntFormat) and fmt.bits in SUPPORTED_BITS
            and len(w.shape) == 2 and w.axis == 0 and fmt.granularity in ("channel", "group"))


def reference(x: jax.Array, w: QArray) -> jax.Array:
    """Pure-jnp reference: dequantize to float32, float32 matmul, cast to ``x.dtype``."""
    y = jnp.dot(x.astype(jnp.float32), dequantize(w, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def _group_rows(w: QArray) -> int:
    return w.format.group_size if w.format.granularity == "group" else w.shape[0]


def _kernel(x_ref, c_ref, s_ref, *rest, bits: int, symmetric: bool, group: int, cfg: TileConfig,
            k_total: int, steps: int):
    z_ref, o_ref = (None, rest[0]) if symmetric else rest
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    m0 = pl.program_id(0) * bm
    n0 = pl.program_id(1) * bn
    split = pl.program_id(2)
    dtype = x_ref.dtype

    def dequant(q, g):
        s = s_ref[pl.ds(g, 1), pl.ds(n0, bn)].astype(jnp.float32)
        if not symmetric:
            q = q - z_ref[pl.ds(g, 1), pl.ds(n0, bn)].astype(jnp.int32)
        return (q.astype(jnp.float32) * s).astype(dtype)

    def x_tile(k0, size):
        if bm == 1:  # GEMV: a column to broadcast against the weight tile
            return x_ref[m0, pl.ds(k0, size)].astype(jnp.float32)[:, None]
        return x_ref[pl.ds(m0, bm), pl.ds(k0, size)]

    def mac(acc, xt, w):
        if bm == 1:  # elementwise FMA into a [block_k, block_n] accumulator, reduced once at the end
            return acc + xt * w.astype(jnp.float32)
        return acc + jnp.dot(xt, w, preferred_element_type=jnp.float32)

    def step(t, acc):
        k0 = (split * steps + t) * bk
        g = k0 // group
        if bits == 8:
            q = c_ref[pl.ds(k0, bk), pl.ds(n0, bn)].astype(jnp.int32)
            return mac(acc, x_tile(k0, bk), dequant(q, g))
        half = bk // 2
        p0 = k0 // 2
        c = c_ref[pl.ds(p0, half), pl.ds(n0, bn)].astype(jnp.int32)
        lo, hi = c & 15, c >> 4
        if symmetric:
            lo, hi = sign_extend_4bit(lo), sign_extend_4bit(hi)
        acc = mac(acc, x_tile(p0, half), dequant(lo, g))
        return mac(acc, x_tile(k_total // 2 + p0, half), dequant(hi, g))

    if bm == 1:
        rows = bk if bits == 8 else bk // 2
        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((rows, bn), jnp.float32))
        o_ref[split, m0, pl.ds(n0, bn)] = jnp.sum(acc, axis=0)
        return
    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
    o_ref[split, pl.ds(m0, bm), pl.ds(n0, bn)] = acc


def check(x: jax.Array, w: QArray, cfg: TileConfig) -> None:
    """Raises a ``ValueError``/``TypeError`` naming the problem when the kernel cannot run."""
    if not supports(w):
        raise ValueError(f"{NAME}: needs a 2-D [K, N] IntFormat weight of {SUPPORTED_BITS} bits with channel "
                         f"or group scales quantized along axis 0; got {w.format.name} shape {w.shape} "
                         f"axis {w.axis}.")
    k, n = w.shape
    check_activation(x, k, NAME)
    step = cfg.block_k
    if _group_rows(w) % step:
        raise ValueError(f"{NAME}: block_k={step} must divide the group size {_group_rows(w)}.")
    check_tiles(NAME, cfg, k, n, step)


def _call(x, codes, scales, zeros, *, w_meta, cfg: TileConfig, interpret: bool):
    bits, symmetric, group, k, n = w_meta
    m = x.shape[0]
    xp = pad_rows(x, cfg.block_m)
    if bits == 4:
        xp = even_odd_split(xp)
    steps = k // cfg.block_k // cfg.split_k
    kernel = functools.partial(_kernel, bits=bits, symmetric=symmetric, group=group, cfg=cfg,
                               k_total=k, steps=steps)
    operands = (xp, codes, scales) if symmetric else (xp, codes, scales, zeros)
    return launch(kernel, operands, name=NAME, cfg=cfg, n=n, m=m, dtype=x.dtype,
                  interpret=interpret)


_call = jax.jit(_call, static_argnames=("w_meta", "cfg", "interpret"))


def weight_only_int_matmul(x: jax.Array, w: QArray, cfg: TileConfig = TileConfig(),
                           *, interpret: bool | None = None) -> jax.Array:
    """``x [M, K] @ dequantize(w [K, N]) -> [M, N]`` in ``x.dtype`` (see module docstring).

    ``interpret`` defaults to True off-GPU (Pallas interpret mode).
    """
    check(x, w, cfg)
    fmt = w.format
    meta = (fmt.bits, fmt.symmetric, _group_rows(w), w.shape[0], w.shape[1])
    interpret = interpret_mode() if interpret is None else interpret
    return _call(x, w.codes, w.scales, w.zeros, w_meta=meta, cfg=cfg, interpret=interpret)
