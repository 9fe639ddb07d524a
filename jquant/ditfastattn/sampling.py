"""Rectified-flow sampling under an attention plan: the plan and the head-output cache threaded through the steps.

``sample_with_plan(transformer, cond, plan=..., key=..., shape=..., steps=...)`` is ``jquant.sampling.sample``
with the transformer's joint attention run as ``plan`` says (``jquant.ditfastattn.runtime.StepAttention``):

- ``mode="compute"`` computes only what the plan allows (grouped heads, gathered bands, reused heads copied):
  one compiled step per distinct step of the plan, the steps run from Python;
- ``mode="masked"`` evaluates the same plan with dense per-head masks inside one ``lax.scan``
  (``jquant.sampling.euler_flow_with_state``): the plan is a traced argument, so every plan of the same shape
  shares one compiled program (the plan search and quality sweeps use it);
- ``mode="kernel"``: as "masked", with the Pallas arrow kernel (``jquant.pallas_kernels.arrow_attention``), which
  reads the plan's window table as data and skips the KV tiles outside each head's arrow: one compiled program
  and real savings on a GPU (interpret mode, slow, off a GPU; arrow plans only).

All give the same images up to float32 rounding (TF32 dots in the kernel on a GPU).

The transformer takes part through ``flow_velocity(latents, sigmas, text, pooled, attention=hook)`` and
``joint_layout(latent_shape, text_len)``; its heads and layers come from ``config.num_attention_heads`` and
``joint_attention_layers()`` (SD3 and Flux take part).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.ditfastattn.plan import AttentionPlan, JointLayout
from jquant.ditfastattn.runtime import HeadCache, StepAttention
from jquant.progress import progress_bar
from jquant.sampling.flow import check_sample_inputs, euler_flow_with_state, guided_velocity
from jquant.sampling.schedule import flow_sigmas

MODES = ("compute", "masked", "kernel")


def model_layout(transformer: nnx.Module, latent_shape: tuple[int, ...], text_len: int) -> JointLayout:
    """The ``JointLayout`` of ``transformer``'s joint attention for latents ``[.., h, w, C]`` and ``text_len``."""
    if not hasattr(transformer, "joint_layout"):
        raise TypeError(f"{type(transformer).__name__} has no joint_layout(latent_shape, text_len): its family does "
                        "not take attention plans (SD3 does).")
    return JointLayout(*transformer.joint_layout(tuple(latent_shape), int(text_len)))


def model_dims(transformer: nnx.Module) -> tuple[int, int, int]:
    """``(layers, heads, head_dim)`` of the transformer's joint attention."""
    cfg = transformer.config
    return transformer.joint_attention_layers(), cfg.num_attention_heads, cfg.attention_head_dim


def empty_cache(transformer: nnx.Module, batch: int, layout: JointLayout) -> HeadCache:
    """The cache before step 0 (zeros; step 0 never reuses) for a velocity batch of ``batch`` rows."""
    layers, heads, head_dim = model_dims(transformer)
    return HeadCache.zeros(layers, batch, layout.length, heads, head_dim)


def plan_velocity(transformer: nnx.Module, layout: JointLayout, pattern: str, implementation: str = "xla"):
    """``velocity(x, t, cond, (windows [L, H], residual [L, H]), cache) -> (v, cache)`` for
    ``jquant.sampling.euler_flow_with_state``; ``cond = (text, pooled)``."""
    def velocity(x, t, cond, step, cache):
        windows, residual = step
        hook = StepAttention(windows, residual, cache, layout, pattern, implementation)
        v = transformer.flow_velocity(x, t, *cond, attention=hook)
        return v, hook.new_cache()
    return velocity


@functools.partial(jax.jit, static_argnames=("graphdef", "implementation"))
def _masked_run(graphdef, state, x, sigmas, cond, uncond, guidance, plan: AttentionPlan, cache: HeadCache,
                implementation: str):
    transformer = nnx.merge(graphdef, state)
    velocity = plan_velocity(transformer, plan.layout, plan.pattern, implementation)
    return euler_flow_with_state(velocity, x, sigmas, cond, per_step=(plan.windows, plan.residual), state=cache,
                                 uncond=uncond, guidance=guidance)[0]


@dataclasses.dataclass(frozen=True)
class _StaticStep:
    """One step of a plan as a hashable static argument."""

    windows: tuple
    residual: tuple
    layout: JointLayout
    pattern: str


@functools.partial(jax.jit, static_argnames=("graphdef", "step"))
def _compute_step(graphdef, state, x, sigma, sigma_next, cond, both, g, cache, step: _StaticStep):
    transformer = nnx.merge(graphdef, state)
    velocity = plan_velocity(transformer, step.layout, step.pattern)
    arrays = (np.asarray(step.windows, np.int32), np.asarray(step.residual, np.int8))
    v, cache = guided_velocity(velocity, x, sigma, cond, both, g, arrays, cache)
    return x + (sigma_next - sigma) * v, cache


def _static_steps(plan: AttentionPlan) -> list[_StaticStep]:
    w, r = np.asarray(plan.windows), np.asarray(plan.residual)
    return [_StaticStep(tuple(map(tuple, w[t].tolist())), tuple(map(tuple, r[t].tolist())), plan.layout,
                        plan.pattern) for t in range(plan.steps)]


def sample_with_plan(transformer: nnx.Module, cond: Any, *, plan: AttentionPlan, key: jax.Array,
                     shape: tuple[int, int, int, int], steps: int, guidance: float | None = None, uncond: Any = None,
                     shift: float = 1.0, mode: str = "compute", progress: bool = False) -> jax.Array:
    """Latents ``[B, h, w, C]`` (float32) as ``jquant.sampling.sample`` would give them, with the joint attention run
    under ``plan`` (module docstring). ``cond = (text [B, S, D], pooled [B, P])``; errors when the plan was made for
    another step count, model or token layout."""
    if mode not in MODES:
        raise ValueError(f"sample_with_plan: mode={mode!r} is not one of {MODES}.")
    if mode == "kernel" and plan.pattern != "arrow":
        raise ValueError(f"sample_with_plan: mode='kernel' runs arrow plans; this plan's pattern is {plan.pattern!r} "
                         "(use mode='compute' or 'masked').")
    check_sample_inputs(transformer, cond, key, shape, steps, guidance, uncond)
    layout = model_layout(transformer, shape, np.shape(cond[0])[1])
    layers, heads, _ = model_dims(transformer)
    plan.check_model(steps=steps, layers=layers, heads=heads, layout=layout)
    sigmas = flow_sigmas(steps, shift=shift).astype(np.float32)
    x = jax.random.normal(key, tuple(int(n) for n in shape), jnp.float32)
    g = None if guidance is None else jnp.float32(guidance)
    cache = empty_cache(transformer, shape[0] * (1 if g is None else 2), layout)
    graphdef, state = nnx.split(transformer)
    if mode != "compute":
        return _masked_run(graphdef, state, x, sigmas, cond, uncond, g, plan, cache,
                           "pallas" if mode == "kernel" else "xla")
    both = None if g is None else jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
    with progress_bar(total=steps, description="sampling", enabled=progress) as bar:
        for t, step in enumerate(_static_steps(plan)):
            x, cache = _compute_step(graphdef, state, x, sigmas[t], sigmas[t + 1], cond, both, g, cache, step)
            bar.update(1)
    return x
