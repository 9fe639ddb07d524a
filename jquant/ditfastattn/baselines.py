"""The DiTFastAttn (V1, Yuan et al. 2024) style plans DiTFastAttnV2 is compared against, built without search.

- ``window_plan``: V1's window attention (WA) for every head of every layer after step 0: a band of half-width
  ``w_k = max(1, floor(n_image / (2 k)))`` over the whole joint sequence (``pattern="band"``: text is not kept
  dense, which is what V2 says breaks text-image interaction) or, for comparison, V2's arrow for every head.
- ``residual_window_plan``: V1's window attention with residual sharing (WA-RS) for whole layers: every
  ``refresh_every`` steps a layer runs full attention and caches ``O_full - O_window``; in between it runs the
  window and adds the cached residual.
- ``layer_reuse_plan``: V1's attention sharing across timesteps (AST) for whole layers: at every step ``t`` with
  ``t % every != 0`` all heads reuse the previous step's output.
- ``AttentionPlan.full``: no compression.
"""

from __future__ import annotations

import numpy as np

from jquant.ditfastattn.plan import ADD, FULL, REFRESH, REUSE, AttentionPlan, JointLayout


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int.")
    return int(value)


def window_half_width(layout: JointLayout, factor: int) -> int:
    """``w_k = max(1, floor(n_image / (2 k)))`` (spec §3.1)."""
    return max(1, layout.n_image // (2 * _positive(factor, "factor")))


def window_plan(steps: int, layers: int, heads: int, layout: JointLayout, *, factor: int,
                pattern: str = "band") -> AttentionPlan:
    """Every head local (``pattern`` band or arrow) with ``w_factor`` at every step after the first."""
    windows = np.full((steps, layers, heads), window_half_width(layout, factor), np.int32)
    windows[0] = FULL
    return AttentionPlan.build(windows, layout, pattern=pattern, method=f"v1_window_{pattern}", factor=int(factor))


def residual_window_plan(steps: int, layers: int, heads: int, layout: JointLayout, *, factor: int,
                         refresh_every: int) -> AttentionPlan:
    """V1's WA-RS for whole layers: refresh at steps ``t % refresh_every == 0``, window + residual in between."""
    every = _positive(refresh_every, "refresh_every")
    windows = np.full((steps, layers, heads), window_half_width(layout, factor), np.int32)
    residual = np.full(windows.shape, ADD, np.int8)
    residual[::every] = REFRESH
    return AttentionPlan.build(windows, layout, residual=residual, pattern="band", method="v1_residual_window",
                               factor=int(factor), refresh_every=every)


def layer_reuse_plan(steps: int, layers: int, heads: int, layout: JointLayout, *, every: int) -> AttentionPlan:
    """V1's AST for whole layers: full at steps ``t % every == 0``, the previous output reused otherwise."""
    every = _positive(every, "every")
    windows = np.full((steps, layers, heads), REUSE, np.int32)
    windows[::every] = FULL
    return AttentionPlan.build(windows, layout, method="v1_layer_reuse", every=every)
