"""NF4: QLoRA's 4-bit NormalFloat with per-block absmax scales (Dettmers et al. 2023, §3).

The 16 levels are quantiles of N(0, 1) scaled to [-1, 1] with an exact zero
(``NF4_LEVELS``, the values bitsandbytes ships; ``normal_float_levels`` rebuilds
them from the paper's construction, eq. 4 with offset 0.9677)::

    c_b     = max_{i in block b} |x_i|                     (block of 64 along ``axis``)
    q_i     = argmin_j |x_i / c_b - NF4_LEVELS[j]|         (4-bit index, packed 2 per byte)
    x_hat_i = NF4_LEVELS[q_i] * c_b

``double_quant=False``: ``c_b`` stored as float32 (4 + 32/64 = 4.5 bits per weight).
``double_quant=True`` (the default, QLoRA's "double quantization"): the block
constants are themselves quantized, to FP8 E4M3 bytes with one float32 tensor scale
``s_t = max_b c_b / 448`` (4 + 8/64 = 4.125 bits plus 32 bits per tensor). QLoRA's
bitsandbytes uses its 8-bit dynamic-tree map in blocks of 256 with the mean
subtracted (4.127 bits); jquant uses NVFP4's two-level FP8 scheme instead, which costs
the same and reuses the exact E4M3 codec. The rounded constant is what dequantization
multiplies by, and the codes are chosen against it.

The axis is zero-padded to a multiple of the block (stored, cropped on decode).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import _blocks as B
from jquant.formats.minifloat import e4m3_byte, e4m3_value
from jquant.formats.packing import pack_bits, unpack_bits
from jquant.formats.qarray import Format, QArray

# bitsandbytes' NF4 table (functional.py ``get_4bit_type("nf4")``), ascending.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
NF4_OFFSET = 0.9677083
E4M3_MAX = 448.0


def normal_float_levels(offset: float = NF4_OFFSET) -> np.ndarray:
    """QLoRA's NF4 construction (eq. 4): 8 positive and 7 negative N(0,1) quantiles and 0, scaled to [-1, 1].

    Needs scipy (``scipy.stats.norm.ppf``); the shipped ``NF4_LEVELS`` equal this to float32 rounding.
    """
    from scipy.stats import norm

    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([positive, [0.0], negative]))
    return (levels / np.max(np.abs(levels))).astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4Format(Format):
    block_size: int = 64
    double_quant: bool = True

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2 \
                or self.block_size % 2:
            raise ValueError(f"NF4Format: block_size={self.block_size!r} must be an even int >= 2 (QLoRA: 64).")

    @property
    def name(self) -> str:
        name = "nf4" + ("" if self.double_quant else "-fp32scale")
        return name + ("" if self.block_size == 64 else f"-b{self.block_size}")

    def expected_children(self, shape, axis, codebooks_shape=None):
        nb = -(-shape[axis] // self.block_size)
        return dict(
            codes=jax.ShapeDtypeStruct(B.with_axis(shape, axis, nb * self.block_size // 2), jnp.uint8),
            scales=jax.ShapeDtypeStruct(B.with_axis(shape, axis, nb),
                                        jnp.uint8 if self.double_quant else jnp.float32),
            tensor_scale=jax.ShapeDtypeStruct((1,) * len(shape), jnp.float32) if self.double_quant else None,
        )

    def encode(self, x, axis, key):
        if key is not None:
            raise ValueError("nf4: this format rounds deterministically; drop the key.")
        shape = tuple(x.shape)
        x = B.pad_axis(x.astype(jnp.float32), axis, self.block_size)
        absmax = B.group_reduce(jnp.abs(x), axis, "group", self.block_size, jnp.max)
        if self.double_quant:
            top = jnp.max(absmax)
            s_t = jnp.where(top > 0, top / E4M3_MAX, 1.0).astype(jnp.float32).reshape((1,) * x.ndim)
            scales = e4m3_byte(jnp.clip(absmax / s_t, 0.0, E4M3_MAX))
            c = s_t * e4m3_value(scales)
        else:
            s_t, scales, c = None, absmax, absmax
        ratio = x / B.expand(B.safe_divisor(c), axis, x.shape[axis])
        levels = jnp.asarray(NF4_LEVELS)
        midpoints = (levels[1:] + levels[:-1]) / 2
        codes = jnp.searchsorted(midpoints, ratio, side="left").astype(jnp.uint8)
        return QArray(codes=pack_bits(codes, 4, axis), scales=scales, tensor_scale=s_t, format=self,
                      shape=shape, axis=axis)

    def _constant(self, q):
        """The block constant c_b per element (float32), at the logical shape."""
        c = q.tensor_scale * e4m3_value(q.scales) if self.double_quant else q.scales
        n_pad = q.scales.shape[q.axis] * self.block_size
        return B.crop_axis(B.expand(c, q.axis, n_pad), q.axis, q.shape[q.axis])

    def codes_of(self, q):
        """uint8 level indices 0..15 at the logical shape."""
        return unpack_bits(q.codes, 4, q.shape[q.axis], q.axis)

    def decode(self, q):
        return jnp.asarray(NF4_LEVELS)[self.codes_of(q).astype(jnp.int32)] * self._constant(q)

    def value_range(self, q):
        c = self._constant(q)
        return -c, c
