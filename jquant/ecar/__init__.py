"""ECAR (Yuan et al. 2024, "E-CAR: Efficient Continuous Autoregressive Image Generation via Multistage Modeling"):
the algorithm side of the ``ecar`` model family (spec ``ecar.md``).

- ``stages``: ``StageSchedule`` (resolutions, noise-window edges, steps per stage; bad input refused), token counts,
  Pyramid Flow's corrected start levels, the block-causal mask;
- ``renoise``: area down-sampling, nearest ×2 up-sampling and the up-sample + re-noise step with 2x2 block noise;
- ``multistage``: the per-stage training endpoints and the stage-by-stage flow sampler.
"""

from jquant.ecar.multistage import multistage_sample, stage_endpoints
from jquant.ecar.renoise import area_down, block_covariance, block_noise, renoise, upsample2
from jquant.ecar.stages import (GAMMA, StageSchedule, block_causal_mask, default_resolutions, equal_edges,
                                renoise_alpha, renoise_beta, split_steps)

__all__ = ["GAMMA", "StageSchedule", "area_down", "block_causal_mask", "block_covariance", "block_noise",
           "default_resolutions", "equal_edges", "multistage_sample", "renoise", "renoise_alpha", "renoise_beta",
           "split_steps", "stage_endpoints", "upsample2"]
