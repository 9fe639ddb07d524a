"""RWKVQuant's percentile-clipped second moments (spec §3.5) as the capture records them, against numpy."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jquant.algorithms.rwkvquant import channel_importance
from jquant.calib.capture import CLIPPED_SQUARE_PERCENTILE, capture_statistics, set_capture
from models.rwkv6 import ElementwiseMix


def _reference(x: np.ndarray, percentile: float) -> np.ndarray:
    """Per channel ``Σ min(x², τ_b²)``, ``τ_b`` the percentile of ``|x|`` over sequence ``b``'s elements (its k-th
    largest, ``k = ceil((1 - p/100) n)``), in float64."""
    total = np.zeros(x.shape[-1])
    for seq in np.float64(x):
        flat = np.sort(np.abs(seq).ravel())[::-1]
        tau = flat[max(1, math.ceil((1 - percentile / 100) * flat.size)) - 1]
        total += np.minimum(seq**2, tau**2).sum(axis=0)
    return total


def _captured(x: np.ndarray):
    mix = ElementwiseMix(jnp.ones(x.shape[-1], jnp.float32))
    set_capture(mix, True)
    _, stats = capture_statistics(lambda m, d: m(d))(mix, jnp.asarray(x))
    (only,) = stats.values()
    return only


def test_elementwise_mix_records_the_clipped_second_moment():
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 200, 24)).astype(np.float32)
    x[1, 7, 5] = 40.0  # an outlier token: clipped to its sequence's percentile
    stats = _captured(x)
    want = _reference(x, CLIPPED_SQUARE_PERCENTILE)
    np.testing.assert_allclose(stats.clipped_square, want, rtol=1e-5)
    plain = np.diag(stats.hessian)
    assert np.all(stats.clipped_square <= plain * (1 + 1e-6))
    assert stats.clipped_square[5] < 0.5 * plain[5]  # the outlier dominated channel 5's unclipped moment
    # the importance RWKVQuant's codebooks use: clipped by default, the plain E[δ²] without clipping
    np.testing.assert_allclose(channel_importance(stats), want / stats.count, rtol=1e-5)
    np.testing.assert_allclose(channel_importance(stats, clip=False), plain / stats.count, rtol=1e-12)


def test_importance_without_clipped_moments_names_the_fix():
    stats = _captured(np.ones((1, 4, 8), np.float32))
    stats = type(stats)(hessian=stats.hessian, count=stats.count, absmax=stats.absmax)
    with pytest.raises(ValueError, match="clip=False"):
        channel_importance(stats)
