"""OCP Microscaling (MX v1.0) block formats: MXFP4, MXFP6 (E2M3, E3M2), MXFP8 (E4M3, E5M2), MXINT8.

Per block of ``block_size`` (32) consecutive elements along ``axis``::

    a = max |V_i|
    E = floor(log2 a) - emax_elem          ("floor", OCP; a = 0 -> -127), or the smallest E
                                           with a / 2^E <= max_normal ("ceil"); clamp [-127, 127]
    P_i = elem_RNE(clip(V_i / 2^E, -max_normal, max_normal))   (saturating, subnormals kept)
    V_hat_i = 2^E * P_i

E is read from the float32 exponent bits (as ``frexp``) and 2^E is built exactly
(never by casting to E8M0). The
scale is stored as the E8M0 byte E + 127 (uint8, ``ceil(n / block)`` entries along
``axis``). MXINT8 elements are two's-complement int8 codes c with value c * 2^-6,
clamped symmetrically to +-127 (as ``microxcaling``), emax_elem = 0.

Payload: FP4 two codes per byte (element 2i in the low nibble), FP6 four codes in 3 bytes
(little-endian bit stream, ``packing.pack_bits``), FP8 in the native float8 dtype, INT8 as
int8. The axis is zero-padded to a multiple of the block (padding stored, cropped on
dequantize). Bits per element: 4.25 (FP4), 6.25 (FP6), 8.25 (FP8, INT8) for
``n % 32 == 0``. Rounding is round-to-nearest-even (``microxcaling`` defaults to
ties-away; the two differ only at exact midpoints).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jquant.formats import _blocks as B
from jquant.formats.minifloat import (E2M1, E2M3, E3M2, E4M3, E5M2, ElementFormat,
                                      decode_element, e8m0_byte, e8m0_exponent, e8m0_value,
                                      encode_element, ldexp, round_to_element)
from jquant.formats.packing import pack_bits, packed_length, unpack_bits
from jquant.formats.qarray import Format, QArray

MX_ELEMENTS: dict[str, ElementFormat | None] = {
    "fp4": E2M1, "fp6-e2m3": E2M3, "fp6-e3m2": E3M2, "fp8-e4m3": E4M3, "fp8-e5m2": E5M2,
    "int8": None,
}
MXINT8_MAX = 127.0 / 64.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MXFormat(Format):
    element: str = "fp4"
    block_size: int = 32
    scale_rounding: str = "floor"

    def __post_init__(self):
        own = "MXFormat"
        if self.element not in MX_ELEMENTS:
            raise ValueError(f"{own}: element={self.element!r} is not one of {tuple(MX_ELEMENTS)}.")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or self.block_size < 2 or self.block_size % 4:
            raise ValueError(f"{own}: block_size={self.block_size!r} must be a positive multiple of 4 "
                             f"(OCP MX uses 32).")
        if self.scale_rounding not in ("floor", "ceil"):
            raise ValueError(f"{own}: scale_rounding={self.scale_rounding!r} must be 'floor' or 'ceil'.")

    @property
    def el(self) -> ElementFormat | None:
        return MX_ELEMENTS[self.element]

    @property
    def name(self) -> str:
        name = f"mx{self.element}"
        if self.block_size != 32:
            name += f"-b{self.block_size}"
        if self.scale_rounding != "floor":
            name += "-ceil"
        return name

    @property
    def element_bits(self) -> int:
        return 8 if self.el is None else self.el.bits

    @property
    def _emax(self) -> int:
        return 0 if self.el is None else self.el.emax

    @property
    def _max(self) -> float:
        return MXINT8_MAX if self.el is None else self.el.max_normal

    def _codes_struct(self, shape, axis, n_pad):
        b = self.element_bits
        if self.el is None:
            return jax.ShapeDtypeStruct(B.with_axis(shape, axis, n_pad), jnp.int8)
        if b == 8:
            return jax.ShapeDtypeStruct(B.with_axis(shape, axis, n_pad), self.el.jnp_dtype)
        return jax.ShapeDtypeStruct(B.with_axis(shape, axis, packed_length(n_pad, b)), jnp.uint8)

    def expected_children(self, shape, axis, codebooks_shape=None):
        n_pad = B.round_up(shape[axis], self.block_size)
        return dict(codes=self._codes_struct(shape, axis, n_pad),
                    scales=jax.ShapeDtypeStruct(B.with_axis(shape, axis, n_pad // self.block_size),
                                                jnp.uint8))

    def encode(self, x, axis, key):
        if key is not None:
            raise ValueError(f"{self.name}: this format rounds deterministically; drop the key.")
        shape = tuple(x.shape)
        x = B.pad_axis(x.astype(jnp.float32), axis, self.block_size)
        amax = B.group_reduce(jnp.abs(x), axis, "group", self.block_size, jnp.max)
        e = e8m0_exponent(amax, self._emax, self._max, self.scale_rounding)
        v = ldexp(x, -B.expand(e, axis, x.shape[axis]))
        if self.el is None:
            codes = jnp.clip(jnp.round(v * 64.0), -127, 127).astype(jnp.int8)
        elif self.el.bits == 8:
            codes = round_to_element(v, self.el).astype(self.el.jnp_dtype)
        else:
            codes = pack_bits(encode_element(v, self.el), self.el.bits, axis)
        return QArray(codes=codes, scales=e8m0_byte(e), format=self, shape=shape, axis=axis)

    def codes_of(self, q):
        """Element codes at the logical shape: uint8 (FP4/FP6), float8 (FP8) or int8 (INT8)."""
        n = q.shape[q.axis]
        if self.element_bits == 8:
            return B.crop_axis(q.codes, q.axis, n)
        return unpack_bits(q.codes, self.el.bits, n, q.axis)

    def _element_values(self, q):
        c = self.codes_of(q)
        if self.el is None:
            return c.astype(jnp.float32) / 64.0
        if self.el.bits == 8:
            return c.astype(jnp.float32)
        return decode_element(c, self.el)

    def _block_scale(self, q):
        n = q.shape[q.axis]
        x = B.expand(e8m0_value(q.scales), q.axis, q.scales.shape[q.axis] * self.block_size)
        return B.crop_axis(x, q.axis, n)

    def decode(self, q):
        return self._element_values(q) * self._block_scale(q)

    def value_range(self, q):
        s = self._block_scale(q)
        return -self._max * s, self._max * s
