"""Restoring a VGDFR clip's frame count (spec ``vgdfr.md`` §3.2(h)): the kept frames go back to their video indices
and each dropped frame ``v`` is synthesised between its kept neighbours ``a < v < b``. The official code uses RIFE
(learned; no weights here), so the interpolator is pluggable: any ``(frames [B, T', H, W, C], plan) -> [B, T_v, H,
W, C]``. The default, ``linear_interpolate``, blends::

    f_v = (1 - w) f_a + w f_b,   w = (v - a) / (b - a)

which for a 2-merge gives ratio 1/2 between frames ``i`` and ``i + 2`` and for a c-merge ratios ``1/c .. (c-1)/c``
between ``i`` and ``i + c``, the ratios at which RIFE is asked. A kept frame is copied exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jquant.frame_rate.schedule import MergePlan

Interpolator = Callable[[jax.Array, MergePlan], jax.Array]


def blend_weights(plan: MergePlan) -> np.ndarray:
    """``W [T_v, T']``: row ``v`` the blend of kept frames giving video frame ``v`` (a one-hot row for a kept one)."""
    kept = np.asarray(plan.kept_frames)
    w = np.zeros((plan.frames, len(kept)), np.float32)
    for v in range(plan.frames):
        b = int(np.searchsorted(kept, v))
        if b < len(kept) and kept[b] == v:
            w[v, b] = 1.0
            continue
        a = b - 1  # frame 0 and the tail are always kept, so 0 <= a < b < len(kept)
        t = (v - kept[a]) / (kept[b] - kept[a])
        w[v, a], w[v, b] = 1.0 - t, t
    return w


def linear_interpolate(frames: jax.Array, plan: MergePlan) -> jax.Array:
    """``frames [B, T', H, W, C]`` at the plan's kept frames -> ``[B, T_v, H, W, C]`` (module docstring)."""
    if frames.ndim != 5 or frames.shape[1] != len(plan.kept_frames):
        raise ValueError(f"linear_interpolate: frames must be [B, {len(plan.kept_frames)}, H, W, C] (the plan's kept "
                         f"frames), got {tuple(frames.shape)}.")
    return jnp.einsum("vk,bkhwc->bvhwc", blend_weights(plan), frames, precision=jax.lax.Precision.HIGHEST)
