"""The text-to-image pipeline: tiny random text encoder + SD3 transformer + VAE, sampling, save / load, bad input."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jquant.data import load_tokenizer
from jquant.models import llama, sd3, vae
from jquant.models.text_encoder import TextEncoder
from jquant.media import image_grid, to_uint8
from jquant.text_to_image import SamplingDefaults, TextToImage, load_pipeline, save_pipeline

HIDDEN = 16


@pytest.fixture(scope="module")
def pipe() -> TextToImage:
    tokenizer = load_tokenizer()
    lm = llama.init_model(llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32,
                                            num_layers=1, num_heads=2, num_kv_heads=1), jax.random.key(0))
    vae_cfg = vae.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            sample_size=16, scaling_factor=1.5, shift_factor=0.1, use_quant_conv=False,
                            use_post_quant_conv=False)
    dit_cfg = sd3.SD3Config(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                            num_attention_heads=2, joint_attention_dim=HIDDEN, caption_projection_dim=16,
                            pooled_projection_dim=HIDDEN, pos_embed_max_size=4)
    return TextToImage(text_encoder=TextEncoder(lm, tokenizer), transformer=sd3.init_model(dit_cfg, jax.random.key(1)),
                       vae=vae.init_model(vae_cfg, jax.random.key(2)),
                       defaults=SamplingDefaults(steps=3, guidance=2.0, max_length=12), text_encoder_name="tiny-lm")


def test_generate_is_the_guided_euler_flow_decoded(pipe):
    prompts = ["a red apple", "a dog face on a blue background"]
    images = np.asarray(pipe.generate(prompts, seed=0))
    assert images.shape == (2, 16, 16, 3) and images.min() >= -1 and images.max() <= 1
    np.testing.assert_array_equal(np.asarray(pipe.generate(prompts, seed=0)), images)
    assert not np.array_equal(np.asarray(pipe.generate(prompts, seed=1)), images)
    # the same flow written out step by step: sigmas 1, 2/3, 1/3, 0 (shift 1), v = v_u + g (v_c - v_u)
    cond, uncond = pipe.encode(prompts)
    z = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 4)), np.float64)
    sigmas = np.array([1.0, 2 / 3, 1 / 3, 0.0])
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sig = np.full(2, s, np.float32)
        v_c = np.asarray(pipe.transformer.flow_velocity(z.astype(np.float32), sig, *cond))
        v_u = np.asarray(pipe.transformer.flow_velocity(z.astype(np.float32), sig, *uncond))
        z = z + (s_next - s) * (v_u + 2.0 * (v_c - v_u))
    manual = np.clip(np.asarray(pipe.vae.decode_latents(z.astype(np.float32))), -1, 1)
    np.testing.assert_allclose(images, manual, atol=2e-4)
    unguided = np.asarray(pipe.generate(prompts, seed=0, guidance=None))
    assert not np.allclose(unguided, images)


def test_pipeline_folder_round_trip(pipe, tmp_path):
    folder = save_pipeline(pipe, tmp_path / "pipe")
    # a text encoder that is not a bundled model is written into the folder
    assert {p.name for p in folder.iterdir()} >= {"pipeline.json", "transformer", "vae", "text_encoder"}
    loaded = load_pipeline(folder)
    assert loaded.defaults == pipe.defaults and loaded.vae.config == pipe.vae.config
    np.testing.assert_array_equal(np.asarray(loaded.generate(["grapes"], seed=3)),
                                  np.asarray(pipe.generate(["grapes"], seed=3)))


def test_grid_and_uint8():
    images = np.random.default_rng(0).uniform(-1, 1, (5, 4, 4, 3)).astype(np.float32)
    u8 = to_uint8(images)
    assert u8.dtype == np.uint8 and np.abs(u8 / 127.5 - 1 - images).max() <= 0.5 / 127.5 + 1e-6
    grid = image_grid(u8, columns=3, scale=2)
    assert grid.shape == (2 * 4 * 2, 3 * 4 * 2, 3)
    np.testing.assert_array_equal(grid[8:16, 8:16], u8[4].repeat(2, 0).repeat(2, 1))
    assert (grid[8:16, 16:] == 255).all()  # the empty cell


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[], seed=0), "non-empty list"), (dict(prompts=["a"], seed=0, steps=0), "steps"),
    (dict(prompts=["a"], seed=0, guidance=float("nan")), "guidance"), (dict(prompts=[""], seed=0), "empty"),
    (dict(prompts=["a"]), "exactly one of seed"), (dict(prompts=["word " * 40], seed=0), "max_length"),
])
def test_bad_generation_arguments_are_refused(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.generate(**kwargs)


def test_load_refuses_a_folder_without_a_pipeline(tmp_path):
    with pytest.raises(ValueError, match="no pipeline.json"):
        load_pipeline(tmp_path)


def test_trajectory_calibration_records_every_velocity_call(pipe):
    """The recorded inputs, fed back step by step, reproduce the sampler's own latents; shapes follow the contract."""
    prompts = ["a red apple", "grapes", "a carrot"]
    calib = pipe.trajectory_calibration(prompts, seed=4, steps=3)
    n = 3 * len(prompts) * 2
    assert calib["latents"].shape == (n, 8, 8, 4) and calib["sigmas"].shape == (n,)
    assert calib["text"].shape[0] == calib["pooled"].shape[0] == n
    pipe.transformer.check_calibration(calib)
    np.testing.assert_allclose(np.unique(calib["sigmas"]), [1 / 3, 2 / 3, 1.0], rtol=1e-6)
    # the last step's conditional latents, moved by that step's guided velocity, are the sampler's result
    last = calib["latents"][-6:-3], calib["latents"][-3:]
    np.testing.assert_array_equal(last[0], last[1])  # cond and uncond halves see the same latents
    v = np.asarray(pipe.transformer.flow_velocity(calib["latents"][-6:], calib["sigmas"][-6:], calib["text"][-6:],
                                                  calib["pooled"][-6:]))
    z0 = last[0] + (0 - 1 / 3) * (v[3:] + 2.0 * (v[:3] - v[3:]))
    np.testing.assert_allclose(z0, np.asarray(pipe.generate_latents(prompts, seed=4, steps=3)), atol=2e-5)
