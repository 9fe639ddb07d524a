"""Sampling of generative image and video models as pure functions: rectified-flow Euler and DDIM
v-prediction (CogVideoX), both with classifier-free guidance.

``sample(velocity, cond, key=, shape=, steps=, guidance=, uncond=, shift= | mu=)`` generates latents;
``euler_flow`` is its traceable core (``euler_flow_with_state`` threads a per-step plan and a cache); ``flow_sigmas`` / ``shift_sigmas`` / ``flux_mu`` the SD3 and Flux
schedules; ``flow_matching_loss`` the matching training objective. ``sample_ddim`` / ``ddim_v`` with a
``DDIMSchedule`` run CogVideoX's DDIM (``dynamic_guidance``: its growing guidance scale).
"""

from jquant.sampling.ddim import DDIMSchedule, ddim_v, dynamic_guidance, sample_ddim
from jquant.sampling.flow import StatefulVelocity, Velocity, euler_flow, euler_flow_with_state, guided_velocity, sample
from jquant.sampling.schedule import flow_sigmas, flux_mu, sd3_last_sigma, shift_sigmas
from jquant.sampling.training import TIMESTEP_SAMPLINGS, flow_matching_loss, sample_timesteps

__all__ = [
    "DDIMSchedule", "ddim_v", "dynamic_guidance", "sample_ddim",
    "TIMESTEP_SAMPLINGS", "StatefulVelocity", "Velocity", "euler_flow", "euler_flow_with_state", "guided_velocity", "flow_matching_loss", "flow_sigmas", "flux_mu", "sample",
    "sample_timesteps", "sd3_last_sigma", "shift_sigmas",
]
