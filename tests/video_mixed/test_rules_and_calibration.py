"""6Bit-Diffusion's decisions and offline fits against numpy references on fixed and random inputs, and its refusals
(no sampler is compiled here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.models import cogvideox
from jquant.video_mixed import FLOAT, INT8, NVFP4, CacheConfig, PrecisionConfig, SixBitConfig, check_block_dit
from jquant.video_mixed import calibrate, rules
from jquant.video_mixed.runtime import BlockState, Modes, Params, _Stepper


def test_relative_l1_and_outlier_ratio_match_float64_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, 7)).astype(np.float32), rng.normal(size=(2, 5, 7)).astype(np.float32)
    ref = np.abs(a.astype(np.float64)).sum() / np.abs(b.astype(np.float64)).sum()
    np.testing.assert_allclose(float(rules.relative_l1(jnp.asarray(a), jnp.asarray(b))), ref, rtol=1e-6)
    x = np.abs(a.astype(np.float64))
    np.testing.assert_allclose(float(rules.outlier_ratio(jnp.asarray(a))), x.max() / x.mean(), rtol=1e-6)


def test_predictor_rule_on_fixed_inputs_matches_numpy():
    rng = np.random.default_rng(1)
    alpha, beta = rng.uniform(0, 3, 6).astype(np.float32), rng.uniform(-0.1, 0.2, 6).astype(np.float32)
    for gamma in rng.uniform(0, 0.2, 5).astype(np.float32):
        tau = np.float32(np.median(alpha * gamma + beta))
        for valid in (True, False):
            expected = np.where(valid & (alpha * gamma + beta <= tau), NVFP4, INT8)
            got = rules.predicted_routes(jnp.float32(gamma), jnp.bool_(valid), jnp.asarray(alpha), jnp.asarray(beta),
                                         jnp.float32(tau))
            np.testing.assert_array_equal(np.asarray(got), expected)


def test_outlier_fallback_runs_a_layer_with_a_huge_channel_in_float():
    x = np.random.default_rng(2).normal(size=(2, 9, 64)).astype(np.float32)
    assert float(rules.outlier_ratio(jnp.asarray(x))) < 25
    assert int(rules.purified_route(jnp.int32(NVFP4), jnp.asarray(x), jnp.float32(25.0))) == NVFP4
    x[..., 5] *= 1000.0
    assert int(rules.purified_route(jnp.int32(NVFP4), jnp.asarray(x), jnp.float32(25.0))) == FLOAT


def test_tdc_skip_test_matches_numpy_and_is_strict():
    rng = np.random.default_rng(3)
    for _ in range(20):
        e, acc, tau = rng.uniform(0, 0.2, 3).astype(np.float32)
        run, valid = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
        expected = valid and acc + e < tau and run < 2
        got = rules.tdc_skip(jnp.float32(e), jnp.bool_(valid), jnp.float32(acc), jnp.int32(run), jnp.float32(tau),
                             jnp.int32(2))
        assert bool(got) == expected
    assert not bool(rules.tdc_skip(jnp.float32(0.0), jnp.bool_(True), jnp.float32(0.0), jnp.int32(0),
                                   jnp.float32(0.0), jnp.int32(2)))


def _tiny_dit():
    cfg = cogvideox.CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, time_embed_dim=16,
                                    text_embed_dim=8, num_layers=2, use_rotary_positional_embeddings=True)
    return cogvideox.init_model(cfg, jax.random.key(0))


def test_a_skipped_block_returns_its_input_plus_the_cached_residual_and_counts():
    dit = _tiny_dit()
    names = check_block_dit(dit)
    rng = np.random.default_rng(4)
    hidden = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 8, 32), (2, 3, 32)))
    delta = tuple(jnp.asarray(rng.normal(size=h.shape), jnp.float32) for h in hidden)
    state = BlockState(delta=delta, e=jnp.float32(0.03), computed=jnp.int32(2), e_acc=jnp.float32(0.01),
                       run=jnp.int32(1), gamma=jnp.float32(0.2), gamma_valid=jnp.bool_(True))
    params = Params(*(jnp.zeros(()) for _ in range(7)))
    for purify in (True, False):
        out, new, (skipped, routes, *_) = _Stepper(dit, names, Modes("dynamic", "tdc", purify), params).skip(
            0, hidden, state)
        for o, h, d in zip(out, hidden, delta):
            np.testing.assert_array_equal(np.asarray(o), np.asarray(h + d))
        assert bool(skipped) and np.all(np.asarray(routes) == -1)
        assert float(new.e_acc) == pytest.approx(0.04) and int(new.run) == 2
        assert bool(new.gamma_valid) == (not purify)  # PDR: no Γ after a skip -> INT8 at the next computation


def test_predictor_fit_matches_numpy_polyfit_and_pearson():
    rng = np.random.default_rng(5)
    gamma = rng.uniform(0.01, 0.3, (3, 6, 2))
    slope = rng.uniform(0.5, 2.0, (2, 4))
    erel = np.zeros((3, 6, 2, 4))
    erel[:, 1:] = gamma[:, :-1, :, None] * slope + 0.05 + rng.normal(0, 0.01, (3, 5, 2, 4))
    fit = calibrate.fit_predictor(gamma, erel)
    for b in range(2):
        for l in range(4):
            x, y = gamma[:, :-1, b].reshape(-1), erel[:, 1:, b, l].reshape(-1)
            a, c = np.polyfit(x, y, 1)
            np.testing.assert_allclose([fit.alpha[b, l], fit.beta[b, l]], [a, c], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(fit.r[b, l], np.corrcoef(x, y)[0, 1], rtol=1e-9)


def test_tau_q_and_the_static_schedule_reach_the_bit_budget():
    rng = np.random.default_rng(6)
    gamma, erel = rng.uniform(0, 1, (4, 8, 3)), rng.uniform(0, 1, (4, 8, 3, 2))
    widths = (32, 128)
    fit = calibrate.fit_predictor(gamma, erel)
    tau = calibrate.choose_tau_q(fit, gamma, widths, 6.0)
    pred = fit.alpha * gamma[:, :-1, :, None] + fit.beta
    weight = np.broadcast_to(np.asarray(widths, float), pred.shape)
    share = np.sum(weight * (pred <= tau)) / (gamma.size * sum(widths))
    smaller = np.sum(weight * (pred < tau)) / (gamma.size * sum(widths))
    assert smaller < 0.5 <= share  # the smallest threshold reaching the NVFP4 share of 6 bits
    schedule = calibrate.static_schedule(erel, widths, 6.0)
    assert schedule.shape == (8, 3, 2) and set(np.unique(schedule)) <= {NVFP4, INT8}
    w = np.broadcast_to(np.asarray(widths, float), schedule.shape)
    nv = np.sum(w * (schedule == NVFP4)) / np.sum(w)
    assert nv <= 0.5 and nv > 0.5 - 128 / np.sum(w)
    mean = erel.mean(axis=0)
    assert mean[schedule == NVFP4].max() <= mean[schedule == INT8].min()  # the least sensitive slots get NVFP4


@pytest.mark.parametrize("make, match", [
    (lambda: CacheConfig(tau_c=-0.1), "tau_c"),
    (lambda: CacheConfig(tau_c=float("nan")), "tau_c"),
    (lambda: CacheConfig(tau_c=float("inf")), "tau_c"),
    (lambda: CacheConfig(max_skips=0), "max_skips"),
    (lambda: CacheConfig(interval=0), "interval"),
    (lambda: CacheConfig(mode="skip-all"), "mode"),
    (lambda: PrecisionConfig(mode="dynamic", alpha=np.ones((2, 6)), beta=np.zeros((2, 6)), tau_q=-1.0), "tau_q"),
    (lambda: PrecisionConfig(mode="dynamic", alpha=np.ones((2, 6)), beta=np.zeros((2, 6)), tau_q=float("inf")),
     "tau_q"),
    (lambda: PrecisionConfig(mode="dynamic"), "predictor"),
    (lambda: PrecisionConfig(mode="off", outlier_ratio=0.5), "outlier_ratio"),
    (lambda: PrecisionConfig(mode="static", schedule=np.full((2, 2, 6), 7)), "schedule"),
    (lambda: calibrate.nvfp4_share(3.0), "target_bits"),
])
def test_bad_settings_are_refused_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_model_without_the_block_protocol_is_refused():
    class Plain(nnx.Module):
        def flow_velocity(self, latents, sigmas, text):
            return latents

    with pytest.raises(TypeError, match="block protocol"):
        check_block_dit(Plain())


def test_config_round_trips_through_its_file(tmp_path):
    rng = np.random.default_rng(7)
    config = SixBitConfig(precision=PrecisionConfig(mode="dynamic", alpha=rng.normal(size=(2, 6)),
                                                    beta=rng.normal(size=(2, 6)), tau_q=0.07),
                          cache=CacheConfig(tau_c=0.2, max_skips=3))
    config.save(tmp_path)
    back = SixBitConfig.load(tmp_path)
    assert back.to_dict() == config.to_dict()
    assert SixBitConfig.load(tmp_path / "nowhere") is None
