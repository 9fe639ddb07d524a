"""PCDVQ's data-free codebooks: E8 shells, greedy directions, Lloyd-Max levels vs quadrature."""

import numpy as np
import pytest
from scipy import integrate, stats

from jquant.formats.polar_codebooks import (direction_candidates, greedy_directions, lattice_points, lloyd_max_chi,
                                            lloyd_max_gaussian, polar_codebooks, unique_directions)


def _e8_brute(max_norm2):
    """E8 points by brute force over a cube (float64), independent of the pruned enumeration."""
    grid = np.stack(np.meshgrid(*[np.arange(-2, 3)] * 8, indexing="ij"), -1).reshape(-1, 8).astype(np.float64)
    half = np.stack(np.meshgrid(*[np.arange(-2.5, 3.0)] * 8, indexing="ij"), -1).reshape(-1, 8)
    pts = np.concatenate([grid, half])
    keep = (np.mod(pts.sum(1), 2) == 0) & ((pts ** 2).sum(1) <= max_norm2) & np.any(pts != 0, 1)
    return pts[keep]


def test_e8_points_match_brute_force_and_the_theta_series():
    pts = lattice_points(8, 8)
    brute = _e8_brute(8)
    assert sorted(map(tuple, pts)) == sorted(map(tuple, brute))
    # the shells of E8's theta series (norm 2, 4, 6, 8): 240 q + 2160 q^2 + 6720 q^3 + 17520 q^4
    norms = np.round((pts ** 2).sum(1)).astype(int)
    sigma3 = lambda n: sum(d ** 3 for d in range(1, n + 1) if n % d == 0)  # noqa: E731
    for m in (1, 2, 3, 4):
        assert np.sum(norms == 2 * m) == 240 * sigma3(m)
    assert len(unique_directions(pts)) == 26400  # spec §3.4 reference count


def test_d4_points_have_even_sum_and_directions_are_unit_and_unique():
    pts = lattice_points(4, 6)
    assert np.all(np.mod(pts.sum(1), 2) == 0) and np.all((pts ** 2).sum(1) <= 6)
    dirs = direction_candidates(4, 256)
    assert len(dirs) >= 384
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1, atol=1e-12)
    assert len(np.unique(np.round(dirs, 6), axis=0)) == len(dirs)


def _max_pairwise_cos(c):
    g = c @ c.T
    np.fill_diagonal(g, -1)
    return g.max()


def test_greedy_selection_is_farthest_point_and_deterministic():
    cands = direction_candidates(8, 256)
    got = greedy_directions(cands, 256)
    # reference: literal farthest-point rule in float64, recomputing max similarity from scratch
    chosen = [0]
    for _ in range(255):
        maxsim = (cands @ cands[chosen].T).max(1)
        chosen.append(int(np.flatnonzero(maxsim <= maxsim.min() + 1e-9)[0]))
    np.testing.assert_allclose(got, cands[chosen], atol=0)
    np.testing.assert_array_equal(got, greedy_directions(cands, 256))
    assert len(np.unique(np.round(got, 6), axis=0)) == 256
    # more candidates (a larger ball) do not make the code worse
    assert _max_pairwise_cos(greedy_directions(direction_candidates(8, 2048), 256)) <= _max_pairwise_cos(got) + 1e-12


def _chi_fixed_point_residual(levels, k):
    """max |c_i - E[r | cell i]| for chi_k by adaptive quadrature (independent of the gamma formula)."""
    u = np.concatenate([[0], (levels[:-1] + levels[1:]) / 2, [np.inf]])
    res = []
    for i, c in enumerate(levels):
        mass = integrate.quad(lambda r: stats.chi.pdf(r, k), u[i], u[i + 1])[0]
        mom = integrate.quad(lambda r: r * stats.chi.pdf(r, k), u[i], u[i + 1])[0]
        res.append(abs(c - mom / mass))
    return max(res)


@pytest.mark.parametrize("bits,reference", [
    (1, [2.2360, 3.3557]),
    (2, [1.8164, 2.4967, 3.1294, 3.9165]),
    (3, [1.4715, 1.9431, 2.3143, 2.6550, 2.9963, 3.3656, 3.8056, 4.4321]),
])
def test_chi8_lloyd_max_levels(bits, reference):
    levels, bounds = lloyd_max_chi(8, bits)
    np.testing.assert_allclose(levels, reference, atol=1e-4)  # spec §3.4 reference values
    np.testing.assert_allclose(bounds, (levels[:-1] + levels[1:]) / 2, rtol=1e-15)
    assert _chi_fixed_point_residual(levels, 8) < 1e-8


def test_chi8_two_bit_mse_and_gaussian_lloyd_max():
    levels, bounds = lloyd_max_chi(8, 2)
    u = np.concatenate([[0], bounds, [np.inf]])
    mse = sum(integrate.quad(lambda r: (r - c) ** 2 * stats.chi.pdf(r, 8), u[i], u[i + 1])[0] for i, c in enumerate(levels))
    assert abs(mse - 0.0552) < 1e-4  # spec §3.4
    g, gb = lloyd_max_gaussian(2)
    assert _fixed_point_gauss(g) < 1e-8
    np.testing.assert_allclose(g, [-1.5104, -0.4528, 0.4528, 1.5104], atol=1e-4)  # Max (1960), 4 levels


def _fixed_point_gauss(levels):
    u = np.concatenate([[-np.inf], (levels[:-1] + levels[1:]) / 2, [np.inf]])
    return max(abs(c - integrate.quad(lambda x: x * stats.norm.pdf(x), u[i], u[i + 1])[0]
                   / integrate.quad(stats.norm.pdf, u[i], u[i + 1])[0]) for i, c in enumerate(levels))


def test_polar_codebooks_are_cached_read_only_float32():
    c_d, c_r = polar_codebooks(8, 8, 2)
    assert c_d.shape == (256, 8) and c_r.shape == (4,) and c_d.dtype == np.float32
    assert polar_codebooks(8, 8, 2)[0] is c_d
    with pytest.raises(ValueError):
        c_d[0, 0] = 1.0
    with pytest.raises(ValueError, match="dim=3"):
        lattice_points(3, 4)
