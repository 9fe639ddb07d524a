"""FP8 (E4M3) W8A8: per-token fp8 activations (quantized in the kernel) times fp8 weights.

With the activation ``FP8Format``'s per-token scales ``s_x[m] = amax_m / 448`` and
per-channel weight scales ``s_w[n]``::

    c_x[m, k] = e4m3_RNE(clip(x[m, k] / s_x[m], -448, 448))     (XLA pass, or in the kernel)
    y[m, n]   = s_x[m] * s_w[n] * sum_k c_x[m, k] * c_w[k, n]             (fp8 tensor cores, f32 acc)

Cost: bytes ``M*K*2 + K*N + 4*(M + N) + M*N*2``; ``2*M*N*K`` flops at the fp8 tensor-core
rate (2x bf16 on Hopper), so at large M the limit is 2x over a bf16 matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jquant.formats import FP8Format, QArray, dequantize, fake_quantize, quantize
from ._common import (TileConfig, check_activation, check_tiles, launch,
                                    interpret_mode, pad_rows)

NAME = "pallas-fp8"
E4M3_MAX = 448.0


def _is_e4m3_channel(fmt) -> bool:
    return isinstance(fmt, FP8Format) and fmt.element == "e4m3" and fmt.granularity == "channel"


def supports(w: QArray, activation) -> bool:
    """E4M3 per-channel weights along axis 0 of ``[K, N]`` and E4M3 per-token activations."""
    return (isinstance(w, QArray) and _is_e4m3_channel(w.format) and _is_e4m3_channel(activation)
            and len(w.shape) == 2 and w.axis == 0)


def reference(x: jax.Array, w: QArray, activation: FP8Format) -> jax.Array:
    xq = fake_quantize(x.astype(jnp.float32), activation, axis=-1)
    y = jnp.dot(xq, dequantize(w, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def _kernel(x_ref, sx_ref, c_ref, s_ref, o_ref, *, cfg: TileConfig, steps: int):
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    m0 = pl.program_id(0) * bm
    n0 = pl.program_id(1) * bn
    split = pl.program_id(2)
    sx = sx_ref[pl.ds(m0, bm), :]

    def step(t, acc):
        k0 = (split * steps + t) * bk
        cx = x_ref[pl.ds(m0, bm), pl.ds(k0, bk)]
        if cfg.quantize_in_kernel:
            cx = jnp.clip(cx.astype(jnp.float32) / sx, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
        cw = c_ref[pl.ds(k0, bk), pl.ds(n0, bn)]
        return acc + jnp.dot(cx, cw, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
    sw = s_ref[pl.ds(0, 1), pl.ds(n0, bn)].astype(jnp.float32)
    o_ref[split, pl.ds(m0, bm), pl.ds(n0, bn)] = acc * sx * sw


def check(x: jax.Array, w: QArray, activation, cfg: TileConfig) -> None:
    if not supports(w, activation):
        raise ValueError(f"{NAME}: needs E4M3 per-channel weights [K, N] quantized along axis 0 and E4M3 "
                         f"per-token activations (get_format('fp8-e4m3')); got weight "
                         f"{w.format.name} shape {w.shape} axis {w.axis}, activation "
                         f"{getattr(activation, 'name', activation)!r}.")
    k, n = w.shape
    check_activation(x, k, NAME)
    check_tiles(NAME, cfg, k, n, cfg.block_k)


def _call(x, codes, scales, *, activation, n: int, cfg: TileConfig, interpret: bool):
    m, k = x.shape
    xp = pad_rows(x, cfg.block_m)
    xq = quantize(xp, activation, axis=-1)
    sx = jnp.where(xq.scales > 0, xq.scales.astype(jnp.float32), 1.0)
    if not cfg.quantize_in_kernel:
        xp = xq.codes
    kernel = functools.partial(_kernel, cfg=cfg, steps=k // cfg.block_k // cfg.split_k)
    return launch(kernel, (xp, sx, codes, scales), name=NAME, cfg=cfg, n=n, m=m, dtype=x.dtype,
                  interpret=interpret)


_call = jax.jit(_call, static_argnames=("activation", "n", "cfg", "interpret"))


def fp8_matmul(x: jax.Array, w: QArray, activation: FP8Format, cfg: TileConfig = TileConfig(),
               *, interpret: bool | None = None) -> jax.Array:
    """``fake_quant_e4m3(x [M, K]) @ dequantize(w [K, N]) -> [M, N]`` on fp8 tensor cores."""
    check(x, w, activation, cfg)
    interpret = interpret_mode() if interpret is None else interpret
    return _call(x, w.codes, w.scales, activation=activation, n=w.shape[1], cfg=cfg, interpret=interpret)
