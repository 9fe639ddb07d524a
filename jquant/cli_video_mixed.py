"""6Bit-Diffusion in the text-to-video commands (``jquant.cli_video``).

- ``jquant quantize --recipe 6bit-diffusion`` on a video pipeline: after the recipe's NVFP4 weights, the activation
  predictor is fitted on measured runs of the first ``PREDICTOR_PROMPTS`` calibration captions, τ_q set for 6 bits
  on average, the Temporal Delta Cache at τ_c = 0.1, N_max = 2; the config is saved beside the pipeline
  (``six_bit_diffusion.json``);
- ``jquant generate`` of a pipeline folder holding that file samples with it (``jquant.video_mixed``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RECIPE = "6bit-diffusion"
PREDICTOR_PROMPTS = 16


def calibrate(pipe, recipe_name: str, captions: list[str], seed: int):
    """``(SixBitConfig, summary)`` for a pipeline quantized with the ``6bit-diffusion`` recipe, else None."""
    if recipe_name != RECIPE:
        return None
    from jquant.video_mixed.pipeline import calibrate as calibrate_pipeline

    config, fit, data = calibrate_pipeline(pipe, captions[:PREDICTOR_PROMPTS], seed=seed)
    summary = {"predictor_prompts": len(data.gamma), "tau_q": config.precision.tau_q, "tau_c": config.cache.tau_c,
               "max_skips": config.cache.max_skips, "pearson_r_pooled": fit.r_pooled,
               "pearson_r_median_per_linear": float(np.nanmedian(fit.r))}
    return config, summary


def saved_config(model: str):
    """The 6Bit-Diffusion config of the pipeline folder ``model`` names, or None."""
    from jquant.models.loading import resolve
    from jquant.video_mixed.config import SixBitConfig

    return SixBitConfig.load(Path(resolve(model)))


def generate(pipe, config, prompt: str, *, seeds: list[int], steps: int, guidance, frames: int
             ) -> tuple[np.ndarray, dict]:
    """``(clips [N, F, H, W, 3], summary)``: one clip per seed of ``prompt`` under ``config``."""
    from jquant.video_mixed.pipeline import generate as generate_six_bit

    runs = [generate_six_bit(pipe, [prompt], config, seed=s, steps=steps, guidance=guidance, frames=frames)
            for s in seeds]
    samples = [r[1] for r in runs]
    summary = {"precision": config.precision.mode, "cache": config.cache.mode,
               "skip_fraction": float(np.mean([s.skip_fraction() for s in samples])),
               "average_activation_bits": float(np.mean([s.average_bits() for s in samples]))}
    return np.concatenate([np.asarray(r[0]) for r in runs]), summary
