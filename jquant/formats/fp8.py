"""Scaled FP8 (E4M3 "fn" or E5M2) with per-tensor, per-channel or per-group scales.

    s = store(amax / max_normal),   c = fp8_RNE(clip(x / s, -max_normal, max_normal)),
    x_hat = c * s

with max_normal = 448 (E4M3) or 57344 (E5M2). The clamp makes the conversion
**saturating** (a plain XLA cast maps 470 to NaN in E4M3). Codes are stored in the
native ``float8_e4m3fn`` / ``float8_e5m2`` dtype (one byte each, usable by fp8
matmuls), computed with the stored scale. An all-zero group has scale 0 and codes 0.
Granularity is as for integers ("tensor", "channel" = "token", "group").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jquant.formats import _blocks as B
from jquant.formats.minifloat import E4M3, E5M2, round_to_element
from jquant.formats.qarray import Format, QArray

FP8_ELEMENTS = {"e4m3": E4M3, "e5m2": E5M2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8Format(Format):
    element: str = "e4m3"
    granularity: str | None = None
    group_size: int | None = None
    scale_dtype: str = "float32"

    def __post_init__(self):
        own = "FP8Format"
        if self.element not in FP8_ELEMENTS:
            raise ValueError(f"{own}: element={self.element!r} is not one of {tuple(FP8_ELEMENTS)}.")
        object.__setattr__(self, "granularity",
                           B.resolve_granularity(own, self.granularity, self.group_size))
        B.check_scale_dtype(own, self.scale_dtype)

    @property
    def el(self):
        return FP8_ELEMENTS[self.element]

    @property
    def name(self) -> str:
        parts = [f"fp8-{self.element}"]
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
        elif self.granularity == "tensor":
            parts.append("tensor")
        if self.scale_dtype != "float32":
            parts.append(self.scale_dtype)
        return "-".join(parts)

    def check_shape(self, shape, axis):
        if self.granularity == "group":
            B.check_group_divides(self.name, tuple(shape), axis, self.group_size)

    def expected_children(self, shape, axis, codebooks_shape=None):
        sshape = B.scale_shape(shape, axis, self.granularity, self.group_size)
        return dict(codes=jax.ShapeDtypeStruct(tuple(shape), self.el.jnp_dtype),
                    scales=jax.ShapeDtypeStruct(sshape, jnp.dtype(self.scale_dtype)))

    def encode(self, x, axis, key):
        if key is not None:
            raise ValueError(f"{self.name}: this format rounds deterministically; drop the key.")
        x = x.astype(jnp.float32)
        amax = B.group_reduce(jnp.abs(x), axis, self.granularity, self.group_size, jnp.max)
        s = B.store_scale(amax / self.el.max_normal, self.scale_dtype)
        v = x / B.expand(B.safe_divisor(s.astype(jnp.float32)), axis, x.shape[axis])
        codes = round_to_element(v, self.el).astype(self.el.jnp_dtype)  # exact: on the grid
        return QArray(codes=codes, scales=s, format=self, shape=tuple(x.shape), axis=axis)

    def codes_of(self, q):
        return q.codes

    def decode(self, q):
        s = B.expand(q.scales.astype(jnp.float32), q.axis, q.shape[q.axis])
        return q.codes.astype(jnp.float32) * s

    def value_range(self, q):
        s = B.expand(q.scales.astype(jnp.float32), q.axis, q.shape[q.axis])
        return -self.el.max_normal * s, self.el.max_normal * s
