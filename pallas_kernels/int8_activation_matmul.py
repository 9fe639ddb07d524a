"""W8A8 and W4A8: int8 activations (quantized in the kernel) times int8 or int4 weights.

With per-token activation scales ``s_x[m]`` (the activation ``IntFormat``'s own
scales, ``amax_m / 127`` stored in its ``scale_dtype``) and weight scales ``s_w``::

    q_x[m, k] = clip(RNE(x[m, k] / s_x[m]), -127, 127)                  (in the kernel)
    y[m, n]   = s_x[m] * sum_g s_w[g, n] * sum_{k in g} q_x[m, k] * (q_w[k, n] - z_w[g, n])

The inner sums are int8 x int8 tensor-core dots accumulated in int32, so the result
equals the fake-quantized float reference up to float32 rounding of the epilogue.
4-bit weights (W4A8, QServe-style) are unpacked to int8 in registers; asymmetric
weights subtract their zero point there (``q - z`` stays in [-15, 15]). The per-token
scales come from one XLA row reduction before the call. By default XLA also writes
the int8 codes of ``x`` in that same fused pass and the kernel reads int8 tiles;
``TileConfig(quantize_in_kernel=True)`` instead reads bf16 ``x`` and quantizes each
tile in registers (no int8 copy of ``x`` in memory, but redone for every N tile).

Cost: bytes ``M*K*2`` (x, bf16) ``+ K*N*b/8`` (codes) ``+ scales + M*N*2``; int8 ops
``2*M*N*K`` at the int8 tensor-core rate (2x bf16 on Hopper), so at large M the
limit is 2x over a bf16 matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jquant.formats import IntFormat, QArray, dequantize, fake_quantize, quantize
from ._common import (TileConfig, check_activation, check_tiles, launch,
                                    even_odd_split, interpret_mode, pad_rows,
                                    round_half_even, sign_extend_4bit)

NAME = "pallas-int8-activation"


def supports_activation(fmt) -> bool:
    """Per-token symmetric int8 activations in the restricted range (the kernel quantizes with amax / 127, +-127)."""
    return (isinstance(fmt, IntFormat) and fmt.bits == 8 and fmt.symmetric and not fmt.full_range
            and fmt.granularity == "channel")


def supports(w: QArray, activation) -> bool:
    fmt = w.format
    return (isinstance(w, QArray) and supports_activation(activation) and isinstance(fmt, IntFormat)
            and (fmt.bits == 4 or (fmt.bits == 8 and fmt.symmetric)) and len(w.shape) == 2 and w.axis == 0
            and fmt.granularity in ("channel", "group"))


def reference(x: jax.Array, w: QArray, activation: IntFormat) -> jax.Array:
    """Fake-quantize ``x`` per token, dequantize ``w``, float32 matmul, cast to ``x.dtype``."""
    xq = fake_quantize(x.astype(jnp.float32), activation, axis=-1)
    y = jnp.dot(xq, dequantize(w, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def token_scales(x: jax.Array, activation: IntFormat) -> jax.Array:
    """Per-token scales ``[M, 1]`` float32 exactly as the activation format stores them (0 -> 1)."""
    s = quantize(x, activation, axis=-1).scales.astype(jnp.float32)
    return jnp.where(s > 0, s, 1.0)


def _kernel(x_ref, sx_ref, c_ref, s_ref, *rest, bits: int, symmetric: bool, group: int | None,
            cfg: TileConfig, k_total: int, steps: int):
    z_ref, o_ref = (None, rest[0]) if symmetric else rest
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    m0 = pl.program_id(0) * bm
    n0 = pl.program_id(1) * bn
    split = pl.program_id(2)
    sx = sx_ref[pl.ds(m0, bm), :]

    def quant_x(k0, size):
        xt = x_ref[pl.ds(m0, bm), pl.ds(k0, size)]
        if not cfg.quantize_in_kernel:  # already int8 codes
            return xt
        xt = xt.astype(jnp.float32)
        return round_half_even(jnp.clip(xt / sx, -127.0, 127.0)).astype(jnp.int8)

    def weight(q, g):
        if not symmetric:
            q = q - z_ref[pl.ds(g, 1), pl.ds(n0, bn)].astype(jnp.int32)
        return q.astype(jnp.int8)

    def partial_dot(k0):
        g = 0 if group is None else k0 // group
        if bits == 8:
            q = c_ref[pl.ds(k0, bk), pl.ds(n0, bn)].astype(jnp.int32)
            acc = jnp.dot(quant_x(k0, bk), weight(q, g), preferred_element_type=jnp.int32)
        else:
            half, p0 = bk // 2, k0 // 2
            c = c_ref[pl.ds(p0, half), pl.ds(n0, bn)].astype(jnp.int32)
            lo, hi = c & 15, c >> 4
            if symmetric:
                lo, hi = sign_extend_4bit(lo), sign_extend_4bit(hi)
            acc = jnp.dot(quant_x(p0, half), weight(lo, g), preferred_element_type=jnp.int32)
            acc = acc + jnp.dot(quant_x(k_total // 2 + p0, half), weight(hi, g),
                                preferred_element_type=jnp.int32)
        return acc, g

    def step(t, acc):
        k0 = (split * steps + t) * bk
        part, g = partial_dot(k0)
        if group is None:  # per-channel weight scales: apply once in the epilogue
            return acc + part.astype(jnp.float32)
        return acc + part.astype(jnp.float32) * s_ref[pl.ds(g, 1), pl.ds(n0, bn)].astype(jnp.float32)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
    if group is None:
        acc = acc * s_ref[pl.ds(0, 1), pl.ds(n0, bn)].astype(jnp.float32)
    o_ref[split, pl.ds(m0, bm), pl.ds(n0, bn)] = acc * sx


def check(x: jax.Array, w: QArray, activation, cfg: TileConfig) -> None:
    if not supports_activation(activation):
        raise ValueError(f"{NAME}: the activation format must be per-token symmetric int8 "
                         f"(e.g. get_format('int8')), got {getattr(activation, 'name', activation)!r}.")
    if not supports(w, activation):
        raise ValueError(f"{NAME}: needs a 2-D [K, N] IntFormat weight (4-bit, or 8-bit symmetric: "
                         f"8-bit zero points overflow int8) with channel or group scales along axis 0; got {w.format.name} shape {w.shape} axis {w.axis}.")
    k, n = w.shape
    check_activation(x, k, NAME)
    if w.format.granularity == "group" and w.format.group_size % cfg.block_k:
        raise ValueError(f"{NAME}: block_k={cfg.block_k} must divide the group size {w.format.group_size}.")
    check_tiles(NAME, cfg, k, n, cfg.block_k)


def _call(x, codes, scales, zeros, *, activation, w_meta, cfg: TileConfig, interpret: bool):
    bits, symmetric, group, k, n = w_meta
    m = x.shape[0]
    xp = pad_rows(x, cfg.block_m)
    sx = token_scales(xp, activation)
    if not cfg.quantize_in_kernel:
        xp = quantize(xp, activation, axis=-1).codes
    if bits == 4:
        xp = even_odd_split(xp)
    steps = k // cfg.block_k // cfg.split_k
    kernel = functools.partial(_kernel, bits=bits, symmetric=symmetric, group=group, cfg=cfg,
                               k_total=k, steps=steps)
    operands = (xp, sx, codes, scales) + (() if symmetric else (zeros,))
    return launch(kernel, operands, name=NAME, cfg=cfg, n=n, m=m, dtype=x.dtype,
                  interpret=interpret)


_call = jax.jit(_call, static_argnames=("activation", "w_meta", "cfg", "interpret"))


def int8_activation_matmul(x: jax.Array, w: QArray, activation: IntFormat,
                           cfg: TileConfig = TileConfig(), *, interpret: bool | None = None) -> jax.Array:
    """``fake_quant(x [M, K]) @ dequantize(w [K, N]) -> [M, N]`` on int8 tensor cores (module docstring)."""
    check(x, w, activation, cfg)
    fmt = w.format
    group = fmt.group_size if fmt.granularity == "group" else None
    meta = (fmt.bits, fmt.symmetric, group, w.shape[0], w.shape[1])
    interpret = interpret_mode() if interpret is None else interpret
    return _call(x, w.codes, w.scales, w.zeros, activation=activation, w_meta=meta, cfg=cfg,
                 interpret=interpret)
