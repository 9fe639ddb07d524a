"""Min-max groups with a floating zero point: the storage format of KIVI, SKVQ and WKVQuant KV caches.

Per group ``G`` of consecutive elements along ``axis`` (SKVQ §3.2)::

    lo = clip * min(x_G),   hi = clip * max(x_G),   M = 2^b - 1   (M = 2 for 1.5 bits)
    s = store(max((hi - lo) / M, floor)),   z = store(lo)
    q = clip(round((x_G - z) / s), 0, M),   x^_G = q * s + z

``store`` rounds to ``meta_dtype`` (float16, bfloat16, float8_e4m3fn or float32), saturating at its
largest finite value (fp8 e4m3fn: 448); ``floor = max(1e-5, smallest subnormal of meta_dtype)``.
Codes are computed from the **stored** ``s`` and ``z``, so the packed cache and the simulated path
(``jquant.kv.KVQuantizer.fake``) agree exactly. Values outside ``[lo, hi]`` saturate (the clipping).

Groups: ``group_size`` consecutive elements, ``group_sizes`` (variable sizes in order: SKVQ's
clusters after its channel permutation), or neither (the whole axis is one group: KIVI's keys, one
range per channel over a block of tokens, stored with the token block as ``axis``).

Storage (``QArray`` children, logical rank): ``codes`` uint8 packed along ``axis`` (``b`` bits per
code; 1.5 bits as base-3 "trits", five per byte, 1.6 bits); ``scales`` and ``zeros`` (the float
offsets ``z``, not integer zero points) in ``meta_dtype``, with the group count on ``axis``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import _blocks as B
from jquant.formats.packing import pack_bits, pack_trits, packed_length, trit_packed_length, unpack_bits, unpack_trits
from jquant.formats.qarray import Format, QArray

MINMAX_BITS = (1.5, 2, 3, 4, 8)
META_DTYPES = ("float16", "bfloat16", "float8_e4m3fn", "float32")


def store_meta(v: jax.Array, dtype: str) -> jax.Array:
    """Round float32 metadata to ``dtype``, saturating at its largest finite value (fp8 e4m3fn: 448)."""
    big = float(jnp.finfo(jnp.dtype(dtype)).max)
    return jnp.clip(v, -big, big).astype(jnp.dtype(dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMaxFormat(Format):
    """Min-max format descriptor (see the module docstring for the equations and storage)."""

    bits: float
    group_size: int | None = None
    group_sizes: tuple[int, ...] | None = None
    clip: float = 1.0
    meta_dtype: str = "float16"

    def __post_init__(self):
        own = "MinMaxFormat"
        if isinstance(self.bits, bool) or self.bits not in MINMAX_BITS:
            raise ValueError(f"{own}: bits={self.bits!r} is not supported; use one of {MINMAX_BITS}.")
        if self.group_size is not None and self.group_sizes is not None:
            raise ValueError(f"{own}: give group_size or group_sizes, not both.")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ValueError(f"{own}: group_size={self.group_size!r} must be a positive int.")
        if self.group_sizes is not None:
            sizes = tuple(int(g) for g in self.group_sizes)
            if not sizes or min(sizes) < 1:
                raise ValueError(f"{own}: group_sizes must be positive sizes, got {self.group_sizes!r}.")
            object.__setattr__(self, "group_sizes", sizes)
        if not 0.0 < float(self.clip) <= 1.0:
            raise ValueError(f"{own}: clip={self.clip!r} must be in (0, 1].")
        if self.meta_dtype not in META_DTYPES:
            raise ValueError(f"{own}: meta_dtype={self.meta_dtype!r} is not one of {META_DTYPES}.")

    @property
    def name(self) -> str:
        groups = ("whole" if self.group_size is None and self.group_sizes is None
                  else f"g{self.group_size}" if self.group_sizes is None else f"var{len(self.group_sizes)}")
        clip = f"-clip{self.clip:g}" if self.clip != 1.0 else ""
        return f"minmax{self.bits:g}-{groups}{clip}-{self.meta_dtype}"

    @property
    def levels(self) -> int:
        """``M``: the largest code."""
        return 2 if self.bits == 1.5 else 2 ** int(self.bits) - 1

    def groups(self, n: int) -> np.ndarray:
        """Group sizes along an axis of ``n`` elements."""
        if self.group_sizes is not None:
            return np.asarray(self.group_sizes)
        size = n if self.group_size is None else self.group_size
        return np.full(n // size, size)

    def check_shape(self, shape, axis):
        n = shape[axis]
        if self.group_sizes is not None and sum(self.group_sizes) != n:
            raise ValueError(f"{self.name}: group_sizes sum to {sum(self.group_sizes)} but axis {axis} has {n} "
                             "elements; calibrate the groups on this tensor.")
        if self.group_size is not None:
            B.check_group_divides(self.name, tuple(shape), axis, self.group_size)

    def _packed(self, n: int) -> int:
        return trit_packed_length(n) if self.bits == 1.5 else packed_length(n, int(self.bits))

    def expected_children(self, shape, axis, codebooks_shape=None):
        meta = jax.ShapeDtypeStruct(B.with_axis(shape, axis, len(self.groups(shape[axis]))), jnp.dtype(self.meta_dtype))
        return dict(codes=jax.ShapeDtypeStruct(B.with_axis(shape, axis, self._packed(shape[axis])), jnp.uint8),
                    scales=meta, zeros=meta)

    # -- maths (shared with the straight-through path of jquant.kv) ---------------------
    def group_range(self, x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
        """Group min and max of ``x`` (before clipping), the group count on ``axis``."""
        sizes = self.groups(x.shape[axis])
        if len(set(sizes.tolist())) == 1:  # min_first / max_first: a gradient that cannot be NaN (WKVQuant learns it)
            g = int(sizes[0])
            return (B.group_reduce(x, axis, "group", g, lambda xb, axis: B.min_first(xb, axis)),
                    B.group_reduce(x, axis, "group", g, lambda xb, axis: B.max_first(xb, axis)))
        ids = np.repeat(np.arange(len(sizes)), sizes)
        xt = jnp.moveaxis(x, axis, 0)
        lo = jax.ops.segment_min(xt, ids, num_segments=len(sizes), indices_are_sorted=True)
        hi = jax.ops.segment_max(xt, ids, num_segments=len(sizes), indices_are_sorted=True)
        return jnp.moveaxis(lo, 0, axis), jnp.moveaxis(hi, 0, axis)

    def scale_zero(self, x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Exact float32 ``(s, z)`` per group and their stored copies (``meta_dtype``)."""
        lo, hi = self.group_range(x, axis)
        lo, hi = lo * self.clip, hi * self.clip
        floor = max(1e-5, float(jnp.finfo(jnp.dtype(self.meta_dtype)).smallest_subnormal))
        s = jnp.maximum((hi - lo) / self.levels, floor)
        return s, lo, store_meta(s, self.meta_dtype), store_meta(lo, self.meta_dtype)

    def expand(self, m: jax.Array, axis: int, n: int) -> jax.Array:
        """Per-group values ``m`` -> per element along ``axis`` of length ``n``."""
        return jnp.repeat(m, self.groups(n), axis=axis, total_repeat_length=n)

    # -- encode / decode ------------------------------------------------------------------
    def encode(self, x, axis, key):
        if key is not None:
            raise ValueError(f"{self.name}: rounding is deterministic; drop the key.")
        xf = x.astype(jnp.float32)
        n = xf.shape[axis]
        _, _, s, z = self.scale_zero(xf, axis)
        s32, z32 = self.expand(s.astype(jnp.float32), axis, n), self.expand(z.astype(jnp.float32), axis, n)
        q = jnp.clip(jnp.round((xf - z32) / s32), 0, self.levels).astype(jnp.int32)
        codes = pack_trits(q, axis=axis) if self.bits == 1.5 else pack_bits(q, int(self.bits), axis=axis)
        return QArray(codes=codes, scales=s, zeros=z, format=self, shape=tuple(x.shape), axis=axis)

    def codes_of(self, q):
        n = q.shape[q.axis]
        if self.bits == 1.5:
            return unpack_trits(q.codes, n, axis=q.axis)
        return unpack_bits(q.codes, int(self.bits), n, axis=q.axis)

    def decode(self, q):
        n = q.shape[q.axis]
        s = self.expand(q.scales.astype(jnp.float32), q.axis, n)
        z = self.expand(q.zeros.astype(jnp.float32), q.axis, n)
        return self.codes_of(q).astype(jnp.float32) * s + z

    def value_range(self, q):
        n = q.shape[q.axis]
        s = self.expand(q.scales.astype(jnp.float32), q.axis, n)
        z = self.expand(q.zeros.astype(jnp.float32), q.axis, n)
        return z, z + self.levels * s
