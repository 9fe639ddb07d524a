"""Element rounding: the spec's E2M1 table, cross-checks with ml_dtypes casts, E8M0/UE4M3."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jquant.formats.minifloat import (E2M1, ELEMENTS, decode_element, e4m3_byte,
                                      e4m3_value, e8m0_byte, e8m0_exponent, e8m0_value,
                                      encode_element, round_to_element)

ML = {"e2m1": ml_dtypes.float4_e2m1fn, "e2m3": ml_dtypes.float6_e2m3fn,
      "e3m2": ml_dtypes.float6_e3m2fn, "e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def test_e2m1_rounding_table_of_the_spec():
    # low_precision_formats.md §5.1 (round to nearest even on the mantissa, saturate at 6)
    x = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.75, -5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -4.0]
    got = round_to_element(jnp.asarray(x, jnp.float32), E2M1)
    np.testing.assert_array_equal(np.asarray(got), want)
    codes = encode_element(jnp.asarray(x, jnp.float32), E2M1)
    np.testing.assert_array_equal(np.asarray(decode_element(codes, E2M1)), want)


@pytest.mark.parametrize("name", sorted(ELEMENTS))
def test_matches_ml_dtypes_casts_after_clamping(name):
    el = ELEMENTS[name]
    rng = np.random.default_rng(0)
    # magnitudes from below the smallest subnormal to past the max, plus exact midpoints
    mags = np.exp2(rng.uniform(np.log2(el.min_subnormal) - 3, np.log2(el.max_normal) + 2, 6000))
    table = el.table()
    finite = np.sort(np.unique(np.abs(table[np.isfinite(table)])))
    mids = (finite[1:] + finite[:-1]) / 2
    v = np.concatenate([mags, -mags, mids, -mids, finite, [0.0, -0.0]]).astype(np.float32)
    clamped = np.clip(v, -el.max_normal, el.max_normal)
    ref = clamped.astype(ML[name])
    got = round_to_element(jnp.asarray(v), el)
    np.testing.assert_array_equal(np.asarray(got), ref.astype(np.float32))
    # codes are the ml_dtypes bit patterns, including the sign of -0
    np.testing.assert_array_equal(np.asarray(encode_element(jnp.asarray(v), el)), ref.view(np.uint8))


@pytest.mark.parametrize("name", sorted(ELEMENTS))
def test_tables_decode_like_ml_dtypes_and_codes_round_trip(name):
    el = ELEMENTS[name]
    codes = np.arange(2 ** el.bits, dtype=np.uint8)
    np.testing.assert_array_equal(el.table(), codes.view(ML[name]).astype(np.float32))
    vals = decode_element(jnp.asarray(codes), el)
    ok = np.isfinite(np.asarray(vals))
    again = encode_element(vals, el)
    np.testing.assert_array_equal(np.asarray(again)[ok], codes[ok])


def test_ue4m3_bytes():
    codes = np.arange(0x7F, dtype=np.uint8)  # all finite non-negative E4M3 codes
    vals = e4m3_value(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(vals), codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(e4m3_byte(vals)), codes)
    assert int(e4m3_byte(jnp.float32(448.00003))) == 0x7E
    assert int(e4m3_byte(jnp.float32(145.6))) == 0x71 and float(e4m3_value(jnp.uint8(0x71))) == 144.0
    assert int(e4m3_byte(jnp.float32(1e6))) == 0x7E  # saturates instead of NaN


def test_e8m0_floor_and_ceil_rules_against_brute_force():
    rng = np.random.default_rng(1)
    amax = np.concatenate([np.exp2(rng.uniform(-60, 60, 2000)), [1.0, 6.0, 6.5, 8.0, 7.999, 12.0]])
    amax = amax.astype(np.float32)
    for el in ELEMENTS.values():
        floor = np.asarray(e8m0_exponent(jnp.asarray(amax), el.emax, el.max_normal, "floor"))
        ref = np.floor(np.log2(amax.astype(np.float64))).astype(int) - el.emax
        np.testing.assert_array_equal(floor, ref)
        ceil = np.asarray(e8m0_exponent(jnp.asarray(amax), el.emax, el.max_normal, "ceil"))
        ratio = amax.astype(np.float64) / np.exp2(ceil)
        assert np.all(ratio <= el.max_normal) and np.all(amax / np.exp2(ceil - 1.0) > el.max_normal)
    assert int(e8m0_exponent(jnp.float32(0.0), 2, 6.0)) == -127
    assert int(e8m0_exponent(jnp.float32(6.5), 2, 6.0)) == 0


def test_e8m0_bytes_decode_like_ml_dtypes():
    b = np.arange(1, 256, dtype=np.uint8)  # byte 0 = 2^-127 is a float32 denormal (flushed on CPU)
    np.testing.assert_array_equal(np.asarray(e8m0_value(jnp.asarray(b))),
                                  b.view(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    assert int(e8m0_byte(jnp.int32(0))) == 127 and int(e8m0_byte(jnp.int32(-6))) == 121
