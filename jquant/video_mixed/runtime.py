"""6Bit-Diffusion inside the jitted Euler sampler: per-step activation routes and block caches as traced state.

One ``lax.scan`` program (``jquant.sampling.flow.euler_flow_with_state``) runs every step; a step's choices are data
(``lax.cond`` between computing a block and reusing its cached residual, route ids as group ids of the routed
linears), so nothing recompiles per step and thresholds are arguments (a threshold sweep compiles once).

Per step t and block b (spec ``video_dit_mixed_precision_tdc.md`` §3.5)::

    skip?   TDC: e defined and E_acc + e < τ_c and run < N_max   |  FORA: t mod k != 0  |  TeaCache: the whole stack
    skip:    Y = X + δ_b;  E_acc += e;  run += 1;  Γ undefined (PDR)
    compute: route_l = NVFP4 if α_l Γ_{b,t−1} + β_l <= τ_q else INT8 (INT8 where Γ undefined), FLOAT if ρ(x_l) > 25
             Y = block(X, route);  e = ‖δ_new − δ_b‖₁ / ‖δ_b‖₁;  δ_b = Y − X;  Γ_{b,t} = ‖Y − X‖₁ / ‖X‖₁;
             E_acc = 0;  run = 0

Γ and e are taken on the video stream (spec §7.1's recommendation), over the whole guided batch; δ_b caches both
streams (video and text), and a skip adds both.

Weights: the routed linears hold one copy (the recipe's, NVFP4 for ``6bit-diffusion``); both activation routes
multiply the same dequantized weights (the INT8 GEMM's weight cast is not simulated). The routed copy of the
transformer gives each routed linear the activation formats ``(nvfp4, int8, None)`` indexed by route id.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.formats import get_format
from jquant.sampling.flow import check_sample_inputs, euler_flow_with_state, guidance_batch
from jquant.sampling.schedule import flow_sigmas
from jquant.video_mixed import rules
from jquant.video_mixed.config import FLOAT, INT8, NVFP4, ROUTE_BITS, ROUTES, SixBitConfig
from jquant.video_mixed.protocol import check_block_dit, in_features, routed_linear


class BlockState(NamedTuple):
    """One block's cache: ``delta`` (its last computed residual per stream), ``e`` (relative L1 change of its last
    two computed residuals), ``computed`` (computations so far, saturating at 2), ``e_acc`` / ``run`` (accumulated
    estimate and consecutive skips since the last computation), ``gamma`` / ``gamma_valid`` (Γ of the last step)."""

    delta: tuple
    e: jax.Array
    computed: jax.Array
    e_acc: jax.Array
    run: jax.Array
    gamma: jax.Array
    gamma_valid: jax.Array


class StackState(NamedTuple):
    """TeaCache's whole-stack cache: the blocks' summed residual, the last stack input (video), the accumulated
    relative change and whether a step was computed."""

    delta: tuple
    previous: jax.Array
    acc: jax.Array
    started: jax.Array


class StepLog(NamedTuple):
    """What each step did: ``skipped [S, B]``, ``routes [S, B, L]`` (route ids, -1 where skipped), ``gamma [S, B]``
    (Γ, NaN where skipped), ``erel [S, B, L]`` (NVFP4's relative output error, measured runs only, else 0) and
    ``e [S, B]`` (the cache's estimate e in effect when the step decided, NaN while undefined)."""

    skipped: jax.Array
    routes: jax.Array
    gamma: jax.Array
    erel: jax.Array
    e: jax.Array


class SamplerState(NamedTuple):
    blocks: tuple
    stack: StackState | None
    log: StepLog


class Params(NamedTuple):
    """The traced settings: predictor ``alpha, beta [B, L]``, ``tau_q``, ``outlier_ratio``, ``tau_c``,
    ``max_skips``, ``interval``."""

    alpha: jax.Array
    beta: jax.Array
    tau_q: jax.Array
    outlier_ratio: jax.Array
    tau_c: jax.Array
    max_skips: jax.Array
    interval: jax.Array


@dataclasses.dataclass(frozen=True)
class Modes:
    """The static settings (one compiled program each): precision and cache modes, PDR, measurement."""

    precision: str
    cache: str
    purify: bool
    measure: bool = False


def activation_formats() -> tuple:
    """The routed linears' activation formats indexed by route id: NVFP4, INT8 per token, float."""
    return get_format("nvfp4"), get_format("int8"), None


def routed_copy(transformer: nnx.Module, names: tuple[str, ...]) -> nnx.Module:
    """A copy of ``transformer`` whose routed linears take ``activation_formats()`` by group id; refused when a
    routed linear already quantizes its activations (use a weights-only recipe such as ``6bit-diffusion``)."""
    copy = nnx.clone(transformer)
    formats = activation_formats()
    for b, block in enumerate(copy.blocks()):
        for name in names:
            linear = routed_linear(block, name)
            if linear.activation is not None:
                raise ValueError(f"block {b} {name} already quantizes its activations ({linear.activation}); "
                                 "6Bit-Diffusion routes them itself: quantize the weights only (recipe "
                                 "6bit-diffusion).")
            linear.activation = formats
    return copy


def _params(config: SixBitConfig, blocks: int, linears: int) -> Params:
    p, c = config.precision, config.cache
    if p.mode == "dynamic" and p.alpha.shape != (blocks, linears):
        raise ValueError(f"the predictor has alpha of shape {p.alpha.shape}; this transformer has {blocks} blocks "
                         f"of {linears} routed linears: calibrate it on this model.")
    zeros = np.zeros((blocks, linears), np.float32)
    return Params(alpha=jnp.asarray(zeros if p.alpha is None else p.alpha),
                  beta=jnp.asarray(zeros if p.beta is None else p.beta), tau_q=jnp.float32(p.tau_q),
                  outlier_ratio=jnp.float32(p.outlier_ratio), tau_c=jnp.float32(c.tau_c),
                  max_skips=jnp.int32(c.max_skips), interval=jnp.int32(c.interval))


def _relative_output_error(linear, x: jax.Array) -> jax.Array:
    """``‖f(Q_NVFP4(x)) − f(x)‖_F / ‖f(x)‖_F`` of a routed linear (same weights on both sides; spec §3.2)."""
    y = linear(x, groups=jnp.int32(FLOAT)).astype(jnp.float32)
    yq = linear(x, groups=jnp.int32(NVFP4)).astype(jnp.float32)
    return jnp.linalg.norm(yq - y) / jnp.maximum(jnp.linalg.norm(y), jnp.finfo(jnp.float32).tiny)


def _e_in_effect(state: BlockState) -> jax.Array:
    return jnp.where(state.computed >= 2, state.e, jnp.nan).astype(jnp.float32)


class _Stepper:
    """The per-step block logic of one sampler program (module docstring)."""

    def __init__(self, dit: nnx.Module, names: tuple[str, ...], modes: Modes, params: Params):
        self.dit, self.names, self.modes, self.params = dit, names, modes, params
        self.blocks = dit.blocks()
        self.routed = modes.precision != "off" or modes.measure

    def planned_routes(self, b: int, state: BlockState, row: jax.Array) -> jax.Array:
        n, mode = len(self.names), self.modes.precision
        if mode == "dynamic":
            p = self.params
            return rules.predicted_routes(state.gamma, state.gamma_valid, p.alpha[b], p.beta[b], p.tau_q)
        if mode == "static":
            return row
        return jnp.full((n,), {"nvfp4": NVFP4, "int8": INT8}.get(mode, FLOAT), jnp.int32)

    def compute(self, b: int, hidden: tuple, context: tuple, state: BlockState, row: jax.Array):
        block, n = self.blocks[b], len(self.names)
        planned = self.planned_routes(b, state, row)
        chosen = [jnp.int32(FLOAT)] * n
        errors = [jnp.float32(0.0)] * n

        def route(name: str, x: jax.Array) -> jax.Array:
            i = self.names.index(name)
            r = planned[i]
            if self.modes.purify and self.modes.precision == "dynamic":
                r = rules.purified_route(r, x, self.params.outlier_ratio)
            if self.modes.measure:
                errors[i] = _relative_output_error(routed_linear(block, name), x)
            chosen[i] = r
            return r

        out = block(*hidden, *context, route=route if self.routed else None)
        delta = tuple(o - h for o, h in zip(out, hidden))
        gamma = rules.relative_l1(delta[0], hidden[0])
        e = rules.relative_l1(delta[0] - state.delta[0], state.delta[0])
        new = BlockState(delta=delta, e=e, computed=jnp.minimum(state.computed + 1, 2), e_acc=jnp.float32(0.0),
                         run=jnp.int32(0), gamma=gamma, gamma_valid=jnp.bool_(True))
        return out, new, (jnp.bool_(False), jnp.stack(chosen).astype(jnp.int32), gamma, jnp.stack(errors),
                          _e_in_effect(state))

    def skip(self, b: int, hidden: tuple, state: BlockState):
        n = len(self.names)
        out = tuple(h + d.astype(h.dtype) for h, d in zip(hidden, state.delta))
        valid = jnp.logical_and(state.gamma_valid, not self.modes.purify)
        new = state._replace(e_acc=state.e_acc + state.e, run=state.run + 1, gamma_valid=valid)
        return out, new, (jnp.bool_(True), jnp.full((n,), -1, jnp.int32), jnp.float32(jnp.nan),
                          jnp.zeros((n,), jnp.float32), _e_in_effect(state))

    def block_step(self, b: int, hidden: tuple, context: tuple, step: jax.Array, state: BlockState, row):
        p, mode = self.params, self.modes.cache
        if mode in ("off", "teacache"):
            return self.compute(b, hidden, context, state, row)
        if mode == "tdc":
            skip = rules.tdc_skip(state.e, state.computed >= 2, state.e_acc, state.run, p.tau_c, p.max_skips)
        else:  # fora
            skip = jnp.logical_and(step % p.interval != 0, state.computed >= 1)
        return jax.lax.cond(skip, lambda h, s: self.skip(b, h, s),
                            lambda h, s: self.compute(b, h, context, s, row), hidden, state)

    def stack(self, hidden: tuple, context: tuple, step: jax.Array, states: tuple, schedule_row: jax.Array):
        """Every block in order: ``(hidden, states, entries)`` with the log entries stacked over blocks."""
        entries, new_states = [], []
        for b in range(len(self.blocks)):
            hidden, s, entry = self.block_step(b, hidden, context, step, states[b], schedule_row[b])
            new_states.append(s)
            entries.append(entry)
        return hidden, tuple(new_states), tuple(jnp.stack(col) for col in zip(*entries))

    def teacache(self, hidden: tuple, context: tuple, step: jax.Array, state: SamplerState, schedule_row):
        st = state.stack
        change = rules.relative_l1(hidden[0] - st.previous, st.previous)
        skip = jnp.logical_and(st.started, st.acc + change < self.params.tau_c)

        def reuse(h, states):
            out = tuple(x + d.astype(x.dtype) for x, d in zip(h, st.delta))
            skipped = [self.skip(b, h, states[b]) for b in range(len(self.blocks))]
            new_states = tuple(s[1] for s in skipped)
            entries = tuple(jnp.stack(col) for col in zip(*(s[2] for s in skipped)))
            return out, new_states, entries, st._replace(previous=h[0], acc=st.acc + change)

        def run(h, states):
            out, new_states, entries = self.stack(h, context, step, states, schedule_row)
            delta = tuple(o - x for o, x in zip(out, h))
            return out, new_states, entries, StackState(delta=delta, previous=h[0], acc=jnp.float32(0.0),
                                                        started=jnp.bool_(True))

        return jax.lax.cond(skip, reuse, run, hidden, state.blocks)

    def velocity(self, latents, sigmas, cond, per_step, state: SamplerState):
        step, schedule_row = per_step
        hidden, context = self.dit.flow_embed(latents, sigmas, *cond)
        stack = state.stack
        if self.modes.cache == "teacache":
            hidden, blocks, entries, stack = self.teacache(hidden, context, step, state, schedule_row)
        else:
            hidden, blocks, entries = self.stack(hidden, context, step, state.blocks, schedule_row)
        log = StepLog(*(field.at[step].set(value.astype(field.dtype)) for field, value in zip(state.log, entries)))
        return self.dit.flow_head(hidden, context, latents.shape), SamplerState(blocks, stack, log)


def _initial_state(dit: nnx.Module, latents, sigmas, cond, steps: int, linears: int, teacache: bool) -> SamplerState:
    hidden = jax.eval_shape(lambda x, t: dit.flow_embed(x, t, *cond)[0], latents, sigmas)
    zeros = tuple(jnp.zeros(h.shape, h.dtype) for h in hidden)
    block = BlockState(delta=zeros, e=jnp.float32(0.0), computed=jnp.int32(0), e_acc=jnp.float32(0.0),
                       run=jnp.int32(0), gamma=jnp.float32(0.0), gamma_valid=jnp.bool_(False))
    blocks = len(dit.blocks())
    stack = StackState(delta=zeros, previous=zeros[0], acc=jnp.float32(0.0), started=jnp.bool_(False)) if teacache \
        else None
    log = StepLog(skipped=jnp.zeros((steps, blocks), bool), routes=jnp.zeros((steps, blocks, linears), jnp.int32),
                  gamma=jnp.zeros((steps, blocks), jnp.float32), erel=jnp.zeros((steps, blocks, linears), jnp.float32),
                  e=jnp.zeros((steps, blocks), jnp.float32))
    return SamplerState(blocks=(block,) * blocks, stack=stack, log=log)


@functools.partial(jax.jit, static_argnames=("graphdef", "names", "modes"))
def _run(graphdef, weights, x, sigmas, cond, uncond, guidance, params: Params, schedule, names, modes: Modes):
    dit = nnx.merge(graphdef, weights)
    steps = sigmas.shape[0] - 1
    both = cond if uncond is None else guidance_batch(cond, uncond)
    rows = x.shape[0] * (1 if uncond is None else 2)
    probe = (jax.ShapeDtypeStruct((rows, *x.shape[1:]), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.float32))
    state = _initial_state(dit, *probe, both, steps, len(names), modes.cache == "teacache")
    stepper = _Stepper(dit, names, modes, params)
    x, state = euler_flow_with_state(stepper.velocity, x, sigmas, cond, per_step=(jnp.arange(steps), schedule),
                                     state=state, uncond=uncond, guidance=guidance)
    return x, state.log


@dataclasses.dataclass(frozen=True)
class SixBitSample:
    """Latents ``[B, f, h, w, C]`` and the numpy ``StepLog`` of a run, with ``in_features`` of the routed linears."""

    latents: jax.Array
    log: StepLog
    in_features: tuple[int, ...]

    def skip_fraction(self) -> float:
        """Fraction of block evaluations replaced by a cached residual."""
        return float(np.mean(self.log.skipped))

    def average_bits(self, skipped_as_zero: bool = True) -> float:
        """Average activation width of the routed linears' inputs, weighted by their input widths (elements per
        token): NVFP4 4, INT8 8, float 16 bits; skipped evaluations count 0 (the paper's accounting) or, with
        ``skipped_as_zero=False``, are left out."""
        routes = np.asarray(self.log.routes)
        bits = np.where(routes < 0, 0, np.asarray(ROUTE_BITS)[np.clip(routes, 0, 2)])
        weight = np.broadcast_to(np.asarray(self.in_features, np.float64), bits.shape)
        if not skipped_as_zero:
            weight = np.where(routes < 0, 0.0, weight)
        return float(np.sum(bits * weight) / max(np.sum(weight), 1.0))

    def route_fractions(self) -> dict[str, float]:
        """The fraction of computed linear evaluations on each route."""
        routes = np.asarray(self.log.routes)
        computed = max(int(np.sum(routes >= 0)), 1)
        return {name: float(np.sum(routes == i) / computed) for i, name in enumerate(ROUTES)}


def sample_six_bit(transformer: nnx.Module, cond, config: SixBitConfig, *, key: jax.Array, shape: tuple[int, ...],
                   steps: int, guidance: float | None = None, uncond=None, shift: float = 1.0,
                   schedule: np.ndarray | None = None, measure: bool = False) -> SixBitSample:
    """``jquant.sampling.sample`` (same noise, schedule and guidance) under ``config``: a ``SixBitSample``.

    ``transformer`` must have the block protocol (``jquant.video_mixed.protocol``); ``cond`` / ``uncond`` are its
    text arguments. ``measure=True`` (with ``config.precision.mode == "off"``) also records each routed linear's
    NVFP4 relative output error per step (``log.erel``) for calibration. One compiled program per shape, step
    count and modes; thresholds and the predictor are arguments.
    """
    names = check_block_dit(transformer)
    if measure and config.precision.quantized:
        raise ValueError("sample_six_bit(measure=True) measures along the float-activation trajectory: give "
                         "config.precision.mode='off'.")
    check_sample_inputs(transformer, cond, key, shape, steps, guidance, uncond)
    blocks = transformer.blocks()
    p = config.precision
    table = p.schedule if schedule is None else np.asarray(schedule, np.int32)
    if p.mode == "static" and table.shape != (steps, len(blocks), len(names)):
        raise ValueError(f"the static schedule has shape {table.shape}; this run needs [steps={steps}, "
                         f"blocks={len(blocks)}, linears={len(names)}].")
    if table is None:
        table = np.zeros((steps, len(blocks), len(names)), np.int32)
    params = _params(config, len(blocks), len(names))
    model = routed_copy(transformer, names) if (p.quantized or measure) else transformer
    graphdef, weights = nnx.split(model)
    sigmas = flow_sigmas(steps, shift=shift).astype(np.float32)
    x = jax.random.normal(key, tuple(int(n) for n in shape), jnp.float32)
    g = None if guidance is None else jnp.float32(guidance)
    modes = Modes(p.mode, config.cache.mode, bool(p.purify), bool(measure))
    latents, log = _run(graphdef, weights, x, sigmas, cond, uncond, g, params, jnp.asarray(table), names, modes)
    return SixBitSample(latents=latents, log=StepLog(*(np.asarray(f) for f in log)),
                        in_features=in_features(blocks[0], names))


def compiled_programs() -> int:
    """How many sampler programs are compiled in this process (for checks that a step or a threshold change does
    not compile again)."""
    return _run._cache_size()
