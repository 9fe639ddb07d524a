"""ECAR's multistage flow (spec ecar.md §3.3–3.4): training endpoints per stage and the stage-by-stage sampler.

Training, with the same ``ε_s ~ N(0, I)`` at resolution ``r_s`` at both ends of stage ``s`` (maps ``M_s``)::

    Y_s^end   = σ_s^end ε_s + (1 − σ_s^end) M_s
    Y_s^start = σ̃_s^start ε_s + (1 − σ̃_s^start) Up₂(M_{s−1})   (s > 1),      Y_1^start = ε_1

The flow inside a stage runs on local time ``τ`` from 1 (``Y^start``) to 0 (``Y^end``):
``Y(τ) = τ Y^start + (1 − τ) Y^end`` with velocity ``dY/dτ = Y^start − Y^end`` — the rectified-flow convention of
``jquant.sampling`` (``x_τ = τ ε + (1 − τ) x_0``, ``v = ε − x_0``), so each stage is integrated by
``jquant.sampling.euler_flow`` on ``flow_sigmas(n_s)`` and one stage with the window ``[1, 0]`` *is* the plain
flow sampler. Between stages ``Y_{s+1}^start = α Up₂(Y_s^end) + β n′`` (``jquant.ecar.renoise``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant.ecar.renoise import block_noise, renoise, upsample2
from jquant.ecar.stages import StageSchedule
from jquant.sampling.flow import Velocity, euler_flow
from jquant.sampling.schedule import flow_sigmas

# condition(s, inputs) -> (cond, uncond or None): stage s's conditioning given the AR inputs Up₂(Y_j^end), j < s
StageCondition = Callable[[int, tuple[jax.Array, ...]], tuple[Any, Any]]


def stage_endpoints(maps: list[jax.Array], eps: list[jax.Array], schedule: StageSchedule
                    ) -> tuple[list[jax.Array], list[jax.Array]]:
    """``(starts, ends)``: ``Y_s^start`` and ``Y_s^end`` (module docstring) of the maps ``M_s [B, r_s, r_s, C]`` and
    noises ``ε_s`` (same shapes)."""
    starts, ends = [], []
    for s, (m, e, start, end) in enumerate(zip(maps, eps, schedule.start_sigmas(), schedule.end_sigmas())):
        ends.append(end * e + (1.0 - end) * m)
        starts.append(e if s == 0 else start * e + (1.0 - start) * upsample2(maps[s - 1]))
    return starts, ends


def multistage_sample(condition: StageCondition, velocity: Callable[[int], Velocity], schedule: StageSchedule,
                      key: jax.Array, *, batch: int, channels: int, guidance: jax.Array | None = None) -> jax.Array:
    """Latents ``[batch, h, h, channels]`` (float32, traceable): ``Y_1^start = normal(key)`` at ``r_1``; for each
    stage the conditioning ``condition(s, inputs)`` and ``euler_flow(velocity(s), ...)`` over ``n_s`` steps (with
    classifier-free guidance when ``guidance`` is given and ``condition`` returns an ``uncond``); between stages the
    up-sample + re-noise step with block noise from ``fold_in(key, s + 1)``."""
    r = schedule.resolutions[0]
    y = jax.random.normal(key, (batch, r, r, channels), jnp.float32)
    inputs: tuple[jax.Array, ...] = ()
    for s, steps in enumerate(schedule.steps):
        cond, uncond = condition(s, inputs)
        sigmas = flow_sigmas(steps).astype(np.float32)
        guided = guidance is not None and uncond is not None
        y = euler_flow(velocity(s), y, sigmas, cond, uncond=uncond if guided else None,
                       guidance=guidance if guided else None)
        if s + 1 < schedule.num_stages:
            up = upsample2(y)
            inputs += (up,)
            noise = block_noise(jax.random.fold_in(key, s + 1), up.shape)
            y = renoise(y, noise, 1.0 - schedule.edges[s + 1])
    return y
