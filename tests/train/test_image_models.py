"""The image / video reference-model trainers on tiny random models: latent scaling, reconstruction PSNR of clips,
and text-conditioned flow-matching training of a video transformer (its loss falls; a resumed run is identical)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.models import hunyuan_video, hunyuan_video_vae, vae
from jquant.sampling.training import flow_matching_loss
from jquant.train import image_models as im
from jquant.train.loop import LoopConfig

VIDEO_VAE = hunyuan_video_vae.HunyuanVideoVAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1,
                                                    latent_channels=4, norm_num_groups=4, spatial_compression_ratio=4)


def test_latent_scaling_gives_unit_variance_with_and_without_a_shift():
    rng = np.random.default_rng()
    clips = rng.uniform(-1, 1, (6, 5, 8, 8, 3)).astype(np.float32)
    video = im.with_latent_scaling(hunyuan_video_vae.init_model(VIDEO_VAE, jax.random.key(0)), clips, batch_size=4)
    z = np.asarray(video.latents(jnp.asarray(clips)), np.float64)  # z * scaling_factor, no shift in this family
    assert z.std() == pytest.approx(1.0, rel=1e-4) and not hasattr(video.config, "shift_factor")

    images = rng.uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32)
    cfg = vae.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    image = im.with_latent_scaling(vae.init_model(cfg, jax.random.key(1)), images, batch_size=4)
    z = np.asarray(image.latents(jnp.asarray(images)), np.float64)  # (z - shift) * scale
    assert z.std() == pytest.approx(1.0, rel=1e-4) and abs(z.mean()) < 1e-4


def test_reconstruction_psnr_of_clips_is_the_mean_over_frames():
    clips = np.random.default_rng().uniform(-1, 1, (3, 5, 8, 8, 3)).astype(np.float32)
    model = hunyuan_video_vae.init_model(VIDEO_VAE, jax.random.key(2))
    recon = np.clip(np.asarray(model(jnp.asarray(clips)), np.float64), -1, 1)
    mse = np.mean((recon - clips) ** 2, axis=(2, 3, 4))
    want = np.mean(10 * np.log10(4.0 / mse))
    assert im.reconstruction_psnr(model, clips, batch_size=2) == pytest.approx(want, rel=1e-4)


def _video_data(rng: np.random.Generator) -> im.TextConditionedData:
    """Latents of two "captions" that differ in sign, with text states, masks and pooled vectors per caption."""
    base = rng.normal(size=(1, 2, 4, 4, 4)).astype(np.float32)
    index = rng.integers(0, 2, 64).astype(np.int32)
    latents = np.where(index[:, None, None, None, None] == 0, base, -base) + 0.05 * rng.normal(size=(64, 2, 4, 4, 4))
    states = rng.normal(size=(2, 6, 16)).astype(np.float32)
    mask = np.array([[True] * 4 + [False] * 2, [True] * 6])
    return im.TextConditionedData(latents=latents.astype(np.float32), caption_index=index,
                                  cond={"text": states, "text_mask": mask, "pooled": states.mean(1)},
                                  uncond={"text": np.zeros((6, 16), np.float32), "text_mask": np.eye(1, 6, dtype=bool)[0],
                                          "pooled": np.zeros(16, np.float32)})


def test_text_conditioned_training_of_a_video_transformer_lowers_its_loss_and_resumes_exactly(tmp_path, monkeypatch):
    data = _video_data(np.random.default_rng(0))
    cfg = hunyuan_video.HunyuanVideoConfig(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=16,
                                           pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))

    def velocity(m, z, s, text, mask, pooled):
        return m.flow_velocity(z, s, text, mask, pooled)

    held = {k: jnp.asarray(v[data.caption_index[:16]]) for k, v in data.cond.items()}

    @nnx.jit  # one compiled program instead of every op compiled on its own (most of this test's cold-cache time)
    def validation(m) -> jax.Array:
        cond = (held["text"], held["text_mask"], held["pooled"])
        return flow_matching_loss(lambda z, s, c: velocity(m, z, s, *c), jnp.asarray(data.latents[:16]), cond,
                                  jax.random.key(5))

    loop = LoopConfig(steps=24, warmup_steps=3, peak_lr=3e-3, weight_decay=0.0, checkpoint_every=12, eval_every=12)
    model = hunyuan_video.init_model(cfg, jax.random.key(3))
    before = validation(model)
    result = im.train_text_to_image(model, data, velocity, loop, tmp_path / "run", batch_size=8, validation=validation,
                                    progress=False)
    assert result.final_val_loss < 0.8 * before

    # Interrupted at step 15 (after the checkpoint of step 12) and run again: the uninterrupted run's weights.
    def interrupting(n, batch_size, seed, step):
        if step == 15:
            raise KeyboardInterrupt("simulated interruption")
        return original(n, batch_size, seed, step)

    original = im.batch_rows
    monkeypatch.setattr(im, "batch_rows", interrupting)
    with pytest.raises(KeyboardInterrupt):
        im.train_text_to_image(hunyuan_video.init_model(cfg, jax.random.key(3)), data, velocity, loop,
                               tmp_path / "resumed", batch_size=8, validation=validation, progress=False)
    monkeypatch.setattr(im, "batch_rows", original)
    resumed = hunyuan_video.init_model(cfg, jax.random.key(4))  # other weights: all must come from the checkpoint
    im.train_text_to_image(resumed, data, velocity, loop, tmp_path / "resumed", batch_size=8, validation=validation,
                           progress=False)
    for a, b in zip(jax.tree.leaves(nnx_state(model)), jax.tree.leaves(nnx_state(resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def nnx_state(model):
    return nnx.state(model, nnx.Param)


def test_conditioning_arrays_must_match():
    with pytest.raises(ValueError, match="same arrays"):
        im.TextConditionedData(latents=np.zeros((2, 4)), caption_index=np.zeros(2, np.int32),
                               cond={"text": np.zeros((1, 3))}, uncond={"pooled": np.zeros(3)})
    with pytest.raises(ValueError, match="differ"):
        im.TextConditionedData(latents=np.zeros((2, 4)), caption_index=np.zeros(2, np.int32),
                               cond={"text": np.zeros((1, 3))}, uncond={"text": np.zeros(4)})
