"""Dynamic latent frame rate for video generation: DLFR-VAE (spec ``dlfr_vae.md``) and VGDFR (spec ``vgdfr.md``).

- ``similarity``: ``neighbour_ssim`` (SSIM of frames ``d`` apart) and ``content_complexity`` (mean ``1 - SSIM``).
- VGDFR: ``schedule`` (``MergePlan``, threshold / keep-ratio schedulers), ``merge`` (pixel-space merge, re-noise),
  ``interpolate`` (pluggable frame restoration, linear default), ``vgdfr`` (``FrameRateConfig``,
  ``sample_dynamic_frame_rate``: the two-phase sampler with DyRoPE).
- DLFR-VAE: ``dlfr`` (``ChunkRates``, ``VariableRateLatent``, ``chunk_complexity``, threshold / budget factors,
  ``dlfr.schedule`` / ``dlfr.encode`` / ``dlfr.decode``: the VAE's per-chunk feature pooling, or the pixel baseline).
"""

from jquant.frame_rate.dlfr import (ChunkRates, VariableRateLatent, chunk_complexity, factors_for_budget,
                                    factors_from_thresholds)
from jquant.frame_rate.interpolate import linear_interpolate
from jquant.frame_rate.schedule import MergePlan, keep_ratio_schedule, threshold_schedule
from jquant.frame_rate.similarity import content_complexity, neighbour_ssim
from jquant.frame_rate.vgdfr import FrameRateConfig, sample_dynamic_frame_rate

__all__ = ["ChunkRates", "VariableRateLatent", "chunk_complexity", "factors_for_budget", "factors_from_thresholds",
           "FrameRateConfig", "MergePlan", "content_complexity", "keep_ratio_schedule", "linear_interpolate",
           "neighbour_ssim", "sample_dynamic_frame_rate", "threshold_schedule"]
