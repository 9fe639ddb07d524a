"""Scaled FP8: saturating casts, ml_dtypes cross-check, granularities, storage."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jquant.formats import FP8Format, dequantize, quantize


@pytest.mark.parametrize("element,ml", [("e4m3", ml_dtypes.float8_e4m3fn), ("e5m2", ml_dtypes.float8_e5m2)])
def test_matches_clamped_ml_dtypes_cast_per_channel(element, ml):
    x = np.random.default_rng(0).standard_normal((128, 32)).astype(np.float32)
    x[5, 3] = 300.0
    fmt = FP8Format(element=element)
    q = quantize(x, fmt, axis=0)
    assert q.codes.dtype == jnp.dtype(ml) and q.scales.shape == (1, 32)
    s = np.asarray(q.scales, np.float32)
    m = fmt.el.max_normal
    ref = np.clip(x / s, -m, m).astype(ml)
    np.testing.assert_array_equal(np.asarray(q.codes).view(np.uint8), ref.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(dequantize(q)), ref.astype(np.float32) * s)
    assert q.bits_per_element == 8 + 32 / 128


def test_saturates_instead_of_nan():
    # a bfloat16 scale rounded down makes x / s exceed 448: a plain cast would give NaN
    x = np.array([[448.0 * 1.003, 1.0]], np.float32).T
    fmt = FP8Format(granularity="tensor", scale_dtype="bfloat16")
    q = quantize(x, fmt, axis=0)
    s = float(np.asarray(q.scales, np.float32).reshape(()))
    assert x.max() / s > 448
    deq = np.asarray(dequantize(q))
    assert np.all(np.isfinite(deq)) and deq.max() == 448 * s
    assert float(np.asarray(q.codes, np.float32).max()) == 448.0


def test_granularities_and_zero_groups():
    x = np.random.default_rng(1).standard_normal((2, 64, 8)).astype(np.float32)
    x[1] = 0.0
    for fmt, axis, sshape in [(FP8Format(granularity="tensor"), -1, (1, 1, 1)),
                              (FP8Format(granularity="token"), -1, (2, 64, 1)),
                              (FP8Format(group_size=16), 1, (2, 4, 8))]:
        q = quantize(x, fmt, axis=axis)
        assert q.scales.shape == sshape
        deq = np.asarray(dequantize(q))
        assert np.all(np.isfinite(deq)) and np.all(deq[1] == 0)
        assert np.max(np.abs(deq - x)) <= np.abs(x).max() * 2 ** -4


def test_errors():
    with pytest.raises(ValueError, match="element"):
        FP8Format(element="e3m4")
    with pytest.raises(ValueError, match="group_size=32 only applies"):
        FP8Format(granularity="tensor", group_size=32)
