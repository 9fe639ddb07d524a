"""The flow-matching training objective (rectified flow, SD3 convention), pure and jittable.

Esser et al. 2024 ("Scaling Rectified Flow Transformers", eqs. 1-3 and 19): draw ``t`` per sample,
``x_t = (1 - t) x0 + t noise`` and regress the velocity ``v = noise - x0``::

    L = mean || velocity(x_t, t, cond) - (noise - x0) ||^2

``t`` is drawn logit-normal (``t = sigmoid(m + s n)``, n ~ N(0, 1); SD3's default m = 0, s = 1, which weights
the middle of the path) or uniform on [0, 1). The sampler (``jquant.sampling.flow``) integrates the same ``v``
from t = 1 to 0, so a velocity trained here samples there with ``timesteps = t``.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from jquant.sampling.flow import Velocity

TimestepSampling = Literal["logit_normal", "uniform"]
TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")


def sample_timesteps(key: jax.Array, n: int, kind: TimestepSampling = "logit_normal", *, logit_mean: float = 0.0,
                     logit_std: float = 1.0) -> jax.Array:
    """``n`` training timesteps in [0, 1) (float32 ``[n]``): ``sigmoid(logit_mean + logit_std N(0, 1))`` or uniform."""
    if kind == "logit_normal":
        return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (n,), jnp.float32))
    if kind == "uniform":
        return jax.random.uniform(key, (n,), jnp.float32)
    raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {kind!r}.")


def flow_matching_loss(velocity_fn: Velocity, x0: jax.Array, cond: Any, key: jax.Array, *,
                       timestep_sampling: TimestepSampling = "logit_normal", logit_mean: float = 0.0,
                       logit_std: float = 1.0) -> jax.Array:
    """Mean squared velocity error over ``x0 [B, ...]`` (float32 scalar); one ``t`` and one noise draw per sample.

    ``velocity_fn(x_t, t [B], cond)`` is the model (an ``nnx.Module`` under ``nnx.value_and_grad``, or any
    function); ``key`` gives the timesteps and the noise (``jquant.train.fit`` passes a fresh one per step).
    """
    if timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"flow_matching_loss: timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, "
                         f"got {timestep_sampling!r}.")
    if x0.ndim < 2 or not jnp.issubdtype(x0.dtype, jnp.floating):
        raise ValueError(f"flow_matching_loss: x0 must be floating latents [batch, ...], got {x0.dtype} {x0.shape}.")
    key_t, key_noise = jax.random.split(key)
    x0 = x0.astype(jnp.float32)
    t = sample_timesteps(key_t, x0.shape[0], timestep_sampling, logit_mean=logit_mean, logit_std=logit_std)
    noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
    tb = t.reshape((-1,) + (1,) * (x0.ndim - 1))
    x_t = (1.0 - tb) * x0 + tb * noise
    v = velocity_fn(x_t, t, cond)
    if v.shape != x0.shape:
        raise ValueError(f"flow_matching_loss: velocity_fn returned shape {v.shape} for latents {x0.shape}.")
    return jnp.mean(jnp.square(v.astype(jnp.float32) - (noise - x0)))
