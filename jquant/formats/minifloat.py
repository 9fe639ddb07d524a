"""Element formats (E2M1, E2M3, E3M2, E4M3, E5M2) and the E8M0 / UE4M3 scale helpers.

Rounding is computed arithmetically, independent of backend casts (spec
``low_precision_formats.md`` §6): for |v| clamped to the format's max normal,

    e = max(floor(log2 |v|), emin)            (floor(log2) from the exponent bits, exactly)
    q = RNE(|v| * 2^(mbits - e)) * 2^(e - mbits)

which is round-to-nearest-even on the mantissa lattice (ties go to the even
mantissa, also across binade boundaries), saturating, with subnormals kept.
The sign is preserved (a negative value that rounds to zero gives -0, code
``1 << (ebits + mbits)``), exactly like an IEEE-style cast.

E8M0 scales are never built by casting (XLA:CPU rounds to a *nearby* power of
two): E = floor(log2 amax) - emax_elem read exactly from the float32 exponent bits
(equivalent to ``frexp``; OCP "floor" rule), or the
smallest E with amax / 2^E <= max_normal ("ceil" rule); clamped to [-127, 127];
byte = E + 127. Note XLA:CPU flushes float32 denormals, so byte 0 (2^-127)
decodes to 0.0 there; it only occurs for all-zero or denormal blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ElementFormat:
    """A sign/exponent/mantissa minifloat. ``emax`` is the MX ``emax_elem``."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max_normal: float
    emax: int
    has_nan: bool = False

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def min_subnormal(self) -> float:
        return float(2.0 ** (self.emin - self.mbits))

    @property
    def jnp_dtype(self):
        return jnp.dtype(_JNP_NAMES[self.name])

    def table(self) -> np.ndarray:
        """float32 value of every code (NaN/Inf codes of fp8 decode as NaN/Inf)."""
        return _TABLES[self.name]


E2M1 = ElementFormat("e2m1", 2, 1, 1, 6.0, 2)
E2M3 = ElementFormat("e2m3", 2, 3, 1, 7.5, 2)
E3M2 = ElementFormat("e3m2", 3, 2, 3, 28.0, 4)
E4M3 = ElementFormat("e4m3", 4, 3, 7, 448.0, 8, has_nan=True)
E5M2 = ElementFormat("e5m2", 5, 2, 15, 57344.0, 15, has_nan=True)
ELEMENTS = {e.name: e for e in (E2M1, E2M3, E3M2, E4M3, E5M2)}
_JNP_NAMES = {
    "e2m1": "float4_e2m1fn", "e2m3": "float6_e2m3fn", "e3m2": "float6_e3m2fn",
    "e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2",
}


def _build_table(el: ElementFormat) -> np.ndarray:
    codes = np.arange(2 ** el.bits)
    sign = np.where(codes >> (el.ebits + el.mbits) & 1, -1.0, 1.0)
    e = (codes >> el.mbits) & ((1 << el.ebits) - 1)
    m = codes & ((1 << el.mbits) - 1)
    mag = np.where(e == 0, m * 2.0 ** (el.emin - el.mbits),
                   (1 + m / 2.0 ** el.mbits) * 2.0 ** (e.astype(np.float64) - el.bias))
    vals = sign * mag
    if el.name == "e4m3":  # S.1111.111 is NaN, no Inf
        vals[(e == 15) & (m == 7)] = np.nan
    if el.name == "e5m2":  # IEEE: exponent all ones is Inf/NaN
        vals[(e == 31) & (m == 0)] = sign[(e == 31) & (m == 0)] * np.inf
        vals[(e == 31) & (m != 0)] = np.nan
    return vals.astype(np.float32)


_TABLES = {name: _build_table(el) for name, el in ELEMENTS.items()}


def floor_log2(a: jax.Array) -> jax.Array:
    """floor(log2 a) (int32) for finite float32 a > 0, read from the exponent bits.

    Exact for normal numbers; zeros and denormals (flushed to zero by XLA:CPU anyway)
    give -127. Cheaper to compile than ``frexp``.
    """
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)
    return ((bits >> 23) & 0xFF) - 127


def pow2(n: jax.Array) -> jax.Array:
    """2.0 ** n as float32 for int32 n in [-126, 127] (exact; built from the exponent bits)."""
    return jax.lax.bitcast_convert_type((n.astype(jnp.int32) + 127) << 23, jnp.float32)


def ldexp(x: jax.Array, n: jax.Array) -> jax.Array:
    """x * 2^n for |n| <= 252 (exact whenever the result is a normal float32).

    Two multiplications by exact powers of two; same values as ``jnp.ldexp`` on normal
    results, much cheaper to compile.
    """
    n = jnp.asarray(n, jnp.int32)
    n1 = n >> 1
    return x * pow2(n1) * pow2(n - n1)


@functools.partial(jax.jit, static_argnums=(1,))
def round_to_element(v: jax.Array, el: ElementFormat) -> jax.Array:
    """Saturating round-to-nearest-even of float32 ``v`` onto the grid of ``el`` (float32)."""
    v = v.astype(jnp.float32)
    a = jnp.minimum(jnp.abs(v), el.max_normal)
    e = jnp.maximum(floor_log2(a), el.emin)
    q = jnp.round(a * pow2(el.mbits - e))
    r = jnp.minimum(q * pow2(e - el.mbits), el.max_normal)
    return jnp.where(jnp.signbit(v), -r, r)


@functools.partial(jax.jit, static_argnums=(1,))
def grid_to_codes(r: jax.Array, el: ElementFormat) -> jax.Array:
    """uint8 codes of float32 values that are already on the grid of ``el``."""
    a = jnp.abs(r)
    normal = a >= 2.0 ** el.emin
    e = floor_log2(jnp.where(normal, a, 1.0))
    efield = jnp.where(normal, e + el.bias, 0)
    mant = jnp.where(normal, a * pow2(el.mbits - e) - 2.0 ** el.mbits,
                     a * 2.0 ** (el.mbits - el.emin))
    code = (efield << el.mbits) | mant.astype(jnp.int32)
    code = code | (jnp.signbit(r).astype(jnp.int32) << (el.ebits + el.mbits))
    return code.astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=(1,))
def encode_element(v: jax.Array, el: ElementFormat) -> jax.Array:
    """Saturating RNE of ``v`` into uint8 codes of ``el`` (sign bit = MSB of the code)."""
    return grid_to_codes(round_to_element(v, el), el)


@functools.partial(jax.jit, static_argnums=(1,))
def decode_element(codes: jax.Array, el: ElementFormat) -> jax.Array:
    """float32 values of uint8 codes of ``el`` (a 2^bits-entry table lookup)."""
    return jnp.take(jnp.asarray(el.table()), codes.astype(jnp.int32), mode="clip")


# ---- UE4M3 (NVFP4 block scale) -------------------------------------------------------

@jax.jit
def e4m3_byte(v: jax.Array) -> jax.Array:
    """uint8 E4M3 byte of non-negative float32 ``v``, saturating at 448 (RNE)."""
    return encode_element(v, E4M3)


@jax.jit
def e4m3_value(byte: jax.Array) -> jax.Array:
    """float32 value of an E4M3 byte."""
    return jax.lax.bitcast_convert_type(byte.astype(jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float32)


# ---- E8M0 (MX shared scale) ------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def e8m0_exponent(amax: jax.Array, el_emax: int, el_max: float,
                  rounding: Literal["floor", "ceil"] = "floor") -> jax.Array:
    """Shared exponent E (int32, in [-127, 127]) of blocks with absolute maximum ``amax``.

    floor: E = floor(log2 amax) - emax_elem (OCP MX v1.0; values in (max_normal, 2^(emax+1))*2^E
    saturate). ceil: the smallest E with amax / 2^E <= max_normal (no saturation).
    amax = 0 gives the minimum, -127.
    """
    amax = amax.astype(jnp.float32)
    pos = amax > 0
    a = jnp.where(pos, amax, 1.0)
    e = floor_log2(a) - el_emax
    if rounding == "ceil":
        e = jnp.where(ldexp(a, -e) > el_max, e + 1, e)
    elif rounding != "floor":
        raise ValueError(f"scale_rounding must be 'floor' or 'ceil', got {rounding!r}.")
    return jnp.clip(jnp.where(pos, e, -127), -127, 127)


@jax.jit
def e8m0_byte(e: jax.Array) -> jax.Array:
    return (e + 127).astype(jnp.uint8)


@jax.jit
def e8m0_value(byte: jax.Array) -> jax.Array:
    """float32 2^(byte - 127); 0xFF is NaN."""
    b = byte.astype(jnp.int32)
    return jnp.where(b == 255, jnp.nan, ldexp(jnp.ones(b.shape, jnp.float32), b - 127))
