"""DDIM sampling of v-prediction diffusion models with CogVideoX's noise schedule, as a pure function.

CogVideoX (Yang et al. 2024) is a discrete-time diffusion model trained with v-prediction (Salimans & Ho 2022)
on a "scaled linear" beta schedule whose cumulative alphas get an SNR shift and are then rescaled to zero
terminal SNR (Lin et al. 2024, Algorithm 1). diffusers' ``CogVideoXDDIMScheduler`` computes (tested)::

    beta_i = (linspace(sqrt(beta_start), sqrt(beta_end), T)_i)^2,   abar_i = prod_{j <= i} (1 - beta_j)
    abar_i <- abar_i / (s + (1 - s) abar_i)                          (SNR shift, s = snr_shift_scale)
    sqrt(abar) <- (sqrt(abar) - sqrt(abar_{T-1})) sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_{T-1}))   (zero SNR)

and a deterministic DDIM step (eta = 0) from timestep ``t`` to ``t' = t - T / steps`` (``abar_{t'} = 1`` past
the end) on the model output ``v``::

    x0 = sqrt(abar_t) x - sqrt(1 - abar_t) v
    x' = a x + b x0,   a = sqrt((1 - abar_t') / (1 - abar_t)),   b = sqrt(abar_t') - sqrt(abar_t) a

The model is called with the integer timestep ``t`` (as float32) for every batch row: ``model(latents,
timesteps [B], cond) -> v`` of the latents' shape, any rank (``[B, F, H, W, C]`` for video). Classifier-free
guidance mixes ``v_u + g_i (v_c - v_u)`` with one scale per step; CogVideoX's pipeline can make it grow along
the steps (``dynamic_guidance``). Schedules are host-side float64 numpy; the loop is one ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.sampling.flow import Velocity, check_sample_inputs, guidance_batch, guided_velocity, split_module

Spacing = Literal["trailing", "leading", "linspace"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDIMSchedule:
    """A diffusion model's training noise schedule (``CogVideoXDDIMScheduler``'s config; its defaults are CogVideoX-2b's:
    ``snr_shift_scale=3.0``, CogVideoX-5b uses 1.0) and how inference steps are spaced over it."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift_scale: float = 3.0
    rescale_zero_terminal_snr: bool = True
    spacing: Spacing = "trailing"
    steps_offset: int = 0

    def __post_init__(self):
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 2:
            raise ValueError(f"DDIMSchedule: num_train_timesteps must be an integer >= 2, got "
                             f"{self.num_train_timesteps!r}.")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"DDIMSchedule: need 0 < beta_start < beta_end < 1, got {self.beta_start} and "
                             f"{self.beta_end}.")
        if not (math.isfinite(self.snr_shift_scale) and self.snr_shift_scale > 0):
            raise ValueError(f"DDIMSchedule: snr_shift_scale must be a finite number > 0, got {self.snr_shift_scale!r}.")
        if self.spacing not in ("trailing", "leading", "linspace"):
            raise ValueError(f"DDIMSchedule: spacing must be 'trailing', 'leading' or 'linspace', got {self.spacing!r}.")

    def alphas_cumprod(self) -> np.ndarray:
        """``abar [T]`` (float64) after the SNR shift and, if set, the zero-terminal-SNR rescale."""
        betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps, dtype=np.float64) ** 2
        abar = np.cumprod(1.0 - betas)
        s = self.snr_shift_scale
        abar = abar / (s + (1.0 - s) * abar)
        if self.rescale_zero_terminal_snr:
            root = np.sqrt(abar)
            first, last = root[0], root[-1]
            abar = ((root - last) * first / (first - last)) ** 2
        return abar

    def timesteps(self, steps: int) -> np.ndarray:
        """The ``steps`` integer timesteps visited, from noisiest to cleanest (``set_timesteps``)."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 0 < steps <= self.num_train_timesteps:
            raise ValueError(f"DDIMSchedule.timesteps: steps must be an integer in [1, {self.num_train_timesteps}] "
                             f"(num_train_timesteps), got {steps!r}.")
        n = self.num_train_timesteps
        if self.spacing == "trailing":
            return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        if self.spacing == "leading":
            return (np.arange(steps) * (n // steps))[::-1].astype(np.int64) + self.steps_offset
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)

    def coefficients(self, steps: int) -> tuple[np.ndarray, ...]:
        """Per step ``(t, sqrt(abar_t), sqrt(1 - abar_t), a, b)`` (``[steps]`` each, float64) of the DDIM update
        in the module docstring; the previous timestep is ``t - T // steps`` as in diffusers."""
        abar = self.alphas_cumprod()
        t = self.timesteps(steps)
        prev = t - self.num_train_timesteps // steps
        abar_t = abar[t]
        abar_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], 1.0)
        a = np.sqrt((1.0 - abar_prev) / (1.0 - abar_t))
        b = np.sqrt(abar_prev) - np.sqrt(abar_t) * a
        return t.astype(np.float64), np.sqrt(abar_t), np.sqrt(1.0 - abar_t), a, b


def dynamic_guidance(guidance: float, timesteps: np.ndarray, steps: int) -> np.ndarray:
    """CogVideoX's growing guidance scale per step (``use_dynamic_cfg``):
    ``1 + g (1 - cos(pi ((steps - t) / steps)^5)) / 2`` for each visited timestep ``t``."""
    t = np.asarray(timesteps, np.float64)
    return 1.0 + guidance * (1.0 - np.cos(np.pi * ((steps - t) / steps) ** 5.0)) / 2.0


def ddim_v(model: Velocity, x: jax.Array, coefficients: tuple[jax.Array, ...], cond: Any, *, uncond: Any = None,
           guidance: jax.Array | None = None) -> jax.Array:
    """Run the DDIM v-prediction steps of ``coefficients`` (``DDIMSchedule.coefficients``) from ``x`` (traceable).

    ``guidance`` is one scale per step ``[S]`` (or None without classifier-free guidance, then ``uncond`` is None
    too). Returns the final latents, float32, the shape of ``x``.
    """
    if (uncond is None) != (guidance is None):
        raise ValueError("ddim_v: classifier-free guidance needs both uncond and guidance; give both or neither.")
    x = jnp.asarray(x, jnp.float32)
    steps = jnp.shape(coefficients[0])[0]
    both = guidance_batch(cond, uncond)
    scales = jnp.zeros((steps,), jnp.float32) if guidance is None else jnp.asarray(guidance, jnp.float32)

    def stateless(x, t, c, step, state):
        return model(x, t, c), state

    def body(x, inputs):
        t, sqrt_abar, sqrt_one_minus, a, b, g = inputs
        v, _ = guided_velocity(stateless, x, t, cond, both, None if guidance is None else g, None, None)
        x0 = sqrt_abar * x - sqrt_one_minus * v
        return a * x + b * x0, None

    columns = tuple(jnp.asarray(c, jnp.float32) for c in coefficients)
    x, _ = jax.lax.scan(body, x, (*columns, scales))
    return x


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _run(graphdef, state, x, coefficients, cond, uncond, guidance):
    model = graphdef if state is None else nnx.merge(graphdef, state)
    return ddim_v(model, x, coefficients, cond, uncond=uncond, guidance=guidance)


def sample_ddim(model: Velocity, cond: Any, *, key: jax.Array, shape: tuple[int, ...], steps: int,
                schedule: DDIMSchedule = DDIMSchedule(), guidance: float | None = None, uncond: Any = None,
                dynamic: bool = False) -> jax.Array:
    """Generate latents of ``shape [B, ..., C]`` (float32) from noise ``normal(key, shape)`` in ``steps`` DDIM steps.

    ``model(latents, timesteps [B], cond) -> v`` (an ``nnx.Module`` is split so its weights are a jit argument);
    ``guidance`` with ``uncond`` is classifier-free guidance, constant or, with ``dynamic=True``, CogVideoX's
    growing scale (``dynamic_guidance``).
    """
    check_sample_inputs(model, cond, key, shape, steps, guidance, uncond)
    if dynamic and guidance is None:
        raise ValueError("sample_ddim: dynamic=True grows the guidance scale; give guidance (and uncond) too.")
    coefficients = schedule.coefficients(steps)
    scales = None
    if guidance is not None:
        scales = dynamic_guidance(guidance, coefficients[0], steps) if dynamic else np.full(steps, guidance)
        scales = scales.astype(np.float32)
    x = jax.random.normal(key, tuple(int(n) for n in shape), jnp.float32)
    graphdef, state = split_module(model)
    return _run(graphdef, state, x, tuple(np.asarray(c, np.float32) for c in coefficients), cond, uncond, scales)
