"""Sampling of generative image models as pure functions: rectified-flow Euler with classifier-free guidance.

``sample(velocity, cond, key=, shape=, steps=, guidance=, uncond=, shift= | mu=)`` generates latents;
``euler_flow`` is its traceable core (``euler_flow_with_state`` threads a per-step plan and a cache); ``flow_sigmas`` / ``shift_sigmas`` / ``flux_mu`` the SD3 and Flux
schedules; ``flow_matching_loss`` the matching training objective.
"""

from jquant.sampling.flow import StatefulVelocity, Velocity, euler_flow, euler_flow_with_state, guided_velocity, sample
from jquant.sampling.schedule import flow_sigmas, flux_mu, sd3_last_sigma, shift_sigmas
from jquant.sampling.training import TIMESTEP_SAMPLINGS, flow_matching_loss, sample_timesteps

__all__ = [
    "TIMESTEP_SAMPLINGS", "StatefulVelocity", "Velocity", "euler_flow", "euler_flow_with_state", "guided_velocity", "flow_matching_loss", "flow_sigmas", "flux_mu", "sample",
    "sample_timesteps", "sd3_last_sigma", "shift_sigmas",
]
