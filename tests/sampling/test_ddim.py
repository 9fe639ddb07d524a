"""DDIM v-prediction sampling with CogVideoX's schedule against diffusers' ``CogVideoXDDIMScheduler``: the schedule
(cumulative alphas, timesteps for each spacing) and whole guided sampling loops of a toy model, as the CogVideoX
pipeline runs them (constant and dynamic guidance)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.sampling.ddim import DDIMSchedule, ddim_v, dynamic_guidance, sample_ddim

torch = pytest.importorskip("torch")
scheduling = pytest.importorskip("diffusers.schedulers.scheduling_ddim_cogvideox")


def _diffusers(schedule: DDIMSchedule):
    return scheduling.CogVideoXDDIMScheduler(
        num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
        beta_schedule="scaled_linear", snr_shift_scale=schedule.snr_shift_scale, prediction_type="v_prediction",
        rescale_betas_zero_snr=schedule.rescale_zero_terminal_snr, timestep_spacing=schedule.spacing,
        steps_offset=schedule.steps_offset, clip_sample=False, set_alpha_to_one=True)


@pytest.mark.parametrize("snr_shift_scale,rescale", [(3.0, True), (1.0, True), (2.0, False)])
def test_alphas_cumprod_match_diffusers(snr_shift_scale, rescale):
    schedule = DDIMSchedule(snr_shift_scale=snr_shift_scale, rescale_zero_terminal_snr=rescale)
    expected = _diffusers(schedule).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(schedule.alphas_cumprod(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_timesteps_match_diffusers(spacing, steps):
    schedule = DDIMSchedule(spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    reference = _diffusers(schedule)
    reference.set_timesteps(steps)
    np.testing.assert_array_equal(schedule.timesteps(steps), reference.timesteps.numpy())


def _toy_model(weights: np.ndarray):
    """``v = tanh(x W) (1 + t / 1000) + cond`` over the channel axis: the same maths in JAX and torch."""
    def jax_model(x, t, cond):
        scale = (1.0 + t / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.tanh(x @ jnp.asarray(weights, x.dtype)) * scale + cond["bias"][:, None, None, None, :]

    def torch_model(x, t, bias):
        scale = (1.0 + t / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
        return torch.tanh(x @ torch.from_numpy(weights)) * scale + bias[:, None, None, None, :]

    return jax_model, torch_model


@pytest.mark.parametrize("dynamic", [False, True])
def test_guided_sampling_matches_the_cogvideox_pipeline_loop(dynamic):
    rng = np.random.default_rng(0)
    schedule, steps, guidance = DDIMSchedule(), 12, 6.0
    channels = 4
    weights = rng.normal(0, 0.5, (channels, channels))
    jax_model, torch_model = _toy_model(weights)
    noise = rng.normal(size=(2, 3, 4, 5, channels))
    cond_bias, uncond_bias = rng.normal(size=(2, channels)), rng.normal(size=(2, channels))

    reference = _diffusers(schedule)
    reference.set_timesteps(steps)
    latents = torch.from_numpy(noise)
    for t in reference.timesteps:
        both = torch.cat([latents, latents])
        v = torch_model(both, t.double().expand(4), torch.from_numpy(np.concatenate([uncond_bias, cond_bias])))
        v_uncond, v_cond = v.chunk(2)
        scale = guidance
        if dynamic:
            scale = 1 + guidance * ((1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2)
        latents = reference.step(v_uncond + scale * (v_cond - v_uncond), t, latents, return_dict=False)[0]
    expected = latents.numpy()

    coefficients = schedule.coefficients(steps)
    scales = dynamic_guidance(guidance, coefficients[0], steps) if dynamic else np.full(steps, guidance)
    got = ddim_v(jax_model, jnp.asarray(noise, jnp.float32), coefficients, {"bias": jnp.asarray(cond_bias, jnp.float32)},
                 uncond={"bias": jnp.asarray(uncond_bias, jnp.float32)}, guidance=scales)
    error = np.max(np.abs(np.asarray(got, np.float64) - expected)) / np.max(np.abs(expected))
    assert error < 1e-5, error


def test_sample_ddim_draws_its_noise_from_the_key_and_returns_video_latents():
    weights = np.random.default_rng(1).normal(0, 0.5, (4, 4))
    jax_model, _ = _toy_model(weights)
    shape = (2, 3, 4, 4, 4)
    cond = {"bias": jnp.asarray(np.random.default_rng(2).normal(size=(2, 4)), jnp.float32)}
    out = sample_ddim(jax_model, cond, key=jax.random.key(3), shape=shape, steps=5)
    assert out.shape == shape and out.dtype == jnp.float32
    noise = jax.random.normal(jax.random.key(3), shape, jnp.float32)
    direct = ddim_v(jax_model, noise, DDIMSchedule().coefficients(5), cond)
    np.testing.assert_allclose(np.asarray(out), np.asarray(direct), rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="steps"):
        DDIMSchedule().timesteps(0)
    with pytest.raises(ValueError, match="snr_shift_scale"):
        DDIMSchedule(snr_shift_scale=-1.0)
    with pytest.raises(ValueError, match="dynamic"):
        sample_ddim(lambda x, t, c: x, {"c": jnp.zeros((1, 2))}, key=jax.random.key(0), shape=(1, 2, 2, 2, 2), steps=2,
                    dynamic=True)
    with pytest.raises(ValueError, match="shape"):
        sample_ddim(lambda x, t, c: x, {"c": jnp.zeros((1, 2))}, key=jax.random.key(0), shape=(1, 2), steps=2)
