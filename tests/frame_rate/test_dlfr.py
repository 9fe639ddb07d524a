"""DLFR-VAE (``jquant.frame_rate.dlfr``, spec ``dlfr_vae.md`` §5) on tiny random-weight HunyuanVideo VAEs.

References: the unmodified VAE (all ``m_i = 1`` is bit-identical), ``content_complexity`` chunk by chunk, a numpy
loop for the pooling / repetition, the pixel-level baseline for the feature path on still clips (where pooling
identical frames is lossless, so both paths must agree), and fresh random clips and schedules throughout.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.frame_rate import dlfr
from jquant.frame_rate.similarity import content_complexity
from jquant.models import hunyuan_video_vae as hv
from jquant.models.hunyuan_video_vae_blocks import pool_chunks, repeat_chunks
from jquant.testing.hf_reference import relative_error

# Three blocks (frames halved in blocks 0 and 1: the bundled tiny VAE's layout) and four (HunyuanVideo's: block 0
# spatial only, so the encoder may pool after conv_in or after down block 0).
THREE = hv.HunyuanVideoVAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                                 norm_num_groups=4, spatial_compression_ratio=4)
FOUR = hv.HunyuanVideoVAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                                norm_num_groups=4, spatial_compression_ratio=8)


@pytest.fixture(scope="module")
def three():
    return hv.init_model(THREE, jax.random.key(np.random.default_rng().integers(1 << 30)))


def _clip(frames: int, size: int = 8, *, still: bool = False, batch: int = 1) -> jnp.ndarray:
    rng = np.random.default_rng()
    if still:
        return jnp.asarray(np.repeat(rng.uniform(-1, 1, (batch, 1, size, size, 3)), frames, axis=1), jnp.float32)
    return jnp.asarray(rng.uniform(-1, 1, (batch, frames, size, size, 3)), jnp.float32)


def _moving_square(speed: int, frames: int = 33, size: int = 32) -> np.ndarray:
    """A textured background with a bright 8 x 8 square moving ``speed`` px per frame (wrapping), in [-1, 1]."""
    rng = np.random.default_rng()
    background = rng.uniform(-1, 0, (size, size, 3))
    clip = np.empty((1, frames, size, size, 3), np.float32)
    for t in range(frames):
        frame = background.copy()
        cols = (np.arange(8) + 4 + speed * t) % size
        frame[12:20][:, cols] = 1.0
        clip[0, t] = frame
    return clip


def _roundtrip(model: hv.AutoencoderKLHunyuanVideo, videos: jax.Array, rates: dlfr.ChunkRates, path: str):
    return dlfr.decode(model, dlfr.encode(model, videos, rates, path=path))


def test_pool_and_repeat_match_a_numpy_loop():
    rng = np.random.default_rng()
    factors, chunk = tuple(int(m) for m in rng.choice([1, 2, 4], 3)), 8
    x = rng.normal(size=(2, 1 + chunk * 3, 2, 3, 4)).astype(np.float32)
    want = [x[:, :1]]
    for i, m in enumerate(factors):
        part = x[:, 1 + i * chunk:1 + (i + 1) * chunk]
        want += [part[:, j:j + m].mean(axis=1, keepdims=True) for j in range(0, chunk, m)]
    pooled = pool_chunks(jnp.asarray(x), factors, chunk)
    np.testing.assert_allclose(pooled, np.concatenate(want, axis=1), rtol=1e-6)
    repeated = np.asarray(repeat_chunks(pooled, factors, chunk))
    assert repeated.shape == x.shape
    start = 1
    for i, m in enumerate(factors):
        for j in range(chunk):
            np.testing.assert_array_equal(repeated[:, 1 + i * chunk + j], np.asarray(pooled)[:, start + j // m])
        start += chunk // m


def test_all_factors_one_is_bit_identical_to_the_plain_vae(three):
    """Spec §5.1 and the -inf threshold extreme: eager and jitted, encode and decode."""
    videos = _clip(33, size=12)
    rates = dlfr.schedule(videos, thresholds=[-np.inf, -np.inf])
    assert rates[0].factors == (1, 1)
    latent = dlfr.encode(three, videos, rates[0])
    plain = three.encode(videos)
    np.testing.assert_array_equal(latent.latents, plain.mean)
    np.testing.assert_array_equal(dlfr.decode(three, latent), three.decode(plain.mean))
    jitted = nnx.jit(lambda m, x: dlfr.encode(m, x, rates[0]).latents)(three, videos)
    np.testing.assert_array_equal(jitted, nnx.jit(lambda m, x: m.encode(x).mean)(three, videos))
    decoded = nnx.jit(lambda m, z: m.decode(z, frame_rates=(1, 1)))(three, plain.mean)
    np.testing.assert_array_equal(decoded, nnx.jit(lambda m, z: m.decode(z))(three, plain.mean))


def test_threshold_extremes_and_levels():
    c = np.random.default_rng().uniform(0, 1, 6)
    assert dlfr.factors_from_thresholds(c, [np.inf, np.inf]) == (4,) * 6
    assert dlfr.factors_from_thresholds(c, [-np.inf, -np.inf]) == (1,) * 6
    lo, hi = np.sort(np.random.default_rng().uniform(0, 1, 2))
    want = tuple(4 if x < lo else 2 if x < hi else 1 for x in c)
    assert dlfr.factors_from_thresholds(c, [lo, hi]) == want


@pytest.mark.parametrize("config, depths", [(THREE, ((0,), (2, 3))), (FOUR, ((0, 1), (3, 4)))])
def test_shape_law(config, depths):
    """Spec §5.3: ``1 + Σ 4 / m_i`` latent frames, ``1 + 16 M`` decoded frames, at every allowed depth, both paths."""
    model = hv.init_model(config, jax.random.key(np.random.default_rng().integers(1 << 30)))
    factors = tuple(int(m) for m in np.random.default_rng().choice([1, 2, 4], 3))
    rates = dlfr.ChunkRates(factors, 16)
    assert rates.latent_frames == 1 + sum(4 // m for m in factors) and rates.pixel_frames == 49
    s = config.spatial_compression_ratio
    videos = _clip(49, size=s)
    assert config.frame_rate_depths == depths
    for depth in depths[0]:
        latent = dlfr.encode(model, videos, rates, depth=depth)
        assert latent.latents.shape == (1, rates.latent_frames, 1, 1, 4)
    for depth in depths[1]:
        assert dlfr.decode(model, latent, depth=depth).shape == videos.shape
    pixel = dlfr.encode(model, videos, rates, path="pixel")
    assert pixel.latents.shape == latent.latents.shape and dlfr.decode(model, pixel).shape == videos.shape


@pytest.mark.parametrize("config", [THREE, FOUR])
def test_still_clip_gets_the_largest_factor_and_loses_nothing(config, x64):
    """Spec §5.4 and §5.6: a still clip has C = 0, so the budget and any positive thresholds give m = 4 everywhere;
    pooling identical frames is lossless (and every layer keeps a still clip still), so its reconstruction equals the
    fixed-rate one and the feature path equals the pixel-level oracle (m = 2 and 4): up to float64 rounding."""
    config = config.replace(dtype="float64", param_dtype="float64")
    model = hv.init_model(config, jax.random.key(np.random.default_rng().integers(1 << 30)))
    videos = _clip(33, size=2 * config.spatial_compression_ratio, still=True).astype(jnp.float64)
    big = _clip(33, size=12, still=True)  # SSIM needs 11 x 11 at least
    np.testing.assert_allclose(dlfr.chunk_complexity(big), 0.0, atol=1e-6)
    assert dlfr.schedule(big, thresholds=[1e-3, 1e-2])[0].factors == (4, 4)
    assert dlfr.schedule(big, target_compression=16)[0].factors == (4, 4)
    fixed = _roundtrip(model, videos, dlfr.uniform_rates(33), "feature")
    rates = dlfr.ChunkRates((2, 4))
    feature = _roundtrip(model, videos, rates, "feature")
    assert relative_error(feature, fixed) < 1e-9
    assert relative_error(feature, _roundtrip(model, videos, rates, "pixel")) < 1e-9


def test_complexity_per_chunk_matches_content_complexity():
    rng = np.random.default_rng()
    videos = rng.uniform(-1, 1, (2, 33, 24, 24, 3)).astype(np.float32)
    videos[:, 17:] = 0.8 * videos[:, 16:17] + 0.2 * videos[:, 17:]  # a calmer second chunk
    got = dlfr.chunk_complexity(videos, 16, downsample=2)
    small = videos.reshape(2, 33, 12, 2, 12, 2, 3).mean(axis=(3, 5))
    want = np.stack([content_complexity(small[:, 1 + 16 * i:1 + 16 * (i + 1)], data_range=2.0) for i in range(2)], 1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(got[:, 1] < got[:, 0])


def test_complexity_grows_with_motion_speed_and_the_factor_does_not():
    """Spec §5.5 on moving squares of 0..4 px / frame."""
    clips = np.concatenate([_moving_square(v) for v in range(5)])
    c = dlfr.chunk_complexity(clips).mean(axis=1)
    assert c[0] < 1e-6 and np.all(np.diff(c) > 0), c
    theta = np.sort(np.random.default_rng().uniform(c[0], c[-1], 2))
    m = [dlfr.factors_from_thresholds([x], theta)[0] for x in c]
    assert m[0] == 4 and all(a >= b for a, b in itertools.pairwise(m)), (m, theta)


def test_budget_meets_the_target_and_keeps_frames_where_the_content_is_complex():
    rng = np.random.default_rng()
    for target in (4, 6, 8, 12, 16, float(rng.uniform(4, 16))):
        c = rng.uniform(0, 1, 8)
        factors = dlfr.factors_for_budget(c, target)
        rates = dlfr.ChunkRates(factors)
        assert rates.compression >= target - 1e-9, (target, factors)
        order = np.argsort(c)
        assert all(factors[a] >= factors[b] for a, b in itertools.pairwise(order)), (c, factors)
    assert dlfr.factors_for_budget(c, 4) == (1,) * 8 and dlfr.factors_for_budget(c, 16) == (4,) * 8


def test_variable_rate_latent_is_a_pytree():
    latent = dlfr.VariableRateLatent(jnp.ones((1, 4, 2, 2, 4)), dlfr.ChunkRates((2, 4)))
    leaves, tree = jax.tree_util.tree_flatten(latent)
    assert len(leaves) == 1 and jax.tree_util.tree_unflatten(tree, leaves).rates.factors == (2, 4)
    doubled = jax.jit(lambda x: jax.tree_util.tree_map(lambda a: 2 * a, x))(latent)
    assert doubled.rates == latent.rates and doubled.path == "feature"


def test_bad_input_is_refused(three):
    c = [0.1, 0.2]
    with pytest.raises(ValueError, match="thresholds=.*each in \\[0, 1\\]"):
        dlfr.factors_from_thresholds(c, [0.1, 1.5])
    with pytest.raises(ValueError, match="thresholds=.*increasing"):
        dlfr.factors_from_thresholds(c, [0.3, 0.1])
    with pytest.raises(ValueError, match="target_compression=20 must be in \\[4, 16\\]"):
        dlfr.factors_for_budget(c, 20)
    with pytest.raises(ValueError, match="target_compression=3 must be in"):
        dlfr.factors_for_budget(c, 3)
    videos = _clip(33, size=16)
    with pytest.raises(ValueError, match="shorter than the first frame plus one chunk"):
        dlfr.chunk_complexity(videos[:, :9])
    with pytest.raises(ValueError, match="1 \\+ 16k: drop the last 4 frames"):
        dlfr.chunk_complexity(jnp.concatenate([videos, videos[:, :4]], axis=1))
    with pytest.raises(ValueError, match="chunk=8 must be a positive multiple of"):
        dlfr.chunk_complexity(videos, 8)
    with pytest.raises(ValueError, match="exactly one of target_compression"):
        dlfr.schedule(videos)
    with pytest.raises(ValueError, match="need 1 \\+ 16 x 2 = 33 frames; got 37"):
        three.encode(_clip(37), frame_rates=(1, 2))
    with pytest.raises(ValueError, match="rate_depth=1 must be one of \\[0\\]"):
        three.encode(_clip(33), frame_rates=(1, 2), rate_depth=1)
    with pytest.raises(ValueError, match="frame_rates and chunk_frames cannot be combined"):
        three.encode(_clip(33), chunk_frames=8, frame_rates=(1, 2))
    with pytest.raises(ValueError, match="need 1 \\+ Σ rate_chunk / \\(4 m_i\\) = 7"):
        three.decode(jnp.zeros((1, 9, 2, 2, 4)), frame_rates=(1, 2))
    with pytest.raises(ValueError, match="rate_chunk=8 must be a positive multiple of 4 x every frame rate factor"):
        three.decode(jnp.zeros((1, 9, 2, 2, 4)), frame_rates=(4, 1), rate_chunk=8)
