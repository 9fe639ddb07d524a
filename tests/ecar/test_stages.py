"""ECAR's stage bookkeeping, the up-sample + re-noise step and the multistage sampler (jquant.ecar), against numpy
references written from the spec's formulas, and the refusals of bad schedules."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import ecar
from jquant.sampling.flow import sample


def _schedule(**changes):
    args = dict(latent_size=8, resolutions=(2, 4, 8), edges=(1.0, 0.7, 0.25, 0.0), steps=(3, 2, 4))
    return ecar.StageSchedule(**{**args, **changes})


def test_token_counts_and_windows_meet():
    sched = _schedule()
    assert sched.token_counts() == tuple(r * r for r in sched.resolutions)
    windows = sched.windows()
    assert windows[0][0] == 1.0 and windows[-1][1] == 0.0
    for (_, end), (start, _) in zip(windows[:-1], windows[1:]):
        assert end == start  # one stage's window ends where the next one's (un-corrected) window starts
    assert sched.end_sigmas() == tuple(w[1] for w in windows)


def test_corrected_start_levels_match_the_gamma_third_closed_form():
    sched = _schedule()
    starts = sched.start_sigmas()
    assert starts[0] == 1.0
    for (_, e), got in zip(sched.windows()[:-1], starts[1:]):
        s0 = 1.0 - e
        assert got == pytest.approx(1.0 - s0 / (2.0 - s0), rel=1e-12)  # α = 1 / (2 − s0) for γ = 1/3


def test_block_causal_mask_against_a_loop():
    prefix, counts = 3, (1, 4, 16)
    got = ecar.block_causal_mask(prefix, counts)
    owner = [0] * prefix + [s + 1 for s, n in enumerate(counts) for _ in range(n)]
    want = np.array([[owner[j] <= owner[i] for j in range(len(owner))] for i in range(len(owner))])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("changes, match", [
    (dict(resolutions=(3, 6, 8)), "must divide the final token map"),
    (dict(resolutions=(2, 4)), "must divide the final token map"),
    (dict(resolutions=(1, 4, 8)), "must double"),
    (dict(edges=(1.0, 0.5, 0.2, 0.1)), "must cover \\[0, 1\\]"),
    (dict(edges=(0.9, 0.5, 0.2, 0.0)), "must cover \\[0, 1\\]"),
    (dict(edges=(1.0, 0.2, 0.5, 0.0)), "must cover \\[0, 1\\]"),
    (dict(edges=(1.0, 0.5, 0.0)), "give 4 edges for 3 stages"),
    (dict(steps=(3, 0, 4)), "at least one Euler step"),
    (dict(steps=(3, 4)), "at least one Euler step"),
])
def test_bad_schedules_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        _schedule(**changes)


def test_split_steps():
    assert ecar.split_steps(20, 3) == (7, 7, 6)
    assert sum(ecar.split_steps(11, 4)) == 11
    with pytest.raises(ValueError, match="at least one Euler step"):
        ecar.split_steps(2, 3)


def _up_np(x):
    b, r, _, c = x.shape
    out = np.zeros((b, 2 * r, 2 * r, c))
    for i, j in itertools.product(range(2 * r), range(2 * r)):
        out[:, i, j] = x[:, i // 2, j // 2]
    return out


def test_area_down_and_upsample_against_loops():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 3))
    got = np.asarray(ecar.area_down(jnp.asarray(x), 2))
    want = np.array([[[x[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4, :].mean(axis=(0, 1)) for j in range(2)]
                      for i in range(2)] for b in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ecar.upsample2(jnp.asarray(x, jnp.float32))),
                                  _up_np(x.astype(np.float32)))


def test_renoise_matches_its_formula_on_fixed_inputs():
    rng = np.random.default_rng(1)
    y, n = rng.normal(size=(2, 2, 2, 3)), rng.normal(size=(2, 4, 4, 3))
    s0 = 0.4
    alpha = 1.0 / (2.0 - s0)
    beta = alpha * (1.0 - s0) * np.sqrt(3.0)  # α (1 − s0) / sqrt(γ), γ = 1/3
    got = np.asarray(ecar.renoise(jnp.asarray(y, jnp.float32), jnp.asarray(n, jnp.float32), s0))
    np.testing.assert_allclose(got, alpha * _up_np(y) + beta * n, rtol=1e-5, atol=1e-6)


def test_block_noise_statistics():
    n = np.asarray(ecar.block_noise(jax.random.key(0), (64, 32, 32, 4)), np.float64)
    blocks = n.reshape(64, 16, 2, 16, 2, 4).transpose(0, 1, 3, 5, 2, 4).reshape(-1, 4)  # row-major 2x2 blocks
    cov = np.cov(blocks, rowvar=False)
    # (1 + γ) I₄ − γ 1₄1₄ᵀ as Pyramid Flow builds it: diagonal 1 + γ − γ = 1, off-diagonal −γ = −1/3
    np.testing.assert_allclose(cov, (4 / 3) * np.eye(4) - (1 / 3) * np.ones((4, 4)), atol=0.03)
    np.testing.assert_allclose(blocks.sum(axis=1), 0.0, atol=1e-4)  # γ = 1/3: the noise cancels in every block


def test_renoised_variance_matches_the_corrected_level():
    """``Y = σ ε`` (level σ, zero data) re-noised with ``s0 = 1 − σ``: the per-element variance is ``σ̃²`` at the
    corrected level ``σ̃ = 1 − α s0`` (spec §5.2) and the 2x2 block means are ``α Y``."""
    sigma = 0.6
    s0 = 1.0 - sigma
    y = sigma * jax.random.normal(jax.random.key(1), (256, 16, 16, 4))
    noise = ecar.block_noise(jax.random.key(2), (256, 32, 32, 4))
    out = np.asarray(ecar.renoise(y, noise, s0), np.float64)
    corrected = 1.0 - s0 / (2.0 - s0)
    assert out.var() == pytest.approx(corrected ** 2, rel=0.01)
    means = out.reshape(256, 16, 2, 16, 2, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(means, np.asarray(y) / (2.0 - s0), atol=1e-5)


def test_stage_endpoints_against_the_formulas():
    sched = _schedule()
    rng = np.random.default_rng(3)
    maps = [rng.normal(size=(2, r, r, 3)) for r in sched.resolutions]
    eps = [rng.normal(size=m.shape) for m in maps]
    starts, ends = ecar.stage_endpoints([jnp.asarray(m, jnp.float32) for m in maps],
                                        [jnp.asarray(e, jnp.float32) for e in eps], sched)
    sig_start = sched.start_sigmas()
    for s, (e_lo, e_hi) in enumerate(sched.windows()):
        np.testing.assert_allclose(ends[s], e_hi * eps[s] + (1 - e_hi) * maps[s], rtol=1e-5, atol=1e-6)
        want = eps[0] if s == 0 else sig_start[s] * eps[s] + (1 - sig_start[s]) * _up_np(maps[s - 1])
        np.testing.assert_allclose(starts[s], want, rtol=1e-5, atol=1e-6)


def _velocity(x, t, c):
    """A small nonlinear velocity of the latents, the time and a per-sample condition."""
    return jnp.tanh(x * c[:, None, None, :]) - t[:, None, None, None] * x


@pytest.mark.parametrize("guidance", [None, 2.5])
def test_one_full_range_stage_is_the_plain_flow_sampler(guidance):
    sched = ecar.StageSchedule(4, (4,), (1.0, 0.0), (5,))
    key = jax.random.key(4)
    cond = jax.random.normal(jax.random.key(5), (2, 3))
    uncond = None if guidance is None else jnp.zeros_like(cond)

    @jax.jit
    def multistage(key, cond, uncond):
        return ecar.multistage_sample(lambda s, inputs: (cond, uncond), lambda s: _velocity, sched, key, batch=2,
                                      channels=3, guidance=None if guidance is None else jnp.float32(guidance))

    got = multistage(key, cond, uncond)
    want = sample(_velocity, cond, key=key, shape=(2, 4, 4, 3), steps=5, guidance=guidance, uncond=uncond)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_multistage_sampler_passes_upsampled_stage_outputs():
    """Stage s + 1 is conditioned on Up₂ of stage s's end point, and the result has the final resolution."""
    sched = ecar.StageSchedule(4, (1, 2, 4), (1.0, 0.6, 0.3, 0.0), (2, 1, 2))
    seen = []

    def condition(s, inputs):
        seen.append(tuple(x.shape for x in inputs))
        return jnp.ones((2, 3)), None

    out = ecar.multistage_sample(condition, lambda s: _velocity, sched, jax.random.key(0), batch=2, channels=3)
    assert out.shape == (2, 4, 4, 3)
    assert seen == [(), ((2, 2, 2, 3),), ((2, 2, 2, 3), (2, 4, 4, 3))]
