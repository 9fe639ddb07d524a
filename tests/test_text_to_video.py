"""Text-to-video pipelines on tiny random HunyuanVideo-style parts with the bundled text encoder: generation against a
plain Euler loop written here, trajectory calibration feeding quantization, pipeline folders, bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.models import hunyuan_video, hunyuan_video_vae
from jquant.models.text_encoder import TextEncoder
from jquant.sampling.schedule import flow_sigmas
from jquant.text_to_image import load_pipeline, save_pipeline
from jquant.media import save_gif, video_frames_grid
from jquant.text_to_video import TextToVideo, VideoSamplingDefaults, text_arguments

DIT = hunyuan_video.HunyuanVideoConfig(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                       num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=192,
                                       pooled_projection_dim=192, rope_axes_dim=(4, 6, 6))
VAE = hunyuan_video_vae.HunyuanVideoVAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                                              norm_num_groups=4, spatial_compression_ratio=4, scaling_factor=0.7)
DEFAULTS = VideoSamplingDefaults(steps=3, guidance=3.0, shift=2.0, max_length=16, frames=5, size=16)


@pytest.fixture(scope="module")
def pipe() -> TextToVideo:
    return TextToVideo(text_encoder=TextEncoder.load("jq-llama-tiny"),
                       transformer=hunyuan_video.init_model(DIT, jax.random.key(0)),
                       vae=hunyuan_video_vae.init_model(VAE, jax.random.key(1)), defaults=DEFAULTS)


def _euler_by_hand(pipe: TextToVideo, prompts: list[str], seed: int) -> np.ndarray:
    """The guided Euler flow as a Python loop over the schedule, one conditional and one unconditional call a step."""
    enc = pipe.text_encoder.encode(prompts, DEFAULTS.max_length)
    unc = pipe.text_encoder.unconditional(len(prompts), DEFAULTS.max_length)
    z = jax.random.normal(jax.random.key(seed), (len(prompts), 2, 4, 4, 4), jnp.float32)
    sigmas = flow_sigmas(DEFAULTS.steps, shift=DEFAULTS.shift)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sig = jnp.full((len(prompts),), s, jnp.float32)
        v_c = pipe.transformer.flow_velocity(z, sig, enc.states, enc.mask, enc.pooled)
        v_u = pipe.transformer.flow_velocity(z, sig, unc.states, unc.mask, unc.pooled)
        z = z + (s_next - s) * (v_u + DEFAULTS.guidance * (v_c - v_u))
    return np.asarray(z)


def test_generation_is_the_guided_flow_then_the_vae(pipe):
    prompts = ["a red apple drifts left", "a rocket flies up"]
    latents = np.asarray(pipe.generate_latents(prompts, seed=3))
    np.testing.assert_allclose(latents, _euler_by_hand(pipe, prompts, 3), rtol=2e-4, atol=2e-4)
    videos = np.asarray(pipe.generate(prompts, seed=3))
    assert videos.shape == (2, 5, 16, 16, 3) and videos.min() >= -1 and videos.max() <= 1
    decoded = np.clip(np.asarray(pipe.vae.decode(jnp.asarray(latents) / VAE.scaling_factor)), -1, 1)
    np.testing.assert_allclose(videos, decoded, rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(pipe.generate(prompts, seed=4)), videos)


def test_trajectory_calibration_quantizes_the_transformer(pipe):
    from jquant.quantization import quantize

    prompts = ["a dog face", "a sun"]
    calib = pipe.trajectory_calibration(prompts, seed=0)
    assert set(calib) == {"latents", "sigmas", "text", "text_mask", "pooled"}
    n = DEFAULTS.steps * len(prompts) * 2
    assert calib["latents"].shape == (n, 2, 4, 4, 4) and calib["sigmas"].shape == (n,)
    noise = np.asarray(jax.random.normal(jax.random.key(0), (2, 2, 4, 4, 4), jnp.float32))
    np.testing.assert_array_equal(calib["latents"][:2], noise)  # the first call sees the initial noise
    np.testing.assert_allclose(calib["sigmas"][::4], flow_sigmas(DEFAULTS.steps, shift=DEFAULTS.shift)[:-1], rtol=1e-6)
    qmodel = quantize(pipe.transformer, "rtn-w8a8", calib, progress=False)
    sig = jnp.asarray(calib["sigmas"][:2])
    args = [jnp.asarray(calib[k][:2]) for k in ("latents", "text", "text_mask", "pooled")]
    ref = np.asarray(pipe.transformer.flow_velocity(args[0], sig, *args[1:]))
    got = np.asarray(qmodel.flow_velocity(args[0], sig, *args[1:]))
    assert np.linalg.norm(got - ref) < 0.05 * np.linalg.norm(ref)


def test_chunked_decoding_gives_the_same_clip(pipe):
    whole = np.asarray(pipe.generate(["a sun"], seed=2))
    chunked = np.asarray(pipe.generate(["a sun"], seed=2, decode_chunk_frames=1))
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)


def test_a_generation_over_the_memory_limit_is_refused_before_it_runs(pipe):
    import dataclasses

    tight = dataclasses.replace(pipe, defaults=dataclasses.replace(DEFAULTS, memory_limit_gb=1e-5))
    with pytest.raises(ValueError, match="memory_limit_gb=1e-05"):
        tight.generate(["a sun"], seed=0, frames=9)
    # the estimate is the largest traced array: here the transformer's attention scores or the decoder's activations
    from jquant.memory_estimate import largest_intermediate_bytes

    decode = largest_intermediate_bytes(pipe.vae.decode_latents, jax.ShapeDtypeStruct((1, 3, 4, 4, 4), jnp.float32))
    assert decode >= 1 * 9 * 16 * 16 * 8 * 4  # at least one full-resolution decoder activation of 8 channels


def test_pipeline_folder_round_trip(pipe, tmp_path):
    folder = save_pipeline(pipe, tmp_path / "video-pipe")
    assert json.loads((folder / "pipeline.json").read_text())["kind"] == "text-to-video"
    loaded = load_pipeline(folder)
    assert isinstance(loaded, TextToVideo) and loaded.defaults == DEFAULTS
    np.testing.assert_array_equal(np.asarray(loaded.generate(["a tree"], seed=1)),
                                  np.asarray(pipe.generate(["a tree"], seed=1)))


def test_gif_and_frame_grid(tmp_path):
    from PIL import Image

    clips = np.random.default_rng().integers(0, 256, (2, 3, 4, 5, 3), dtype=np.uint8)
    grid = video_frames_grid(clips)
    assert grid.shape == (8, 15, 3)
    np.testing.assert_array_equal(grid[4:8, 5:10], clips[1, 1])
    path = save_gif(clips, tmp_path / "clip.gif", columns=2)
    with Image.open(path) as gif:
        assert gif.n_frames == 3 and gif.size == (10, 4)
    with pytest.raises(ValueError, match="exists"):
        save_gif(clips, path)


def test_bad_input_is_refused(pipe):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        pipe.generate_latents(["a sun"], seed=0, frames=6)
    with pytest.raises(ValueError, match="non-empty list"):
        pipe.generate([], seed=0)
    with pytest.raises(ValueError, match="exactly one"):
        pipe.generate(["a sun"])
    with pytest.raises(TypeError, match="flow_velocity"):
        text_arguments(pipe.vae)
    with pytest.raises(ValueError, match="frames"):
        VideoSamplingDefaults(frames=0)


@pytest.mark.parametrize("family, config, frames, bad_frames", [
    ("hunyuan_video_vae", VAE, 9, 6),
    ("cogvideox_vae", dict(block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4),
     9, 5),
    ("wan_vae", dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latents_mean=(0.0,) * 4,
                     latents_std=(1.0,) * 4), 9, 7),
])
def test_every_video_vae_states_its_latent_shape(family, config, frames, bad_frames):
    from jquant.models.registry import family as family_named

    declared = family_named(family)
    cfg = config if isinstance(config, declared.config_class) else declared.config_class(**config)
    vae = declared.init_model(cfg, jax.random.key(0))
    clip = jnp.zeros((1, frames, 16, 24, 3), jnp.float32)
    assert vae.latent_shape(frames, 16, 24) == tuple(vae.encode(clip).mean.shape[1:])
    with pytest.raises(ValueError, match="frames"):
        vae.latent_shape(bad_frames, 16, 24)
