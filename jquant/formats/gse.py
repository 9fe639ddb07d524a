"""GSE-INT: group-shared-exponent integers (spec ``gsq_tuning.md`` §3.1).

Groups of ``group_size`` (G, default 32) consecutive elements along ``axis`` share one
exponent E; each element is a signed b-bit integer m (b in {4, ..., 8}), a fixed-point
number with b - 2 fractional bits::

    E   = floor(log2 max|x_group|)      (exponent bits; an all-zero group gets the minimum)
    m_i = clip(RNE(x_i * 2^((b-2) - E)), -(2^(b-1) - 1), 2^(b-1) - 1)
    x_hat_i = m_i * 2^(E - (b-2))

Since amax < 2^(E+1), |x| * 2^((b-2)-E) < 2^(b-1): saturation clips at most the top
half-step. Every rescaling is a power of two (a shift in hardware).

Storage: E as int8 (``scales``, one per group, range [-128, 127]); m as int8 for b = 8,
else packed densely along ``axis`` (two's complement). With ``exponent_bits=k`` the
exponent field is narrowed: a per-tensor offset E0 = max_g E_g - (2^(k-1) - 1) is stored
as int32 in ``tensor_scale`` and the stored int8 exponents are clip(E - E0, -2^(k-1),
2^(k-1) - 1) (small groups underflow towards zero; this measures the §7.3 question).
The axis is zero-padded to a multiple of G (stored, cropped on dequantize).

Bits: the paper budgets ``b + 5/G`` (``nominal_bits_per_element``, e.g. 8 + 5/32 =
8.156); jquant stores the exponent in a full int8, so ``bits_per_element`` reports the
stored ``b + 8/G`` (8.25 for b = 8, G = 32), plus 32/N bits with an exponent offset.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jquant.formats import _blocks as B
from jquant.formats.integer import ROUNDINGS, _round, check_key
from jquant.formats.minifloat import floor_log2, ldexp
from jquant.formats.packing import pack_bits, packed_length, to_signed, unpack_bits
from jquant.formats.qarray import Format, QArray

GSE_BITS = (4, 5, 6, 7, 8)
PAPER_EXPONENT_BITS = 5


@dataclasses.dataclass(frozen=True, kw_only=True)
class GSEFormat(Format):
    bits: int = 8
    group_size: int = 32
    exponent_bits: int | None = None
    rounding: str = "nearest"

    def __post_init__(self):
        own = "GSEFormat"
        if isinstance(self.bits, bool) or self.bits not in GSE_BITS:
            raise ValueError(f"{own}: bits={self.bits!r} is not supported; use one of {GSE_BITS}.")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"{own}: group_size={self.group_size!r} must be a positive int (default 32).")
        if self.exponent_bits is not None and (
                isinstance(self.exponent_bits, bool) or self.exponent_bits not in range(2, 9)):
            raise ValueError(f"{own}: exponent_bits={self.exponent_bits!r} must be None or in 2..8.")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"{own}: rounding={self.rounding!r} is not one of {ROUNDINGS}.")

    @property
    def name(self) -> str:
        name = f"gse-int{self.bits}"
        if self.group_size != 32:
            name += f"-g{self.group_size}"
        if self.exponent_bits is not None:
            name += f"-e{self.exponent_bits}"
        if self.rounding != "nearest":
            name += f"-{self.rounding}"
        return name

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def nominal_bits_per_element(self) -> float:
        """The paper's accounting b + e_bits / G (e_bits = 5 unless ``exponent_bits`` is set)."""
        return self.bits + (self.exponent_bits or PAPER_EXPONENT_BITS) / self.group_size

    def _e_range(self) -> tuple[int, int]:
        if self.exponent_bits is None:
            return -128, 127
        return -(2 ** (self.exponent_bits - 1)), 2 ** (self.exponent_bits - 1) - 1

    def expected_children(self, shape, axis, codebooks_shape=None):
        n_pad = B.round_up(shape[axis], self.group_size)
        codes_n = n_pad if self.bits == 8 else packed_length(n_pad, self.bits)
        return dict(
            codes=jax.ShapeDtypeStruct(B.with_axis(shape, axis, codes_n),
                                       jnp.int8 if self.bits == 8 else jnp.uint8),
            scales=jax.ShapeDtypeStruct(B.with_axis(shape, axis, n_pad // self.group_size), jnp.int8),
            tensor_scale=(None if self.exponent_bits is None
                          else jax.ShapeDtypeStruct((1,) * len(shape), jnp.int32)),
        )

    def mantissas(self, x: jax.Array, axis: int, key: jax.Array | None
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """The encode without packing: ``x`` zero-padded to a multiple of G along ``axis``.

        Returns ``(m, e, stored, offset)``: int32 mantissas at the padded shape, the
        effective int32 group exponents E (``n_pad / G`` along ``axis``), the stored
        int8-range exponents and the int32 tensor offset (None without ``exponent_bits``).
        ``m * 2^(E - (b-2))`` (E repeated G times along ``axis``) is the dequantized value.
        """
        check_key(self.name, self.rounding, key)
        x = B.pad_axis(x.astype(jnp.float32), axis, self.group_size)
        amax = B.group_reduce(jnp.abs(x), axis, "group", self.group_size, jnp.max)
        pos = amax > 0
        e = floor_log2(jnp.where(pos, amax, 1.0))
        lo, hi = self._e_range()
        if self.exponent_bits is None:
            offset = None
            stored = jnp.clip(jnp.where(pos, e, lo), lo, hi)
            e_eff = stored
        else:
            top = jnp.max(jnp.where(pos, e, -(2 ** 20)))
            offset = jnp.where(top > -(2 ** 20), top - hi, 0).astype(jnp.int32).reshape((1,) * x.ndim)
            stored = jnp.clip(jnp.where(pos, e - offset, lo), lo, hi)
            e_eff = stored + offset
        v = ldexp(x, B.expand((self.bits - 2) - e_eff, axis, x.shape[axis]))
        m = jnp.clip(_round(v, self.rounding, key), -self.qmax, self.qmax).astype(jnp.int32)
        return m, e_eff.astype(jnp.int32), stored, offset

    def fake_values(self, x: jax.Array, axis: int, key: jax.Array | None = None) -> jax.Array:
        """``decode(encode(x))`` in float32 without packing (the training-time quantizer)."""
        m, e, _, _ = self.mantissas(x, axis, key)
        step = ldexp(jnp.ones(e.shape, jnp.float32), e - (self.bits - 2))
        return B.crop_axis(m.astype(jnp.float32) * B.expand(step, axis, m.shape[axis]), axis, x.shape[axis])

    def encode(self, x, axis, key):
        m, _, stored, offset = self.mantissas(x, axis, key)
        codes = m.astype(jnp.int8) if self.bits == 8 else pack_bits(m, self.bits, axis)
        return QArray(codes=codes, scales=stored.astype(jnp.int8), tensor_scale=offset,
                      format=self, shape=tuple(x.shape), axis=axis)

    def exponents(self, q: QArray) -> jax.Array:
        """Effective int32 group exponents E (offset applied), ``ceil(n / G)`` along ``axis``."""
        e = q.scales.astype(jnp.int32)
        return e if q.tensor_scale is None else e + q.tensor_scale

    def codes_of(self, q):
        """int32 mantissas m at the logical shape."""
        n = q.shape[q.axis]
        if self.bits == 8:
            return B.crop_axis(q.codes, q.axis, n).astype(jnp.int32)
        return to_signed(unpack_bits(q.codes, self.bits, n, q.axis), self.bits)

    def _step(self, q):
        """2^(E - (b-2)) per element (float32), at the logical shape."""
        n = q.shape[q.axis]
        shift = B.expand(self.exponents(q) - (self.bits - 2), q.axis,
                         q.scales.shape[q.axis] * self.group_size)
        return B.crop_axis(ldexp(jnp.ones(shift.shape, jnp.float32), shift), q.axis, n)

    def decode(self, q):
        return self.codes_of(q).astype(jnp.float32) * self._step(q)

    def value_range(self, q):
        step = self._step(q)
        return -self.qmax * step, self.qmax * step
