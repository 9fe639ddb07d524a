"""Decode GEMV for W4A16 / W8A16 (M = 1..16): one kernel launch, no XLA passes around it.

``y[M, N] = x[M, K] @ W`` with ``W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]`` for the
``IntFormat`` codes of a ``QArray`` quantized along K (same math as ``weight_only_int``).
This file exists because decode is memory bound and the general kernel spends its time
elsewhere: an XLA pass that permutes ``x`` into even/odd halves, an XLA reduction of
split-K partial sums, and one int-to-float conversion per weight (a quarter-rate
instruction on Hopper). Here:

- **Layout.** The weight is read as stored (4-bit: element 2i in the low nibble of
  packed row i). ``x`` is passed as ``[M, K/2, 2]`` (a free reshape) and the kernel reads
  its even and odd columns with strided loads, so nothing is permuted per call.
- **Grid.** One program per ``block_n`` output columns loops over all of K and writes
  the output in ``x.dtype`` directly (no partial sums, no second kernel).
- **Dequantization without conversions.** A code ``v`` (made unsigned, ``v in [0, 2^b)``)
  is placed in the top mantissa bits of the float ``1.0``: ``f = 1 + v / 2^b`` is exact
  and costs a shift and one logic op. Then ``W = f * (2^b s) - (2^b + o) s`` with
  ``o = z`` (asymmetric) or ``2^(b-1)`` (symmetric, after flipping the sign bit): one FMA.
- **Inner product.** ``block_m = 1``: CUDA-core FMAs into a ``[block_k, block_n]``
  float32 accumulator per row of ``x`` (rows unrolled; for small M), reduced over K once
  at the end. ``block_m = 16``: tensor-core ``x @ W`` with rows masked beyond M; the
  4-bit codes become exact bf16 values ``128 + v`` (bits ``0x4300 | v``) and the scale
  and offset are applied per K step: ``s * (x @ (128 + v) - (128 + o) * sum_k x)``.

Cost (bits b, group size G, 16-bit scales, 8-bit zeros):

- bytes moved: ``K*N*b/8`` codes + ``K/G*N*(2 + 1 if asym)`` scales/zeros
  + ``M*K*2`` + ``M*N*2``. int4-g128 moves 4.125 bits per weight against 16 for bf16:
  the bandwidth limit is 3.9x over a bf16 GEMV.
- flops: ``2*M*N*K`` (FMA variant: ``M + 1`` FMAs per weight plus about 2 integer ops to
  unpack; dot variant: the dot on tensor cores, about 2 integer ops per weight).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jquant.formats import IntFormat, QArray, dequantize
from ._common import TileConfig, check_activation, is_power_of_two, interpret_mode

NAME = "pallas-int-gemv"
SUPPORTED_BITS = (4, 8)
MAX_M = 16  # rows handled by one program (dot variant); the FMA variant unrolls rows
MAX_FMA_M = 8
MAX_SUB_ROWS = 256  # caps the accumulator height (per-channel scales would otherwise make it block_k)
ONE = 0x3F800000  # float32 bits of 1.0
SIGN_FLIP = 0x00400000  # float32 mantissa bit 22: adds 2^(b-1) to a b-bit code placed at the top


def supports(w: QArray) -> bool:
    """2-D ``[K, N]`` IntFormat 4/8-bit weights with channel or group scales along axis 0."""
    fmt = w.format
    return (isinstance(w, QArray) and isinstance(fmt, IntFormat) and fmt.bits in SUPPORTED_BITS
            and len(w.shape) == 2 and w.axis == 0 and fmt.granularity in ("channel", "group"))


def reference(x: jax.Array, w: QArray) -> jax.Array:
    """Pure-jnp reference: dequantize to float32, float32 matmul, cast to ``x.dtype``."""
    y = jnp.dot(x.astype(jnp.float32), dequantize(w, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def _group_rows(w: QArray) -> int:
    return w.format.group_size if w.format.granularity == "group" else w.shape[0]


def _unit_float(c: jax.Array, shift: int, mask: int, symmetric: bool) -> jax.Array:
    """``1 + v / 2^b`` (float32, exact) for the b-bit field of ``c`` that ``shift`` moves to bits 22.."""
    bits = ((c << shift) & mask) ^ (ONE | (SIGN_FLIP if symmetric else 0))
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _bf16_code(v: jax.Array) -> jax.Array:
    """bfloat16 ``128 + v`` for 4-bit ``v`` in [0, 16) (exponent of 128, ``v`` in the mantissa)."""
    return jax.lax.bitcast_convert_type((v | 0x4300).astype(jnp.uint16), jnp.bfloat16)


def _kernel(x_ref, c_ref, s_ref, *rest, bits: int, symmetric: bool, group: int, cfg: TileConfig,
            m: int, steps: int):
    z_ref, o_ref = (None, rest[0]) if symmetric else rest
    bn, bk = cfg.block_n, cfg.block_k
    # logical rows per sub-step (one scale row; accumulator rows): a step covers bk // sub of them
    sub = min(bk, group, MAX_SUB_ROWS)
    n0 = pl.program_id(0) * bn
    cols = pl.ds(n0, bn)
    dtype = o_ref.dtype
    full = float(1 << bits)

    def scale_offset(k0):
        """Per-column ``s`` and offset ``o`` of the group holding logical row ``k0``, [1, bn] float32."""
        g = k0 // group
        s = s_ref[pl.ds(g, 1), cols].astype(jnp.float32)
        if symmetric:
            return s, jnp.float32(1 << (bits - 1))
        return s, z_ref[pl.ds(g, 1), cols].astype(jnp.float32)

    def codes(k0):
        rows = sub // 2 if bits == 4 else sub
        c = c_ref[pl.ds(k0 // 2 if bits == 4 else k0, rows), cols]
        return c.astype(jnp.int32)

    def x_cols(r, k0):
        """The x values that multiply the code rows at ``k0``: (even, odd) halves or one tile."""
        if bits == 4:
            p = pl.ds(k0 // 2, sub // 2)
            return x_ref[r, p, 0].astype(jnp.float32), x_ref[r, p, 1].astype(jnp.float32)
        return (x_ref[r, pl.ds(k0, sub)].astype(jnp.float32),)

    def sub_steps(t):
        return [t * bk + j * sub for j in range(bk // sub)]

    if cfg.block_m == 1:  # CUDA-core FMAs, rows of x unrolled
        def step(t, accs):
            loaded = [(k0, codes(k0), scale_offset(k0)) for k0 in sub_steps(t)]  # issue loads first
            accs = list(accs)
            for k0, c, (s, o) in loaded:
                a, b = s * full, -(full + o) * s
                if bits == 4:
                    ws = (_unit_float(c, 19, 0x780000, symmetric) * a + b,
                          _unit_float(c, 15, 0x780000, symmetric) * a + b)
                else:
                    ws = (_unit_float(c, 15, 0x7F8000, symmetric) * a + b,)
                for r in range(m):
                    for xv, wv in zip(x_cols(r, k0), ws):
                        accs[r] = accs[r] + xv[:, None] * wv
            return tuple(accs)

        rows = sub // 2 if bits == 4 else sub
        init = tuple(jnp.zeros((rows, bn), jnp.float32) for _ in range(m))
        accs = jax.lax.fori_loop(0, steps, step, init)
        for r in range(m):
            o_ref[r, cols] = jnp.sum(accs[r], axis=0).astype(dtype)
        return

    # tensor-core variant: 16 rows, rows >= m masked (read as 0, never written)
    row_ids = jax.lax.broadcasted_iota(jnp.int32, (MAX_M, 1), 0)
    live = row_ids < m
    # bf16 activations: 4-bit codes become exact bf16 ``128 + v`` by bit ops; other dtypes convert
    op_dtype = jnp.bfloat16 if x_ref.dtype == jnp.bfloat16 else x_ref.dtype
    fast = op_dtype == jnp.bfloat16

    def x_tile(k0, half_index):
        if bits == 4:
            ref = x_ref.at[pl.ds(0, MAX_M), pl.ds(k0 // 2, sub // 2), jnp.int32(half_index)]
        else:
            ref = x_ref.at[pl.ds(0, MAX_M), pl.ds(k0, sub)]
        return plt.load(ref, mask=live, other=0)

    def step(t, acc):
        loaded = [(k0, codes(k0), scale_offset(k0)) for k0 in sub_steps(t)]
        for k0, c, (s, o) in loaded:
            if bits == 4:
                if symmetric:
                    c = c ^ 0x88  # v = q + 8 in both nibbles
                tiles = ((x_tile(k0, 0), c & 15), (x_tile(k0, 1), c >> 4))
                base = 128.0 if fast else 0.0
            else:
                tiles = ((x_tile(k0, 0), c),)  # 8-bit codes are exact in bfloat16
                base = 0.0
            part = xsum = 0.0
            for xt, v in tiles:
                xt = xt.astype(op_dtype)
                wt = _bf16_code(v) if base else v.astype(jnp.float32).astype(op_dtype)
                part = part + jnp.dot(xt, wt, preferred_element_type=jnp.float32)
                xsum = xsum + jnp.sum(xt.astype(jnp.float32), axis=1, keepdims=True)
            if symmetric and bits == 8:
                acc = acc + s * part
            else:
                acc = acc + s * (part - (base + o) * xsum)
        return acc

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((MAX_M, bn), jnp.float32))
    plt.store(o_ref.at[pl.ds(0, MAX_M), cols], acc.astype(dtype), mask=live)


def check(x: jax.Array, w: QArray, cfg: TileConfig) -> None:
    """Raises a ``ValueError``/``TypeError`` naming the problem when the kernel cannot run."""
    if not supports(w):
        raise ValueError(f"{NAME}: needs a 2-D [K, N] IntFormat weight of {SUPPORTED_BITS} bits with channel "
                         f"or group scales quantized along axis 0; got {w.format.name} shape {w.shape} "
                         f"axis {w.axis}.")
    k, n = w.shape
    check_activation(x, k, NAME)
    m = x.shape[0]
    if cfg.block_m not in (1, MAX_M):
        raise ValueError(f"{NAME}: block_m must be 1 (FMA variant) or {MAX_M} (tensor cores), got {cfg.block_m}.")
    limit = MAX_FMA_M if cfg.block_m == 1 else MAX_M
    if not 1 <= m <= limit:
        raise ValueError(f"{NAME}: M={m} rows; this variant (block_m={cfg.block_m}) takes 1..{limit}.")
    if cfg.split_k != 1:
        raise ValueError(f"{NAME}: split_k must be 1 (one program covers all of K).")
    for name in ("block_n", "block_k"):
        if not is_power_of_two(getattr(cfg, name)):
            raise ValueError(f"{NAME}: {name}={getattr(cfg, name)} must be a power of two.")
    min_k = 32 if cfg.block_m == MAX_M else 2
    if min(cfg.block_k, _group_rows(w)) < min_k:
        raise ValueError(f"{NAME}: block_k={cfg.block_k} (or the group size) is below {min_k}.")
    k_step = min(cfg.block_k, _group_rows(w), MAX_SUB_ROWS)
    if _group_rows(w) % k_step or cfg.block_k % k_step or k % cfg.block_k:
        raise ValueError(f"{NAME}: block_k={cfg.block_k} must divide K={k} and divide or be a multiple of "
                         f"the group size {_group_rows(w)}.")
    if n % cfg.block_n:
        raise ValueError(f"{NAME}: N={n} is not a multiple of block_n={cfg.block_n}.")


def _call(x, codes, scales, zeros, *, w_meta, cfg: TileConfig, interpret: bool):
    bits, symmetric, group, k, n = w_meta
    m = x.shape[0]
    xs = x.reshape(m, k // 2, 2) if bits == 4 else x
    kernel = functools.partial(_kernel, bits=bits, symmetric=symmetric, group=group, cfg=cfg,
                               m=m, steps=k // cfg.block_k)
    operands = (xs, codes, scales) if symmetric else (xs, codes, scales, zeros)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(n // cfg.block_n,),
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name=NAME,
    )(*operands)


_call = jax.jit(_call, static_argnames=("w_meta", "cfg", "interpret"))


def int_gemv(x: jax.Array, w: QArray, cfg: TileConfig = TileConfig(1, 32, 128, 1, 4, 3),
             *, interpret: bool | None = None) -> jax.Array:
    """``x [M, K] @ dequantize(w [K, N]) -> [M, N]`` in ``x.dtype`` for decode batches (module docstring).

    ``interpret`` defaults to True off-GPU (Pallas interpret mode).
    """
    check(x, w, cfg)
    fmt = w.format
    meta = (fmt.bits, fmt.symmetric, _group_rows(w), w.shape[0], w.shape[1])
    interpret = interpret_mode() if interpret is None else interpret
    return _call(x, w.codes, w.scales, w.zeros, w_meta=meta, cfg=cfg, interpret=interpret)
