"""NVFP4 against the bit-exact vectors of low_precision_formats.md §5 and its properties."""

import jax
import ml_dtypes
import numpy as np
import pytest

from jquant.formats import NVFP4Format, dequantize, get_format, quantize, unpack_codes
from jquant.formats.minifloat import E2M1, e4m3_value

BLOCK = np.array([0.1, -0.3, 2.9, 1.2, 0, 0.05, -6.5, 3.3, 0.7, -0.9, 1.9, 2.2, -1.1, 0.4, 5.0, -2.6],
                 np.float32)


def test_worked_example_bit_exact():
    q = quantize(BLOCK, "nvfp4", axis=0)
    assert np.asarray(q.tensor_scale).reshape(()) == np.float32(6.5) / np.float32(2688)
    assert abs(float(q.tensor_scale[0]) - 0.0024181549) < 1e-10
    assert np.asarray(q.scales).tolist() == [0x7E]
    assert [f"{c:X}" for c in np.asarray(unpack_codes(q))] == list("095200F51A44A16C")
    assert bytes(np.asarray(q.codes)).hex(" ").upper() == "90 25 00 5F A1 44 1A C6"
    total = np.float32(448) * np.asarray(q.tensor_scale)[0]
    assert abs(total - 1.0833334) < 1e-7
    want = [0, -0.5417, 3.25, 1.0833, 0, 0, -6.5, 3.25, 0.5417, -1.0833, 2.1667, 2.1667, -1.0833,
            0.5417, 4.3333, -2.1667]
    deq = np.asarray(dequantize(q))
    np.testing.assert_allclose(deq, want, atol=5e-5)
    e2m1 = np.array([0, -0.5, 3, 1, 0, 0, -6, 3, 0.5, -1, 2, 2, -1, 0.5, 4, -2], np.float32)
    np.testing.assert_array_equal(deq, e2m1 * total)  # x_hat = q * (s_t * s_b) exactly


@pytest.mark.parametrize("static", [True, False])
def test_same_block_in_a_tensor_with_amax_20(static):
    if static:
        q = quantize(BLOCK, NVFP4Format(tensor_amax=20.0), axis=0)
        deq = np.asarray(dequantize(q))
    else:
        x = np.stack([BLOCK, np.where(np.arange(16) == 3, 20.0, 0.0).astype(np.float32)], axis=1)
        q = quantize(x, "nvfp4", axis=0)  # blocks run down axis 0: one block per column
        deq = np.asarray(dequantize(q))[:, 0]
    assert np.asarray(q.scales).reshape(-1)[0] == 0x71
    want = [0, -0.5357, 3.2143, 1.0714, 0, 0, -6.4286, 3.2143, 0.5357, -1.0714, 2.1429, 2.1429,
            -1.0714, 0.5357, 4.2857, -2.1429]
    np.testing.assert_allclose(deq, want, atol=5e-5)


def test_single_level_variant():
    q = quantize(BLOCK, "nvfp4-1level", axis=0)
    assert q.tensor_scale is None
    s = float(e4m3_value(q.scales)[0])
    assert s == float(np.float32(6.5 / 6).astype(ml_dtypes.float8_e4m3fn))


def test_cross_check_with_ml_dtypes_and_idempotence_with_fixed_tensor_scale():
    x = np.asarray(np.random.default_rng(0).standard_normal((96, 24)).astype(np.float32) * 3.0)
    amax = float(np.abs(x).max())
    fmt = NVFP4Format(tensor_amax=amax)
    q = quantize(x, fmt, axis=0)
    s_t = np.asarray(q.tensor_scale).reshape(())
    total = np.repeat(np.asarray(e4m3_value(q.scales)) * s_t, 16, axis=0)
    ref = np.clip(x / total, -6, 6).astype(ml_dtypes.float4_e2m1fn)
    np.testing.assert_array_equal(np.asarray(unpack_codes(q)), ref.view(np.uint8))
    deq = dequantize(q)
    q2 = quantize(deq, fmt, axis=0)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(q2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(dequantize(q2)), np.asarray(deq))


def test_zero_blocks_padding_and_bits():
    x = np.zeros((40, 8), np.float32)
    x[:16, 0] = BLOCK
    q = quantize(x, "nvfp4", axis=0)  # 40 -> padded to 48 (3 blocks)
    assert q.codes.shape == (24, 8) and q.scales.shape == (3, 8) and q.tensor_scale.shape == (1, 1)
    deq = np.asarray(dequantize(q))
    assert deq.shape == (40, 8) and np.all(np.isfinite(deq))
    assert np.all(deq[16:] == 0) and np.all(deq[:, 1:] == 0)
    np.testing.assert_array_equal(deq[:16, 0], np.asarray(dequantize(quantize(BLOCK, "nvfp4", axis=0))))
    z = quantize(np.zeros((40, 8), np.float32), "nvfp4", axis=0)
    assert np.all(np.asarray(dequantize(z)) == 0) and np.all(np.asarray(z.scales) == 1)  # 2^-9
    w = quantize(np.ones((64, 5), np.float32), "nvfp4", axis=0)
    assert w.bits_per_element == 4.5 + 32 / (64 * 5)


def test_block_scaled_gemm_equals_dequantized_matmul():
    # §3.5: Y = s_tX s_tW sum_b (s_X[m,b] s_W[n,b] sum_i q_X q_W), X [M, K] and W [K, N] blocked on K
    rng = np.random.default_rng(1)
    X = rng.standard_normal((8, 64)).astype(np.float32)
    W = rng.standard_normal((64, 5)).astype(np.float32)
    qx, qw = quantize(X, "nvfp4", axis=1), quantize(W, "nvfp4", axis=0)
    e2m1 = E2M1.table().astype(np.float64)  # numpy-side decode of the stored bytes
    ex = e2m1[np.asarray(unpack_codes(qx))].reshape(8, 4, 16)
    ew = e2m1[np.asarray(unpack_codes(qw))].reshape(4, 16, 5)
    sx = np.asarray(qx.scales).view(ml_dtypes.float8_e4m3fn).astype(np.float64)  # [8, 4]
    sw = np.asarray(qw.scales).view(ml_dtypes.float8_e4m3fn).astype(np.float64)  # [4, 5]
    inner = np.einsum("mbi,bin->mbn", ex, ew)
    Y = float(qx.tensor_scale[0, 0]) * float(qw.tensor_scale[0, 0]) * np.einsum(
        "mb,bn,mbn->mn", sx, sw, inner)
    ref = np.asarray(dequantize(qx), np.float64) @ np.asarray(dequantize(qw), np.float64)
    np.testing.assert_allclose(Y, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_descriptor_errors():
    with pytest.raises(ValueError, match="two_level"):
        NVFP4Format(tensor_amax=1.0, two_level=False)
    with pytest.raises(ValueError, match="tensor_amax"):
        NVFP4Format(tensor_amax=0.0)
    assert get_format("nvfp4", tensor_amax=3.0).name == "nvfp4-amax3"
