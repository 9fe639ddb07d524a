"""Codebook (VQ) GEMV: ``x [M, K] @ W`` for a ``CodebookFormat`` weight, decoded by lookup in registers.

``W`` is a ``[K, N]`` QArray quantized along K (axis 0) in vectors of ``d`` rows: vector
``v`` of column ``n`` is ``s[g, n] * sum_c C[grid(v, n), c, i[v, c, n], :]`` (``M_cb``
additive codebooks ``c``; ``grid`` the codebook grid of the format, one codebook per
layer by default; ``s`` the optional group scales). The kernel keeps the codes as
stored: 8-bit indices are one byte per index, 16-bit indices two little-endian bytes,
both in vector-major order along K (the ``M_cb`` indices of a vector adjacent).

One program per ``block_n`` output columns loops over K in steps of ``block_k`` rows
(``block_k / d`` vectors): it loads the index rows of the step with strided loads (one
``[block_k / d, block_n]`` tile per codebook), gathers each codeword element from the
codebook array (small tables stay in L1/L2), multiplies by the strided ``x`` columns and
accumulates in float32; rows of ``x`` (M <= 8) are unrolled. No XLA pass runs around it.

Cost (index bits k, d, M_cb codebooks, 16-bit codebooks and scales):

- bytes moved: ``K*N*M_cb*k/(8 d)`` indices + scales ``K/G*N*2`` + codebooks
  ``grid * M_cb * 2^k * d * 2`` + ``M*K*2`` + ``M*N*2``. ``vq-d4-k8`` is 2 bits per weight
  (8x fewer weight bytes than bf16), ``vq-d8-k16`` also 2 (but a 1 MiB codebook).
- work: ``M_cb * K * N`` gathers of one codebook element (L1/L2 traffic, not HBM) and
  ``2 * M * N * K`` flops on CUDA cores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jquant.formats import CodebookFormat, QArray, dequantize
from ._common import TileConfig, check_activation, interpret_mode, is_power_of_two

NAME = "pallas-codebook-gemv"
SUPPORTED_INDEX_BITS = (8, 16)
MAX_M = 8


def supports(w: QArray) -> bool:
    """2-D ``[K, N]`` ``CodebookFormat`` weights along axis 0 with 8- or 16-bit indices."""
    fmt = w.format
    return (isinstance(w, QArray) and isinstance(fmt, CodebookFormat) and len(w.shape) == 2 and w.axis == 0
            and fmt.index_bits in SUPPORTED_INDEX_BITS and w.codebooks is not None)


def reference(x: jax.Array, w: QArray) -> jax.Array:
    """Pure-jnp reference: dequantize (lookup) to float32, float32 matmul, cast to ``x.dtype``."""
    y = jnp.dot(x.astype(jnp.float32), dequantize(w, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def _kernel(x_ref, c_ref, cb_ref, *rest, fmt: CodebookFormat, grid: tuple[int, int], k: int, n: int,
            cfg: TileConfig, m: int):
    s_ref, o_ref = (rest[0], rest[1]) if fmt.group_size is not None else (None, rest[0])
    d, ncb, bits = fmt.vector_dim, fmt.num_codebooks, fmt.index_bits
    entries = fmt.codebook_size
    bn, bk = cfg.block_n, cfg.block_k
    vb = bk // d  # vectors per step
    nv = k // d
    gk, gn = grid
    n0 = pl.program_id(0) * bn
    cols = pl.ds(n0, bn)
    # codebook column-group of every output column of this program: [1, bn]
    col_group = (n0 + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)) // (n // gn)
    bytes_per_index = bits // 8

    def index_tile(v0, c):
        """int32 indices ``[vb, bn]`` of codebook ``c`` for vectors ``v0 .. v0 + vb``."""
        stride = ncb * bytes_per_index
        first = (v0 * ncb + c) * bytes_per_index
        lo = c_ref[pl.ds(first, vb, stride=stride), cols].astype(jnp.int32)
        if bits == 8:
            return lo
        hi = c_ref[pl.ds(first + 1, vb, stride=stride), cols].astype(jnp.int32)
        return lo | (hi << 8)

    def step(t, accs):
        v0 = t * vb
        row_group = (v0 // (nv // gk))  # scalar: a step stays inside one codebook row-group
        base = ((row_group * gn + col_group) * ncb) * entries  # [1, bn] codeword offset of codebook 0
        idx = [(base + c * entries + index_tile(v0, c)) * d for c in range(ncb)]  # [vb, bn] element offsets
        scale = None
        if s_ref is not None:
            scale = s_ref[pl.ds((v0 * d) // fmt.group_size, 1), cols].astype(jnp.float32)
        accs = list(accs)
        for j in range(d):
            w = sum(cb_ref[i + j].astype(jnp.float32) for i in idx)  # gather: [vb, bn]
            if scale is not None:
                w = w * scale
            for r in range(m):
                xj = x_ref[jnp.int32(r), pl.ds(v0 * d + j, vb, stride=d)].astype(jnp.float32)
                accs[r] = accs[r] + xj[:, None] * w
        return tuple(accs)

    init = tuple(jnp.zeros((vb, bn), jnp.float32) for _ in range(m))
    accs = jax.lax.fori_loop(0, k // bk, step, init)
    for r in range(m):
        o_ref[r, cols] = jnp.sum(accs[r], axis=0).astype(o_ref.dtype)


def _grid(w: QArray) -> tuple[int, int]:
    return int(w.codebooks.shape[0]), int(w.codebooks.shape[1])


def check(x: jax.Array, w: QArray, cfg: TileConfig) -> None:
    """Raises a ``ValueError``/``TypeError`` naming the problem when the kernel cannot run."""
    if not supports(w):
        raise ValueError(f"{NAME}: needs a 2-D [K, N] CodebookFormat weight along axis 0 with "
                         f"{SUPPORTED_INDEX_BITS}-bit indices; got {w.format.name} shape {w.shape} axis {w.axis}.")
    k, n = w.shape
    check_activation(x, k, NAME)
    fmt = w.format
    if not 1 <= x.shape[0] <= MAX_M:
        raise ValueError(f"{NAME}: M={x.shape[0]} rows; the GEMV takes 1..{MAX_M}.")
    for name in ("block_n", "block_k"):
        if not is_power_of_two(getattr(cfg, name)):
            raise ValueError(f"{NAME}: {name}={getattr(cfg, name)} must be a power of two.")
    if n % cfg.block_n:
        raise ValueError(f"{NAME}: N={n} is not a multiple of block_n={cfg.block_n}.")
    gk, gn = _grid(w)
    rows_per_book = k // gk
    limits = [k, rows_per_book] + ([fmt.group_size] if fmt.group_size is not None else [])
    for lim in limits:
        if lim % cfg.block_k:
            raise ValueError(f"{NAME}: block_k={cfg.block_k} must divide K={k}, the rows per codebook "
                             f"({rows_per_book}) and the scale group ({fmt.group_size}).")
    if cfg.block_k < fmt.vector_dim:
        raise ValueError(f"{NAME}: block_k={cfg.block_k} is below vector_dim={fmt.vector_dim}.")
    if (n // gn) % 1 or n % gn:
        raise ValueError(f"{NAME}: the codebook grid {gn} does not divide N={n}.")


def _call(x, codes, books, scales, *, fmt, grid, k, n, cfg: TileConfig, interpret: bool):
    m = x.shape[0]
    kernel = functools.partial(_kernel, fmt=fmt, grid=grid, k=k, n=n, cfg=cfg, m=m)
    operands = (x, codes, books.reshape(-1)) + ((scales,) if scales is not None else ())
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(n // cfg.block_n,),
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name=NAME,
    )(*operands)


_call = jax.jit(_call, static_argnames=("fmt", "grid", "k", "n", "cfg", "interpret"))


def codebook_gemv(x: jax.Array, w: QArray, cfg: TileConfig = TileConfig(1, 32, 64, 1, 4, 2),
                  *, interpret: bool | None = None) -> jax.Array:
    """``x [M, K] @ dequantize(w [K, N]) -> [M, N]`` in ``x.dtype`` for a codebook weight (module docstring)."""
    check(x, w, cfg)
    interpret = interpret_mode() if interpret is None else interpret
    return _call(x, w.codes, w.codebooks, w.scales, fmt=w.format, grid=_grid(w), k=w.shape[0], n=w.shape[1],
                 cfg=cfg, interpret=interpret)
