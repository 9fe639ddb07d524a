"""Rectified-flow / flow-matching Euler sampling (SD3, Flux) as pure functions with classifier-free guidance.

The denoiser is any ``velocity(latents [B, ..., C], timesteps [B], cond) -> [B, ..., C]`` (images ``[B, H, W,
C]``, video ``[B, F, H, W, C]``): ``timesteps`` are
the sigmas in [0, 1] (1 = noise) and ``cond`` a pytree whose leaves all have the leading batch axis ``B``.
Map sigma to a model's own convention inside it: diffusers' SD3 transformer takes ``1000 * sigma``, Flux's
pipeline passes ``sigma`` (its transformer multiplies by 1000 itself). The velocity convention is SD3's:
``v = noise - x0``, so ``x_sigma = (1 - sigma) x0 + sigma noise`` moves along ``dx/dsigma = v``.

One Euler step from ``sigma`` to ``sigma_next`` (diffusers ``FlowMatchEulerDiscreteScheduler.step``)::

    x_next = x + (sigma_next - sigma) v,    v = v_uncond + g (v_cond - v_uncond)   (classifier-free guidance,
                                                                                  Ho & Salimans 2022)

with the conditional and unconditional halves in one batched call ``[cond; uncond]``. Latents are carried in
float32 (diffusers upcasts the same way). ``euler_flow`` is the traceable core (a ``lax.scan`` over steps);
``sample`` validates, draws the initial noise from an explicit key and runs it jitted. ``euler_flow_with_state``
threads a pytree (a per-step plan and a cache) through the steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.progress import progress_bar
from jquant.sampling.schedule import flow_sigmas

Velocity = Callable[[jax.Array, jax.Array, Any], jax.Array]
StatefulVelocity = Callable[[jax.Array, jax.Array, Any, Any, Any], tuple[jax.Array, Any]]


def euler_flow(velocity: Velocity, x: jax.Array, sigmas: jax.Array, cond: Any, *, uncond: Any = None,
               guidance: jax.Array | float | None = None) -> jax.Array:
    """Integrate ``dx/dsigma = velocity`` from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps (traceable).

    ``x [B, H, W, C]`` is the state at ``sigmas[0]`` (pure noise when it is 1), ``sigmas [S + 1]`` the
    noise levels (``flow_sigmas``). With ``uncond`` (same tree and shapes as ``cond``) every step makes one
    call on the batch ``[x; x]`` with ``[cond; uncond]`` and mixes ``v_u + guidance (v_c - v_u)``.
    Returns the state at ``sigmas[-1]``, float32.
    """
    def stateless(x, t, c, step, state):
        return velocity(x, t, c), state

    return euler_flow_with_state(stateless, x, sigmas, cond, per_step=None, state=None, uncond=uncond,
                                 guidance=guidance)[0]


def euler_flow_with_state(velocity: StatefulVelocity, x: jax.Array, sigmas: jax.Array, cond: Any, *, per_step: Any,
                          state: Any, uncond: Any = None, guidance: jax.Array | float | None = None
                          ) -> tuple[jax.Array, Any]:
    """``euler_flow`` with a pytree ``state`` threaded through the steps (like a KV cache through decoding).

    Step ``i`` calls ``velocity(x, t, cond, per_step_i, state) -> (v, state)``, where ``per_step_i`` is row ``i``
    of ``per_step`` (a pytree whose leaves have the leading axis ``S``, the step count; None for nothing) — e.g.
    DiTFastAttn's attention plan and its cache of the previous step's head outputs. Returns ``(x, state)`` at
    ``sigmas[-1]``.
    """
    _check_flow(sigmas, uncond, guidance)
    x = jnp.asarray(x, jnp.float32)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    both = guidance_batch(cond, uncond)
    g = None if guidance is None else jnp.asarray(guidance, jnp.float32)

    def body(carry, inputs):
        x, state = carry
        sigma, sigma_next, step = inputs
        v, state = guided_velocity(velocity, x, sigma, cond, both, g, step, state)
        return (x + (sigma_next - sigma) * v, state), None

    (x, state), _ = jax.lax.scan(body, (x, state), (sigmas[:-1], sigmas[1:], per_step))
    return x, state


def _check_flow(sigmas, uncond, guidance) -> None:
    if (uncond is None) != (guidance is None):
        raise ValueError("euler_flow: classifier-free guidance needs both uncond and guidance; give both or neither.")
    if np.ndim(sigmas) != 1 or np.shape(sigmas)[0] < 2:
        raise ValueError(f"euler_flow: sigmas must be a 1-D schedule of at least 2 noise levels (flow_sigmas), got "
                         f"shape {np.shape(sigmas)}.")


def guidance_batch(cond: Any, uncond: Any) -> Any:
    """``[cond; uncond]`` (leaves concatenated on the batch axis) for classifier-free guidance; None without it."""
    if uncond is None:
        return None
    return jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)


def guided_velocity(velocity: StatefulVelocity, x: jax.Array, sigma: jax.Array, cond: Any, both: Any,
                    g: jax.Array | None, step: Any, state: Any) -> tuple[jax.Array, Any]:
    """One (guided) velocity evaluation at noise level ``sigma`` (a scalar) of ``x [B, ..., C]``: the batch
    ``[x; x]`` on ``both = [cond; uncond]`` mixed ``v_u + g (v_c - v_u)`` when ``g`` is given. Returns
    ``(v [B, ..., C] float32, state)``."""
    b = x.shape[0]
    if g is None:
        v, state = velocity(x, jnp.full((b,), sigma, jnp.float32), cond, step, state)
    else:
        v, state = velocity(jnp.concatenate([x, x], axis=0), jnp.full((2 * b,), sigma, jnp.float32), both, step,
                            state)
    expected = x.shape if g is None else (2 * b, *x.shape[1:])
    if v.shape != expected:
        raise ValueError(f"euler_flow: velocity returned shape {v.shape} for latents of shape {expected}; it "
                         "must return the velocity of every latent element, the latents' shape.")
    v = v.astype(jnp.float32)
    return (v if g is None else v[b:] + g * (v[:b] - v[b:])), state


def split_module(velocity):
    """An nnx.Module is split so its weights are a jit argument, not constants baked into the program."""
    if isinstance(velocity, nnx.Module):
        return nnx.split(velocity)
    return velocity, None


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _run(graphdef, state, x, sigmas, cond, uncond, guidance):
    velocity = graphdef if state is None else nnx.merge(graphdef, state)
    return euler_flow(velocity, x, sigmas, cond, uncond=uncond, guidance=guidance)


def _check_batch(tree: Any, batch: int, name: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = np.shape(leaf)
        if not shape or shape[0] != batch:
            raise ValueError(f"sample: every leaf of {name} needs the leading batch axis {batch} of the latents; "
                             f"{name}{jax.tree_util.keystr(path)} has shape {shape}.")


def generation_key(seed: int | None, key: jax.Array | None) -> jax.Array:
    """The PRNG key of a generation: ``key`` itself, or ``jax.random.key(seed)``; exactly one must be given."""
    if (seed is None) == (key is None):
        raise ValueError("give exactly one of seed= (an int) or key= (a jax PRNG key).")
    if key is not None:
        return key
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    return jax.random.key(int(seed))


def check_sample_inputs(velocity, cond, key, shape, steps, guidance, uncond) -> None:
    """The checks of ``sample``'s arguments (clear errors naming the argument)."""
    if not callable(velocity):
        raise TypeError(f"sample: velocity must be callable as velocity(latents, timesteps, cond), got "
                        f"{type(velocity).__name__}.")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"sample: steps must be a positive integer (the number of Euler steps), got {steps!r}.")
    if len(shape) not in (4, 5) or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise ValueError(f"sample: shape must be the latents' [batch, height, width, channels] (images) or [batch, "
                         f"frames, height, width, channels] (video), positive integers; got {tuple(shape)}.")
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()):
        raise TypeError("sample: key must be one typed PRNG key, e.g. jax.random.key(0), for the initial noise.")
    if guidance is None and uncond is not None:
        raise ValueError("sample: uncond was given without guidance; pass guidance=g (e.g. 4.0) for "
                         "classifier-free guidance, or drop uncond.")
    if guidance is not None:
        if not (isinstance(guidance, (int, float, np.floating)) and math.isfinite(guidance)):
            raise ValueError(f"sample: guidance must be a finite number (1.0 = conditional only), got {guidance!r}.")
        if uncond is None:
            raise ValueError("sample: guidance needs the unconditional inputs uncond (e.g. the text encoder's "
                             "unconditional(batch)), with the same tree and shapes as cond.")
        if jax.tree.structure(cond) != jax.tree.structure(uncond):
            raise ValueError(f"sample: uncond must have the same tree as cond; got {jax.tree.structure(uncond)} "
                             f"for {jax.tree.structure(cond)}.")
        for c, u in zip(jax.tree.leaves(cond), jax.tree.leaves(uncond)):
            if np.shape(c) != np.shape(u):
                raise ValueError(f"sample: uncond leaves must have the shapes of cond's; got {np.shape(u)} for "
                                 f"{np.shape(c)}.")
    _check_batch(cond, shape[0], "cond")


def sample(velocity: Velocity, cond: Any, *, key: jax.Array, shape: tuple[int, ...], steps: int,
           guidance: float | None = None, uncond: Any = None, shift: float = 1.0, mu: float | None = None,
           last: float | None = None, progress: bool = False) -> jax.Array:
    """Generate latents of ``shape`` (float32; ``[B, H, W, C]`` images, ``[B, F, H, W, C]`` video) from noise
    ``normal(key, shape)`` in ``steps`` Euler steps.

    ``cond`` (and ``uncond`` for classifier-free guidance with scale ``guidance``) are the velocity's
    conditioning pytrees; ``shift`` / ``mu`` / ``last`` choose the schedule (``flow_sigmas``: SD3 uses
    ``shift=3.0``, Flux ``mu=flux_mu(tokens)``). ``velocity`` may be an ``nnx.Module`` (split so that its
    weights are an argument of the compiled program) or a function defined once (a new closure per call
    compiles again). The program compiles once per shape, step count and velocity; guidance and schedule
    values are arguments. ``progress=True`` runs the steps in ten chunks (each the same jitted scan) and
    reports them with ``jquant.progress``; the result is the same.
    """
    check_sample_inputs(velocity, cond, key, shape, steps, guidance, uncond)
    sigmas = flow_sigmas(steps, shift=shift, mu=mu, last=last).astype(np.float32)
    x = jax.random.normal(key, tuple(int(n) for n in shape), jnp.float32)
    graphdef, state = split_module(velocity)
    g = None if guidance is None else jnp.float32(guidance)
    if not progress:
        return _run(graphdef, state, x, sigmas, cond, uncond, g)
    chunk = max(1, -(-steps // 10))
    with progress_bar(total=steps, description="sampling") as bar:
        for start in range(0, steps, chunk):
            stop = min(start + chunk, steps)
            x = _run(graphdef, state, x, sigmas[start : stop + 1], cond, uncond, g)
            x.block_until_ready()
            bar.update(stop - start)
    return x
