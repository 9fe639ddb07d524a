"""Codebook format: brute-force assignment vs numpy, lookup decode, grids, packing, bits."""

import jax.numpy as jnp
import numpy as np
import pytest

from jquant.formats import CodebookFormat, codebook_quantize, dequantize, quantize, unpack_codes


def _nearest_np(v, cb):
    return np.argmin(((v[:, None, :] - cb[None]) ** 2).sum(-1), axis=1)


def test_single_codebook_matches_numpy_argmin():
    rng = np.random.default_rng(0)
    cb = rng.standard_normal((16, 4)).astype(np.float16).astype(np.float32)
    x = rng.standard_normal((64, 6)).astype(np.float32)  # [in, out], vectors of 4 along axis 0
    q = codebook_quantize(x, cb, axis=0)
    assert q.format == CodebookFormat(vector_dim=4, index_bits=4)
    vecs = x.reshape(16, 4, 6).transpose(0, 2, 1).reshape(-1, 4)  # [vector, out] order
    want = _nearest_np(vecs, cb).reshape(16, 6)
    idx = np.asarray(unpack_codes(q))[:, 0, :]  # [nv, M=1, out]
    np.testing.assert_array_equal(idx, want)
    deq = np.asarray(dequantize(q))
    np.testing.assert_array_equal(deq, cb[want].transpose(0, 2, 1).reshape(64, 6))
    assert q.codes.shape == (8, 6) and q.codes.dtype == jnp.uint8
    assert q.bits_per_element == (8 * 6 + 16 * 4 * 2) * 8 / (64 * 6)


def test_sixteen_bit_indices_recover_codewords_exactly():
    rng = np.random.default_rng(1)
    cb = rng.standard_normal((2 ** 16, 8)).astype(np.float16)
    idx = rng.integers(0, 2 ** 16, size=(3, 5))  # [rows, vectors] along the last axis
    x = cb[idx].reshape(3, 40).astype(np.float32)
    q = codebook_quantize(x, cb, axis=-1)
    assert q.codes.shape == (3, 10) and q.format.index_bits == 16
    np.testing.assert_array_equal(np.asarray(unpack_codes(q))[:, :, 0], idx)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), x)
    assert q.bits_per_element == (30 + 2 ** 16 * 8 * 2) * 8 / 120


def test_per_group_codebooks_scales_and_odd_index_bits():
    # RWKVQuant-style: 1-D codebooks (d = 1) of 8 entries per 16 elements of axis 0
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    cbs = np.sort(rng.standard_normal((4, 3, 1, 8, 1)), axis=3).astype(np.float16).astype(np.float32)
    fmt = CodebookFormat(vector_dim=1, index_bits=3, group_size=16)
    q = codebook_quantize(x, cbs, fmt, axis=0)
    assert q.scales.shape == (4, 3) and q.codes.shape == (24, 3)
    s = np.sqrt((x.reshape(4, 16, 3) ** 2).mean(1)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(q.scales, np.float32), s)
    y = x / np.repeat(s, 16, axis=0)
    book = np.repeat(cbs[:, :, 0, :, 0], 16, axis=0)  # [64, 3, 8]
    want = np.argmin(np.abs(y[..., None] - book), axis=-1)
    np.testing.assert_array_equal(np.asarray(unpack_codes(q))[:, 0, :], want)
    deq = np.take_along_axis(book, want[..., None], -1)[..., 0] * np.repeat(s, 16, axis=0)
    np.testing.assert_allclose(np.asarray(dequantize(q)), deq, rtol=1e-6)
    # given scales are used as is
    q2 = codebook_quantize(x, cbs, fmt, axis=0, scales=np.ones((4, 3), np.float32))
    assert np.all(np.asarray(q2.scales) == 1)


def test_additive_codebooks_decode_to_the_sum():
    rng = np.random.default_rng(3)
    cbs = rng.standard_normal((2, 16, 2)).astype(np.float32)
    cbs[1] *= 0.2  # residual codebook
    cbs = cbs.astype(np.float16).astype(np.float32)  # stored as float16
    x = rng.standard_normal((4, 32)).astype(np.float32)
    q = codebook_quantize(x, cbs, axis=1)
    assert q.format.num_codebooks == 2 and q.codes.shape == (4, 16)
    idx = np.asarray(unpack_codes(q))  # [4, 16, 2]
    want = (cbs[0][idx[..., 0]] + cbs[1][idx[..., 1]]).reshape(4, 32)
    np.testing.assert_allclose(np.asarray(dequantize(q)), want, rtol=1e-6, atol=1e-6)
    one = codebook_quantize(x, cbs[:1], axis=1)
    assert np.mean((np.asarray(dequantize(q)) - x) ** 2) < np.mean((np.asarray(dequantize(one)) - x) ** 2)


def test_errors():
    with pytest.raises(ValueError, match="vector_dim"):
        CodebookFormat(vector_dim=3, index_bits=4)
    with pytest.raises(ValueError, match="index_bits"):
        CodebookFormat(vector_dim=2, index_bits=17)
    with pytest.raises(ValueError, match="multiple of vector_dim"):
        CodebookFormat(vector_dim=4, index_bits=4, group_size=6)
    fmt = CodebookFormat(vector_dim=4, index_bits=4)
    with pytest.raises(ValueError, match="codebook_quantize"):
        quantize(np.ones((8, 2), np.float32), fmt, axis=0)
    with pytest.raises(ValueError, match="does not divide the length 6"):
        codebook_quantize(np.ones((6, 2), np.float32), np.ones((16, 4)), axis=0)
    with pytest.raises(ValueError, match="codebooks must have shape"):
        codebook_quantize(np.ones((8, 2), np.float32), np.ones((3, 1, 1, 16, 4)), fmt, axis=0)
