"""Noise levels (sigmas) of rectified-flow / flow-matching samplers, as SD3 and Flux use them.

A sigma is the noise fraction of ``x_sigma = (1 - sigma) x0 + sigma noise``: 1 is pure noise, 0 the data.
A schedule of ``steps`` Euler steps is ``steps + 1`` sigmas from 1 down to 0.

Both shifts are one map, the SD3 timestep shift (Esser et al. 2024, "Scaling Rectified Flow Transformers",
eq. 23)::

    sigma' = shift sigma / (1 + (shift - 1) sigma)  =  shift / (shift + 1/sigma - 1)

and Flux's resolution-dependent shift ``exp(mu) / (exp(mu) + 1/sigma - 1)`` is the same map with
``shift = exp(mu)``. diffusers' ``FlowMatchEulerDiscreteScheduler`` computes the same values (tested).
Schedules are host-side float64 numpy: ``steps`` fixes the length of the sampler's scan anyway.
"""

from __future__ import annotations

import math

import numpy as np


def _check_steps(steps: int, fn: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"{fn}: steps must be a positive integer (the number of Euler steps), got {steps!r}.")


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The SD3 timestep shift of ``sigmas [...]`` in (0, 1]: ``shift s / (1 + (shift - 1) s)`` (0 stays 0)."""
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift_sigmas: shift must be a finite number > 0 (SD3 uses 3.0; 1.0 is no shift), "
                         f"got {shift!r}.")
    s = np.asarray(sigmas, np.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


def flux_mu(image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux's ``mu`` for ``image_seq_len`` latent tokens: linear from ``base_shift`` at ``base_seq_len`` to
    ``max_shift`` at ``max_seq_len`` (diffusers ``calculate_shift``; a Flux latent of ``h x w`` packs into
    ``(h/2) (w/2)`` tokens)."""
    if image_seq_len <= 0 or max_seq_len == base_seq_len:
        raise ValueError(f"flux_mu: image_seq_len must be positive and max_seq_len != base_seq_len, got "
                         f"image_seq_len={image_seq_len}, base_seq_len={base_seq_len}, max_seq_len={max_seq_len}.")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def sd3_last_sigma(shift: float, num_train_timesteps: int = 1000) -> float:
    """The last unshifted sigma of diffusers' SD3 default schedule: its scheduler's smallest training sigma,
    ``shift(1 / num_train_timesteps)`` (the grid then gets the shift a second time, as diffusers does)."""
    return float(shift_sigmas(np.array(1.0 / num_train_timesteps), shift))


def flow_sigmas(steps: int, *, shift: float = 1.0, mu: float | None = None, last: float | None = None) -> np.ndarray:
    """``steps + 1`` sigmas from 1 to 0 (float64): ``linspace(1, last, steps)``, shifted, then 0 appended.

    ``last`` defaults to ``1 / steps``, which makes the unshifted grid the uniform ``linspace(1, 0, steps + 1)``
    (Flux's pipeline); diffusers' SD3 pipeline ends at ``last=sd3_last_sigma(shift)``. ``shift`` is the SD3
    shift (3.0 for SD3), ``mu`` Flux's resolution-dependent shift (``flux_mu``), applied as ``shift = exp(mu)``;
    give one of them.
    """
    _check_steps(steps, "flow_sigmas")
    if mu is not None:
        if not (isinstance(mu, (int, float)) and math.isfinite(mu)):
            raise ValueError(f"flow_sigmas: mu must be a finite number (see flux_mu), got {mu!r}.")
        if shift != 1.0:
            raise ValueError(f"flow_sigmas: give shift={shift} or mu={mu}, not both (mu is the shift exp(mu)).")
        shift = math.exp(mu)
    last = 1.0 / steps if last is None else last
    if not (isinstance(last, (int, float)) and 0 < last <= 1):
        raise ValueError(f"flow_sigmas: last must be a number in (0, 1] (the smallest nonzero unshifted sigma), "
                         f"got {last!r}.")
    grid = np.linspace(1.0, last, steps, dtype=np.float64)
    return np.concatenate([shift_sigmas(grid, shift), [0.0]])
