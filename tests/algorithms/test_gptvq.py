"""GPTVQ-style VQ: k-means init = the shared weighted k-means, the output-error claim, codebook tuning."""

import jax.numpy as jnp
import numpy as np
import pytest

from jquant.algorithms.gptvq import GPTVQConfig, finetune_codebooks, gptvq_quantize
from jquant.formats import CodebookFormat, codebook_quantize, dequantize, unpack_codes
from jquant.numerics.kmeans import kmeans
from jquant.testing.layer_problems import correlated_layer, relative_output_error


def _layer(seed, n=64, m=32):
    return correlated_layer(seed, n, m)


def _points(rows, d):
    return rows.reshape(len(rows) // d, d, -1).transpose(0, 2, 1).reshape(-1, d)


def test_codebooks_start_from_the_hessian_weighted_kmeans():
    w, h = _layer(0)
    fmt = CodebookFormat(vector_dim=2, index_bits=3, codebook_cols=16)  # one row group, two column groups
    q = gptvq_quantize(w, h, fmt, config=GPTVQConfig(finetune_steps=0, kmeans_iters=20, seed=5))
    diag = np.diag(h).astype(np.float64)
    for g in range(2):
        pts = _points(w[:, 16 * g:16 * (g + 1)].astype(np.float64), 2)
        wts = np.broadcast_to(diag.reshape(32, 1, 2), (32, 16, 2)).reshape(-1, 2)
        ref = kmeans(pts, 8, weights=wts, seed=5 + g, iters=20).centroids
        np.testing.assert_allclose(np.asarray(q.codebooks[0, g, 0], np.float32), ref.astype(np.float16), rtol=1e-3)


def test_gptvq_beats_kmeans_with_nearest_rounding_onrelative_output_error():
    w, h = _layer(1)
    fmt = CodebookFormat(vector_dim=2, index_bits=4, codebook_rows=32, codebook_cols=16)
    q = gptvq_quantize(w, h, fmt)
    assert q.codebooks.shape == (2, 2, 1, 16, 2) and q.bits_per_element == 8 * (q.codes.size + 4 * 16 * 2 * 2) / w.size
    # baseline: the same k-means codebooks (unweighted, on the original weights), nearest codeword
    books = np.stack([np.stack([kmeans(_points(w[32 * r:32 * r + 32, 16 * c:16 * c + 16].astype(np.float64), 2), 16,
                                       iters=30).centroids for c in range(2)]) for r in range(2)])[:, :, None]
    base = codebook_quantize(w, books.astype(np.float32), fmt, axis=0)
    assert relative_output_error(w, dequantize(q), h) < 0.8 * relative_output_error(w, dequantize(base), h)


def test_codebook_tuning_minimises_the_float64relative_output_error():
    w, h = _layer(2)
    fmt = CodebookFormat(vector_dim=2, index_bits=3, codebook_cols=16)
    q = gptvq_quantize(w, h, fmt, config=GPTVQConfig(finetune_steps=0))
    idx = unpack_codes(q)[:, 0]
    books = jnp.asarray(q.codebooks[:, :, 0], jnp.float32)
    tuned, before, after = finetune_codebooks(jnp.asarray(w), jnp.asarray(h), books, idx, 1e-3 * float(np.sqrt(np.mean(w ** 2))),
                                     steps=200, cols=16, d=2)
    assert abs(float(before) - relative_output_error(w, dequantize(q).astype(np.float32), h)) < 1e-3 * float(before)
    assert float(after) < float(before)
    # the tuned codebooks with the fixed codes, decoded in numpy: the reported loss is their output error
    tb, ix = np.asarray(tuned, np.float64)[0], np.asarray(idx)  # [2 col groups, 8, 2], [32 vectors, 32 cols]
    w_hat = np.stack([tb[c // 16][ix[:, c]] for c in range(32)], 1)  # [32, 32 cols, 2]
    w_hat = w_hat.transpose(0, 2, 1).reshape(64, 32)
    assert abs(relative_output_error(w, w_hat, h) - float(after)) < 1e-3 * float(after)


def test_bad_input():
    w, h = _layer(3)
    with pytest.raises(ValueError, match="one codebook per group and no scales"):
        gptvq_quantize(w, h, CodebookFormat(vector_dim=2, index_bits=3, group_size=8))
    with pytest.raises(ValueError, match="Hessian shape"):
        gptvq_quantize(w, h[:8, :8], CodebookFormat(vector_dim=2, index_bits=3))
    with pytest.raises(ValueError, match="codebook_rows=48 does not divide"):
        gptvq_quantize(w, h, CodebookFormat(vector_dim=2, index_bits=3, codebook_rows=48))
    zero = gptvq_quantize(np.zeros_like(w), h, CodebookFormat(vector_dim=2, index_bits=3))
    assert np.all(np.isfinite(np.asarray(dequantize(zero))))
