"""CodebookFormat with a fixed codebook grid (codebook_rows x codebook_cols, GPTVQ's groups)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jquant.formats import CodebookFormat, codebook_quantize, dequantize, get_format, unpack_codes


def test_grouped_codebooks_decode_per_group_against_numpy():
    rng = np.random.default_rng(0)
    fmt = CodebookFormat(vector_dim=2, index_bits=3, codebook_rows=8, codebook_cols=4)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    books = rng.standard_normal((2, 2, 1, 8, 2)).astype(np.float16).astype(np.float32)
    q = codebook_quantize(x, books, fmt, axis=0)
    assert q.codebooks.shape == (2, 2, 1, 8, 2)
    idx = np.asarray(unpack_codes(q))[:, 0]  # [8 vectors, 8 columns]
    want = np.empty((16, 8))
    for v in range(8):
        for c in range(8):
            book = books[v // 4, c // 4, 0]  # 4 vectors (8 rows) x 4 columns per codebook
            vec = x[2 * v:2 * v + 2, c]
            assert idx[v, c] == np.argmin(((book - vec) ** 2).sum(1))
            want[2 * v:2 * v + 2, c] = book[idx[v, c]]
    np.testing.assert_array_equal(np.asarray(dequantize(q)), want)
    assert q.bits_per_element == 8 * (q.codes.size + books.size * 2) / x.size
    assert fmt.table_bits == 8 * 2 * 16
    # the format alone fixes the stored shapes (what a checkpoint needs)
    assert fmt.expected_children((16, 8), 0)["codebooks"].shape == (2, 2, 1, 8, 2)


def test_grid_and_size_errors():
    fmt = CodebookFormat(vector_dim=2, index_bits=3, codebook_rows=8, codebook_cols=4)
    x = jnp.zeros((16, 8))
    with pytest.raises(ValueError, match=r"grid \(2, 2\)"):
        codebook_quantize(x, jnp.zeros((1, 1, 1, 8, 2)), fmt, axis=0)
    with pytest.raises(ValueError, match="codebook_cols=4 does not divide the length 6"):
        fmt.check_shape((16, 6), 0)
    with pytest.raises(ValueError, match="codebook_rows=3 must be a multiple of vector_dim=2"):
        CodebookFormat(vector_dim=2, index_bits=3, codebook_rows=3)
    with pytest.raises(ValueError, match="vector_dim=2 does not divide the length 15"):
        fmt.check_shape((15, 8), 0)
    # a codebook larger than the index width allows
    with pytest.raises(ValueError, match=r"grid \+ \(1, 8, 2\)"):
        codebook_quantize(x, jnp.zeros((2, 2, 1, 16, 2)), fmt, axis=0)
    with pytest.raises(ValueError, match="index_bits=17"):
        codebook_quantize(jnp.zeros((4, 2)), jnp.zeros((2 ** 17, 2)), axis=0)


def test_all_zero_input_gives_finite_values():
    q = codebook_quantize(jnp.zeros((8, 4)), jnp.zeros((4, 2)), CodebookFormat(vector_dim=2, index_bits=2, group_size=4),
                          axis=0)
    assert np.all(np.asarray(dequantize(q)) == 0)


def test_names_round_trip():
    for name in ("vq-d2-k4-cb256x32", "vq-d4-k8-cballx64", "vq-d8-k12x2-g64"):
        assert get_format(name).name == name
