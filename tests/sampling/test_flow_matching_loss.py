"""The flow-matching loss: its interpolation and target (SD3 convention), timestep laws, jit and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats

from jquant.sampling import flow_matching_loss, sample_timesteps


def _rng():
    return np.random.default_rng()


@pytest.mark.parametrize("kind", ["logit_normal", "uniform"])
def test_loss_regresses_noise_minus_data_along_the_straight_path(kind):
    rng = _rng()
    x0 = jnp.asarray(rng.normal(size=(64, 6, 6, 4)) * 2 + 0.5, jnp.float32)
    key = jax.random.key(rng.integers(2**31))
    seen = {}

    def velocity(x_t, t, cond):
        seen["x_t"], seen["t"] = np.asarray(x_t, np.float64), np.asarray(t, np.float64)
        return jnp.tanh(x_t) * cond

    loss = float(flow_matching_loss(velocity, x0, 0.7, key, timestep_sampling=kind))
    x0_64, t = np.asarray(x0, np.float64), seen["t"][:, None, None, None]
    assert seen["t"].shape == (64,) and np.all((seen["t"] > 0) & (seen["t"] < 1))
    noise = (seen["x_t"] - (1 - t) * x0_64) / t  # x_t = (1 - t) x0 + t noise, solved for the noise
    keep = seen["t"] > 0.05  # dividing by a tiny t loses the float32 digits of x_t
    assert abs(noise[keep].mean()) < 0.05 and abs(noise[keep].std() - 1) < 0.05
    row_mse = np.mean((np.tanh(seen["x_t"]) * 0.7 - (noise - x0_64)) ** 2, axis=(1, 2, 3))
    # x_t is float32: the noise solved from it is off by up to ~4 eps |x_t| / t per element (large where t is tiny)
    bound = 4 * np.finfo(np.float32).eps * (np.abs(seen["x_t"]).max(axis=(1, 2, 3)) + 1) / seen["t"]
    slack = np.mean(2 * np.sqrt(row_mse) * bound + bound**2)
    assert abs(loss - row_mse.mean()) <= 1e-3 * row_mse.mean() + slack

    # the exact velocity of a point mass at x0 has zero loss
    assert float(flow_matching_loss(lambda x_t, t, c: (x_t - c) / t[:, None, None, None], x0, x0, key,
                                    timestep_sampling=kind)) < 1e-8


def test_timestep_laws():
    rng = _rng()
    key = jax.random.key(rng.integers(2**31))
    t = np.asarray(sample_timesteps(key, 4000, "logit_normal", logit_mean=0.3, logit_std=0.8), np.float64)
    assert stats.kstest(np.log(t / (1 - t)), "norm", args=(0.3, 0.8)).pvalue > 1e-4
    u = np.asarray(sample_timesteps(key, 4000, "uniform"), np.float64)
    assert stats.kstest(u, "uniform").pvalue > 1e-4


class _Velocity(nnx.Module):
    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (channels, channels)) * 0.1)
        self.b = nnx.Param(jnp.zeros((channels,)))

    def __call__(self, x, t, cond):
        return x @ self.w[...] + t[:, None, None, None] * self.b[...] + cond[:, None, None, :]


def test_jitted_loss_and_an_optax_step_that_lowers_it():
    rng = _rng()
    x0 = jnp.asarray(rng.normal(size=(8, 4, 4, 3)), jnp.float32)
    cond = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    key = jax.random.key(rng.integers(2**31))
    model = _Velocity(3, nnx.Rngs(int(rng.integers(2**31))))
    eager = flow_matching_loss(model, x0, cond, key)
    jitted = nnx.jit(lambda m, x, c, k: flow_matching_loss(m, x, c, k))(model, x0, cond, key)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)

    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
    value, grads = nnx.value_and_grad(lambda m: flow_matching_loss(m, x0, cond, key))(model)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    optimizer.update(model, grads)
    assert float(flow_matching_loss(model, x0, cond, key)) < float(value)


def test_bad_arguments():
    x0 = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match="timestep_sampling must be one of"):
        flow_matching_loss(lambda x, t, c: x, x0, None, jax.random.key(0), timestep_sampling="cosine")
    with pytest.raises(ValueError, match="floating latents"):
        flow_matching_loss(lambda x, t, c: x, jnp.zeros((2, 4), jnp.int32), None, jax.random.key(0))
    with pytest.raises(ValueError, match="returned shape"):
        flow_matching_loss(lambda x, t, c: x[..., :1], x0, None, jax.random.key(0))
