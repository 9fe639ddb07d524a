"""Grouped (MoE expert) matmul with integer weights dequantized in registers, megablox style.

``y[r] = x[r] @ W[g(r)]`` for ``x [M, K]`` whose rows are sorted by group (expert):
group ``g`` owns rows ``[o_g, o_g + s_g)`` with ``o_g = s_0 + ... + s_{g-1}`` and
``s = group_sizes [G]``; rows from ``sum(s)`` to ``M`` are padding and get 0. ``W [G, K, N]``
is either an ``IntFormat`` ``QArray`` quantized along K (axis 1: 4 or 8 bits, symmetric
or asymmetric, channel or group scales; ``W[g, k, n] = (q - z[g, k // gs, n]) * s[g, k // gs, n]``)
or a float array (the bf16 grouped-matmul baseline).

Tile schedule (computed in jnp under jit, static shapes). Each group's rows are padded up
to a multiple of ``block_m``, so every row tile belongs to exactly one group:

- ``tiles_g = ceil(s_g / block_m)``, tile ``t`` belongs to the group ``g`` with
  ``T_g <= t < T_g + tiles_g`` (``T`` = exclusive prefix sum of ``tiles``). At most
  ``T_max = n + (M - n) // block_m`` tiles are needed (``n = min(G, M)`` non-empty groups),
  so the padded activation buffer has the static size ``Mp = T_max * block_m``
  (``<= M + G * (block_m - 1)`` rounded up to ``block_m``);
- ``x`` rows are gathered into ``xp [Mp, K]`` (zero rows for the padding of each group's
  last tile), and ``tile_group [T_max]`` (int32, -1 for the unused tail tiles) is an
  ordinary kernel input (the Triton backend has no scalar prefetch);
- the grid is ``(T_max, N / block_n, split_k)``. A program reads its tile's group id, skips
  the tile when it is -1, and otherwise runs the K loop of ``weight_only_int`` on that
  group's slice of the codes/scales/zeros: a ``[block_k, block_n]`` code tile (4-bit:
  ``block_k / 2`` packed rows, low nibble against the even half of the permuted
  activations) is dequantized to the activation dtype and ``x_tile @ W_tile`` is
  accumulated in float32;
- the output rows are gathered back to the original order (padding rows read as 0).

``mixed_grouped_matmul`` (MxMoE) runs one such call per precision group (a set of experts
sharing a weight format) over the rows of its experts, then gathers all rows back at once
from the concatenated padded outputs.

Cost (bits b, scale group gs, scales 16-bit, zeros 8-bit, ``Ga`` groups with rows,
``Tu = sum_g ceil(s_g / block_m)`` used tiles, activations bf16):

- bytes moved (HBM, ideal L2 reuse across row tiles): ``Ga*K*N*b/8`` codes
  + ``Ga*K/gs*N*(2 + 1 if asym)`` scales/zeros + ``M*K*2`` activations + ``M*N*2`` output
  (float weights: ``Ga*K*N*2``). The XLA passes around the kernel add ``M*K*2 + Mp*K*2``
  (gather into the padded buffer), ``split_k*Mp*N*4 + Mp*N*2`` (float32 partials and their
  sum) and ``Mp*N*2 + M*N*2`` (gather back). Without L2 reuse each row tile re-reads its
  group's weights: ``Tu*K*N*b/8`` codes.
- flops: ``2*sum(s)*K*N`` useful, ``2*Tu*block_m*K*N`` executed on tensor cores (row
  padding to ``block_m``), plus ``~3*K*N*Tu`` dequantization ops.

Decode-sized batches (few rows per expert) are bound by the weight bytes; large batches are
compute bound and pay the in-loop dequantization once per row tile.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jquant.formats import IntFormat, QArray, dequantize
from ._common import TileConfig, check_tiles, even_odd_split, interpret_mode, launch, sign_extend_4bit

NAME = "pallas-grouped-matmul"
SUPPORTED_BITS = (4, 8)
FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)

Weights = QArray | jax.Array


class ExpertGroup(NamedTuple):
    """One precision group of ``mixed_grouped_matmul``.

    ``expert_ids``: the experts (indices into ``group_sizes``) whose weights are stacked,
    in this order, in ``weights`` ``[len(expert_ids), K, N]`` (an ``IntFormat`` QArray
    quantized along axis 1, or a float array).
    """

    expert_ids: tuple[int, ...]
    weights: Weights


# -- references --------------------------------------------------------------------------


def _float_weights(w: Weights) -> jax.Array:
    return dequantize(w, jnp.float32) if isinstance(w, QArray) else w.astype(jnp.float32)


def reference(x: jax.Array, group_sizes: jax.Array, w: Weights) -> jax.Array:
    """Pure-jnp reference: dequantize ``w [G, K, N]`` to float32, ``lax.ragged_dot``, rows past ``sum(group_sizes)`` set to 0."""
    y = jax.lax.ragged_dot(x.astype(jnp.float32), _float_weights(w), group_sizes,
                           precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    used = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(used[:, None], y, 0.0).astype(x.dtype)


# -- checks ------------------------------------------------------------------------------


def _group_rows(w: QArray) -> int:
    """K rows per scale group (K itself for per-channel scales)."""
    return w.format.group_size if w.format.granularity == "group" else w.shape[1]


def _dtype_name(d) -> str:
    return jnp.dtype(d).name


def check(x: jax.Array, group_sizes: jax.Array, w: Weights, cfg: TileConfig) -> None:
    """Raises a ``ValueError`` naming the parameter when ``grouped_matmul`` cannot run.

    ``sum(group_sizes) <= M`` and non-negative sizes are the caller's contract (traced
    values cannot be checked here).
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{NAME}: x must be [M, K] with M >= 1, got shape {tuple(x.shape)}.")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{NAME}: x must be bfloat16, float16 or float32, got {_dtype_name(x.dtype)}.")
    if group_sizes.ndim != 1 or group_sizes.dtype != jnp.int32:
        raise ValueError(f"{NAME}: group_sizes must be a 1-D int32 array [G], got shape "
                         f"{tuple(group_sizes.shape)} {_dtype_name(group_sizes.dtype)}.")
    if isinstance(w, QArray):
        fmt = w.format
        if not (isinstance(fmt, IntFormat) and fmt.bits in SUPPORTED_BITS
                and fmt.granularity in ("channel", "group")):
            raise ValueError(f"{NAME}: w must be an IntFormat QArray of {SUPPORTED_BITS} bits with channel or "
                             f"group scales, got format {fmt.name}.")
        if len(w.shape) != 3 or w.axis != 1:
            raise ValueError(f"{NAME}: w must be [G, K, N] quantized along axis 1 (K), got shape {w.shape} "
                             f"axis {w.axis}.")
        if w.shape[1] % _group_rows(w):
            raise ValueError(f"{NAME}: w's group size {_group_rows(w)} does not divide K={w.shape[1]}.")
    else:
        if w.ndim != 3:
            raise ValueError(f"{NAME}: w must be [G, K, N], got shape {tuple(w.shape)}.")
        if w.dtype != x.dtype:
            raise ValueError(f"{NAME}: float w must have x's dtype {_dtype_name(x.dtype)}, got "
                             f"{_dtype_name(w.dtype)}.")
    g, k, n = w.shape
    if x.shape[1] != k:
        raise ValueError(f"{NAME}: x has K={x.shape[1]} but w has K={k} (layout [G, K, N]).")
    if group_sizes.shape[0] != g:
        raise ValueError(f"{NAME}: group_sizes has G={group_sizes.shape[0]} groups but w has G={g}.")
    if cfg.block_m < 16:
        raise ValueError(f"{NAME}: block_m={cfg.block_m} must be at least 16 (tensor-core dot).")
    if isinstance(w, QArray) and _group_rows(w) % cfg.block_k:
        raise ValueError(f"{NAME}: block_k={cfg.block_k} must divide the group size {_group_rows(w)}.")
    check_tiles(NAME, cfg, k, n, cfg.block_k)


# -- kernel ------------------------------------------------------------------------------


def _kernel(x_ref, tg_ref, w_ref, *rest, bits: int | None, symmetric: bool, group: int, cfg: TileConfig,
            k_total: int, steps: int):
    """One ``[block_m, block_n]`` tile of one group; ``bits=None`` for float weights."""
    if bits is None:
        s_ref, z_ref, (o_ref,) = None, None, rest
    elif symmetric:
        (s_ref, o_ref), z_ref = rest, None
    else:
        s_ref, z_ref, o_ref = rest
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    t = pl.program_id(0)
    m0 = t * bm
    n0 = pl.program_id(1) * bn
    split = pl.program_id(2)
    g = tg_ref[t]
    dtype = x_ref.dtype

    def dequant(q, gi):
        s = s_ref[g, pl.ds(gi, 1), pl.ds(n0, bn)].astype(jnp.float32)
        if not symmetric:
            q = q - z_ref[g, pl.ds(gi, 1), pl.ds(n0, bn)].astype(jnp.int32)
        return (q.astype(jnp.float32) * s).astype(dtype)

    def mac(acc, k0, size, w):
        xt = x_ref[pl.ds(m0, bm), pl.ds(k0, size)]
        return acc + jnp.dot(xt, w, preferred_element_type=jnp.float32)

    def step(i, acc):
        k0 = (split * steps + i) * bk
        if bits is None:
            return mac(acc, k0, bk, w_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)].astype(dtype))
        gi = k0 // group
        if bits == 8:
            return mac(acc, k0, bk, dequant(w_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)].astype(jnp.int32), gi))
        half = bk // 2
        p0 = k0 // 2
        c = w_ref[g, pl.ds(p0, half), pl.ds(n0, bn)].astype(jnp.int32)
        lo, hi = c & 15, c >> 4
        if symmetric:
            lo, hi = sign_extend_4bit(lo), sign_extend_4bit(hi)
        acc = mac(acc, p0, half, dequant(lo, gi))
        return mac(acc, k_total // 2 + p0, half, dequant(hi, gi))

    @pl.when(g >= 0)
    def _():
        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
        o_ref[split, pl.ds(m0, bm), pl.ds(n0, bn)] = acc


# -- schedule and launch -----------------------------------------------------------------


def _exclusive_cumsum(v: jax.Array) -> jax.Array:
    return jnp.cumsum(v) - v


def _padded_products(x: jax.Array, starts: jax.Array, sizes: jax.Array, w: Weights, cfg: TileConfig,
                     interpret: bool) -> tuple[jax.Array, jax.Array]:
    """Runs the kernel for groups whose rows are ``x[starts[g] : starts[g] + sizes[g]]``.

    Returns ``yp [Mp, N]`` (``x.dtype``; rows of unused tail tiles are unspecified) and
    ``row_base [G]`` int32: row ``r`` of group ``g`` is ``yp[row_base[g] + r]``.
    """
    m, k = x.shape
    g_count, _, n = w.shape
    bm = cfg.block_m
    used_groups = min(g_count, m)
    n_tiles = used_groups + (m - used_groups) // bm
    tiles = (sizes + bm - 1) // bm
    tile_start = _exclusive_cumsum(tiles)
    tile_group = jnp.searchsorted(jnp.cumsum(tiles), jnp.arange(n_tiles, dtype=jnp.int32), side="right")
    tile_group = jnp.where(tile_group < g_count, tile_group, -1).astype(jnp.int32)

    row_group = jnp.repeat(tile_group, bm)  # [Mp]
    gc = jnp.maximum(row_group, 0)
    local = jnp.arange(n_tiles * bm, dtype=jnp.int32) - tile_start[gc] * bm
    src = jnp.where((row_group >= 0) & (local < sizes[gc]), starts[gc] + local, m)

    if isinstance(w, QArray):
        fmt = w.format
        bits, symmetric, group = fmt.bits, fmt.symmetric, _group_rows(w)
        operands = (w.codes, w.scales) if symmetric else (w.codes, w.scales, w.zeros)
    else:
        bits, symmetric, group = None, True, k
        operands = (w,)
    xs = even_odd_split(x) if bits == 4 else x
    xp = xs.at[src].get(mode="fill", fill_value=0)
    steps = k // cfg.block_k // cfg.split_k
    kernel = functools.partial(_kernel, bits=bits, symmetric=symmetric, group=group, cfg=cfg, k_total=k,
                               steps=steps)
    yp = launch(kernel, (xp, tile_group) + operands, name=NAME, cfg=cfg, n=n, m=n_tiles * bm,
                dtype=x.dtype, interpret=interpret)
    return yp, (tile_start * bm - starts).astype(jnp.int32)


def _gather_rows(yp: jax.Array, row_base: jax.Array, group_sizes: jax.Array, m: int) -> jax.Array:
    """``out [m, N]``: row ``r`` of group ``g`` is ``yp[row_base[g] + r]``; rows past ``sum(group_sizes)`` are 0."""
    ends = jnp.cumsum(group_sizes)
    r = jnp.arange(m, dtype=jnp.int32)
    g = jnp.searchsorted(ends, r, side="right")
    pos = jnp.where(g < group_sizes.shape[0], row_base[jnp.minimum(g, group_sizes.shape[0] - 1)] + r,
                    yp.shape[0])
    return yp.at[pos].get(mode="fill", fill_value=0)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _grouped_call(x, group_sizes, w, *, cfg: TileConfig, interpret: bool):
    yp, row_base = _padded_products(x, _exclusive_cumsum(group_sizes), group_sizes, w, cfg, interpret)
    return _gather_rows(yp, row_base, group_sizes, x.shape[0])


@functools.partial(jax.jit, static_argnames=("expert_ids", "cfg", "interpret"))
def _mixed_call(x, group_sizes, weights, *, expert_ids: tuple[tuple[int, ...], ...], cfg: TileConfig,
                interpret: bool):
    starts = _exclusive_cumsum(group_sizes)
    outputs, bases, offset = [], [], 0
    for ids, w in zip(expert_ids, weights):
        idx = jnp.asarray(ids, jnp.int32)
        yp, row_base = _padded_products(x, starts[idx], group_sizes[idx], w, cfg, interpret)
        outputs.append(yp)
        bases.append(row_base + offset)
        offset += yp.shape[0]
    order = jnp.asarray([e for ids in expert_ids for e in ids], jnp.int32)
    row_base = jnp.zeros(group_sizes.shape, jnp.int32).at[order].set(jnp.concatenate(bases))
    return _gather_rows(jnp.concatenate(outputs), row_base, group_sizes, x.shape[0])


# -- public API --------------------------------------------------------------------------


def grouped_matmul(x: jax.Array, group_sizes: jax.Array, w: Weights, cfg: TileConfig = TileConfig(),
                   *, interpret: bool | None = None) -> jax.Array:
    """``x [M, K]`` (rows sorted by group) times ``w [G, K, N]`` per group -> ``[M, N]`` in ``x.dtype``.

    ``group_sizes [G]`` int32, ``sum <= M``; rows past the sum are 0 (see module docstring).
    ``interpret`` defaults to True off-GPU (Pallas interpret mode).
    """
    check(x, group_sizes, w, cfg)
    interpret = interpret_mode() if interpret is None else interpret
    return _grouped_call(x, group_sizes, w, cfg=cfg, interpret=interpret)


def check_mixed(x: jax.Array, group_sizes: jax.Array, groups: Sequence[ExpertGroup], cfg: TileConfig) -> None:
    """Raises a ``ValueError`` unless ``groups`` cover the experts of ``group_sizes`` exactly once with consistent shapes."""
    if group_sizes.ndim != 1:
        raise ValueError(f"{NAME}: group_sizes must be a 1-D int32 array [E], got shape {tuple(group_sizes.shape)}.")
    if not groups:
        raise ValueError(f"{NAME}: groups is empty; give at least one (expert_ids, weights) pair.")
    n_experts = group_sizes.shape[0]
    seen: list[int] = []
    for i, (ids, w) in enumerate(groups):
        if not ids or not all(isinstance(e, (int, np.integer)) and 0 <= e < n_experts for e in ids):
            raise ValueError(f"{NAME}: groups[{i}].expert_ids must be a non-empty tuple of ints in [0, {n_experts}), "
                             f"got {ids!r}.")
        if w.shape[0] != len(ids):
            raise ValueError(f"{NAME}: groups[{i}].weights has G={w.shape[0]} experts but expert_ids lists "
                             f"{len(ids)}.")
        if tuple(w.shape[1:]) != tuple(groups[0].weights.shape[1:]):
            raise ValueError(f"{NAME}: groups[{i}].weights has [K, N]={list(w.shape[1:])} but groups[0] has "
                             f"{list(groups[0].weights.shape[1:])}.")
        check(x, jax.ShapeDtypeStruct((len(ids),), group_sizes.dtype), w, cfg)
        seen.extend(int(e) for e in ids)
    if sorted(seen) != list(range(n_experts)):
        missing = sorted(set(range(n_experts)) - set(seen))
        repeated = sorted({e for e in seen if seen.count(e) > 1})
        raise ValueError(f"{NAME}: groups must list every expert of group_sizes (E={n_experts}) exactly once; "
                         f"missing {missing}, repeated {repeated}.")


def mixed_grouped_matmul(x: jax.Array, group_sizes: jax.Array, groups: Sequence[ExpertGroup | tuple],
                         cfg: TileConfig = TileConfig(), *, interpret: bool | None = None) -> jax.Array:
    """MxMoE mixed precision: ``x [M, K]`` (rows sorted by expert) times each expert's own weight -> ``[M, N]``.

    ``group_sizes [E]`` int32 rows per expert (``sum <= M``; rows past the sum are 0).
    ``groups``: ``ExpertGroup(expert_ids, weights)`` (or plain pairs), one per precision
    group, covering the E experts exactly once; ``weights [len(expert_ids), K, N]`` hold
    those experts in ``expert_ids`` order. One grouped kernel launch per precision group,
    all with ``cfg`` (its ``block_k`` must divide every group size).
    """
    groups = tuple(ExpertGroup(tuple(ids), w) for ids, w in groups)
    check_mixed(x, group_sizes, groups, cfg)
    interpret = interpret_mode() if interpret is None else interpret
    expert_ids = tuple(tuple(int(e) for e in ids) for ids, _ in groups)
    return _mixed_call(x, group_sizes, tuple(w for _, w in groups), expert_ids=expert_ids, cfg=cfg,
                       interpret=interpret)
