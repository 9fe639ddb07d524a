"""QSUR against the closed form of spec §3.2 (exact samples and sampled Gaussians), the exact box
of §7.8 with a mean, and the design consequences: rotations keep λ, a Hadamard spreads an outlier,
whitening plus a Hadamard reaches the ball-to-cube ceiling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.transforms import qsur, qsur_from_covariance, random_hadamard
from jquant.transforms.qsur import _chi2_quantile


def closed_form(lam, max_diag, normalized=True):
    """π^{d/2}/(Γ(d/2+1) 2^d) · Π λ^{1/2} / (max Σ_jj)^{d/2}, for μ = 0."""
    d = len(lam)
    log_q = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1) - d * math.log(2)
    log_q += 0.5 * np.sum(np.log(lam)) - 0.5 * d * math.log(max_diag)
    return math.exp(log_q / d if normalized else log_q)


def ceiling(d):
    """Normalised ball-to-cube ratio (π^{d/2}/(Γ(d/2+1) 2^d))^{1/d}."""
    return closed_form(np.ones(d), 1.0)


def exact_samples(cov, n, rng):
    """n samples whose sample mean is exactly 0 and sample covariance (1/(n-1)) exactly cov."""
    z = rng.normal(size=(n, cov.shape[0]))
    z -= z.mean(0)
    z = np.linalg.solve(np.linalg.cholesky(z.T @ z / (n - 1)), z.T).T
    return z @ np.linalg.cholesky(cov).T


def random_rotation(d, rng):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


LAM = np.array([4.0, 1.0, 0.25, 9.0, 2.0, 0.5])


# ---- closed form ---------------------------------------------------------------------------------
def test_diagonal_gaussian_matches_closed_form():
    rng = np.random.default_rng(0)
    x = exact_samples(np.diag(LAM), 400, rng)
    for normalized in (True, False):
        expected = closed_form(LAM, LAM.max(), normalized)
        assert qsur(x, normalized) == pytest.approx(expected, rel=1e-10)
        assert qsur_from_covariance(np.diag(LAM), normalized=normalized) == pytest.approx(expected, rel=1e-12)
    assert isinstance(qsur(x), float)


def test_rotated_gaussian_matches_closed_form():
    rng = np.random.default_rng(1)
    q = random_rotation(len(LAM), rng)
    cov = q @ np.diag(LAM) @ q.T
    x = exact_samples(cov, 400, rng)
    expected = closed_form(LAM, np.diag(cov).max())
    assert qsur(x) == pytest.approx(expected, rel=1e-10)
    assert qsur_from_covariance(cov) == pytest.approx(expected, rel=1e-12)


def test_sampled_gaussian_within_sampling_error():
    rng = np.random.default_rng(2)
    q = random_rotation(len(LAM), rng)
    x = rng.normal(size=(40_000, len(LAM))) * np.sqrt(LAM) @ q.T
    expected = closed_form(LAM, np.diag(q @ np.diag(LAM) @ q.T).max())
    assert qsur(x) == pytest.approx(expected, rel=1e-2)


def test_orthogonal_rotation_keeps_eigenvalues():
    """Rotating changes only max Σ_jj; whitened data stays at the ceiling under any rotation."""
    rng = np.random.default_rng(3)
    x = exact_samples(np.diag(LAM), 300, rng)
    r = random_rotation(len(LAM), rng)
    rotated_diag = np.diag(r.T @ np.diag(LAM) @ r)
    assert qsur(x @ r) == pytest.approx(closed_form(LAM, rotated_diag.max()), rel=1e-10)
    white = exact_samples(np.eye(8), 300, rng)
    for data in (white, white @ random_rotation(8, rng)):
        assert qsur(data) == pytest.approx(ceiling(8), rel=1e-10)


# ---- the design consequences ---------------------------------------------------------------------
def test_hadamard_rotation_spreads_an_outlier_channel():
    d, rng = 64, np.random.default_rng(4)
    x = rng.normal(size=(4096, d))
    x[:, 5] *= 20.0
    h = np.asarray(random_hadamard(d, jax.random.key(0)), np.float64)
    raw, rotated = qsur(x), qsur(x @ h)
    assert raw < rotated < ceiling(d)
    assert rotated > 2 * raw


def test_whitening_then_hadamard_reaches_ceiling():
    d, n, rng = 32, 40_000, np.random.default_rng(5)
    q = random_rotation(d, rng)
    lam = np.geomspace(1e-2, 1e2, d)
    x = rng.normal(size=(n, d)) * np.sqrt(lam) @ q.T
    h = np.asarray(random_hadamard(d, jax.random.key(1)), np.float64)
    hadamard_only = qsur(x @ h)
    whitened = qsur(x @ q @ np.diag(lam**-0.5) @ h)  # population whitening: sampling error remains
    assert max(qsur(x), hadamard_only) < whitened <= ceiling(d)
    # The largest of d sample variances exceeds 1 by about 2·sqrt(2/N) = 1.4%, lowering QSUR^{1/d} by half that.
    assert whitened == pytest.approx(ceiling(d), rel=2e-2)


def test_invariant_to_sample_permutation():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(500, 10)) @ rng.normal(size=(10, 10)) + rng.normal(size=10)
    assert qsur(x[rng.permutation(500)]) == pytest.approx(qsur(x), rel=1e-12)


# ---- the box with a mean, numerics ---------------------------------------------------------------
def test_box_with_mean_matches_direct_volumes():
    """d = 3 by the volume formulas directly: V_X = 4/3 π c^{3/2} sqrt(det Σ), box from μ_j ± sqrt(cΣ_jj)."""
    rng = np.random.default_rng(7)
    q = random_rotation(3, rng)
    cov = q @ np.diag([3.0, 1.0, 0.2]) @ q.T
    mean = np.array([4.0, -4.0, 0.3])
    for alpha in (0.9, 0.99):
        c = _chi2_quantile(alpha, 3)
        v_x = 4 / 3 * math.pi * c**1.5 * math.sqrt(np.linalg.det(cov))
        half = np.sqrt(c * np.diag(cov))
        v_s = (np.max(mean + half) - np.min(mean - half)) ** 3
        got = qsur_from_covariance(cov, mean, normalized=False, alpha=alpha)
        assert got == pytest.approx(v_x / v_s, rel=1e-12)
        assert qsur_from_covariance(cov, mean, alpha=alpha) == pytest.approx((v_x / v_s) ** (1 / 3), rel=1e-12)
    assert qsur_from_covariance(cov, mean) < qsur_from_covariance(cov)  # spread means widen the box
    assert qsur_from_covariance(cov, np.full(3, 7.0)) == pytest.approx(qsur_from_covariance(cov), rel=1e-12)


def test_wilson_hilferty_quantile():
    chi2 = pytest.importorskip("scipy.stats").chi2
    for d in (1, 3, 10, 64, 4096):
        assert _chi2_quantile(0.99, d) == pytest.approx(chi2.ppf(0.99, d), rel=1e-2 if d < 64 else 2e-4)


def test_large_dimension_does_not_overflow():
    d = 1024  # Γ(d/2 + 1) alone overflows float64
    lam = np.geomspace(0.1, 10.0, d)
    got = qsur_from_covariance(np.diag(lam))
    assert got == pytest.approx(closed_form(lam, lam.max()), rel=1e-10)
    assert qsur_from_covariance(np.eye(d)) == pytest.approx(ceiling(d), rel=1e-12)
    assert 0.0 <= qsur_from_covariance(np.eye(d), normalized=False) < 1e-300


def test_singular_covariance_is_finite():
    x = np.random.default_rng(8).normal(size=(5, 12))  # N <= d: rank 4
    value = qsur(x)
    assert np.isfinite(value) and 0.0 < value < 1e-2


def test_accepts_jax_and_bfloat16_arrays():
    x = np.random.default_rng(9).normal(size=(256, 16))
    xb = jnp.asarray(x, jnp.bfloat16)
    assert qsur(xb) == pytest.approx(qsur(np.asarray(xb.astype(jnp.float32))), rel=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"2-D array \[N, d\]"):
        qsur(np.ones(8))
    with pytest.raises(ValueError, match=r"2-D array \[N, d\]"):
        qsur(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        qsur(np.ones((1, 8)))
    with pytest.raises(ValueError, match="constant data"):
        qsur(np.ones((10, 4)))
    with pytest.raises(ValueError, match="square"):
        qsur_from_covariance(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
        qsur_from_covariance(np.eye(3), np.zeros(4))
    with pytest.raises(ValueError, match="confidence level"):
        qsur_from_covariance(np.eye(3), alpha=1.0)
    with pytest.raises(ValueError, match="finite"):
        qsur_from_covariance(np.diag([1.0, np.nan]))
