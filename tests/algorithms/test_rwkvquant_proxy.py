"""RWKVQuant's coarse-to-fine proxy: the spec's defining claims on synthetic 512×512 matrices."""

import numpy as np
import pytest

from jquant.algorithms.rwkvquant_proxy import (TAU_C, Proxy, TAU_F, coarse_proxy, fine_proxy, percentile_thresholds, proxy,
                                               use_vector)

STD = 0.02  # the scale of the spec's reference table (and of RWKV's matrices)


def _gaussian(seed=0):
    return STD * np.random.default_rng(seed).standard_normal((512, 512))


def _uniform(seed=0):
    a = STD * 3**0.5
    return np.random.default_rng(seed).uniform(-a, a, (512, 512))


def _with_outlier(w):
    w = w.copy()
    w[7, 11] = 20 * np.abs(w).max()
    return w


def test_equal_gaps_give_zero_and_both_proxies_are_non_negative():
    assert coarse_proxy(np.full(10, 0.1)) == pytest.approx(0.0, abs=1e-12)
    assert fine_proxy(np.full(10, 0.1)) == pytest.approx(0.0, abs=1e-12)
    for w in (_gaussian(), _uniform(), _with_outlier(_gaussian())):
        p = proxy(w)
        assert p.coarse >= 0 and p.fine >= 0


def test_reference_values_of_the_spec_table():
    # spec §3.2: Gaussian, fp16 unique gaps 1.38 / 86, + one 20x outlier 3.84 / 1.1e4; all fp32 gaps 2.70 / 9.6e9
    # (Gaussian) and 0.42 / 1.5 (uniform); ±10 % (the values depend on the draw)
    g = proxy(_gaussian())
    assert g.coarse == pytest.approx(1.38, rel=0.1) and g.fine == pytest.approx(86, rel=0.1)
    o = proxy(_with_outlier(_gaussian()))
    assert o.coarse == pytest.approx(3.84, rel=0.1) and o.fine == pytest.approx(1.1e4, rel=0.1)
    g32, u32 = proxy(_gaussian(), view_dtype=None), proxy(_uniform(), view_dtype=None)
    assert g32.coarse == pytest.approx(2.70, rel=0.1) and g32.fine == pytest.approx(9.6e9, rel=0.1)
    assert u32.coarse == pytest.approx(0.42, rel=0.1) and u32.fine == pytest.approx(1.5, rel=0.1)


def test_uniform_is_more_uniform_than_gaussian_and_an_outlier_blows_up_the_fine_proxy():
    for view in ("float16", None):
        assert proxy(_uniform(), view).coarse < proxy(_gaussian(), view).coarse
    # spec §5.1: one 20x outlier multiplies P_f by > 100 (Gaussian: ~130x; uniform at this scale: ~94x)
    for w, factor in ((_gaussian(), 100), (_uniform(), 50)):
        plain, spiked = proxy(w), proxy(_with_outlier(w))
        assert spiked.fine > factor * plain.fine and spiked.coarse > plain.coarse


def test_invariant_to_positive_rescaling_and_permutation():
    w = _gaussian(3)
    perm = np.random.default_rng(1).permutation(w.size)
    p, q = proxy(w), proxy(w.ravel()[perm].reshape(64, -1))
    assert (q.coarse, q.fine) == (p.coarse, p.fine)
    # rescaling: exact in float64 for powers of two (the float16 view rounds subnormals differently)
    p, q = proxy(w, view_dtype=None), proxy(4.0 * w, view_dtype=None)
    assert q.coarse == pytest.approx(p.coarse, rel=1e-9) and q.fine == pytest.approx(p.fine, rel=1e-6)


def test_decision_uniform_is_scalar_friendly_clustered_or_outlier_heavy_is_vector_friendly():
    # 256 x 256 (a 512 x 512 uniform matrix already has P_f ~ 40 > tau_f = 30 in the float16 view)
    rng = np.random.default_rng(0)
    uniform = _uniform()[:256, :256]
    clustered = rng.choice([-0.03, -0.01, 0.01, 0.03], (256, 256)) + 1e-3 * rng.standard_normal((256, 256))
    mats = {"uniform": uniform, "outlier": _with_outlier(uniform), "clustered": clustered,
            "gaussian": _gaussian()[:256, :256]}
    p = {k: proxy(w) for k, w in mats.items()}
    vq = use_vector([v.coarse for v in p.values()], [v.fine for v in p.values()], TAU_C, TAU_F)
    assert dict(zip(mats, vq.tolist())) == {"uniform": False, "outlier": True, "clustered": True,
                                                "gaussian": True}


def test_percentile_thresholds_send_the_target_fraction_to_vq():
    rng = np.random.default_rng(0)
    coarse, fine = rng.uniform(0, 3, 40), rng.lognormal(3, 1, 40)
    for fraction, expected in ((0.1, 4), (0.25, 10), (0.0, 0), (1.0, 40)):
        tau_c, tau_f = percentile_thresholds(coarse, fine, fraction)
        assert use_vector(coarse, fine, tau_c, tau_f).sum() == expected
    # the highest coarse proxy always goes to VQ at any positive fraction
    tau_c, tau_f = percentile_thresholds(coarse, fine, 0.1)
    assert use_vector(coarse, fine, tau_c, tau_f)[np.argmax(coarse)]


@pytest.mark.parametrize("tau_c, tau_f", [(-1.0, 30.0), (1.54, float("nan")), (True, 30.0), ("1.5", 30.0)])
def test_bad_thresholds_raise(tau_c, tau_f):
    with pytest.raises(ValueError, match="RWKVQuant threshold"):
        use_vector([1.0], [1.0], tau_c, tau_f)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_bad_vq_fraction_raises(fraction):
    with pytest.raises(ValueError, match="vq_fraction"):
        percentile_thresholds([1.0, 2.0], [1.0, 2.0], fraction)


def test_constant_weight_is_uniform_and_non_finite_raises():
    assert proxy(np.zeros((4, 4))) == Proxy(coarse=0.0, fine=0.0, gaps=0)  # e.g. RWKV's zero-initialised LoRAs
    with pytest.raises(ValueError, match="finite"):
        proxy(np.array([0.0, np.inf, 1.0]))
