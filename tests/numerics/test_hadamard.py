"""Hadamard matrices (exact ±1 orthogonality of every stored order), the fast transform against
the dense matrix, sizes and errors, and the random orthogonal matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.numerics.hadamard import (
    SMALL_HADAMARD_ORDERS,
    _small_hadamard,
    fwht,
    hadamard_factorization,
    hadamard_matrix,
    pad_to_hadamard_size,
    random_hadamard,
    random_orthogonal,
    supported_size,
)




# ---- exact construction --------------------------------------------------------------------------
@pytest.mark.parametrize("m", SMALL_HADAMARD_ORDERS)
def test_stored_orders_are_hadamard(m):
    h = _small_hadamard(m).astype(np.int64)
    assert h.shape == (m, m)
    assert set(np.unique(h)) == {-1, 1}
    np.testing.assert_array_equal(h @ h.T, m * np.eye(m, dtype=np.int64))


def test_stored_orders_cover_the_llama_widths():
    assert SMALL_HADAMARD_ORDERS == (12, 20, 28, 36, 52, 60, 108, 140, 156, 172)
    assert hadamard_factorization(11008) == (172, 64)  # Llama-2-7B d_ff
    assert hadamard_factorization(14336) == (28, 512)  # Llama-3-8B d_ff
    assert hadamard_factorization(4096) == (1, 4096)
    assert hadamard_factorization(40) == (20, 2)
    assert hadamard_factorization(1) == (1, 1)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 12, 40, 28 * 4, 52, 156 * 2, 172 * 4])
def test_hadamard_matrix_orthogonal_float64(x64, n):
    h = np.asarray(hadamard_matrix(n, jnp.float64, normalized=False))
    assert h.dtype == np.float64
    assert set(np.unique(h)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
    q = np.asarray(hadamard_matrix(n, jnp.float64))
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-13)


def test_symmetry_as_documented():
    for n in (64, 28 * 8, 36):
        h = np.asarray(hadamard_matrix(n))
        np.testing.assert_array_equal(h, h.T)
    for n in (12, 20 * 4, 172):
        h = np.asarray(hadamard_matrix(n))
        assert not np.array_equal(h, h.T)


def test_matrix_is_kronecker_of_small_and_sylvester():
    h = np.asarray(hadamard_matrix(12 * 4, normalized=False))
    syl4 = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    np.testing.assert_array_equal(h, np.kron(_small_hadamard(12), syl4))


# ---- fast transform ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 8, 64, 12, 20, 40, 28 * 4, 52 * 2, 12 * 64, 156, 172 * 4])
def test_fwht_matches_dense(x64, n):
    x = np.random.default_rng(n).normal(size=(3, n))
    h = np.asarray(hadamard_matrix(n, jnp.float64))
    y = fwht(jnp.asarray(x))
    assert y.dtype == jnp.float64 and y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y), x @ h, atol=1e-12)
    np.testing.assert_allclose(np.asarray(fwht(y, inverse=True)), x, atol=1e-12)
    np.testing.assert_allclose(np.asarray(fwht(jnp.asarray(x), inverse=True)), x @ h.T, atol=1e-12)


def test_fwht_llama2_width(x64):
    """n = 172·64 = 11008, checked against the factored product (the dense matrix is 1 GB)."""
    n = 172 * 64
    x = np.random.default_rng(0).normal(size=(2, n))
    y = np.asarray(fwht(jnp.asarray(x)))
    h172 = np.asarray(hadamard_matrix(172, jnp.float64, normalized=False))
    h64 = np.asarray(hadamard_matrix(64, jnp.float64, normalized=False))
    expected = np.einsum("bap,ac,pd->bcd", x.reshape(2, 172, 64), h172, h64, optimize=True).reshape(2, n) / np.sqrt(n)
    np.testing.assert_allclose(y, expected, atol=1e-11)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(fwht(jnp.asarray(y), inverse=True)), x, atol=1e-12)


def test_fwht_axis_jit_and_dtype():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(20, 3, 5)), jnp.float32)
    h = np.asarray(hadamard_matrix(20))
    expected = np.einsum("iab,ij->jab", np.asarray(x), h)
    np.testing.assert_allclose(np.asarray(fwht(x, axis=0)), expected, atol=1e-5)
    jitted = jax.jit(fwht, static_argnames=("axis", "inverse"))
    np.testing.assert_allclose(np.asarray(jitted(x, axis=0)), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jitted(jitted(x, axis=0), axis=0, inverse=True)), x, atol=1e-5)
    xb = x.astype(jnp.bfloat16)
    assert fwht(xb, axis=0).dtype == jnp.bfloat16
    assert fwht(jnp.ones((2, 8), jnp.int32)).dtype == jnp.float32


def test_fwht_gradient_is_transpose():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(12,)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(3).normal(size=(12,)), jnp.float32)
    grad = jax.grad(lambda v: jnp.sum(fwht(v) * g))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(fwht(g, inverse=True)), atol=1e-5)


# ---- sizes and errors ----------------------------------------------------------------------------
def test_supported_and_padding():
    for n in (1, 2, 4096, 11008, 14336, 40, 12):
        assert supported_size(n)
    for n in (0, -4, 3, 6, 44, 11000, 24 * 7):
        assert not supported_size(n)
    assert not supported_size(12.0)
    assert pad_to_hadamard_size(1) == 1
    assert pad_to_hadamard_size(44) == 48
    assert pad_to_hadamard_size(100) == 104  # 52 · 2
    assert pad_to_hadamard_size(11000) == 11008
    assert pad_to_hadamard_size(4096) == 4096
    for n in range(1, 600):
        p = pad_to_hadamard_size(n)
        assert supported_size(p) and p >= n
        assert not any(supported_size(k) for k in range(n, p))


def test_unsupported_size_errors():
    with pytest.raises(ValueError, match=r"n=44 .*nearest supported sizes are 40 and 48"):
        hadamard_matrix(44)
    with pytest.raises(ValueError, match=r"n=6 .*nearest supported sizes are 4 and 8"):
        fwht(jnp.ones((2, 6)))
    with pytest.raises(ValueError, match="positive integer"):
        hadamard_factorization(0)


# ---- random orthogonal matrices ------------------------------------------------------------------
def test_random_hadamard(x64):
    n = 28 * 2
    r = np.asarray(random_hadamard(n, jax.random.key(0), jnp.float64))
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-13)
    h = np.asarray(hadamard_matrix(n, jnp.float64))
    signs = r[:, 0] / h[:, 0]
    np.testing.assert_array_equal(np.abs(signs), np.ones(n))
    np.testing.assert_allclose(r, signs[:, None] * h, atol=1e-15)
    assert 0 < np.sum(signs > 0) < n
    assert not np.array_equal(r, np.asarray(random_hadamard(n, jax.random.key(1), jnp.float64)))


def test_random_orthogonal(x64):
    n = 33
    q = np.asarray(random_orthogonal(n, jax.random.key(0), jnp.float64))
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-13)
    np.testing.assert_array_equal(q, np.asarray(random_orthogonal(n, jax.random.key(0), jnp.float64)))
    assert not np.allclose(q, np.asarray(random_orthogonal(n, jax.random.key(1), jnp.float64)))
