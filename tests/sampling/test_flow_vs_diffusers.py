"""Flow-matching schedules and Euler steps against diffusers' FlowMatchEulerDiscreteScheduler (SD3 and Flux).

The same random nonlinear velocity field is written in jnp and in torch; the diffusers loop is the SD3 / Flux
pipelines' (timesteps = 1000 sigma, the batch [uncond; cond], ``scheduler.step``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from jquant.sampling import flow_sigmas, flux_mu, sample, sd3_last_sigma

C = 4


def _fields(seed: int):
    """jnp and torch versions of v(x, t, c) = tanh(x W + t b + c U) over latents [B, H, W, C], c [B, C]."""
    rng = np.random.default_rng(seed)
    w, b, u = rng.normal(size=(C, C)) / 2, rng.normal(size=C), rng.normal(size=(C, C))
    w32, b32, u32 = (np.float32(a) for a in (w, b, u))

    def v_jax(x, t, c):
        return jnp.tanh(x @ w32 + t[:, None, None, None] * b32 + (c @ u32)[:, None, None, :])

    tw, tb, tu = (torch.from_numpy(a) for a in (w32, b32, u32))

    def v_torch(x, t, c):
        return torch.tanh(x @ tw + t[:, None, None, None] * tb + (c @ tu)[:, None, None, :])

    return v_jax, v_torch


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sd3_schedule_matches_diffusers(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    ours = flow_sigmas(steps, shift=3.0, last=sd3_last_sigma(3.0))
    np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(1000 * ours[:-1], scheduler.timesteps.numpy(), rtol=1e-6)


@pytest.mark.parametrize("steps,tokens", [(1, 256), (6, 1024), (20, 4096)])
def test_flux_dynamic_schedule_matches_diffusers(steps, tokens):
    mu = flux_mu(tokens)
    assert mu == pytest.approx(calculate_shift(tokens), rel=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # what FluxPipeline passes
    ours = flow_sigmas(steps, mu=mu)
    np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(1000 * ours[:-1], scheduler.timesteps.numpy(), rtol=1e-6)


def test_sd3_guided_sampling_matches_diffusers_steps():
    v_jax, v_torch = _fields(0)
    steps, guidance, shape = 5, 3.5, (2, 6, 5, C)
    key = jax.random.key(np.random.default_rng().integers(2**31))
    cond = {"text": jnp.asarray(np.random.default_rng(1).normal(size=(2, C)), jnp.float32)}
    uncond = {"text": jnp.asarray(np.random.default_rng(2).normal(size=(2, C)), jnp.float32)}
    ours = sample(lambda x, t, c: v_jax(x, t, c["text"]), cond, key=key, shape=shape, steps=steps,
                  guidance=guidance, uncond=uncond, shift=3.0, last=sd3_last_sigma(3.0))

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(np.array(jax.random.normal(key, shape, jnp.float32)))
    text = torch.from_numpy(np.concatenate([np.asarray(uncond["text"]), np.asarray(cond["text"])]))
    for t in scheduler.timesteps:
        both = torch.cat([latents, latents])
        v_u, v_c = v_torch(both, t.expand(both.shape[0]) / 1000, text).chunk(2)
        latents = scheduler.step(v_u + guidance * (v_c - v_u), t, latents).prev_sample
    np.testing.assert_allclose(np.asarray(ours), latents.numpy(), rtol=1e-5, atol=1e-5)


def test_flux_unguided_sampling_matches_diffusers_steps():
    v_jax, v_torch = _fields(1)
    steps, shape = 6, (3, 4, 4, C)
    mu = flux_mu(shape[1] * shape[2] // 4)
    key = jax.random.key(np.random.default_rng().integers(2**31))
    text = np.random.default_rng(3).normal(size=(3, C)).astype(np.float32)
    ours = sample(v_jax, jnp.asarray(text), key=key, shape=shape, steps=steps, mu=mu)

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    latents = torch.from_numpy(np.array(jax.random.normal(key, shape, jnp.float32)))
    for t in scheduler.timesteps:
        v = v_torch(latents, t.expand(shape[0]) / 1000, torch.from_numpy(text))
        latents = scheduler.step(v, t, latents).prev_sample
    np.testing.assert_allclose(np.asarray(ours), latents.numpy(), rtol=1e-5, atol=1e-5)
