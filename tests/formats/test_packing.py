"""Bit packing: layout against a Python-int bit-stream reference, round trips, errors."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jquant.formats.packing import pack_bits, packed_length, to_signed, unpack_bits


def _stream_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit stream of a 1-D code vector, padded to whole units."""
    unit = 8 // math.gcd(8, bits)
    n = -(-len(codes) // unit) * unit
    acc = 0
    for i, c in enumerate(codes.tolist()):
        acc |= int(c) << (i * bits)
    return np.frombuffer(acc.to_bytes(n * bits // 8, "little"), np.uint8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 11, 16])
def test_layout_matches_bit_stream_and_round_trips(bits):
    rng = np.random.default_rng(bits)
    n = 37  # not a multiple of any unit
    codes = rng.integers(0, 2 ** bits, size=(3, n))
    packed = np.asarray(pack_bits(jnp.asarray(codes, jnp.int32), bits, axis=1))
    assert packed.dtype == np.uint8
    assert packed.shape == (3, packed_length(n, bits))
    for row in range(3):
        np.testing.assert_array_equal(packed[row], _stream_reference(codes[row], bits))
    back = unpack_bits(jnp.asarray(packed), bits, n, axis=1)
    np.testing.assert_array_equal(np.asarray(back), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8, 16])
def test_every_code_and_every_byte_value_round_trips(bits):
    # all codes, along axis 0 of a rank-3 array
    codes = np.arange(2 ** bits).reshape(-1, 1, 1) if bits <= 12 else np.arange(2 ** 16).reshape(-1, 1, 1)
    codes = np.broadcast_to(codes, (codes.shape[0], 2, 1))
    packed = pack_bits(jnp.asarray(codes, jnp.int32), bits, axis=0)
    np.testing.assert_array_equal(np.asarray(unpack_bits(packed, bits, codes.shape[0], axis=0)), codes)
    # every byte value at every byte position of a unit: unpack then pack is the identity
    unit_bytes = bits // math.gcd(8, bits)
    allb = np.zeros((unit_bytes, 256, unit_bytes), np.uint8)
    for j in range(unit_bytes):
        allb[j, :, j] = np.arange(256)
    b = allb.reshape(-1)
    n = len(b) * 8 // bits
    re = pack_bits(unpack_bits(jnp.asarray(b), bits, n, axis=0).astype(jnp.int32), bits, axis=0)
    np.testing.assert_array_equal(np.asarray(re), b)


def test_known_layouts():
    # int4: element 2i in the low nibble (PyTorch float4_e2m1fn_x2 / cuBLAS)
    assert np.asarray(pack_bits(jnp.array([1, 2]), 4)).tolist() == [0x21]
    assert np.asarray(pack_bits(jnp.array([1, 2, 3, 0]), 2)).tolist() == [0b00111001]
    # 8 codes of 3 bits in 3 bytes, 4 codes of 6 bits in 3 bytes, 8 codes of 5 bits in 5 bytes
    assert pack_bits(jnp.arange(8), 3).shape == (3,)
    assert pack_bits(jnp.arange(4), 6).shape == (3,)
    assert pack_bits(jnp.arange(8), 5).shape == (5,)
    assert packed_length(128, 3) == 48 and packed_length(10, 3) == 6 and packed_length(7, 4) == 4
    assert packed_length(3, 16) == 6


def test_signed_codes_use_twos_complement():
    vals = np.arange(-4, 4)
    packed = pack_bits(jnp.asarray(vals), 3)
    np.testing.assert_array_equal(np.asarray(to_signed(unpack_bits(packed, 3, 8), 3)), vals)


def test_errors():
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(jnp.arange(4), 17)
    with pytest.raises(TypeError, match="integers"):
        pack_bits(jnp.ones(4), 4)
    with pytest.raises(ValueError, match="need at least"):
        unpack_bits(jnp.zeros((3,), jnp.uint8), 4, 8)
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(jnp.arange(4), 4, axis=2)
