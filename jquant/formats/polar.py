"""PCDVQ's polar (direction × magnitude) vector format (Yue et al. 2025, arXiv 2506.05432).

An ``[in, out]`` weight ``W`` (quantized along axis 0) is stored as ``Ŵ̄`` in a randomly
rotated, unit-RMS basis (SGR, spec §3.2, two-sided as QuIP#)::

    W̃ = (H_n S_in)ᵀ W (S_out H_m),      W̄ = W̃ / s,      W ≈ s · S_in H_n Ŵ̄ H_mᵀ S_out

with ``H`` the orthonormal Hadamard matrices of ``jquant.numerics.hadamard`` (``fwht``), ``S``
random ±1 diagonals drawn from ``seed`` (``signs``), ``s`` the RMS of ``W̃`` (``scale="tensor"``,
one float32) or of each output column (``"channel"``). Each column of ``W̄`` is cut into vectors
``v`` of ``k = vector_dim`` consecutive inputs, stored as a direction index ``i_d`` (``a`` bits)
and a magnitude index ``i_r`` (``b`` bits)::

    v̂ = C_r[i_r] · C_d[i_d]          (spec §3.3, Eq. ‖v − v̂‖² = (r − r̂)² + 2 r r̂ (1 − cos θ))

``C_d``/``C_r`` are the data-free codebooks of ``polar_codebooks`` (shared by every tensor with
the same ``(k, a, b)``; regenerated, not stored, so ``QArray.nbytes`` excludes them and
``shared_table_bytes`` states their size, counted once per model by ``jquant.size_report``).

Children: ``codes`` uint8 ``[packed_length(n/k, a) + packed_length(n/k, b), out]``: the
direction plane then the magnitude plane, each a little-endian bit stream along axis 0 (spec
§3.8 stores a = 14, b = 2 in one uint16; two planes also hold a = 16); ``scales`` float32
``[1, 1]`` or ``[1, out]``. ``encode`` rounds to the nearest direction (largest cosine) and the
nearest magnitude level; Hessian-aware rounding is ``jquant.algorithms.pcdvq``.
All-zero tensors (or columns, per channel) get ``s = 0`` and decode to exact zeros; a zero
vector inside a nonzero tensor decodes to ``C_r[0] · C_d[i]`` (never NaN).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import _blocks as B
from jquant.formats.packing import pack_bits, packed_length, unpack_bits
from jquant.formats.polar_codebooks import DIRECTION_DIMS, polar_codebooks
from jquant.formats.qarray import Format, QArray
from jquant.numerics.hadamard import fwht, supported_size

SCALES = ("tensor", "channel")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolarVQFormat(Format):
    """PCDVQ storage: ``vector_dim`` k, ``direction_bits`` a, ``magnitude_bits`` b; bits/weight (a + b) / k."""

    vector_dim: int = 8
    direction_bits: int = 14
    magnitude_bits: int = 2
    scale: str = "tensor"
    rht: bool = True
    seed: int = 0

    def __post_init__(self):
        own = "PolarVQFormat"
        if isinstance(self.vector_dim, bool) or self.vector_dim not in DIRECTION_DIMS:
            raise ValueError(f"{own}: vector_dim={self.vector_dim!r} must be one of {DIRECTION_DIMS}.")
        if isinstance(self.direction_bits, bool) or self.direction_bits not in range(1, 17):
            raise ValueError(f"{own}: direction_bits={self.direction_bits!r} must be an int in 1..16 "
                             f"(the codebook has 2^direction_bits unit vectors).")
        if isinstance(self.magnitude_bits, bool) or self.magnitude_bits not in range(1, 9):
            raise ValueError(f"{own}: magnitude_bits={self.magnitude_bits!r} must be an int in 1..8.")
        if self.scale not in SCALES:
            raise ValueError(f"{own}: scale={self.scale!r} must be one of {SCALES}.")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{own}: seed={self.seed!r} must be a non-negative int.")

    @property
    def name(self) -> str:
        tail = ("-ch" if self.scale == "channel" else "") + ("" if self.rht else "-norht")
        seed = f"-s{self.seed}" if self.seed else ""
        return f"pcdvq-d{self.vector_dim}-a{self.direction_bits}-b{self.magnitude_bits}{tail}{seed}"

    @property
    def index_bits_per_weight(self) -> float:
        return (self.direction_bits + self.magnitude_bits) / self.vector_dim

    def codebooks(self) -> tuple[np.ndarray, np.ndarray]:
        """``(C_d [2^a, k], C_r [2^b])`` float32 (cached; ``polar_codebooks``)."""
        return polar_codebooks(self.vector_dim, self.direction_bits, self.magnitude_bits)

    @property
    def shared_table_bytes(self) -> int:
        """Bytes of the shared codebooks as spec §3.8 stores them: C_d in float16, C_r in float32."""
        return 2 ** self.direction_bits * self.vector_dim * 2 + 2 ** self.magnitude_bits * 4

    def check_shape(self, shape, axis):
        shape = tuple(shape)
        if len(shape) != 2 or axis != 0:
            raise ValueError(f"{self.name}: handles [in, out] weights quantized along axis 0, got shape {shape} "
                             f"and axis {axis}.")
        n = shape[0]
        if n % self.vector_dim:
            raise ValueError(f"{self.name}: vector_dim={self.vector_dim} does not divide the input size {n} "
                             f"(shape {shape}); pick a vector_dim dividing {n} or pad the input dimension.")
        if self.rht:
            bad = [d for d in shape if not supported_size(d)]
            if bad:
                raise ValueError(f"{self.name}: no Hadamard matrix of order {bad} for the random Hadamard transform "
                                 f"of shape {shape}; use rht=False or pad (jquant.transforms.pad_to_hadamard_size).")

    def expected_children(self, shape, axis, codebooks_shape=None):
        nv = shape[0] // self.vector_dim
        rows = packed_length(nv, self.direction_bits) + packed_length(nv, self.magnitude_bits)
        return dict(codes=jax.ShapeDtypeStruct((rows, shape[1]), jnp.uint8),
                    scales=jax.ShapeDtypeStruct(B.scale_shape(shape, axis, self.scale, None), jnp.float32))

    # -- rotation ---------------------------------------------------------------------------------------
    def signs(self, n: int, side: int) -> np.ndarray:
        """The ±1 float32 diagonal of ``S_in`` (``side=0``) or ``S_out`` (``side=1``) of length ``n``, from ``seed``."""
        rng = np.random.default_rng([self.seed, side, n])
        return (rng.integers(0, 2, n) * 2 - 1).astype(np.float32)

    def rotate(self, w: jax.Array) -> jax.Array:
        """``W̃ = (H_n S_in)ᵀ W (S_out H_m)`` for ``w [in, out]`` (identity without ``rht``)."""
        if not self.rht:
            return w
        s_in, s_out = jnp.asarray(self.signs(w.shape[0], 0), w.dtype), jnp.asarray(self.signs(w.shape[1], 1), w.dtype)
        return fwht(fwht(s_in[:, None] * w * s_out[None, :], axis=0), axis=1)

    def unrotate(self, wt: jax.Array) -> jax.Array:
        """Inverse of ``rotate``: ``S_in H_n W̃ H_mᵀ S_out``."""
        if not self.rht:
            return wt
        s_in, s_out = jnp.asarray(self.signs(wt.shape[0], 0), wt.dtype), jnp.asarray(self.signs(wt.shape[1], 1), wt.dtype)
        return s_in[:, None] * fwht(fwht(wt, axis=1, inverse=True), axis=0, inverse=True) * s_out[None, :]

    def rotate_hessian(self, h: jax.Array) -> jax.Array:
        """``H̃ = (H_n S_in)ᵀ H (H_n S_in)``: the Hessian of the rotated inputs ``x S_in H_n``."""
        if not self.rht:
            return h
        s_in = jnp.asarray(self.signs(h.shape[0], 0), h.dtype)
        return fwht(fwht(s_in[:, None] * h * s_in[None, :], axis=0), axis=1)

    # -- codes ------------------------------------------------------------------------------------------
    def pack(self, i_d: jax.Array, i_r: jax.Array) -> jax.Array:
        """Direction and magnitude indices ``[n/k, out]`` -> the two stacked bit planes (uint8)."""
        return jnp.concatenate([pack_bits(i_d, self.direction_bits, 0), pack_bits(i_r, self.magnitude_bits, 0)], 0)

    def codes_of(self, q):
        """int32 ``[n/k, 2, out]``: direction index then magnitude index of every vector."""
        nv = q.shape[0] // self.vector_dim
        split = packed_length(nv, self.direction_bits)
        i_d = unpack_bits(q.codes[:split], self.direction_bits, nv, 0)
        i_r = unpack_bits(q.codes[split:], self.magnitude_bits, nv, 0)
        return jnp.stack([i_d, i_r], axis=1).astype(jnp.int32)

    def decode_rotated(self, q) -> jax.Array:
        """``s · Ŵ̄`` (the rotated basis) float32 ``[in, out]``: one gather per codebook and a multiply."""
        c_d, c_r = self.codebooks()
        idx = self.codes_of(q)
        vec = jnp.asarray(c_r)[idx[:, 1]][..., None] * jnp.asarray(c_d)[idx[:, 0]]  # [nv, out, k]
        w = jnp.swapaxes(vec, 1, 2).reshape(q.shape)
        return w * q.scales.astype(jnp.float32)

    def decode(self, q):
        return self.unrotate(self.decode_rotated(q))

    def encode(self, x, axis, key):
        return _encode_nearest(x, self)

    def value_range(self, q):
        w = self.decode(q)
        return jnp.min(w), jnp.max(w)


def nearest_polar(v: jax.Array, c_d: jax.Array, c_r: jax.Array) -> tuple[jax.Array, jax.Array]:
    """PCD rounding of vectors ``v [..., k]``: ``(argmax_j <C_d[j], v>, argmin_j |C_r[j] - ‖v‖|)`` int32.

    The direction search uses the raw dot product, which ranks like the cosine for a fixed ``v``
    (a zero vector gets direction 0).
    """
    i_d = jnp.argmax(v @ c_d.T, axis=-1).astype(jnp.int32)
    r = jnp.linalg.norm(v, axis=-1)
    i_r = jnp.argmin(jnp.abs(r[..., None] - c_r), axis=-1).astype(jnp.int32)
    return i_d, i_r


def polar_scale(wt: jax.Array, fmt: PolarVQFormat) -> jax.Array:
    """The SGR scale ``s`` (float32, ``scale_shape``): RMS of ``W̃`` per tensor or per output column."""
    return jnp.sqrt(B.group_reduce(wt.astype(jnp.float32) ** 2, 0, fmt.scale, None, jnp.mean))


def from_indices(i_d: jax.Array, i_r: jax.Array, scales: jax.Array, fmt: PolarVQFormat,
                 shape: tuple[int, int], dtype: str) -> QArray:
    """A validated ``QArray`` from direction/magnitude indices ``[n/k, out]`` and float32 ``scales``."""
    q = QArray(codes=fmt.pack(i_d, i_r), scales=jnp.asarray(scales, jnp.float32), format=fmt, shape=tuple(shape),
               dtype=dtype, axis=0)
    return q.validate()


@functools.partial(jax.jit, static_argnums=(1,))
def _encode_nearest(x, fmt: PolarVQFormat):
    c_d, c_r = (jnp.asarray(c) for c in fmt.codebooks())
    wt = fmt.rotate(x.astype(jnp.float32))
    s = polar_scale(wt, fmt)
    wbar = wt / B.safe_divisor(s)
    n, m = x.shape
    k = fmt.vector_dim
    vecs = jnp.swapaxes(wbar.reshape(n // k, k, m), 1, 2)  # [nv, out, k]
    i_d, i_r = jax.lax.map(lambda v: nearest_polar(v, c_d, c_r), vecs)
    return QArray(codes=fmt.pack(i_d, i_r), scales=s, format=fmt, shape=tuple(x.shape), dtype="float32", axis=0)
