"""VGDFR's two-phase sampler on a tiny random HunyuanVideo-style pipeline (spec ``vgdfr.md`` §5 invariants 1, 2, 7
and the sampler itself): disabled / empty plans reproduce ``TextToVideo.generate`` bit for bit, the clean-latent
estimate and the second phase against a plain Euler loop written here, re-noising, bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.frame_rate.merge import compress_latents
from jquant.frame_rate.schedule import MergePlan
from jquant.frame_rate.vgdfr import FrameRateConfig, clean_estimate, least_keep_ratio, sample_dynamic_frame_rate
from jquant.models import hunyuan_video, hunyuan_video_vae
from jquant.models.text_encoder import TextEncoder
from jquant.sampling.schedule import flow_sigmas
from jquant.text_to_video import TextToVideo, VideoSamplingDefaults, VideoVelocity

DIT = hunyuan_video.HunyuanVideoConfig(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32,
                                       num_layers=2, num_single_layers=2, num_refiner_layers=1, text_embed_dim=192,
                                       pooled_projection_dim=192, rope_axes_dim=(8, 12, 12))
VAE = hunyuan_video_vae.HunyuanVideoVAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                                              norm_num_groups=4, spatial_compression_ratio=4, scaling_factor=0.7)
DEFAULTS = VideoSamplingDefaults(steps=4, guidance=3.0, shift=2.0, max_length=16, frames=25, size=16)
PROMPTS = ["a red apple drifts left", "a rocket flies up"]


@pytest.fixture(scope="module")
def pipe() -> TextToVideo:
    return TextToVideo(text_encoder=TextEncoder.load("jq-llama-tiny"),
                       transformer=hunyuan_video.init_model(DIT, jax.random.key(0)),
                       vae=hunyuan_video_vae.init_model(VAE, jax.random.key(1)), defaults=DEFAULTS)


def test_disabled_and_empty_plans_are_the_pipeline_bit_for_bit(pipe):
    baseline = np.asarray(pipe.generate(PROMPTS, seed=5))
    for config in (FrameRateConfig(threshold=1.0, compress_after=1), FrameRateConfig(threshold=1.0, compress_after=3),
                   FrameRateConfig(keep_ratio=1.0, compress_after=2),
                   FrameRateConfig(keep_ratio=0.6, compress_after=2, enabled=False)):
        out = sample_dynamic_frame_rate(pipe, PROMPTS, config, seed=5)
        assert all(p.empty for p in out.plans)
        np.testing.assert_array_equal(np.asarray(out.videos), baseline)
        np.testing.assert_array_equal(out.token_fraction, 1.0)
    found_empty = sample_dynamic_frame_rate(pipe, PROMPTS, FrameRateConfig(keep_ratio=0.7, compress_after=2), seed=5,
                                            planner=lambda frames, i: MergePlan(25, 4))
    np.testing.assert_allclose(np.asarray(found_empty.videos), baseline, rtol=1e-5, atol=1e-5)


@nnx.jit
def _flow(transformer, x, s, cond, positions):
    """One velocity call (jitted: the loops below are plain Python; DyRoPE with block 2 global when positions)."""
    if positions is None:
        return transformer.flow_velocity(x, s, *cond)
    return transformer.flow_velocity(x, s, *cond, global_frame_positions=positions, global_blocks=(2,))


def _guided(pipe, cond, uncond, x, sigma, positions=None):
    s = jnp.full((x.shape[0],), sigma, jnp.float32)
    v_c, v_u = (_flow(pipe.transformer, x, s, c, positions) for c in (cond, uncond))
    return v_u + DEFAULTS.guidance * (v_c - v_u)


_decode = nnx.jit(lambda vae, z: vae.decode_latents(z))
_encode = nnx.jit(lambda vae, frames: vae.latents(frames))


@pytest.mark.parametrize("m", [1, 2])
def test_clean_estimate_is_x_k_minus_sigma_k_v(pipe, m):
    """x̂₀ = x_K - σ_K v_{K-1} (M = 1) or M Euler steps of σ_K / M, by hand."""
    cond, uncond = pipe.encode(PROMPTS)
    sigmas = flow_sigmas(6, shift=DEFAULTS.shift).astype(np.float32)
    x = jax.random.normal(jax.random.key(0), (2, *pipe.latent_shape()), jnp.float32)
    k = 2
    for i in range(k):
        v = _guided(pipe, cond, uncond, x, sigmas[i])
        x_prev, x = x, x + (sigmas[i + 1] - sigmas[i]) * v
    want = x - sigmas[k] / m * v
    if m == 2:
        want = want - sigmas[k] / m * _guided(pipe, cond, uncond, want, sigmas[round(k + (6 - k) / 2)])
    got = clean_estimate(VideoVelocity(pipe.transformer), x_prev, x, sigmas, k, cond, uncond, jnp.float32(3.0), m)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-3)


def test_renoise_identity_with_the_compression_path_on_and_nothing_merged(pipe):
    """z' at the kept indices = σ_K ε₀ + (1 - σ_K) Enc(Dec(x̂₀)) when the plan merges nothing (spec invariant 7)."""
    x0 = jax.random.normal(jax.random.key(2), (1, *pipe.latent_shape()), jnp.float32)
    noise = jax.random.normal(jax.random.key(3), x0.shape, jnp.float32)
    frames = jnp.clip(_decode(pipe.vae, x0), -1, 1)
    got = nnx.jit(compress_latents, static_argnames="plan")(frames, noise, 0.6, MergePlan(25, 4), pipe.vae)
    want = 0.6 * noise + 0.4 * _encode(pipe.vae, frames)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_merging_sampler_against_a_plain_loop(pipe):
    """A forced plan (one 2x4 merge in clip 0, none in clip 1): clip 0 is K full steps, the compression module, the
    remaining steps on 5 of 7 latent frames with DyRoPE (single block 2 global), decode and linear interpolation;
    clip 1 the plain flow (up to batching round-off)."""
    from jquant.frame_rate.interpolate import linear_interpolate

    plan = MergePlan(25, 4, ((9, 2),))
    config = FrameRateConfig(threshold=0.5, compress_after=2, global_blocks=(2,))
    out = sample_dynamic_frame_rate(pipe, PROMPTS, config, seed=1,
                                    planner=lambda f, i: plan if i == 0 else MergePlan(25, 4))
    assert out.plans == (plan, MergePlan(25, 4)) and out.videos.shape == (2, 25, 16, 16, 3)
    np.testing.assert_allclose(out.token_fraction, [(2 * 7 + 2 * 6) / (4 * 7), 1.0])
    cond, uncond = pipe.encode(PROMPTS)
    sigmas = flow_sigmas(4, shift=DEFAULTS.shift).astype(np.float32)
    noise = jax.random.normal(jax.random.key(1), (2, *pipe.latent_shape()), jnp.float32)
    x = noise
    for i in range(2):
        v = _guided(pipe, cond, uncond, x, sigmas[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    x0 = x - sigmas[2] * v
    frames = jnp.clip(_decode(pipe.vae, x0[:1]), -1, 1)
    groups = [frames[:, list(g)].mean(axis=1) for g in plan.groups]
    z = sigmas[2] * noise[:1, [0, 1, 2, 3, 5, 6]] + (1 - sigmas[2]) * _encode(pipe.vae, jnp.stack(groups, axis=1))
    one = [tuple(a[:1] for a in c) for c in (cond, uncond)]
    positions = jnp.asarray([0.0, 1.0, 2.0, 3.0, 5.0, 6.0])  # frames 13-16 (latent 4) merged into 9-12
    for i in range(2, 4):
        z = z + (sigmas[i + 1] - sigmas[i]) * _guided(pipe, *one, z, sigmas[i], positions)
    want = linear_interpolate(jnp.clip(_decode(pipe.vae, z), -1, 1), plan)
    np.testing.assert_allclose(np.asarray(out.videos[0]), np.asarray(want[0]), rtol=1e-3, atol=1e-3)
    plain = np.asarray(pipe.generate(PROMPTS, seed=1))
    np.testing.assert_allclose(np.asarray(out.videos[1]), plain[1], rtol=1e-3, atol=1e-3)
    assert np.abs(np.asarray(out.videos[0]) - plain[0]).max() > 1e-3


def test_the_ssim_scheduler_runs_and_static_clips_merge_maximally(pipe):
    """A keep ratio plans every clip from its decoded x̂₀ and shortens what it plans; a clip of identical frames
    (SSIM 1 everywhere) merges as far as any plan can."""
    from jquant.frame_rate.vgdfr import plan_clip

    out = sample_dynamic_frame_rate(pipe, PROMPTS, FrameRateConfig(keep_ratio=0.7, compress_after=1), seed=0)
    assert out.videos.shape == (2, 25, 16, 16, 3) and np.isfinite(np.asarray(out.videos)).all()
    for plan, fraction in zip(out.plans, out.token_fraction):
        assert plan.keep_ratio >= 0.7 or plan.keep_ratio == pytest.approx(least_keep_ratio(25))
        assert fraction == pytest.approx((7 + 3 * len(plan.kept_latents)) / 28)
    still = jnp.broadcast_to(jax.random.uniform(jax.random.key(4), (1, 1, 16, 16, 3)), (1, 25, 16, 16, 3))
    plan = plan_clip(still, FrameRateConfig(keep_ratio=0.3), 4)
    assert plan.keep_ratio == least_keep_ratio(25) and plan.merges == ((1, 4),)


@pytest.mark.parametrize("change,match", [
    (dict(threshold=1.5), "threshold must be in \\[0, 1\\]"),
    (dict(keep_ratio=0.2), "keep_ratio=0.2 leaves fewer frames"),
    (dict(frames=9), "frames=9 is too short"),
    (dict(compress_after=4), "compress_after=4 must be below"),
    (dict(keep_ratio=0.7, threshold=0.5), "exactly one of keep_ratio"),
])
def test_bad_input_is_refused_before_sampling(pipe, change, match):
    frames = change.pop("frames", None)
    options = {"keep_ratio": 0.7} if not {"threshold", "keep_ratio"} & set(change) else {}
    with pytest.raises(ValueError, match=match):
        config = FrameRateConfig(**{**options, **change})
        sample_dynamic_frame_rate(dataclasses.replace(pipe, transformer=None), PROMPTS, config, seed=0, frames=frames)
