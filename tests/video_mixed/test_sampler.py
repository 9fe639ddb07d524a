"""6Bit-Diffusion's jitted sampler on a tiny random CogVideoX DiT: exactness with both parts off, the cache's
bookkeeping against a pure-Python simulation, the routing extremes and PDR from the step log, FORA's refresh schedule,
and one compiled program per setting (no recompilation per step or per threshold)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.models import cogvideox
from jquant.sampling.flow import sample
from jquant.text_to_video import VideoVelocity
from jquant.video_mixed import (FLOAT, INT8, NVFP4, CacheConfig, PrecisionConfig, SixBitConfig, compiled_programs,
                                sample_six_bit)

STEPS, SHAPE, GUIDANCE = 8, (1, 2, 4, 4, 4), 2.0


@pytest.fixture(scope="module")
def setup():
    """A 2-block CogVideoX DiT whose adaLN gates are scaled up (residuals of order one, unlike the N(0, 0.02) init),
    one prompt's text states and the unconditional ones."""
    cfg = cogvideox.CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, time_embed_dim=16,
                                    text_embed_dim=8, num_layers=2, use_rotary_positional_embeddings=True)
    dit = cogvideox.init_model(cfg, jax.random.key(0))
    for block in dit.blocks():
        for norm in (block.norm1, block.norm2):
            norm.linear.kernel.set_value(norm.linear.kernel.get_value() * 40.0)
    cond = (jax.random.normal(jax.random.key(1), (1, 3, 8)),)
    uncond = (jnp.zeros((1, 3, 8)),)
    return dit, cond, uncond


def _run(setup, config: SixBitConfig):
    dit, cond, uncond = setup
    return sample_six_bit(dit, cond, config, key=jax.random.key(2), shape=SHAPE, steps=STEPS, guidance=GUIDANCE,
                          uncond=uncond)


def _dynamic(alpha: float, beta: float, tau_q: float, cache: CacheConfig) -> SixBitConfig:
    shape = (2, 6)
    return SixBitConfig(precision=PrecisionConfig(mode="dynamic", alpha=np.full(shape, alpha),
                                                  beta=np.full(shape, beta), tau_q=tau_q), cache=cache)


def test_both_parts_off_is_the_float_sampler_bit_for_bit(setup):
    dit, cond, uncond = setup
    reference = sample(VideoVelocity(dit), cond, key=jax.random.key(2), shape=SHAPE, steps=STEPS, guidance=GUIDANCE,
                       uncond=uncond)
    out = _run(setup, SixBitConfig())
    np.testing.assert_array_equal(np.asarray(out.latents), np.asarray(reference))
    assert out.skip_fraction() == 0 and np.all(out.log.routes == FLOAT)


def simulate_tdc(e: np.ndarray, tau_c: float, max_skips: int) -> tuple[np.ndarray, np.ndarray]:
    """Pure-Python TDC over the logged estimates ``e [S, B]``: ``(skipped [S, B], e defined [S, B])``."""
    steps, blocks = e.shape
    skipped, defined = np.zeros((steps, blocks), bool), np.zeros((steps, blocks), bool)
    for b in range(blocks):
        acc, run, computed = np.float32(0), 0, 0
        for t in range(steps):
            defined[t, b] = computed >= 2
            skip = defined[t, b] and np.float32(acc + np.float32(e[t, b])) < np.float32(tau_c) and run < max_skips
            if skip:
                acc, run = np.float32(acc + np.float32(e[t, b])), run + 1
            else:
                acc, run, computed = np.float32(0), 0, computed + 1
            skipped[t, b] = skip
    return skipped, defined


def test_cache_bookkeeping_matches_a_python_simulation_without_recompiling(setup):
    first = _run(setup, _dynamic(1.0, 0.0, 0.5, CacheConfig(tau_c=1e6)))
    programs = compiled_programs()
    finite = first.log.e[np.isfinite(first.log.e)]
    middle = _run(setup, _dynamic(1.0, 0.0, 0.5, CacheConfig(tau_c=float(np.median(finite)) * 1.5, max_skips=3)))
    assert compiled_programs() == programs  # thresholds and the cap are data: the same program
    for run, tau_c, cap in ((first, 1e6, 2), (middle, float(np.median(finite)) * 1.5, 3)):
        skipped, defined = simulate_tdc(run.log.e, tau_c, cap)
        np.testing.assert_array_equal(run.log.skipped, skipped)
        np.testing.assert_array_equal(np.isfinite(run.log.e), defined)
        assert not run.log.skipped[:2].any()  # steps 0 and 1 are always computed
        for b in range(run.log.skipped.shape[1]):  # never more than the cap of consecutive skips
            streak = 0
            for s in run.log.skipped[:, b]:
                streak = streak + 1 if s else 0
                assert streak <= cap
        routes = run.log.routes
        assert np.all((routes[0] == INT8) | (routes[0] == FLOAT))  # step 0: no Γ yet
        after_skip = run.log.skipped[:-1] & ~run.log.skipped[1:]
        assert np.all(np.isin(routes[1:][after_skip], (INT8, FLOAT)))  # PDR: INT8 after a skip
        assert np.all((routes == -1) == run.log.skipped[..., None])
    assert first.skip_fraction() > 0 and middle.skip_fraction() > 0


def test_routing_extremes_and_tau_c_zero_equal_dmpq_alone(setup):
    no_skip = CacheConfig(tau_c=0.0)
    low = _run(setup, _dynamic(0.0, 1.0, 0.0, no_skip))  # Ê = 1 > τ_q = 0: INT8 everywhere
    high = _run(setup, _dynamic(0.0, 0.0, 1e30, no_skip))  # Ê = 0 <= τ_q: NVFP4 wherever Γ exists
    assert low.skip_fraction() == 0 and high.skip_fraction() == 0  # τ_c = 0 never skips (strict test)
    assert np.all(np.isin(low.log.routes, (INT8, FLOAT))) and np.mean(low.log.routes == INT8) > 0.5
    assert np.all(np.isin(high.log.routes[1:], (NVFP4, FLOAT))) and np.mean(high.log.routes[1:] == NVFP4) > 0.5
    assert np.all(np.isin(high.log.routes[0], (INT8, FLOAT)))
    bits = np.where(low.log.routes == INT8, 8, 16) * np.asarray(low.in_features)
    np.testing.assert_allclose(low.average_bits(), bits.sum() / (bits.size / len(low.in_features)
                                                                 * sum(low.in_features)))
    alone = _run(setup, _dynamic(0.0, 0.0, 1e30, CacheConfig(mode="off")))
    np.testing.assert_array_equal(alone.log.routes, high.log.routes)
    np.testing.assert_allclose(np.asarray(alone.latents), np.asarray(high.latents), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(low.latents), np.asarray(high.latents), rtol=1e-6, atol=1e-6)


def test_fora_reuses_every_block_between_refreshes(setup):
    out = _run(setup, SixBitConfig(precision=PrecisionConfig(mode="int8"), cache=CacheConfig(mode="fora", interval=3)))
    expected = np.broadcast_to((np.arange(STEPS) % 3 != 0)[:, None], out.log.skipped.shape)
    np.testing.assert_array_equal(out.log.skipped, expected)
    assert np.all(out.log.routes[~out.log.skipped] == INT8)
    assert out.average_bits(skipped_as_zero=False) == 8.0
    np.testing.assert_allclose(out.average_bits(), 8.0 * (1 - out.skip_fraction()))
