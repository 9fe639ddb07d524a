"""k-means against brute-force optimal clusterings and the weighted-mean/assignment fixed point."""

import itertools

import numpy as np
import pytest

from jquant.numerics.kmeans import kmeans


def _brute_force_inertia(x, w, k):
    """Lowest weighted inertia over every labelling of a tiny set (exhaustive)."""
    best = np.inf
    for labels in itertools.product(range(k), repeat=len(x)):
        labels = np.array(labels)
        total = 0.0
        for c in range(k):
            m = labels == c
            if m.any():
                mass = w[m].sum(0)
                centre = (w[m] * x[m]).sum(0) / np.where(mass > 0, mass, 1)
                total += (w[m] * (x[m] - centre) ** 2).sum()
        best = min(best, total)
    return best


def test_matches_exhaustive_optimum_on_small_sets():
    rng = np.random.default_rng(1)
    for trial in range(3):
        x = rng.normal(size=(7, 2))
        w = rng.uniform(0.1, 2.0, size=(7, 2))
        got = kmeans(x, 3, weights=w, seed=trial, n_init=20)
        assert got.inertia == pytest.approx(_brute_force_inertia(x, w, 3), rel=1e-9)


def test_fixed_point_weighted_means_and_nearest_assignment():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 3))
    w = rng.uniform(0.0, 3.0, size=200)
    res = kmeans(x, 5, weights=w, seed=0, iters=200)
    d = (w[:, None, None] * (x[:, None, :] - res.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(res.labels, d.argmin(1))
    for c in range(5):
        m = res.labels == c
        np.testing.assert_allclose(res.centroids[c], (w[m, None] * x[m]).sum(0) / w[m].sum(), rtol=1e-6, atol=1e-9)
    assert res.inertia == pytest.approx(d.min(1).sum())


def test_separated_clusters_found_and_deterministic():
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + 0.1 * rng.normal(size=(30, 2)) for c in centres])
    a, b = kmeans(x, 3, seed=4), kmeans(x, 3, seed=4)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(set(a.labels[:30])) == len(set(a.labels[30:60])) == len(set(a.labels[60:])) == 1
    assert len(set(a.labels)) == 3


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="k=5"):
        kmeans(np.zeros((3, 2)), 5)
    with pytest.raises(ValueError, match="weights"):
        kmeans(np.zeros((3, 2)), 2, weights=np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        kmeans(np.array([[np.nan, 0.0]]), 1)
