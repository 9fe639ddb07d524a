"""6Bit-Diffusion on a text-to-video pipeline (``jquant.text_to_video.TextToVideo`` whose transformer has the block
protocol): measurement along calibration trajectories, calibration of a config, generation with a config.

``generate_latents(pipe, prompts, config, seed=s)`` starts from the noise ``pipe.generate_latents`` draws for the same
seed and prompts, with the pipeline's schedule and guidance, so a config with both parts off gives its latents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.module_jit import module_jit
from jquant.sampling.flow import generation_key
from jquant.video_mixed.calibrate import PredictorFit, choose_tau_q, fit_predictor, nvfp4_share
from jquant.video_mixed.config import CacheConfig, PrecisionConfig, SixBitConfig
from jquant.video_mixed.protocol import check_block_dit
from jquant.video_mixed.runtime import SixBitSample, sample_six_bit


def _options(pipe, steps: int | None, guidance) -> tuple[int, float | None]:
    return (pipe.defaults.steps if steps is None else steps,
            pipe.defaults.guidance if guidance == "default" else guidance)


def generate_latents(pipe, prompts: Sequence[str], config: SixBitConfig, *, seed: int, steps: int | None = None,
                     guidance: float | None | str = "default", frames: int | None = None,
                     measure: bool = False) -> SixBitSample:
    """``pipe.generate_latents`` (same noise for ``seed``, schedule, guidance) under ``config``."""
    check_block_dit(pipe.transformer)
    steps, guidance = _options(pipe, steps, guidance)
    cond, uncond = pipe.encode(prompts)
    shape = (len(prompts), *pipe.latent_shape(frames))
    pipe.check_memory(len(prompts), frames, guided=guidance is not None)
    return sample_six_bit(pipe.transformer, cond, config, key=generation_key(seed, None), shape=shape, steps=steps,
                          guidance=guidance, uncond=None if guidance is None else uncond, shift=pipe.defaults.shift,
                          measure=measure)


@module_jit
def _decode(vae: nnx.Module, latents: jax.Array) -> jax.Array:
    return vae.decode_latents(latents)


def generate(pipe, prompts: Sequence[str], config: SixBitConfig, **options) -> tuple[jax.Array, SixBitSample]:
    """``(videos [B, F, H, W, 3] in [-1, 1], the SixBitSample)``; ``options`` as ``generate_latents``."""
    result = generate_latents(pipe, prompts, config, **options)
    return jnp.clip(_decode(pipe.vae, result.latents).astype(jnp.float32), -1.0, 1.0), result


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Measured float-activation runs, one per calibration prompt: ``gamma [R, S, B]``, ``erel [R, S, B, L]``."""

    gamma: np.ndarray
    erel: np.ndarray
    in_features: tuple[int, ...]


def measure(pipe, prompts: Sequence[str], *, seed: int, steps: int | None = None,
            guidance: float | None | str = "default") -> Measurement:
    """Γ per block and NVFP4's relative output error per routed linear at every step of each prompt's guided run
    (prompt ``i`` from seed ``seed + i``), along the float-activation trajectory."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError(f"prompts must be a non-empty list of calibration captions, got {prompts!r}.")
    runs = [generate_latents(pipe, [p], SixBitConfig(), seed=seed + i, steps=steps, guidance=guidance, measure=True)
            for i, p in enumerate(prompts)]
    return Measurement(gamma=np.stack([r.log.gamma for r in runs]), erel=np.stack([r.log.erel for r in runs]),
                       in_features=runs[0].in_features)


def calibrate(pipe, prompts: Sequence[str], *, seed: int = 0, steps: int | None = None,
              guidance: float | None | str = "default", target_bits: float = 6.0, tau_c: float = 0.1,
              max_skips: int = 2) -> tuple[SixBitConfig, PredictorFit, Measurement]:
    """The 6Bit-Diffusion config of ``pipe`` (DMPQ with PDR + TDC): the predictor fitted on ``prompts``' measured
    runs, τ_q for an average of ``target_bits`` activation bits on them, the cache at ``tau_c`` / ``max_skips``."""
    CacheConfig(mode="tdc", tau_c=tau_c, max_skips=max_skips)  # checks before the long work
    nvfp4_share(target_bits)
    data = measure(pipe, prompts, seed=seed, steps=steps, guidance=guidance)
    fit = fit_predictor(data.gamma, data.erel)
    tau_q = choose_tau_q(fit, data.gamma, data.in_features, target_bits)
    config = SixBitConfig(precision=PrecisionConfig(mode="dynamic", alpha=fit.alpha, beta=fit.beta, tau_q=tau_q),
                          cache=CacheConfig(mode="tdc", tau_c=tau_c, max_skips=max_skips))
    return config, fit, data
