"""DiTFastAttnV2 on a text-to-image pipeline: search a plan on calibration prompts and attach it.

``compress_pipeline(pipe, budget=0.2, prompts=[...], seed=0)`` returns ``(pipe', details)``: ``pipe'`` is ``pipe``
with ``attention_plan`` set (and its sampling defaults fixed to the plan's steps and image size); save it with
``jquant.text_to_image.save_pipeline`` and ``generate`` / ``jquant generate`` run the plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from jquant.ditfastattn.search import ARROW_FACTORS, search_plan


def compress_pipeline(pipe, *, budget: float, prompts: Sequence[str], seed: int = 0, solver: str = "ilp",
                      steps: int | None = None, image_size: int | None = None,
                      factors: Sequence[int] = ARROW_FACTORS):
    """The plan of ``jquant.ditfastattn.search_plan`` for ``pipe`` (a ``TextToImage``) at threshold ``budget``,
    calibrated on ``prompts`` sampled together from ``seed`` with the pipeline's guidance and schedule, for
    ``steps`` (default: the pipeline's) and ``image_size`` (default: the pipeline's). Returns ``(pipe', details)``."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError(f"compress_pipeline: prompts must be a non-empty list of calibration captions, got "
                         f"{prompts!r}.")
    defaults = dataclasses.replace(pipe.defaults, steps=steps or pipe.defaults.steps,
                                   image_size=image_size or pipe.defaults.image_size)
    target = dataclasses.replace(pipe, defaults=defaults, attention_plan=None)
    cond, uncond = target.encode(list(prompts))
    guidance = defaults.guidance
    plan, details = search_plan(target.transformer, cond, budget=budget, key=jax.random.key(seed),
                                shape=(len(prompts), *target.latent_shape), steps=defaults.steps, guidance=guidance,
                                uncond=None if guidance is None else uncond, shift=defaults.shift, solver=solver,
                                factors=factors)
    return dataclasses.replace(target, attention_plan=plan), details
