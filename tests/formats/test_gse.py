"""GSE-INT (gsq_tuning.md §3.1, §5.1): exactness, idempotence, range, integer GEMM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.formats import GSEFormat, dequantize, quantize, unpack_codes


def _exponents(q):
    e = np.asarray(q.scales, np.int64)  # numpy-side: stored int8 exponents (+ offset)
    return e if q.tensor_scale is None else e + np.asarray(q.tensor_scale, np.int64)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_idempotent_in_range_and_error_bounds(bits):
    fmt = GSEFormat(bits=bits)
    x = np.random.default_rng(bits).standard_normal((96, 16)).astype(np.float32)
    x[:32, 0] = 0.0  # a zero group
    q = quantize(x, fmt, axis=0)
    deq = np.asarray(dequantize(q))
    assert np.all(deq[:32, 0] == 0) and np.all(np.isfinite(deq))
    m = np.asarray(unpack_codes(q))
    qmax = 2 ** (bits - 1) - 1
    assert np.abs(m).max() <= qmax
    step = np.repeat(np.exp2(_exponents(q) - (bits - 2.0)), 32, axis=0)
    err = np.abs(x - deq)
    # saturation only clips the top half-step; elsewhere round-to-nearest
    top = np.abs(x) / step > qmax + 0.5
    assert np.all(err[~top] <= step[~top] / 2) and np.all(err[top] <= step[top])
    # E = floor(log2 amax) per group
    amax = np.abs(x).reshape(3, 32, 16).max(1)
    nz = amax > 0
    np.testing.assert_array_equal(_exponents(q)[nz], np.floor(np.log2(amax[nz])).astype(int))
    # Q(Q(x)) = Q(x)
    q2 = quantize(deq, fmt, axis=0)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(q2)):
        np.testing.assert_array_equal(np.asarray(a)[:, 1:], np.asarray(b)[:, 1:])
    np.testing.assert_array_equal(np.asarray(dequantize(q2)), deq)
    assert q.bits_per_element == bits + 8 / 32
    assert fmt.nominal_bits_per_element == bits + 5 / 32


def test_powers_of_two_times_small_integers_are_exact():
    rng = np.random.default_rng(0)
    for bits in (4, 8):
        qmax = 2 ** (bits - 1) - 1
        m = rng.integers(-qmax, qmax + 1, size=(64, 8))
        m[0::32] = qmax  # each group's amax has floor(log2) = E
        e = rng.integers(-20, 20, size=(2, 8))
        x = (m * np.exp2(np.repeat(e, 32, axis=0) - (bits - 2.0))).astype(np.float32)
        q = quantize(x, GSEFormat(bits=bits), axis=0)
        np.testing.assert_array_equal(np.asarray(dequantize(q)), x)
        np.testing.assert_array_equal(np.asarray(unpack_codes(q)), m)


def test_gaussian_group_error_is_about_a_uniform_step():
    x = np.random.default_rng(7).standard_normal((4096, 8)).astype(np.float32)
    q = quantize(x, GSEFormat(bits=6), axis=0)
    step = np.repeat(np.exp2(_exponents(q) - 4.0), 32, axis=0)
    ratio = np.sqrt(np.mean((x - np.asarray(dequantize(q))) ** 2 / step ** 2))
    assert abs(ratio - 1 / np.sqrt(12)) < 0.02


def test_integer_gemm_simulation_equals_dequantized_matmul():
    # C[r,c] = sum_g 2^(E_P[r,g] + E_R[g,c] - 2(b-2)) * sum_{k in g} m_P[r,k] m_R[k,c]
    b, G = 8, 32
    rng = np.random.default_rng(3)
    P = rng.standard_normal((6, 128)).astype(np.float32) * 10
    R = rng.standard_normal((128, 5)).astype(np.float32) * 0.01
    qp, qr = quantize(P, GSEFormat(bits=b), axis=1), quantize(R, GSEFormat(bits=b), axis=0)
    mp = np.asarray(unpack_codes(qp), np.int64).reshape(6, 4, G)
    mr = np.asarray(unpack_codes(qr), np.int64).reshape(4, G, 5)
    inner = np.einsum("rgk,gkc->rgc", mp, mr)  # exact integers
    assert np.abs(inner).max() < 2 ** 24
    ep, er = _exponents(qp), _exponents(qr)  # [6, 4], [4, 5]
    C = np.sum(np.exp2(ep[:, :, None] + er[None, :, :] - 2.0 * (b - 2)) * inner, axis=1)
    ref = np.asarray(dequantize(qp), np.float64) @ np.asarray(dequantize(qr), np.float64)
    np.testing.assert_allclose(C, ref, rtol=1e-12, atol=0)


def test_narrow_exponent_field_and_padding():
    x = np.random.default_rng(5).standard_normal((80, 4)).astype(np.float32)  # 80 -> padded to 96
    x[32:64] *= 1e-12  # a group far below the others
    q = quantize(x, GSEFormat(bits=8, exponent_bits=5), axis=0)
    assert q.tensor_scale.shape == (1, 1) and q.tensor_scale.dtype == jnp.int32
    e = np.asarray(q.scales)
    assert e.shape == (3, 4) and e.min() >= -16 and e.max() <= 15
    full = quantize(x, GSEFormat(bits=8), axis=0)
    deq, deq_full = np.asarray(dequantize(q)), np.asarray(dequantize(full))
    np.testing.assert_array_equal(deq[:32], deq_full[:32])  # in range: identical
    assert np.all(deq[32:64] == 0)  # underflowed with a 5-bit exponent
    assert deq.shape == (80, 4)
    assert q.bits_per_element == (96 * 4 + 12 + 4) * 8 / (80 * 4)


def test_descriptor_errors_and_stochastic_rounding():
    with pytest.raises(ValueError, match="bits=3"):
        GSEFormat(bits=3)
    with pytest.raises(ValueError, match="group_size"):
        GSEFormat(group_size=0)
    fmt = GSEFormat(bits=4, rounding="stochastic")
    x = np.full((32, 1), 0.3, np.float32)
    x[0] = 3.9  # E = 1, step = 0.5
    with pytest.raises(ValueError, match="key"):
        quantize(x, fmt, axis=0)
    d = np.asarray(dequantize(quantize(np.tile(x, (1, 256)), fmt, axis=0, key=jax.random.key(1))))
    assert set(np.unique(d[1:])) == {0.0, 0.5} and abs(d[1:].mean() - 0.3) < 0.03


def test_gse_int8_with_groups_of_32_equals_mxint8():
    # same maths: E = floor(log2 amax), m = RNE(x * 2^(6 - E)) clipped to +-127
    x = np.random.default_rng(8).standard_normal((96, 16)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(dequantize(quantize(x, "gse-int8", axis=0))),
                                  np.asarray(dequantize(quantize(x, "mxint8", axis=0))))
