"""NVFP4: E2M1 elements in 16-element blocks with UE4M3 block scales and an FP32 tensor scale.

Two-level encode (spec ``low_precision_formats.md`` §3.3, as torchao / ModelOpt)::

    s_t     = amax_tensor / (448 * 6)                          (float32; 1 if amax is 0)
    s_hat_b = E4M3_RNE(clip((amax_b / 6) / s_t, 2^-9, 448))    (stored as a uint8 byte)
    total_b = s_t * s_hat_b
    q_i     = E2M1_RNE(clip(x_i / total_b, -6, 6))             (4-bit codes, packed)
    x_hat_i = q_i * total_b

``amax_tensor`` is the current tensor's (dynamic, default) or a calibrated
``tensor_amax`` (static). The single-level variant (``two_level=False``) drops s_t:
s_hat_b = E4M3(clip(amax_b / 6, 2^-9, 448)), valid for block amaxes in about
[0.012, 2688].

Layout: ``codes`` uint8 with two E2M1 codes per byte along ``axis`` (element 2i in the
low nibble), ``scales`` uint8 UE4M3 bytes with ``ceil(n / 16)`` entries along ``axis``,
``tensor_scale`` float32 of shape ``(1,) * rank``. The axis is zero-padded to a
multiple of 16 (the padding is stored; ``dequantize`` crops it). Storage:
4 + 8/16 = 4.5 bits per element plus 32 bits per tensor.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jquant.formats import _blocks as B
from jquant.formats.minifloat import (E2M1, decode_element, e4m3_byte, e4m3_value,
                                      encode_element)
from jquant.formats.packing import pack_bits, unpack_bits
from jquant.formats.qarray import Format, QArray

BLOCK = 16
E4M3_MAX = 448.0
E2M1_MAX = 6.0


def nvfp4_tensor_scale(amax: jax.Array) -> jax.Array:
    """s_t = amax / (448 * 6) in float32, with 1.0 for an all-zero tensor."""
    s_t = jnp.asarray(amax, jnp.float32) / jnp.float32(E4M3_MAX * E2M1_MAX)
    return jnp.where(s_t > 0, s_t, jnp.float32(1.0))


@dataclasses.dataclass(frozen=True, kw_only=True)
class NVFP4Format(Format):
    tensor_amax: float | None = None
    two_level: bool = True

    def __post_init__(self):
        if self.tensor_amax is not None:
            if not self.two_level:
                raise ValueError("NVFP4Format: tensor_amax needs two_level=True (it sets s_t).")
            if not float(self.tensor_amax) > 0 or float(self.tensor_amax) == float("inf"):
                raise ValueError(f"NVFP4Format: tensor_amax={self.tensor_amax!r} must be finite and > 0.")

    @property
    def name(self) -> str:
        name = "nvfp4"
        if not self.two_level:
            name += "-1level"
        if self.tensor_amax is not None:
            name += f"-amax{self.tensor_amax:g}"
        return name

    def expected_children(self, shape, axis, codebooks_shape=None):
        nb = -(-shape[axis] // BLOCK)
        rank = len(shape)
        return dict(
            codes=jax.ShapeDtypeStruct(B.with_axis(shape, axis, nb * BLOCK // 2), jnp.uint8),
            scales=jax.ShapeDtypeStruct(B.with_axis(shape, axis, nb), jnp.uint8),
            tensor_scale=jax.ShapeDtypeStruct((1,) * rank, jnp.float32) if self.two_level else None,
        )

    def encode(self, x, axis, key):
        if key is not None:
            raise ValueError("nvfp4: this format rounds deterministically; drop the key.")
        shape = tuple(x.shape)
        x = B.pad_axis(x.astype(jnp.float32), axis, BLOCK)
        amax_b = B.group_reduce(jnp.abs(x), axis, "group", BLOCK, jnp.max)
        if self.two_level:
            amax_t = (jnp.max(jnp.abs(x)) if self.tensor_amax is None
                      else jnp.float32(self.tensor_amax))
            s_t = nvfp4_tensor_scale(amax_t).reshape((1,) * x.ndim)
            ratio = (amax_b / E2M1_MAX) / s_t
        else:
            s_t, ratio = None, amax_b / E2M1_MAX
        byte = e4m3_byte(jnp.clip(ratio, 2.0 ** -9, E4M3_MAX))
        total = e4m3_value(byte) if s_t is None else s_t * e4m3_value(byte)
        v = jnp.clip(x / B.expand(total, axis, x.shape[axis]), -E2M1_MAX, E2M1_MAX)
        codes = pack_bits(encode_element(v, E2M1), 4, axis)
        return QArray(codes=codes, scales=byte, tensor_scale=s_t, format=self,
                      shape=shape, axis=axis)

    def _total(self, q):
        """s_t * s_hat_b per element (float32), at the logical shape."""
        total = e4m3_value(q.scales)
        if q.tensor_scale is not None:
            total = q.tensor_scale * total
        n = q.shape[q.axis]
        return B.crop_axis(B.expand(total, q.axis, q.scales.shape[q.axis] * BLOCK), q.axis, n)

    def codes_of(self, q):
        """uint8 E2M1 codes at the logical shape."""
        return unpack_bits(q.codes, 4, q.shape[q.axis], q.axis)

    def decode(self, q):
        return decode_element(self.codes_of(q), E2M1) * self._total(q)

    def value_range(self, q):
        t = self._total(q)
        return -E2M1_MAX * t, E2M1_MAX * t
