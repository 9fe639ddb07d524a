"""NVFP4 / MXFP4 weight-only matmul: E2M1 weight codes decoded to the activation dtype in registers.

``y[M, N] = x[M, K] @ W`` with ``W[k, n] = e2m1(c[k, n]) * scale[k // B, n] * t`` where the
block scale is a UE4M3 byte (NVFP4, block ``B = 16``, tensor scale ``t`` float32) or an
E8M0 byte (MXFP4, block ``B = 32``, ``t = 1``). Codes are packed two per byte along K
(element 2i in the low nibble), as ``jquant.formats`` stores them. E2M1 decodes as
``sign * (m / 2 if e == 0 else (2 + m) * 2^(e - 2))`` with ``e = (c >> 1) & 3``,
``m = c & 1``; UE4M3 as ``m * 2^-9`` (e = 0) or ``(8 + m) * 2^(e - 10)``; E8M0 as
``2^(b - 127)``. Powers of two are built exactly from exponent bits.

``block_m = 1`` selects the GEMV variant (elementwise multiply-add, one reduction at
the end; see ``weight_only_int``). Hopper has no FP4 tensor cores, so this is the W4A16 emulation (Marlin-FP4 style):
bytes ``K*N/2`` codes ``+ K*N/B`` scale bytes ``+ M*K*2 + M*N*2``, i.e. 4.5 (NVFP4) or
4.25 (MXFP4) bits per weight; flops ``2*M*N*K`` at the bf16 rate plus the decode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jquant.formats import MXFormat, NVFP4Format, QArray, dequantize
from ._common import (TileConfig, check_activation, check_tiles, launch,
                                    even_odd_split, interpret_mode, pad_rows)

NAME = "pallas-weight-only-fp4"


def _block(fmt) -> int | None:
    if isinstance(fmt, NVFP4Format):
        return 16
    if isinstance(fmt, MXFormat) and fmt.element == "fp4":
        return fmt.block_size
    return None


def supports(w: QArray) -> bool:
    """2-D ``[K, N]`` NVFP4 or MXFP4 weights quantized along axis 0."""
    return isinstance(w, QArray) and _block(w.format) is not None and len(w.shape) == 2 and w.axis == 0


def reference(x: jax.Array, w: QArray) -> jax.Array:
    y = jnp.dot(x.astype(jnp.float32), dequantize(w, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def _pow2(e: jax.Array) -> jax.Array:
    """Exact float32 ``2^e`` for int32 ``e`` in [-126, 127] (from the exponent bits)."""
    return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def _e2m1(c: jax.Array) -> jax.Array:
    """float32 values of int32 E2M1 nibbles."""
    e, m = (c >> 1) & 3, (c & 1).astype(jnp.float32)
    mag = jnp.where(e == 0, 0.5 * m, (2.0 + m) * _pow2(jnp.maximum(e, 1) - 2))
    return jnp.where(c >= 8, -mag, mag)


def _scale_value(b: jax.Array, mx: bool) -> jax.Array:
    """float32 value of int32 scale bytes (E8M0 if ``mx`` else UE4M3)."""
    if mx:
        return jnp.where(b == 0, jnp.float32(2.0 ** -127), _pow2(jnp.maximum(b, 1) - 127))
    e, m = (b >> 3) & 15, (b & 7).astype(jnp.float32)
    return jnp.where(e == 0, m * jnp.float32(2.0 ** -9), (8.0 + m) * _pow2(jnp.maximum(e, 1) - 10))


def _kernel(x_ref, c_ref, s_ref, t_ref, o_ref, *, mx: bool, block: int, cfg: TileConfig,
            k_total: int, steps: int):
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    m0 = pl.program_id(0) * bm
    n0 = pl.program_id(1) * bn
    split = pl.program_id(2)
    half = bk // 2
    rows_per_block = block // 2  # packed rows sharing one scale
    row = jax.lax.broadcasted_iota(jnp.int32, (half, bn), 0)
    dtype = x_ref.dtype

    def step(t, acc):
        k0 = (split * steps + t) * bk
        p0 = k0 // 2
        scale = jnp.zeros((half, bn), jnp.float32)
        for j in range(bk // block):  # static: scale rows covered by this step
            b = s_ref[pl.ds(k0 // block + j, 1), pl.ds(n0, bn)].astype(jnp.int32)
            scale = jnp.where(row // rows_per_block == j, _scale_value(b, mx), scale)
        c = c_ref[pl.ds(p0, half), pl.ds(n0, bn)].astype(jnp.int32)
        w_even = (_e2m1(c & 15) * scale).astype(dtype)
        w_odd = (_e2m1(c >> 4) * scale).astype(dtype)
        if bm == 1:  # GEMV: elementwise FMA into a [block_k / 2, block_n] accumulator
            x_even = x_ref[m0, pl.ds(p0, half)].astype(jnp.float32)[:, None]
            x_odd = x_ref[m0, pl.ds(k_total // 2 + p0, half)].astype(jnp.float32)[:, None]
            return acc + x_even * w_even.astype(jnp.float32) + x_odd * w_odd.astype(jnp.float32)
        x_even = x_ref[pl.ds(m0, bm), pl.ds(p0, half)]
        x_odd = x_ref[pl.ds(m0, bm), pl.ds(k_total // 2 + p0, half)]
        acc = acc + jnp.dot(x_even, w_even, preferred_element_type=jnp.float32)
        return acc + jnp.dot(x_odd, w_odd, preferred_element_type=jnp.float32)

    t_scale = t_ref[pl.ds(0, 1), pl.ds(0, 1)]
    if bm == 1:
        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((half, bn), jnp.float32))
        o_ref[split, m0, pl.ds(n0, bn)] = jnp.sum(acc * t_scale, axis=0)
        return
    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
    o_ref[split, pl.ds(m0, bm), pl.ds(n0, bn)] = acc * t_scale


def check(x: jax.Array, w: QArray, cfg: TileConfig) -> None:
    if not supports(w):
        raise ValueError(f"{NAME}: needs 2-D [K, N] NVFP4 or MXFP4 weights quantized along axis 0; got "
                         f"{w.format.name} shape {w.shape} axis {w.axis}.")
    k, n = w.shape
    check_activation(x, k, NAME)
    block = _block(w.format)
    if cfg.block_k % block or cfg.block_k // block > 8:
        raise ValueError(f"{NAME}: block_k={cfg.block_k} must be a multiple of the scale block {block} "
                         f"(at most 8 blocks per step).")
    check_tiles(NAME, cfg, k, n, cfg.block_k)


def _call(x, codes, scales, tensor_scale, *, w_meta, cfg: TileConfig, interpret: bool):
    mx, block, k, n = w_meta
    m = x.shape[0]
    xp = even_odd_split(pad_rows(x, cfg.block_m))
    kernel = functools.partial(_kernel, mx=mx, block=block, cfg=cfg, k_total=k,
                               steps=k // cfg.block_k // cfg.split_k)
    return launch(kernel, (xp, codes, scales, tensor_scale), name=NAME, cfg=cfg, n=n, m=m,
                  dtype=x.dtype, interpret=interpret)


_call = jax.jit(_call, static_argnames=("w_meta", "cfg", "interpret"))


def weight_only_fp4_matmul(x: jax.Array, w: QArray, cfg: TileConfig = TileConfig(),
                           *, interpret: bool | None = None) -> jax.Array:
    """``x [M, K] @ dequantize(w [K, N]) -> [M, N]`` for NVFP4/MXFP4 ``w`` (module docstring)."""
    check(x, w, cfg)
    mx = isinstance(w.format, MXFormat)
    t = jnp.ones((1, 1), jnp.float32) if w.tensor_scale is None else \
        jnp.reshape(w.tensor_scale, (1, 1)).astype(jnp.float32)
    interpret = interpret_mode() if interpret is None else interpret
    return _call(x, w.codes, w.scales, t, w_meta=(mx, _block(w.format), w.shape[0], w.shape[1]),
                 cfg=cfg, interpret=interpret)
