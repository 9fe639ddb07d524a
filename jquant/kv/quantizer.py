"""Quantizers for cached keys and values: min-max groups with a floating zero point, or any jquant Format.

``KVQuantizer`` is the quantizer of KIVI, SKVQ and WKVQuant (and per-token RTN). A token's key
(or value) is the flattened vector ``x [C]``, ``C = kv_heads * head_dim``. Optional offline
parts come first: channel smoothing ``x~ = (x - shift) / scale`` (WKVQuant §3.3; the arrays are
passed in, they are learned) and a channel permutation ``x' = x~[perm]`` (SKVQ §3.1). Then per
group ``G`` (SKVQ §3.2)::

    lo = clip * min(x'_G),   hi = clip * max(x'_G),   M = 2^b - 1   (M = 2 for 1.5 bits)
    s = store(max((hi - lo) / M, floor)),   z = store(lo)
    q = clip(round((x'_G - z) / s), 0, M),   x^'_G = q * s + z

``store`` rounds to ``meta_dtype`` (float16, bfloat16 or float8_e4m3fn; fp8 saturates at 448).
Codes are computed from the **stored** ``s`` and ``z`` (SKVQ's reference code computes them
from the exact values and rounds only the stored copies; using the stored ones is never worse
and makes the packed cache and the simulated path identical). Values outside ``[lo, hi]``
saturate, which is the clipping.

Group layouts (``axis``):

- ``"token"``: per token, ``group_size`` consecutive channels (after the permutation), or the
  variable ``group_sizes`` of SKVQ's clusters. ``group_size = head_dim`` is one group per head.
- ``"channel"``: KIVI's keys: per channel over blocks of ``group_size`` consecutive tokens, so
  a block is quantized only when all its tokens are known (the cache keeps them in full
  precision until then).

Storage: a ``QArray`` of the quantizer's ``format`` (``jquant.formats.MinMaxFormat``: the maths above,
codes packed along the grouped axis, 1.5 bits as base-3 "trits", five per byte), token or block index
on axis 1: logical shape ``[B, N, C]`` grouped along the channels (token), or ``[B, N, bt, C]``
grouped along the ``bt`` tokens of each block, one range per channel (channel).

``FormatKV`` adapts any ``jquant.formats`` Format (e.g. ``int4-asym``, per token and head as in
QuaRot/OSTQuant) to the same interface; its QArrays have the logical shape ``[B, T, K, D]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import Format, QArray, dequantize, fake_quantize, get_format, quantize
from jquant.formats.minmax import META_DTYPES, MINMAX_BITS, MinMaxFormat

KV_BITS = MINMAX_BITS
AXES = ("token", "channel")
Smoothing = tuple[jax.Array, jax.Array] | None  # (shift [C], scale [C]) of WKVQuant, or None


def _round_ste(u: jax.Array) -> jax.Array:
    return u + jax.lax.stop_gradient(jnp.round(u) - u)


def _ste(exact: jax.Array, stored: jax.Array) -> jax.Array:
    """``stored`` in the forward pass, gradient of ``exact``."""
    return exact + jax.lax.stop_gradient(stored.astype(jnp.float32) - exact)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVQuantizer:
    """Min-max KV quantizer (see module docstring). Static and hashable: it is part of a model's structure.

    Args:
      bits: 1.5 (ternary), 2, 3, 4 or 8.
      axis: ``"token"`` (per-token channel groups) or ``"channel"`` (per-channel token blocks, KIVI keys).
      group_size: channels per group (token axis) or tokens per block (channel axis).
      group_sizes: variable channel-group sizes in permuted order (SKVQ clusters); overrides group_size.
      perm: channel order ``[C]`` applied before grouping (SKVQ reorder); None keeps the natural order.
      clip: the clip ratio ``alpha`` in (0, 1] applied to both ends of every group's range.
      meta_dtype: storage dtype of scales and zero points.
    """

    bits: float
    axis: str = "token"
    group_size: int | None = None
    group_sizes: tuple[int, ...] | None = None
    perm: tuple[int, ...] | None = None
    clip: float = 1.0
    meta_dtype: str = "float16"

    def __post_init__(self):
        own = "KVQuantizer"
        if self.bits not in KV_BITS:
            raise ValueError(f"{own}: bits={self.bits!r} is not supported; use one of {KV_BITS}.")
        if self.axis not in AXES:
            raise ValueError(f"{own}: axis={self.axis!r} must be one of {AXES}.")
        if self.group_sizes is None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"{own}: group_size={self.group_size!r} must be a positive int (or give group_sizes).")
        if self.group_sizes is not None:
            if self.axis != "token" or not self.group_sizes or min(self.group_sizes) < 1:
                raise ValueError(f"{own}: group_sizes must be positive sizes, and only with axis='token'.")
            object.__setattr__(self, "group_sizes", tuple(int(g) for g in self.group_sizes))
        if self.perm is not None:
            object.__setattr__(self, "perm", tuple(int(p) for p in self.perm))
            if sorted(self.perm) != list(range(len(self.perm))):
                raise ValueError(f"{own}: perm must be a permutation of 0..{len(self.perm) - 1}.")
        if not 0.0 < float(self.clip) <= 1.0:
            raise ValueError(f"{own}: clip={self.clip!r} must be in (0, 1].")
        if self.meta_dtype not in META_DTYPES:
            raise ValueError(f"{own}: meta_dtype={self.meta_dtype!r} is not one of {META_DTYPES}.")
        if self.axis == "channel" and self.bits == 1.5:
            raise ValueError(f"{own}: 1.5-bit (ternary) codes are per token; use axis='token' or bits >= 2.")

    # -- description -------------------------------------------------------------------
    @property
    def name(self) -> str:
        parts = [f"kv{self.bits:g}", "chan" if self.axis == "channel" else "tok"]
        parts.append(f"g{self.group_size}" if self.group_sizes is None else f"var{len(self.group_sizes)}")
        if self.perm is not None:
            parts.append("reorder")
        if self.clip != 1.0:
            parts.append(f"clip{self.clip:g}")
        parts.append({"float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "fp8", "float32": "fp32"}[self.meta_dtype])
        return "-".join(parts)

    @property
    def levels(self) -> int:
        """``M``: the largest code."""
        return 2 if self.bits == 1.5 else 2 ** int(self.bits) - 1

    @property
    def block(self) -> int:
        """Tokens quantized together: 1, or the block length of the channel axis."""
        return self.group_size if self.axis == "channel" else 1

    def groups(self, channels: int) -> np.ndarray:
        """Group sizes over the ``channels`` of a token (token axis)."""
        if self.group_sizes is not None:
            return np.asarray(self.group_sizes)
        return np.full(channels // self.group_size, self.group_size)

    def check(self, kv_heads: int, head_dim: int) -> None:
        """Raise when this quantizer cannot hold keys/values of ``kv_heads`` heads of ``head_dim`` channels."""
        c = kv_heads * head_dim
        if self.perm is not None and len(self.perm) != c:
            raise ValueError(f"{self.name}: perm has {len(self.perm)} entries but a token has {c} = "
                             f"{kv_heads} heads x {head_dim} channels; calibrate it on this model.")
        if self.axis == "token":
            if self.group_sizes is not None and sum(self.group_sizes) != c:
                raise ValueError(f"{self.name}: group_sizes sum to {sum(self.group_sizes)} but a token has {c} "
                                 "channels; calibrate it on this model.")
            if self.group_sizes is None and c % self.group_size:
                raise ValueError(f"{self.name}: group_size={self.group_size} does not divide the {c} channels of a "
                                 f"token ({kv_heads} heads x {head_dim}); use a divisor such as {head_dim}.")

    @property
    def format(self) -> MinMaxFormat:
        """The storage format: channel groups of a token (token axis), or one range per channel over a block of
        tokens (channel axis, the block being the QArray's grouped axis)."""
        token = self.axis == "token"
        return MinMaxFormat(bits=self.bits, group_size=self.group_size if token and self.group_sizes is None else None,
                            group_sizes=self.group_sizes, clip=self.clip, meta_dtype=self.meta_dtype)

    def bits_per_element(self, channels: int) -> float:
        """Stored bits per cached element (codes plus scales and zero points), from the QArray of one block."""
        shape = (1, 1, channels) if self.axis == "token" else (1, 1, self.block, channels)
        spec = self.format.expected_children(shape, 2)
        stored = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in spec.values() if a is not None)
        return 8.0 * stored / (channels * self.block)

    # -- maths -------------------------------------------------------------------------
    def _prepare(self, x: jax.Array, smooth: Smoothing) -> jax.Array:
        """``[B, T, K, D]`` -> smoothed, permuted float32 ``[B, T, C]`` (channel axis: ``[B, T / bt, bt, C]``)."""
        b, t = x.shape[:2]
        x = x.reshape(b, t, -1).astype(jnp.float32)
        if smooth is not None:
            x = (x - smooth[0].astype(jnp.float32)) / smooth[1].astype(jnp.float32)
        if self.perm is not None:
            x = x[..., np.asarray(self.perm)]
        return x

    def _finish(self, y: jax.Array, shape: tuple[int, ...], smooth: Smoothing, dtype) -> jax.Array:
        if self.perm is not None:
            y = y[..., np.argsort(self.perm)]
        if smooth is not None:
            y = y * smooth[1].astype(jnp.float32) + smooth[0].astype(jnp.float32)
        return y.reshape(shape).astype(dtype)

    def _blocked(self, x: jax.Array) -> jax.Array:
        b, t, c = x.shape
        if t % self.block:
            raise ValueError(f"{self.name}: {t} tokens are not whole blocks of {self.block}.")
        return x.reshape(b, t // self.block, self.block, c)

    def encode(self, x: jax.Array, smooth: Smoothing = None) -> QArray:
        """``x [B, T, K, D]`` -> a QArray of ``format`` (T a multiple of ``block``; see the module docstring)."""
        xf = self._prepare(x, smooth)
        if self.axis == "channel":
            xf = self._blocked(xf)
        return quantize(xf, self.format, axis=2)

    def decode(self, stored: QArray, shape: tuple[int, ...], smooth: Smoothing = None, dtype=jnp.float32) -> jax.Array:
        """A QArray of ``encode`` -> ``[B, T, K, D]`` of ``shape`` in ``dtype``."""
        y = dequantize(stored, jnp.float32)
        return self._finish(y.reshape(shape[0], shape[1], -1), shape, smooth, dtype)

    def fake(self, x: jax.Array, smooth: Smoothing = None) -> jax.Array:
        """``decode(encode(x))`` exactly in the forward pass; straight-through rounding, gradients reach the
        range (min/max), the smoothing and ``x`` (WKVQuant learns through this). Channel axis: a trailing
        partial block is quantized with its own range (such tokens are never read from the cache)."""
        b, t = x.shape[:2]
        xf = self._prepare(x, smooth)
        if self.axis == "channel":
            pad = -t % self.block
            xf = self._blocked(jnp.pad(xf, ((0, 0), (0, pad), (0, 0)), mode="edge"))
        fmt, n = self.format, xf.shape[2]
        s, z, s_st, z_st = fmt.scale_zero(xf, 2)
        s, z = fmt.expand(_ste(s, s_st), 2, n), fmt.expand(_ste(z, z_st), 2, n)
        v = _round_ste((xf - z) / s)
        v = jnp.where(v < 0, 0.0, jnp.where(v > self.levels, float(self.levels), v))
        y = (v * s + z).reshape(b, -1, xf.shape[-1])[:, :t]
        return self._finish(y, x.shape, smooth, x.dtype)


@dataclasses.dataclass(frozen=True)
class FormatKV:
    """Any jquant ``Format`` quantizing each token's head vectors along ``head_dim`` (QuaRot/OSTQuant KV)."""

    format: Format

    block = 1

    @staticmethod
    def of(fmt: Format | str) -> FormatKV:
        return FormatKV(get_format(fmt) if isinstance(fmt, str) else fmt)

    @property
    def name(self) -> str:
        return self.format.name

    def check(self, kv_heads: int, head_dim: int) -> None:
        try:
            self.format.check_shape((1, 1, kv_heads, head_dim), 3)
        except ValueError as err:
            raise ValueError(f"KV format {self.format.name} cannot hold head_dim={head_dim}: {err}") from None

    def encode(self, x: jax.Array, smooth: Smoothing = None) -> QArray:
        _no_smoothing(self, smooth)
        return quantize(x, self.format, axis=3)

    def decode(self, stored: QArray, shape: tuple[int, ...], smooth: Smoothing = None, dtype=jnp.float32) -> jax.Array:
        _no_smoothing(self, smooth)
        return dequantize(stored, dtype).reshape(shape)

    def fake(self, x: jax.Array, smooth: Smoothing = None) -> jax.Array:
        _no_smoothing(self, smooth)
        return fake_quantize(x, self.format, axis=-1)


def _no_smoothing(q: FormatKV, smooth: Smoothing) -> None:
    if smooth is not None:
        raise ValueError(f"KV format {q.name}: channel smoothing needs a KVQuantizer, not a Format.")


Quantizer = KVQuantizer | FormatKV
