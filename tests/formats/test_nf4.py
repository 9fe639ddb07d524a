"""NF4 (QLoRA NormalFloat): level table, nearest-level encoding, double quantization, bits."""

import jax
import ml_dtypes
import numpy as np
import pytest

from jquant.formats import NF4Format, dequantize, get_format, quantize, unpack_codes
from jquant.formats.nf4 import NF4_LEVELS, normal_float_levels


def test_levels_are_the_qlora_construction():
    pytest.importorskip("scipy")
    np.testing.assert_allclose(normal_float_levels(), NF4_LEVELS, rtol=0, atol=2e-7)
    assert NF4_LEVELS[7] == 0.0 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[-1] == 1.0
    assert np.all(np.diff(NF4_LEVELS) > 0)


def _blocks(x, block):
    """[in, out] -> [in // block, block, out] in numpy."""
    return x.reshape(x.shape[0] // block, block, x.shape[1])


@pytest.mark.parametrize("block", [64, 32])
def test_fp32_scale_encoding_is_nearest_level_times_absmax(block):
    x = np.asarray(jax.random.normal(jax.random.key(1), (4 * block, 24)), np.float32)
    fmt = NF4Format(block_size=block, double_quant=False)
    q = quantize(x, fmt, axis=0)
    c = np.abs(_blocks(x, block)).max(axis=1, keepdims=True)
    ratio = _blocks(x, block) / c
    want_codes = np.argmin(np.abs(ratio[..., None] - NF4_LEVELS), axis=-1)
    np.testing.assert_array_equal(_blocks(np.asarray(unpack_codes(q)), block), want_codes)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), (NF4_LEVELS[want_codes] * c).reshape(x.shape))
    again = quantize(np.asarray(dequantize(q)), fmt, axis=0)  # idempotent with exact block constants
    np.testing.assert_array_equal(np.asarray(dequantize(again)), np.asarray(dequantize(q)))


def test_double_quant_stores_fp8_block_constants_with_a_tensor_scale():
    x = np.asarray(3.0 * jax.random.normal(jax.random.key(2), (256, 40)), np.float32)
    q = quantize(x, "nf4", axis=0)
    absmax = np.abs(_blocks(x, 64)).max(axis=1)
    s_t = float(np.asarray(q.tensor_scale).reshape(()))
    assert s_t == pytest.approx(absmax.max() / 448, rel=1e-6)
    c = np.asarray(q.scales).view(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.float32(s_t)
    np.testing.assert_allclose(c, absmax, rtol=2 ** -4)  # E4M3 keeps 3 mantissa bits
    ratio = _blocks(x, 64) / c[:, None, :]
    want_codes = np.argmin(np.abs(ratio[..., None] - NF4_LEVELS), axis=-1)
    np.testing.assert_array_equal(_blocks(np.asarray(unpack_codes(q)), 64), want_codes)
    assert q.bits_per_element == pytest.approx(4 + 8 / 64 + 32 / x.size)
    assert quantize(x, "nf4-fp32scale", axis=0).bits_per_element == pytest.approx(4.5)


def test_padding_zero_blocks_and_other_axes():
    x = np.array(jax.random.normal(jax.random.key(3), (10, 100)), np.float32)
    x[:, :64] = 0.0
    q = quantize(x, "nf4", axis=1)  # 100 -> padded to 128 along axis 1
    y = np.asarray(dequantize(q))
    assert y.shape == x.shape and np.all(y[:, :64] == 0) and np.all(np.isfinite(y))
    assert np.all(np.abs(y) <= np.abs(x).max(axis=1, keepdims=True) * (1 + 2 ** -4))


def test_nf4_beats_int4_absmax_on_normal_weights():
    """The paper's premise: quantiles of N(0,1) suit normally distributed weights better than uniform levels."""
    w = jax.random.normal(jax.random.key(4), (512, 128))
    err = lambda name: float(np.mean((np.asarray(dequantize(quantize(w, name, axis=0))) - np.asarray(w)) ** 2))  # noqa: E731
    assert err("nf4-fp32scale") < 0.8 * err("int4-g64")


def test_bad_input():
    with pytest.raises(ValueError, match="block_size"):
        NF4Format(block_size=63)
    with pytest.raises(ValueError, match="drop the key"):
        quantize(np.ones((64, 2), np.float32), "nf4", axis=0, key=jax.random.key(0))
    assert get_format("nf4", block_size=32).name == "nf4-b32"
