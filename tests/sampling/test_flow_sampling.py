"""Euler flow sampling: exact answers on velocity fields with known ODE solutions, guidance, jit, errors.

A point mass at ``m`` has the rectified-flow velocity ``v(x, sigma) = (x - m) / sigma``: the path
``x_sigma = m + sigma (noise - m)`` is straight, so Euler is exact on any schedule and every intermediate
state is known. Classifier-free guidance of two point masses ``c`` and ``u`` is the point mass
``u + g (c - u)``, which checks the pairing of the conditional and unconditional halves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.sampling import euler_flow, flow_sigmas, sample


def _point_mass(x, t, target):
    return (x - target) / t[:, None, None, None]


def _rng():
    return np.random.default_rng()


@pytest.mark.parametrize("steps,schedule", [(1, {}), (3, {"shift": 3.0}), (8, {"mu": 0.9}), (5, {"last": 0.05})])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 3, 2, 5, 4)], ids=["image", "video"])
def test_point_mass_is_reached_exactly_on_any_schedule(steps, schedule, shape):
    rng = _rng()
    target = jnp.asarray(rng.normal(size=shape), jnp.float32)
    key = jax.random.key(rng.integers(2**31))
    out = sample(_point_mass, target, key=key, shape=shape, steps=steps, **schedule)
    np.testing.assert_allclose(np.asarray(out), np.asarray(target), atol=2e-5)

    noise = np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64)
    sigmas = flow_sigmas(steps, **schedule)
    for k in range(1, steps):  # the state after k steps lies on the straight path at sigma_k
        mid = euler_flow(_point_mass, noise, sigmas[: k + 1], target)
        expected = np.asarray(target, np.float64) + sigmas[k] * (noise - np.asarray(target, np.float64))
        np.testing.assert_allclose(np.asarray(mid), expected, atol=2e-5)


def test_constant_velocity_of_linear_interpolation_is_exact():
    rng = _rng()
    x0, noise = rng.normal(size=(2, 3, 4, 2, 2)).astype(np.float32)
    out = euler_flow(lambda x, t, c: jnp.broadcast_to(c, x.shape), noise, flow_sigmas(7, shift=2.0),
                     jnp.asarray(noise - x0))
    np.testing.assert_allclose(np.asarray(out), x0, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 4.5, 0.0, -1.5])
def test_guidance_mixes_conditional_and_unconditional_in_one_call(guidance):
    rng = _rng()
    shape = (3, 4, 4, 2)
    cond, uncond = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
    batches = []

    def velocity(x, t, c):
        batches.append(x.shape[0])
        return _point_mass(x, t, c)

    out = sample(velocity, cond, key=jax.random.key(rng.integers(2**31)), shape=shape, steps=4, guidance=guidance,
                 uncond=uncond, shift=3.0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(uncond + guidance * (cond - uncond)), atol=5e-5)
    assert batches == [2 * shape[0]]  # traced once, one batched call per step


def test_progress_chunks_give_the_same_latents(capsys):
    rng = _rng()
    shape, w = (2, 4, 4, 3), jnp.asarray(rng.normal(size=(3, 3)) / 2, jnp.float32)

    def velocity(x, t, c):
        return jnp.sin(x @ w) * t[:, None, None, None] + c

    cond = jnp.asarray(rng.normal(size=(2, 1, 1, 3)), jnp.float32)
    key = jax.random.key(rng.integers(2**31))
    whole = sample(velocity, cond, key=key, shape=shape, steps=13, shift=3.0)
    chunked = sample(velocity, cond, key=key, shape=shape, steps=13, shift=3.0, progress=True)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6, atol=1e-6)
    assert "sampling: 13/13" in capsys.readouterr().err


class _Drift(nnx.Module):
    def __init__(self, channels: int):
        self.w = nnx.Param(jnp.zeros((channels, channels)))

    def __call__(self, x, t, c):
        return x @ self.w[...] + c


def test_module_weights_are_arguments_not_constants():
    rng = _rng()
    shape = (1, 3, 3, 2)
    model, cond = _Drift(2), jnp.asarray(rng.normal(size=shape), jnp.float32)
    key = jax.random.key(rng.integers(2**31))
    for _ in range(2):
        model.w[...] = jnp.asarray(rng.normal(size=(2, 2)) / 3, jnp.float32)
        w = model.w[...]
        expected = sample(lambda x, t, c: x @ w + c, cond, key=key, shape=shape, steps=3)
        np.testing.assert_allclose(np.asarray(sample(model, cond, key=key, shape=shape, steps=3)),
                                   np.asarray(expected), rtol=1e-6)


def _never(x, t, c):
    raise AssertionError("the velocity ran before the arguments were checked")


@pytest.mark.parametrize("change,match", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": -2}, "steps must be a positive integer"),
    ({"steps": 2.0}, "steps must be a positive integer"),
    ({"steps": True}, "steps must be a positive integer"),
    ({"guidance": float("nan"), "uncond": "same"}, "guidance must be a finite number"),
    ({"guidance": float("inf"), "uncond": "same"}, "guidance must be a finite number"),
    ({"guidance": 3.0}, "guidance needs the unconditional inputs"),
    ({"uncond": "same"}, "uncond was given without guidance"),
    ({"guidance": 2.0, "uncond": "short"}, "uncond leaves must have the shapes"),
    ({"shape": (2, 4, 4)}, r"\[batch, height, width, channels\]"),
    ({"shape": (2, 4, 4, 0)}, r"\[batch, height, width, channels\]"),
    ({"shape": (2, 1, 4, 4, 3, 1)}, r"\[batch, frames, height, width, channels\]"),
    ({"shape": (3, 4, 4, 3)}, r"cond\['text'\] has shape \(2, 3\)"),
    ({"shift": 0.0}, "shift must be a finite number > 0"),
    ({"shift": 3.0, "mu": 1.0}, "not both"),
    ({"mu": float("nan")}, "mu must be a finite number"),
])
def test_bad_arguments_are_refused_before_any_work(change, match):
    cond = {"text": jnp.zeros((2, 3))}
    kwargs = {"key": jax.random.key(0), "shape": (2, 4, 4, 3), "steps": 4, **change}
    if kwargs.get("uncond") == "same":
        kwargs["uncond"] = cond
    elif kwargs.get("uncond") == "short":
        kwargs["uncond"] = {"text": jnp.zeros((2, 2))}
    with pytest.raises(ValueError, match=match):
        sample(_never, cond, **kwargs)


def test_untyped_key_and_wrong_velocity_shape_are_refused():
    with pytest.raises(TypeError, match="typed PRNG key"):
        sample(_never, jnp.zeros((1, 2)), key=jax.random.PRNGKey(0), shape=(1, 4, 4, 2), steps=2)
    with pytest.raises(ValueError, match="velocity returned shape"):
        sample(lambda x, t, c: x[..., :1], jnp.zeros((1, 2)), key=jax.random.key(0), shape=(1, 4, 4, 2), steps=2)


def test_euler_flow_refuses_half_guidance_and_short_schedules():
    x = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match="needs both uncond and guidance"):
        euler_flow(_never, x, flow_sigmas(2), x, uncond=x)
    with pytest.raises(ValueError, match="at least 2 noise levels"):
        euler_flow(_never, x, np.ones(1), x)
