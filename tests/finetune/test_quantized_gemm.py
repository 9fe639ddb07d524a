"""QCD GEMMs: the int32 group-sum path and the float32 path against float64 maths on dequantized operands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.formats import GSEFormat, IntFormat, dequantize, quantize
from jquant.ops import quantized_matmul


def _operands(seed, m=24, k=96, n=40):
    kp, kr = jax.random.split(jax.random.key(seed))
    p = jax.random.normal(kp, (m, k)) * jnp.exp(jax.random.normal(kp, (m, 1)))  # rows of different scales
    return p, 0.05 * jax.random.normal(kr, (k, n))


def _reference(p, r, fmt):
    qp = np.asarray(dequantize(quantize(p, fmt, axis=1)), np.float64)
    qr = np.asarray(dequantize(quantize(r, fmt, axis=0)), np.float64)
    return qp @ qr


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("accumulate", ["int32", "float32"])
def test_gse_gemm_equals_float64_product_of_dequantized_operands(bits, accumulate):
    fmt = GSEFormat(bits=bits)
    p, r = _operands(bits)
    got = np.asarray(jax.jit(lambda a, b: quantized_matmul(a, b, fmt, accumulate=accumulate))(p, r))
    want = _reference(p, r, fmt)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


def test_reduction_not_a_multiple_of_the_group_is_zero_padded():
    fmt = GSEFormat(bits=6)
    p, r = _operands(1, k=70)
    want = _reference(p, r, fmt)
    for acc in ("int32", "float32"):
        np.testing.assert_allclose(np.asarray(quantized_matmul(p, r, fmt, accumulate=acc)), want, rtol=2e-6,
                                   atol=2e-6 * np.abs(want).max())


def test_per_tensor_int8_is_the_no_shared_exponent_baseline():
    fmt = IntFormat(bits=8, granularity="tensor")
    p, r = _operands(2)
    np.testing.assert_allclose(np.asarray(quantized_matmul(p, r, fmt, accumulate="float32")), _reference(p, r, fmt),
                               rtol=1e-5, atol=1e-5)
    # rows of very different scales: one tensor scale loses the small rows, shared exponents do not
    exact = np.asarray(p, np.float64) @ np.asarray(r, np.float64)
    err = lambda f: np.abs(np.asarray(quantized_matmul(p, r, f, accumulate="float32")) - exact).mean()  # noqa: E731
    assert err(GSEFormat(bits=8)) < 0.5 * err(fmt)


def test_stochastic_rounding_of_one_operand_is_keyed_and_unbiased():
    fmt = GSEFormat(bits=4)
    p, r = _operands(3)
    f = jax.jit(lambda key: quantized_matmul(p, r, fmt, accumulate="float32", key_p=key))
    a, b = f(jax.random.key(1)), f(jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(f(jax.random.key(1))))
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    # E[Q_sr(p)] = p, so averaging many keys approaches p @ Q(r) better than round-to-nearest does
    qr = np.asarray(dequantize(quantize(r, fmt, axis=0)), np.float64)
    target = np.asarray(p, np.float64) @ qr
    mean = np.mean([np.asarray(f(jax.random.key(i))) for i in range(64)], axis=0)
    nearest = np.asarray(quantized_matmul(p, r, fmt, accumulate="float32"))
    assert np.abs(mean - target).mean() < 0.5 * np.abs(nearest - target).mean()
    int32 = quantized_matmul(p, r, fmt, accumulate="int32", key_p=jax.random.key(1))
    np.testing.assert_allclose(np.asarray(int32), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_bad_input():
    p, r = _operands(4)
    with pytest.raises(ValueError, match="accumulate='int32' needs a GSEFormat"):
        quantized_matmul(p, r, IntFormat(bits=8), accumulate="int32")
    with pytest.raises(ValueError, match="accumulate="):
        quantized_matmul(p, r, GSEFormat(), accumulate="int64")
    with pytest.raises(ValueError, match=r"expected p \[M, K\]"):
        quantized_matmul(p, r.T, GSEFormat())
