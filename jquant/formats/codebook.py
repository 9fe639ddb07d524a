"""Codebook (vector) formats: packed indices into lookup tables, plus optional group scales.

A tensor is cut into vectors of ``vector_dim`` (d in {1, 2, 4, 8}) consecutive elements
along ``axis``. Each vector stores ``num_codebooks`` (M) indices of ``index_bits`` (k <= 16)
bits, one per codebook, and is decoded additively (M = 1 is plain VQ; M > 1 is
additive/residual VQ as in AQLM)::

    x_hat[vector v] = scale_g * sum_m C[grid(v), m, i_{v,m}, :]

Codebooks: ``codebooks`` has shape ``grid + (M, 2^k, d)`` where ``grid`` has the logical
rank, with 1 (shared) or a divisor of the logical length on each dimension (the axis
dimension counted in vectors). So one codebook per layer is ``(1,) * rank + (M, K, d)``,
and e.g. one per 64-element group along axis 0 of an ``[in, out]`` weight with d = 1 is
``(in // 64, 1, M, K, 1)`` (RWKVQuant style), one per output column ``(1, out, M, K, d)``.
Scales (optional, ``group_size`` a multiple of d along ``axis``) have the integer
formats' generic-broadcast shape and ``scale_dtype``.

The grid can be fixed by the format (``codebook_rows`` elements along ``axis`` and
``codebook_cols`` along the last other dimension share one codebook; GPTVQ's groups),
so a checkpoint knows its codebook shapes from the recipe alone. Without them the grid
is whatever the stored ``codebooks`` array has (one per tensor by default).

Codes: the ``n / d * M`` indices of a line (vector-major: the M indices of a vector are
adjacent) are bit-packed along ``axis`` with ``packing.pack_bits`` (uint8). Bits per
element = (M * k) / d + scale bits / group + codebook bytes * 8 / N.

``codebook_quantize`` assigns each vector its nearest codeword by brute force (greedy
per codebook on the residual when M > 1); learned codebooks (k-means, GPTVQ) belong to the algorithms
(``jquant.algorithms.gptvq``). PCDVQ's product codebook (direction x magnitude) is
``jquant.formats.polar``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jquant.formats import _blocks as B
from jquant.formats.api import check_finite
from jquant.formats.packing import pack_bits, packed_length, unpack_bits
from jquant.formats.qarray import Format, QArray

VECTOR_DIMS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CodebookFormat(Format):
    vector_dim: int
    index_bits: int
    num_codebooks: int = 1
    group_size: int | None = None
    scale_dtype: str = "float16"
    codebook_dtype: str = "float16"
    codebook_rows: int | None = None
    codebook_cols: int | None = None

    def __post_init__(self):
        own = "CodebookFormat"
        if isinstance(self.vector_dim, bool) or self.vector_dim not in VECTOR_DIMS:
            raise ValueError(f"{own}: vector_dim={self.vector_dim!r} must be one of {VECTOR_DIMS}.")
        if isinstance(self.index_bits, bool) or self.index_bits not in range(1, 17):
            raise ValueError(f"{own}: index_bits={self.index_bits!r} must be an int in 1..16.")
        if isinstance(self.num_codebooks, bool) or not isinstance(self.num_codebooks, int) \
                or self.num_codebooks < 1:
            raise ValueError(f"{own}: num_codebooks={self.num_codebooks!r} must be a positive int.")
        if self.group_size is not None and (
                not isinstance(self.group_size, int) or self.group_size < 1
                or self.group_size % self.vector_dim):
            raise ValueError(f"{own}: group_size={self.group_size!r} must be a positive multiple of "
                             f"vector_dim={self.vector_dim} (or None for no scales).")
        B.check_scale_dtype(own, self.scale_dtype)
        B.check_scale_dtype(f"{own} (codebook_dtype)", self.codebook_dtype)
        for field in ("codebook_rows", "codebook_cols"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{own}: {field}={v!r} must be a positive int (or None: one codebook along it).")
        if self.codebook_rows is not None and self.codebook_rows % self.vector_dim:
            raise ValueError(f"{own}: codebook_rows={self.codebook_rows} must be a multiple of "
                             f"vector_dim={self.vector_dim}.")

    @property
    def name(self) -> str:
        name = f"vq-d{self.vector_dim}-k{self.index_bits}"
        if self.num_codebooks != 1:
            name += f"x{self.num_codebooks}"
        if self.group_size is not None:
            name += f"-g{self.group_size}"
        if self.grouped:
            name += f"-cb{self.codebook_rows or 'all'}x{self.codebook_cols or 'all'}"
        return name

    @property
    def grouped(self) -> bool:
        """Whether the format fixes the codebook grid (``codebook_rows`` / ``codebook_cols``)."""
        return self.codebook_rows is not None or self.codebook_cols is not None

    def grid(self, shape, axis) -> tuple[int, ...]:
        """The codebook grid the format fixes for ``shape`` (all ones when not ``grouped``)."""
        grid = [1] * len(shape)
        if self.codebook_rows is not None:
            grid[axis] = shape[axis] // self.codebook_rows
        last = max(d for d in range(len(shape)) if d != axis) if len(shape) > 1 else None
        if self.codebook_cols is not None and last is not None:
            grid[last] = shape[last] // self.codebook_cols
        return tuple(grid)

    @property
    def table_bits(self) -> int:
        """Bits of one codebook (``M * 2^k * d`` entries in ``codebook_dtype``)."""
        return self.num_codebooks * self.codebook_size * self.vector_dim * 8 * jnp.dtype(self.codebook_dtype).itemsize

    @property
    def codebook_size(self) -> int:
        return 2 ** self.index_bits

    def check_shape(self, shape, axis):
        n = shape[axis]
        if n % self.vector_dim:
            raise ValueError(
                f"{self.name}: vector_dim={self.vector_dim} does not divide the length {n} of axis "
                f"{axis} (shape {tuple(shape)}); pad the axis or pick a smaller vector_dim.")
        if self.group_size is not None:
            B.check_group_divides(self.name, tuple(shape), axis, self.group_size)
        last = [d for d in range(len(shape)) if d != axis]
        for field, dim in (("codebook_rows", axis), ("codebook_cols", last[-1] if last else None)):
            v = getattr(self, field)
            if v is not None and (dim is None or shape[dim] % v):
                raise ValueError(f"{self.name}: {field}={v} does not divide the length "
                                 f"{None if dim is None else shape[dim]} of axis {dim} (shape {tuple(shape)}); "
                                 f"pick a divisor.")

    def check_codebooks(self, cb_shape, shape, axis) -> None:
        """Raises unless ``cb_shape`` is ``grid + (M, 2^k, d)`` with a valid grid."""
        rank = len(shape)
        tail = (self.num_codebooks, self.codebook_size, self.vector_dim)
        grid = tuple(cb_shape[:rank])
        ok = len(cb_shape) == rank + 3 and tuple(cb_shape[rank:]) == tail
        vshape = B.with_axis(shape, axis, shape[axis] // self.vector_dim)
        if ok:
            ok = all(g >= 1 and L % g == 0 for g, L in zip(grid, vshape))
        if ok and self.grouped and grid != self.grid(shape, axis):
            raise ValueError(f"{self.name}: codebooks must have the grid {self.grid(shape, axis)} for shape "
                             f"{tuple(shape)} (codebook_rows/codebook_cols), got {tuple(cb_shape)}.")
        if not ok:
            raise ValueError(
                f"{self.name}: codebooks must have shape grid + {tail}, where grid has rank {rank} "
                f"and each entry divides {vshape} (the logical shape counted in vectors along axis "
                f"{axis}); got {tuple(cb_shape)}.")

    def expected_children(self, shape, axis, codebooks_shape=None):
        grid = self.grid(shape, axis)
        if codebooks_shape is not None:
            self.check_codebooks(codebooks_shape, shape, axis)
            grid = tuple(codebooks_shape[:len(shape)])
        nv = shape[axis] // self.vector_dim
        sshape = None if self.group_size is None else B.scale_shape(shape, axis, "group", self.group_size)
        return dict(
            codes=jax.ShapeDtypeStruct(
                B.with_axis(shape, axis, packed_length(nv * self.num_codebooks, self.index_bits)), jnp.uint8),
            scales=None if sshape is None else jax.ShapeDtypeStruct(sshape, jnp.dtype(self.scale_dtype)),
            codebooks=jax.ShapeDtypeStruct(
                grid + (self.num_codebooks, self.codebook_size, self.vector_dim), jnp.dtype(self.codebook_dtype)),
        )

    def encode(self, x, axis, key):
        raise ValueError(
            f"{self.name}: a codebook format needs codebooks; use "
            f"jquant.formats.codebook_quantize(x, codebooks, fmt, axis=...) instead of quantize.")

    def codes_of(self, q):
        """int32 indices, shape ``logical[:axis] + (n/d, M) + logical[axis+1:]``."""
        nv = q.shape[q.axis] // self.vector_dim
        idx = unpack_bits(q.codes, self.index_bits, nv * self.num_codebooks, q.axis).astype(jnp.int32)
        s = idx.shape
        return idx.reshape(s[:q.axis] + (nv, self.num_codebooks) + s[q.axis + 1:])

    def decode(self, q):
        idx = self.codes_of(q)  # [..., nv, M, ...]
        axis, d = q.axis, self.vector_dim
        vshape = B.with_axis(q.shape, axis, q.shape[axis] // d)
        grid = q.codebooks.shape[:len(q.shape)]
        gid = _grid_index(vshape, grid)  # vshape
        M, K = self.num_codebooks, self.codebook_size
        flat = (jnp.expand_dims(gid, axis + 1) * M + _iota_along(M, idx.ndim, axis + 1)) * K + idx
        table = q.codebooks.astype(jnp.float32).reshape(-1, d)
        vec = jnp.take(table, flat, axis=0).sum(axis=axis + 1)  # vshape + (d,)
        vec = jnp.moveaxis(vec, -1, axis + 1)  # [..., nv, d, ...]
        out = vec.reshape(q.shape)
        if q.scales is not None:
            out = out * B.expand(q.scales.astype(jnp.float32), axis, q.shape[axis])
        return out


def _iota_along(n: int, ndim: int, dim: int) -> jax.Array:
    shape = [1] * ndim
    shape[dim] = n
    return jnp.arange(n, dtype=jnp.int32).reshape(shape)


def _grid_index(vshape: tuple[int, ...], grid: tuple[int, ...]) -> jax.Array:
    """Flat codebook-grid index of every vector position (int32, broadcast to ``vshape``)."""
    gid = jnp.zeros((1,) * len(vshape), jnp.int32)
    for dim, (L, g) in enumerate(zip(vshape, grid)):
        if g > 1:
            gid = gid * g + _iota_along(L, len(vshape), dim) // (L // g)
    return jnp.broadcast_to(gid, vshape)


def _nearest(vecs: jax.Array, gid: jax.Array, books: jax.Array) -> jax.Array:
    """Index of the nearest codeword: vecs [N, d], gid [N], books [G, K, d] -> [N] int32."""
    n, d = vecs.shape
    K = books.shape[1]
    chunk = max(1, min(n, (1 << 22) // (K * d)))
    pad = -n % chunk
    vecs = jnp.pad(vecs, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    gid = jnp.pad(gid, (0, pad)).reshape(-1, chunk)

    def one(args):
        v, g = args
        cb = books[g] if books.shape[0] > 1 else books[:1]  # [chunk or 1, K, d]
        dist = jnp.sum((v[:, None, :] - cb) ** 2, axis=-1)
        return jnp.argmin(dist, axis=-1).astype(jnp.int32)

    return jax.lax.map(one, (vecs, gid)).reshape(-1)[:n]


@functools.partial(jax.jit, static_argnums=(3, 4))
def _encode(x, codebooks, scales, fmt: CodebookFormat, axis: int):
    rank, shape = x.ndim, tuple(x.shape)
    books = codebooks.astype(jnp.dtype(fmt.codebook_dtype))
    x32 = x.astype(jnp.float32)
    n, d, M = shape[axis], fmt.vector_dim, fmt.num_codebooks
    if fmt.group_size is not None:
        if scales is None:
            scales = jnp.sqrt(B.group_reduce(x32 * x32, axis, "group", fmt.group_size, jnp.mean))
        scales = B.store_scale(jnp.asarray(scales, jnp.float32), fmt.scale_dtype)
        x32 = x32 / B.expand(B.safe_divisor(scales.astype(jnp.float32)), axis, n)
    vshape = B.with_axis(shape, axis, n // d)
    vecs = jnp.moveaxis(x32.reshape(shape[:axis] + (n // d, d) + shape[axis + 1:]), axis + 1, -1)
    gid = _grid_index(vshape, codebooks.shape[:rank]).reshape(-1)
    resid = vecs.reshape(-1, d)
    tables = books.astype(jnp.float32).reshape((-1,) + books.shape[rank:])  # [G, M, K, d]
    idx = []
    for m in range(M):  # M is a small static count of codebooks
        i = _nearest(resid, gid, tables[:, m])
        idx.append(i)
        resid = resid - (tables[:, m][gid, i] if tables.shape[0] > 1 else tables[0, m][i])
    idx = jnp.stack(idx, axis=-1).reshape(vshape + (M,))  # [..., nv, ..., M]
    idx = jnp.moveaxis(idx, -1, axis + 1)  # [..., nv, M, ...]
    idx = idx.reshape(B.with_axis(shape, axis, (n // d) * M))
    return pack_bits(idx, fmt.index_bits, axis), scales, books


def codebook_quantize(x: jax.Array, codebooks: jax.Array, fmt: CodebookFormat | None = None, *,
                      axis: int, scales: jax.Array | None = None) -> QArray:
    """Nearest-codeword (brute force) quantization of ``x`` along ``axis``.

    ``codebooks``: ``grid + (M, K, d)`` (see module doc), or ``(K, d)`` for one shared
    codebook, or ``(M, K, d)`` for M shared additive codebooks. ``fmt`` defaults to
    ``CodebookFormat(vector_dim=d, index_bits=log2 K, num_codebooks=M)``.
    With ``fmt.group_size`` set, ``scales`` (generic-broadcast, ``fmt.scale_dtype``) are
    used as given, or default to the RMS of each group (codebooks then describe
    unit-variance data); the assignment uses the stored scale.
    Returns a validated ``QArray`` whose ``codebooks`` are stored in ``fmt.codebook_dtype``.
    """
    x, codebooks = jnp.asarray(x), jnp.asarray(codebooks)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"codebook_quantize: x must be a floating array, got dtype {x.dtype}.")
    axis = B.normalize_axis(axis, x.ndim, "codebook_quantize")
    check_finite(x)
    rank = x.ndim
    if codebooks.ndim in (2, 3):
        lead = (1,) * rank + ((1,) if codebooks.ndim == 2 else ())
        codebooks = codebooks.reshape(lead + codebooks.shape)
    if fmt is None:
        K = codebooks.shape[-2]
        if K & (K - 1) or K < 2:
            raise ValueError(f"codebook_quantize: the codebook size {K} must be a power of two >= 2.")
        fmt = CodebookFormat(vector_dim=codebooks.shape[-1], index_bits=int(math.log2(K)),
                             num_codebooks=codebooks.shape[-3])
    shape = tuple(x.shape)
    fmt.check_shape(shape, axis)
    fmt.check_codebooks(codebooks.shape, shape, axis)
    if fmt.group_size is None and scales is not None:
        raise ValueError(f"{fmt.name}: scales were given but the format has group_size=None.")
    if scales is not None:
        want = B.scale_shape(shape, axis, "group", fmt.group_size)
        if tuple(jnp.shape(scales)) != want:
            raise ValueError(f"{fmt.name}: scales must have shape {want}, got {tuple(jnp.shape(scales))}.")
    codes, scales, books = _encode(x, codebooks, scales, fmt, axis)
    q = QArray(codes=codes, scales=scales, codebooks=books, format=fmt, shape=shape,
               dtype=jnp.dtype(x.dtype).name, axis=axis)
    return q.validate()
