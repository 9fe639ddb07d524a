"""OCP MX formats against low_precision_formats.md §5, ml_dtypes casts and round trips."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jquant.formats import MXFormat, dequantize, quantize, unpack_codes

BLOCK = np.array([0.1, -0.3, 2.9, 1.2, 0, 0.05, -6.5, 3.3, 0.7, -0.9, 1.9, 2.2, -1.1, 0.4, 5.0, -2.6],
                 np.float32)
PADDED = np.concatenate([BLOCK, np.zeros(16, np.float32)])
ALL = ["fp4", "fp6-e2m3", "fp6-e3m2", "fp8-e4m3", "fp8-e5m2", "int8"]
ML = {"fp4": ml_dtypes.float4_e2m1fn, "fp6-e2m3": ml_dtypes.float6_e2m3fn,
      "fp6-e3m2": ml_dtypes.float6_e3m2fn, "fp8-e4m3": ml_dtypes.float8_e4m3fn,
      "fp8-e5m2": ml_dtypes.float8_e5m2}


@pytest.mark.parametrize("x", [PADDED, BLOCK], ids=["padded", "auto-pad"])
def test_mxfp4_block(x):
    q = quantize(x, "mxfp4", axis=0)
    assert np.asarray(q.scales).tolist() == [0x7F]
    want = [0, -0.5, 3, 1, 0, 0, -6, 3, 0.5, -1, 2, 2, -1, 0.5, 4, -3]  # -6 saturated, 4 tie-to-even
    np.testing.assert_array_equal(np.asarray(dequantize(q))[:16], want)


def test_mxfp8_e4m3_block():
    q = quantize(PADDED, "mxfp8-e4m3", axis=0)
    assert np.asarray(q.scales).tolist() == [121]
    want = [0.1015625, -0.3125, 3.0, 1.25, 0, 0.05078125, -6.5, 3.25, 0.6875, -0.875, 1.875, 2.25,
            -1.125, 0.40625, 5.0, -2.5]
    np.testing.assert_array_equal(np.asarray(dequantize(q))[:16], want)
    assert q.codes.dtype == jnp.float8_e4m3fn


@pytest.mark.parametrize("element", ALL)
def test_cross_check_idempotence_zero_blocks_and_bits(element):
    fmt = MXFormat(element=element)
    x = np.array(np.random.default_rng(2).standard_normal((8, 96)).astype(np.float32) * 4.0)
    x[3] = 0.0  # zero blocks
    x[5, :32] *= 1e3  # a block with a large range
    q = quantize(x, fmt, axis=1)
    assert q.scales.shape == (8, 3) and q.scales.dtype == jnp.uint8
    deq = np.asarray(dequantize(q))
    assert np.all(np.isfinite(deq)) and np.all(deq[3] == 0)
    # P = elem(clip(V / 2^E)) with E from the stored byte, checked against ml_dtypes casts
    X = np.repeat(np.exp2(np.asarray(q.scales, np.float64) - 127), 32, axis=1)
    v = (x / X).astype(np.float32)
    if element == "int8":
        ref = np.clip(np.round(v * 64), -127, 127) / 64
    else:
        m = fmt.el.max_normal
        ref = np.clip(v, -m, m).astype(ML[element]).astype(np.float64)
    np.testing.assert_array_equal(deq, ref * X)
    # floor rule: a / X in [2^emax, 2^(emax+1)) for non-zero blocks
    a = np.abs(x).reshape(8, 3, 32).max(-1)
    r = a / np.exp2(np.asarray(q.scales, np.float64) - 127)
    emax = 0 if element == "int8" else fmt.el.emax
    assert np.all((r[a > 0] >= 2.0 ** emax) & (r[a > 0] < 2.0 ** (emax + 1)))
    # re-quantizing the dequantized tensor is exact
    q2 = quantize(deq, fmt, axis=1)
    for u, w in zip(jax.tree.leaves(q), jax.tree.leaves(q2)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(w))
    bits = {"fp4": 4.25, "fp6-e2m3": 6.25, "fp6-e3m2": 6.25}.get(element, 8.25)
    assert q.bits_per_element == bits


def test_fp6_packs_four_codes_in_three_bytes():
    q = quantize(np.ones((32, 2), np.float32), "mxfp6-e2m3", axis=0)
    assert q.codes.shape == (24, 2)
    codes = [int(c) for c in np.asarray(unpack_codes(q))[:4, 0]]
    stream = sum(c << (6 * i) for i, c in enumerate(codes))
    assert bytes(np.asarray(q.codes)[:3, 0]) == stream.to_bytes(3, "little")


def test_ceil_rule_does_not_saturate():
    q = quantize(PADDED, MXFormat(element="fp4", scale_rounding="ceil"), axis=0)
    assert np.asarray(q.scales).tolist() == [128]  # 6.5 / 2^0 > 6 -> E = 1
    deq = np.asarray(dequantize(q))
    assert deq[6] == -6.0  # -6.5 / 2 = -3.25 -> -3, no clipping (the grid is coarser instead)
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    q = quantize(x, MXFormat(element="fp4", scale_rounding="ceil"), axis=1)
    X = np.repeat(np.exp2(np.asarray(q.scales, np.float64) - 127), 32, axis=1)
    assert np.all(np.abs(x) / X <= 6.0)


def test_descriptor_errors():
    with pytest.raises(ValueError, match="element"):
        MXFormat(element="fp5")
    with pytest.raises(ValueError, match="scale_rounding"):
        MXFormat(scale_rounding="up")
    with pytest.raises(ValueError, match="block_size"):
        MXFormat(block_size=30)
