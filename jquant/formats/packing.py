"""Dense bit packing of b-bit codes (1 <= b <= 16) into uint8 along one axis.

Layout: a little-endian bit stream along ``axis``. Element ``i`` occupies stream bits
``[i*b, (i+1)*b)``; byte ``j`` holds stream bits ``[8j, 8j+8)`` with bit 0 the least
significant. For b = 4 this is the PyTorch ``float4_e2m1fn_x2`` / cuBLAS convention
(element 2i in the low nibble, 2i+1 in the high nibble); b = 2 puts element 4i in bits
0-1; b = 3 packs 8 codes in 3 bytes, b = 5 packs 8 codes in 5 bytes, b = 6 packs
4 codes in 3 bytes; b = 8 is one code per byte and b = 16 is two little-endian bytes.

The axis is zero-padded to a multiple of ``8 / gcd(8, b)`` elements (one "unit" of
``b / gcd(8, b)`` bytes), so a packed axis of ``n`` codes has
``packed_length(n, b) = ceil(n / unit) * unit_bytes`` bytes. The padding is real
storage and is counted by ``bits_per_element``. Packed arrays keep the logical rank:
only ``axis`` shrinks. Implementation: codes are expanded to bit planes right after
``axis`` (a broadcast shift), regrouped by a contiguous reshape, and summed; no
transposes and no loops over elements.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jquant.formats._blocks import crop_axis, normalize_axis, pad_axis

MAX_BITS = 16


def _unit(bits: int) -> tuple[int, int]:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"packing: bits must be an int in [1, {MAX_BITS}], got {bits!r}.")
    g = math.gcd(8, bits)
    return 8 // g, bits // g  # elements per unit, bytes per unit


def packed_length(n: int, bits: int) -> int:
    """Number of bytes that ``n`` codes of ``bits`` bits occupy along the packed axis."""
    elems, nbytes = _unit(bits)
    return -(-n // elems) * nbytes


def _bit_shape(n: int, axis: int, ndim: int, size: int) -> tuple[int, ...]:
    """Shape of an ``arange(size)`` that broadcasts along the dimension after ``axis``."""
    shape = [1] * (ndim + 1)
    shape[axis + 1] = size
    return tuple(shape)


def _to_bits(x: jax.Array, axis: int, width: int) -> jax.Array:
    """uint32 ``x`` [..., n, ...] -> bit planes [..., n * width, ...] (LSB first)."""
    shifts = jnp.arange(width, dtype=jnp.uint32).reshape(_bit_shape(0, axis, x.ndim, width))
    bits = (jnp.expand_dims(x, axis + 1) >> shifts) & 1
    s = bits.shape
    return bits.reshape(s[:axis] + (s[axis] * width,) + s[axis + 2:])


def _from_bits(bits: jax.Array, axis: int, width: int) -> jax.Array:
    """bit planes [..., m * width, ...] -> uint32 [..., m, ...] (LSB first)."""
    s = bits.shape
    grouped = bits.reshape(s[:axis] + (s[axis] // width, width) + s[axis + 1:])
    shifts = jnp.arange(width, dtype=jnp.uint32).reshape(_bit_shape(0, axis, bits.ndim, width))
    return jnp.sum(grouped << shifts, axis=axis + 1, dtype=jnp.uint32)


def pack_bits(codes: jax.Array, bits: int, axis: int = -1) -> jax.Array:
    """Packs integer ``codes`` (only their low ``bits`` bits are kept) into uint8.

    Signed codes may be passed directly: their two's-complement low bits are stored.
    Returns an array of ``codes.shape`` with ``axis`` replaced by
    ``packed_length(codes.shape[axis], bits)``.
    """
    elems, nbytes = _unit(bits)
    axis = normalize_axis(axis, codes.ndim, "pack_bits")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"pack_bits: codes must be integers, got dtype {codes.dtype}.")
    return _pack(codes, bits, axis)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pack(codes, bits, axis):
    elems, _ = _unit(bits)
    x = (codes.astype(jnp.int32) & ((1 << bits) - 1)).astype(jnp.uint32)
    if bits == 8:
        return x.astype(jnp.uint8)
    x = pad_axis(x, axis, elems)
    return _from_bits(_to_bits(x, axis, bits), axis, 8).astype(jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int, length: int, axis: int = -1) -> jax.Array:
    """Inverse of ``pack_bits``: returns the first ``length`` unsigned codes along ``axis``.

    ``length`` may be smaller than the packed capacity (padding is dropped).

    The result is uint8 for ``bits <= 8`` and uint16 otherwise.
    """
    elems, nbytes = _unit(bits)
    axis = normalize_axis(axis, packed.ndim, "unpack_bits")
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack_bits: packed must be uint8, got dtype {packed.dtype}.")
    nb = packed.shape[axis]
    capacity = nb // nbytes * elems
    if nb % nbytes or not 0 <= length <= capacity:
        raise ValueError(
            f"unpack_bits: {length} codes of {bits} bits need at least "
            f"{packed_length(length, bits)} bytes (a multiple of {nbytes}) along axis {axis}, "
            f"but the packed array has {nb} (shape {packed.shape}).")
    return _unpack(packed, bits, length, axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack(packed, bits, length, axis):
    dtype = jnp.uint8 if bits <= 8 else jnp.uint16
    if bits == 8:
        return crop_axis(packed, axis, length)
    codes = _from_bits(_to_bits(packed.astype(jnp.uint32), axis, 8), axis, bits)
    return crop_axis(codes.astype(dtype), axis, length)


def to_signed(u: jax.Array, bits: int) -> jax.Array:
    """Sign-extends unsigned ``bits``-bit two's-complement codes to int32."""
    u = u.astype(jnp.int32)
    return u - ((u >> (bits - 1)) << bits)


TRITS_PER_BYTE = 5  # 3^5 = 243 <= 256


def trit_packed_length(n: int) -> int:
    """Bytes that ``n`` ternary codes occupy: five per byte (1.6 bits per code)."""
    return -(-n // TRITS_PER_BYTE)


def pack_trits(codes: jax.Array, axis: int = -1) -> jax.Array:
    """Packs codes in {0, 1, 2} base 3, five per uint8 along ``axis``: ``byte = sum_i c_i 3^i``.

    The axis is zero-padded to a multiple of five. Used for SKVQ's 1.5-bit (ternary) KV codes.
    """
    axis = normalize_axis(axis, codes.ndim, "pack_trits")
    x = pad_axis(codes.astype(jnp.int32), axis, TRITS_PER_BYTE)
    s = x.shape
    grouped = x.reshape(s[:axis] + (s[axis] // TRITS_PER_BYTE, TRITS_PER_BYTE) + s[axis + 1:])
    powers = (3 ** jnp.arange(TRITS_PER_BYTE, dtype=jnp.int32)).reshape(_bit_shape(0, axis, x.ndim, TRITS_PER_BYTE))
    return jnp.sum(grouped * powers, axis=axis + 1).astype(jnp.uint8)


def unpack_trits(packed: jax.Array, length: int, axis: int = -1) -> jax.Array:
    """Inverse of ``pack_trits``: the first ``length`` codes (uint8) along ``axis``."""
    axis = normalize_axis(axis, packed.ndim, "unpack_trits")
    if packed.dtype != jnp.uint8 or not 0 <= length <= packed.shape[axis] * TRITS_PER_BYTE:
        raise ValueError(f"unpack_trits: {length} codes need {trit_packed_length(length)} uint8 bytes along axis "
                         f"{axis}; got {packed.shape} {packed.dtype}.")
    powers = (3 ** jnp.arange(TRITS_PER_BYTE, dtype=jnp.int32)).reshape(_bit_shape(0, axis, packed.ndim, TRITS_PER_BYTE))
    digits = (jnp.expand_dims(packed.astype(jnp.int32), axis + 1) // powers) % 3
    s = digits.shape
    codes = digits.reshape(s[:axis] + (s[axis] * TRITS_PER_BYTE,) + s[axis + 2:])
    return crop_axis(codes.astype(jnp.uint8), axis, length)
