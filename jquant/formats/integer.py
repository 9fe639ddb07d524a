"""Uniform integer formats: b in {2, 3, 4, 5, 6, 8}, symmetric or asymmetric.

Symmetric, ``symmetric_range="full"`` (all 2^b levels: compressed-tensors / llm-compressor /
vLLM, AutoGPTQ and GPTQModel checkpoints; compressed-tensors ``calculate_qparams``)::

    s = store(amax * r / ((2^b - 1) / 2)),  s = eps(scale_dtype) where s == 0,
    q = clip(RNE(x / s), -2^(b-1), 2^(b-1) - 1),  x_hat = q * s

Symmetric, ``symmetric_range="restricted"`` (2^b - 1 levels, as in the papers' INT8 and
qwix "sym"; the meaning of every symmetric format written before the option existed, and
so the field's default)::

    qmax = 2^(b-1) - 1,  s = store(amax * r / qmax),  q = clip(RNE(x / s), -qmax, qmax),
    x_hat = q * s

Both decode the same way (``q * s``); they differ in the scale divisor and the lowest code.
Names: a full-range format ends in ``-full`` (``int4-g64-full``), a restricted one has no
suffix (``int4-g64``), so names written before the option keep their meaning.

Asymmetric (zero point, range always contains 0)::

    qmax = 2^b - 1,  hi = max(max x, 0) * r,  lo = min(min x, 0) * r,
    s = store((hi - lo) / qmax),  z = clip(RNE(-lo / s), 0, qmax),
    q = clip(RNE(x / s) + z, 0, qmax),  x_hat = (q - z) * s

``store`` rounds the float32 scale to ``scale_dtype`` (float16 by default, as GPTQ
checkpoints; saturating at its max), and the codes are computed with that **stored**
scale, so ``dequantize(quantize(x))`` is exactly what a packed kernel produces.
``amax``, ``max x``, ``min x`` are taken per group: ``"tensor"`` (one scale),
``"channel"`` (reduce over ``axis`` only: one scale per output channel of an
``[in, out]`` weight quantized along axis 0, or per token of an activation along
axis -1; ``"token"`` is an accepted alias), or ``"group"`` (``group_size``
consecutive elements along ``axis``; the group size must divide the axis).
``r`` is ``clip_ratio``; with ``clip_search=True`` it is chosen per scale group from
``clip_ratio * linspace(1, clip_min_ratio, clip_grid + 1)`` by the smallest squared
error of the dequantized group (first ratio on ties: never worse than no search).
Rounding is RNE, or stochastic (``floor(v + u)``, u ~ U[0, 1), needs a key).

Storage: 8 bits -> int8 (symmetric) / uint8 (asymmetric) codes; fewer bits -> packed
densely along ``axis`` with ``packing.pack_bits`` (two's complement low bits for
symmetric codes). Scales have ``scale_dtype``; zero points are uint8 (8 bits per
group; GPTQ's qzeros pack them at b bits, which would save (8 - b) / group bits).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import _blocks as B
from jquant.formats.packing import pack_bits, packed_length, to_signed, unpack_bits
from jquant.formats.qarray import Format, QArray

INT_BITS = (2, 3, 4, 5, 6, 8)
ROUNDINGS = ("nearest", "stochastic")
SYMMETRIC_RANGES = ("full", "restricted")


def _round(v: jax.Array, rounding: str, key) -> jax.Array:
    if rounding == "nearest":
        return jnp.round(v)
    return jnp.floor(v + jax.random.uniform(key, v.shape, jnp.float32))


def exact_div(a: jax.Array, b) -> jax.Array:
    """``a / b`` correctly rounded (IEEE division), as PyTorch and numpy compute it.

    XLA rewrites a division by a broadcast (a scalar, a per-group scale) into a multiplication by
    the reciprocal, which is off by one ulp for about half of the inputs and so flips scales and
    codes at rounding ties; the barrier keeps the divisor a full-shape array and the division real.
    """
    b = jnp.broadcast_to(jnp.asarray(b, jnp.result_type(a)), jnp.shape(a))
    return a / jax.lax.optimization_barrier(b)


def check_key(name: str, rounding: str, key) -> None:
    if rounding == "stochastic" and key is None:
        raise ValueError(f"{name}: rounding='stochastic' needs a PRNG key (quantize(..., key=key)).")
    if rounding == "nearest" and key is not None:
        raise ValueError(
            f"{name}: a key was given but rounding='nearest' is deterministic; drop the key or "
            f"use rounding='stochastic'.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntFormat(Format):
    """Uniform integer format descriptor (see module docstring for the equations)."""

    bits: int
    symmetric: bool = True
    granularity: str | None = None
    group_size: int | None = None
    clip_ratio: float = 1.0
    clip_search: bool = False
    clip_grid: int = 20
    clip_min_ratio: float = 0.5
    scale_dtype: str = "float16"
    rounding: str = "nearest"
    range_gradient: bool = False
    symmetric_range: str = "restricted"

    def __post_init__(self):
        own = "IntFormat"
        if isinstance(self.bits, bool) or self.bits not in INT_BITS:
            raise ValueError(f"{own}: bits={self.bits!r} is not supported; use one of {INT_BITS}.")
        object.__setattr__(self, "granularity",
                           B.resolve_granularity(own, self.granularity, self.group_size))
        if not 0.0 < float(self.clip_ratio) <= 1.0:
            raise ValueError(f"{own}: clip_ratio={self.clip_ratio!r} must be in (0, 1].")
        if not 0.0 < float(self.clip_min_ratio) < 1.0:
            raise ValueError(f"{own}: clip_min_ratio={self.clip_min_ratio!r} must be in (0, 1).")
        if isinstance(self.clip_grid, bool) or not isinstance(self.clip_grid, int) or self.clip_grid < 1:
            raise ValueError(f"{own}: clip_grid={self.clip_grid!r} must be a positive int.")
        B.check_scale_dtype(own, self.scale_dtype)
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"{own}: rounding={self.rounding!r} is not one of {ROUNDINGS}.")
        if self.symmetric_range not in SYMMETRIC_RANGES:
            raise ValueError(f"{own}: symmetric_range={self.symmetric_range!r} is not one of {SYMMETRIC_RANGES}.")
        if not self.symmetric and self.symmetric_range != "restricted":
            raise ValueError(f"{own}: symmetric_range={self.symmetric_range!r} applies to symmetric formats only; "
                             f"drop it for an asymmetric format (symmetric=False) or set symmetric=True.")

    # -- naming and shapes -----------------------------------------------------------
    @property
    def name(self) -> str:
        parts = [f"int{self.bits}"]
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
        elif self.granularity == "tensor":
            parts.append("tensor")
        if not self.symmetric:
            parts.append("asym")
        elif self.symmetric_range == "full":
            parts.append("full")
        if self.clip_ratio != 1.0:
            parts.append(f"clip{self.clip_ratio:g}")
        if self.clip_search:
            parts.append("mse")
        if self.scale_dtype != "float16":
            parts.append(self.scale_dtype)
        if self.rounding != "nearest":
            parts.append(self.rounding)
        return "-".join(parts)

    @property
    def full_range(self) -> bool:
        """True for a symmetric format that uses all 2^b codes (lowest code -2^(b-1))."""
        return self.symmetric and self.symmetric_range == "full"

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) if self.full_range else -(2 ** (self.bits - 1) - 1)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def scale_divisor(self) -> float:
        """What a group's range is divided by to give its scale: ``(qmax - qmin) / 2`` if symmetric
        (``qmax`` restricted, ``qmax + 1/2`` full), else ``qmax`` (``s = (hi - lo) / qmax``)."""
        return (self.qmax - self.qmin) / 2 if self.symmetric else float(self.qmax)

    @property
    def ratios(self) -> np.ndarray:
        """Clip ratios tried per scale group (just ``clip_ratio`` without a search)."""
        if not self.clip_search:
            return np.array([self.clip_ratio], np.float32)
        return (self.clip_ratio * np.linspace(1.0, self.clip_min_ratio, self.clip_grid + 1)).astype(np.float32)

    def check_shape(self, shape, axis):
        if self.granularity == "group":
            B.check_group_divides(self.name, tuple(shape), axis, self.group_size)

    def _codes_dtype(self):
        return jnp.int8 if self.symmetric else jnp.uint8

    def expected_children(self, shape, axis, codebooks_shape=None):
        n = shape[axis]
        codes_n = n if self.bits == 8 else packed_length(n, self.bits)
        codes_dt = self._codes_dtype() if self.bits == 8 else jnp.uint8
        sshape = B.scale_shape(shape, axis, self.granularity, self.group_size)
        return dict(
            codes=jax.ShapeDtypeStruct(B.with_axis(shape, axis, codes_n), codes_dt),
            scales=jax.ShapeDtypeStruct(sshape, jnp.dtype(self.scale_dtype)),
            zeros=None if self.symmetric else jax.ShapeDtypeStruct(sshape, jnp.uint8),
        )

    # -- encode / decode -------------------------------------------------------------
    def _scale_zero(self, x: jax.Array, axis: int, ratio) -> tuple[jax.Array, jax.Array | None]:
        """Stored scales (scale_dtype) and zero points (float32 integers or None)."""
        g, gs = self.granularity, self.group_size
        if self.symmetric:
            amax = B.group_reduce(jnp.abs(x), axis, g, gs, jnp.max)
            s = B.store_scale(exact_div(amax * ratio, self.scale_divisor), self.scale_dtype)
            if self.full_range:  # compressed-tensors stores eps, not 0, for an all-zero group
                s = jnp.where(s == 0, jnp.finfo(s.dtype).eps, s)
            return s, None
        hi = jnp.maximum(B.group_reduce(x, axis, g, gs, jnp.max), 0.0) * ratio
        lo = jnp.minimum(B.group_reduce(x, axis, g, gs, jnp.min), 0.0) * ratio
        s = B.store_scale(exact_div(hi - lo, self.qmax), self.scale_dtype)
        z = jnp.clip(jnp.round(-lo / B.safe_divisor(s.astype(jnp.float32))), 0, self.qmax)
        return s, z

    def _codes(self, x, axis, s, z, key=None):
        n = x.shape[axis]
        v = exact_div(x, B.expand(B.safe_divisor(s.astype(jnp.float32)), axis, n))
        q = _round(v, self.rounding if key is not None else "nearest", key)
        if z is not None:
            q = q + B.expand(z, axis, n)
        return jnp.clip(q, self.qmin, self.qmax)

    def _dequant(self, q, axis, s, z):
        n = q.shape[axis]
        if z is not None:
            q = q - B.expand(z, axis, n)
        return q * B.expand(s.astype(jnp.float32), axis, n)

    def encode(self, x, axis, key):
        check_key(self.name, self.rounding, key)
        x = x.astype(jnp.float32)
        ratios = self.ratios
        s, z = self._scale_zero(x, axis, ratios[0])
        if len(ratios) > 1:
            def body(carry, r):
                best_err, best_s, best_z = carry
                s_r, z_r = self._scale_zero(x, axis, r)
                err = (x - self._dequant(self._codes(x, axis, s_r, z_r), axis, s_r, z_r)) ** 2
                err = B.group_reduce(err, axis, self.granularity, self.group_size, jnp.sum)
                better = err < best_err
                best_z = None if z_r is None else jnp.where(better, z_r, best_z)
                return (jnp.where(better, err, best_err), jnp.where(better, s_r, best_s), best_z), None

            inf = jnp.full(s.shape, jnp.inf, jnp.float32)
            (_, s, z), _ = jax.lax.scan(body, (inf, s, z), jnp.asarray(ratios))
        q = self._codes(x, axis, s, z, key).astype(jnp.int32)
        return QArray(codes=self._store_codes(q, axis), scales=s, zeros=None if z is None else z.astype(jnp.uint8),
                      format=self, shape=tuple(x.shape), axis=axis)

    def quantize_with_scales(self, x: jax.Array, scales: jax.Array, zeros: jax.Array | None = None,
                             *, axis: int, key: jax.Array | None = None) -> QArray:
        """Quantizes ``x`` with given (e.g. calibrated or GPTQ) scales and zero points.

        ``scales`` (cast to ``scale_dtype``) and ``zeros`` (integers, asymmetric only) must
        have this format's scale shape for ``x.shape`` and ``axis``. No clip search runs.
        """
        x = jnp.asarray(x)
        axis = B.normalize_axis(axis, x.ndim, f"{self.name}.quantize_with_scales")
        self.check_shape(tuple(x.shape), axis)
        check_key(self.name, self.rounding, key)
        want = B.scale_shape(tuple(x.shape), axis, self.granularity, self.group_size)
        if tuple(scales.shape) != want or (zeros is not None and tuple(zeros.shape) != want):
            raise ValueError(f"{self.name}.quantize_with_scales: scales/zeros must have shape {want} "
                             f"for x of shape {tuple(x.shape)} on axis {axis}.")
        if (zeros is None) != self.symmetric:
            raise ValueError(f"{self.name}.quantize_with_scales: zeros are required for asymmetric "
                             f"and not allowed for symmetric formats.")
        s = scales.astype(jnp.dtype(self.scale_dtype))
        z = None if zeros is None else zeros.astype(jnp.float32)
        q = self._codes(x.astype(jnp.float32), axis, s, z, key).astype(jnp.int32)
        return QArray(codes=self._store_codes(q, axis), scales=s,
                      zeros=None if z is None else z.astype(jnp.uint8), format=self,
                      shape=tuple(x.shape), dtype=jnp.dtype(x.dtype).name, axis=axis).validate()

    def range_surrogate(self, x: jax.Array, axis: int) -> jax.Array:
        """A differentiable stand-in for ``dequantize(quantize(x))`` whose gradient also flows through the range.

        The quantizer of OSTQuant's / QuaRot's training code (spec §3.1) in float32, without
        storing the scale and without clip search: ``s = (hi - lo) / qmax`` (``amax / scale_divisor``
        symmetric) from the group's min/max (not detached), ``z = round_ste(-lo / s)``,
        ``x̂ = (clip(round_ste(x / s) + z, qmin, qmax) - z) · s`` with
        ``round_ste(u) = u + stop_gradient(round(u) - u)``. ``fake_quantize`` uses its
        gradient (and the exact stored-scale values as its forward) when ``range_gradient``.
        """
        g, gs, n = self.granularity, self.group_size, x.shape[axis]
        x = x.astype(jnp.float32)
        tiny = jnp.finfo(jnp.float32).tiny

        def round_ste(u):
            return u + jax.lax.stop_gradient(jnp.round(u) - u)

        if self.symmetric:
            amax = B.group_reduce(jnp.abs(x), axis, g, gs, jnp.max)
            s = jnp.maximum(exact_div(amax * self.clip_ratio, self.scale_divisor), tiny)
            z = jnp.zeros_like(s)
        else:
            hi = jnp.maximum(B.group_reduce(x, axis, g, gs, jnp.max), 0.0) * self.clip_ratio
            lo = jnp.minimum(B.group_reduce(x, axis, g, gs, jnp.min), 0.0) * self.clip_ratio
            s = jnp.maximum(exact_div(hi - lo, self.qmax), tiny)
            z = round_ste(-lo / s)
        s, z = B.expand(s, axis, n), B.expand(z, axis, n)
        v = round_ste(exact_div(x, s)) + z
        v = jnp.where(v < self.qmin, self.qmin, jnp.where(v > self.qmax, self.qmax, v))  # gradient 1 on [qmin, qmax]
        return (v - z) * s

    def _store_codes(self, q: jax.Array, axis: int) -> jax.Array:
        if self.bits == 8:
            return q.astype(self._codes_dtype())
        return pack_bits(q, self.bits, axis)

    def codes_of(self, q: QArray) -> jax.Array:
        """int32 codes at the logical shape (signed for symmetric, unsigned otherwise)."""
        if self.bits == 8:
            return q.codes.astype(jnp.int32)
        u = unpack_bits(q.codes, self.bits, q.shape[q.axis], q.axis)
        return to_signed(u, self.bits) if self.symmetric else u.astype(jnp.int32)

    def decode(self, q: QArray) -> jax.Array:
        z = None if q.zeros is None else q.zeros.astype(jnp.float32)
        return self._dequant(self.codes_of(q).astype(jnp.float32), q.axis, q.scales, z)

    def value_range(self, q: QArray):
        s = q.scales.astype(jnp.float32)
        z = 0.0 if q.zeros is None else q.zeros.astype(jnp.float32)
        n = q.shape[q.axis]
        lo, hi = (self.qmin - z) * s, (self.qmax - z) * s
        return B.expand(lo, q.axis, n), B.expand(hi, q.axis, n)
