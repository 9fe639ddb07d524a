"""DiTFastAttnV2's plan search (spec §3.2-§3.4): local error per head and candidate, a budgeted choice per layer
and step, progressive calibration along the sampler's trajectory.

Candidates (spec §3.1): ``REUSE`` (the head's previous-step output, saving 1) and arrows ``arrow_k`` with
half-width ``w_k = max(1, floor(n_image / (2 k)))`` for ``k`` in ``(8, 16, 32)`` (the floor at 1 and the removal of
equal widths matter only at tiny ``n_image``); the saving of an arrow is the exact fraction of the ``S x S`` score
matrix its mask removes (``1 - arrow_pairs / S^2``; the paper's closed form approximates it).

Error (§3.2), per head ``h`` and candidate ``m`` on the calibration batch::

    RSE(h, m) = mean_{b,s,d} (Ô_m - O)^2 / mean_{b,s,d} (O - mean(O))^2

with ``O`` the head's full-attention output. Choice (§3.3), per layer and step, a multiple-choice knapsack::

    maximise sum_{h,m} saving_m x_{h,m}   s.t.  sum_m x_{h,m} <= 1 (each h),  sum_{h,m} RSE(h,m) x_{h,m} <= δ

over the pairs with ``RSE < 1.5 δ / H`` (the official pre-filter), solved exactly with ``scipy.optimize.milp``
(HiGHS; the official code uses GLPK) or greedily (best saving per unit error first). ``δ`` bounds the summed error
of one layer at one step, not of the run.

Calibration (§3.4): the model samples the calibration prompts as one guided batch, eagerly; step 0 is full; at
every later step and layer the hook computes ``O`` and every candidate, chooses, and *emits the chosen outputs*,
so later layers and steps see the compression and reuse takes the previous step's planned output.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from jquant import ops
from jquant.ditfastattn.plan import FULL, REUSE, AttentionPlan, JointLayout, arrow_pairs
from jquant.ditfastattn.runtime import HeadCache
from jquant.ditfastattn.sampling import empty_cache, model_dims, model_layout
from jquant.sampling.flow import check_sample_inputs, guided_velocity
from jquant.sampling.schedule import flow_sigmas

ARROW_FACTORS = (8, 16, 32)
SOLVERS = ("ilp", "greedy")
PREFILTER = 1.5


def candidate_windows(layout: JointLayout, factors: Sequence[int] = ARROW_FACTORS) -> list[int]:
    """``[REUSE, w_k ...]``: the candidates of the module docstring, widest arrow first, equal widths once."""
    widths = sorted({max(1, layout.n_image // (2 * int(k))) for k in factors}, reverse=True)
    return [REUSE, *widths]


def savings(layout: JointLayout, candidates: Sequence[int]) -> np.ndarray:
    """Fraction of a head's score matrix each candidate saves: 1 for reuse, ``1 - arrow_pairs / S^2`` for arrows."""
    full = layout.length ** 2
    return np.array([1.0 if c == REUSE else 1.0 - arrow_pairs(layout, c) / full for c in candidates])


def relative_squared_error(candidate: jax.Array, full: jax.Array) -> np.ndarray:
    """``RSE [H]`` of ``candidate`` against ``full`` (both ``[B, S, H, D]``), spec §3.2."""
    full = jnp.asarray(full, jnp.float32)
    err = jnp.mean(jnp.square(jnp.asarray(candidate, jnp.float32) - full), axis=(0, 1, 3))
    spread = jnp.var(full, axis=(0, 1, 3))
    return np.asarray(err / jnp.maximum(spread, jnp.finfo(jnp.float32).tiny), np.float64)


def _eligible(rse: np.ndarray, budget: float, prefilter: bool) -> np.ndarray:
    limit = PREFILTER * budget / rse.shape[0] if prefilter else budget
    return np.isfinite(rse) & (rse < limit) & (rse <= budget)


def choose_ilp(rse: np.ndarray, saving: np.ndarray, budget: float, *, prefilter: bool = True) -> np.ndarray:
    """Exact multiple-choice knapsack (module docstring) on ``rse [H, M]`` and ``saving [M]`` -> ``[H]`` the chosen
    candidate index per head, ``-1`` for none (full attention)."""
    heads, methods = rse.shape
    pairs = np.argwhere(_eligible(rse, budget, prefilter))
    choice = np.full(heads, -1)
    if not len(pairs):
        return choice
    n = len(pairs)
    values = saving[pairs[:, 1]]
    errors = rse[pairs[:, 0], pairs[:, 1]]
    one_per_head = np.zeros((heads, n))
    one_per_head[pairs[:, 0], np.arange(n)] = 1.0
    constraints = [LinearConstraint(one_per_head, -np.inf, 1.0), LinearConstraint(errors[None], -np.inf, budget)]
    tie_break = 1e-9 * errors  # among equal savings prefer the smaller error
    res = milp(-values + tie_break, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints,
               options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise RuntimeError(f"DiTFastAttn plan search: the knapsack solver failed ({res.message}).")
    for (h, m), x in zip(pairs, res.x):
        if x > 0.5:
            choice[h] = m
    return choice


def choose_greedy(rse: np.ndarray, saving: np.ndarray, budget: float, *, prefilter: bool = True) -> np.ndarray:
    """Greedy multiple-choice knapsack: eligible (head, candidate) pairs by saving per unit error (then saving), each
    taken when its head is still free and the error still fits -> ``[H]`` as ``choose_ilp``."""
    pairs = np.argwhere(_eligible(rse, budget, prefilter))
    choice = np.full(rse.shape[0], -1)
    spent = 0.0
    order = sorted(pairs.tolist(), key=lambda p: (-saving[p[1]] / max(rse[p[0], p[1]], 1e-12), -saving[p[1]]))
    for h, m in order:
        if choice[h] < 0 and spent + rse[h, m] <= budget:
            choice[h], spent = m, spent + rse[h, m]
    return choice


def choose_brute_force(rse: np.ndarray, saving: np.ndarray, budget: float, *, prefilter: bool = True) -> float:
    """The knapsack's optimal objective by enumeration (tests; ``(M + 1)^H`` assignments)."""
    ok = _eligible(rse, budget, prefilter)
    best = 0.0
    for assign in itertools.product(range(-1, rse.shape[1]), repeat=rse.shape[0]):
        used = [(h, m) for h, m in enumerate(assign) if m >= 0]
        if all(ok[h, m] for h, m in used) and sum(rse[h, m] for h, m in used) <= budget:
            best = max(best, sum(saving[m] for _, m in used))
    return best


SOLVE = {"ilp": choose_ilp, "greedy": choose_greedy}


class _SearchHook:
    """The calibration hook of one step: chooses each layer's heads and emits the chosen outputs (eager)."""

    def __init__(self, step: int, cache: HeadCache, layout: JointLayout, candidates: list[int], saving: np.ndarray,
                 budget: float, solver: str, prefilter: bool):
        self.step, self.cache, self.layout = step, cache, layout
        self.candidates, self.saving, self.budget = candidates, saving, budget
        self.solver, self.prefilter = solver, prefilter
        self.windows: dict[int, np.ndarray] = {}
        self.errors: dict[int, np.ndarray] = {}
        self.outputs: dict[int, jax.Array] = {}

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        full = ops.attention(q, k, v, ops.Full())
        heads = q.shape[2]
        windows = np.full(heads, FULL, np.int32)
        rse = np.zeros((heads, len(self.candidates)))
        out = full
        if self.step > 0:
            options = dict(n_text=self.layout.n_text, text_start=self.layout.text_start, pattern="arrow")
            outputs = [self.cache.outputs[layer].astype(full.dtype) if c == REUSE else
                       ops.local_attention(q, k, v, [c] * heads, **options) for c in self.candidates]
            rse = np.stack([relative_squared_error(o, full) for o in outputs], axis=1)
            choice = SOLVE[self.solver](rse, self.saving, self.budget, prefilter=self.prefilter)
            pick = [outputs[m][:, :, h] if m >= 0 else full[:, :, h] for h, m in enumerate(choice)]
            out = jnp.stack(pick, axis=2)
            windows = np.array([self.candidates[m] if m >= 0 else FULL for m in choice], np.int32)
        self.windows[layer], self.errors[layer], self.outputs[layer] = windows, rse, out
        return out

    def new_cache(self) -> HeadCache:
        layers = len(self.outputs)
        outputs = jnp.stack([self.outputs[i] for i in range(layers)]).astype(self.cache.outputs.dtype)
        return HeadCache(outputs, self.cache.residuals)


def search_plan(transformer, cond: Any, *, budget: float, key: jax.Array, shape: tuple[int, int, int, int],
                steps: int, guidance: float | None = None, uncond: Any = None, shift: float = 1.0,
                solver: str = "ilp", factors: Sequence[int] = ARROW_FACTORS, prefilter: bool = True
                ) -> tuple[AttentionPlan, dict]:
    """The plan for ``transformer`` at threshold ``δ = budget`` from one guided calibration batch (module
    docstring). ``cond = (text [B, S, D], pooled [B, P])`` of the calibration prompts (``uncond`` their
    unconditional inputs); ``shape`` the latents ``[B, h, w, C]``. Returns ``(plan, details)`` with ``details``
    holding the RSE table ``[T, L, H, M]`` and the candidates."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"search_plan: budget={budget!r} must be a number in (0, 1] (the summed relative error "
                         "allowed per layer and step, δ of the paper; 0.05-1.0 in its experiments).")
    if solver not in SOLVERS:
        raise ValueError(f"search_plan: solver={solver!r} is not one of {SOLVERS}.")
    check_sample_inputs(transformer, cond, key, shape, steps, guidance, uncond)
    layout = model_layout(transformer, shape, np.shape(cond[0])[1])
    layers, heads, _ = model_dims(transformer)
    candidates = candidate_windows(layout, factors)
    saving = savings(layout, candidates)
    sigmas = flow_sigmas(steps, shift=shift).astype(np.float32)
    x = jax.random.normal(key, tuple(int(n) for n in shape), jnp.float32)
    g = None if guidance is None else jnp.float32(guidance)
    both = None if g is None else jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
    cache = empty_cache(transformer, shape[0] * (1 if g is None else 2), layout)
    windows = np.full((steps, layers, heads), FULL, np.int32)
    errors = np.zeros((steps, layers, heads, len(candidates)))
    for t in range(steps):
        hook = _SearchHook(t, cache, layout, candidates, saving, float(budget), solver, prefilter)

        def velocity(x, sig, c, step, state, hook=hook):
            return transformer.flow_velocity(x, sig, *c, attention=hook), state

        v, _ = guided_velocity(velocity, x, sigmas[t], cond, both, g, None, None)
        x = x + (sigmas[t + 1] - sigmas[t]) * v
        cache = hook.new_cache()
        windows[t] = np.stack([hook.windows[i] for i in range(layers)])
        errors[t] = np.stack([hook.errors[i] for i in range(layers)])
    plan = AttentionPlan.build(windows, layout, method="ditfastattn_v2", budget=float(budget), solver=solver,
                               candidates=tuple(candidates), calibration_batch=int(shape[0]))
    return plan, {"rse": errors, "candidates": candidates, "savings": saving}
