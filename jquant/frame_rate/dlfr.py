"""DLFR-VAE: a dynamic latent frame rate for a pretrained causal video VAE, training-free (spec ``dlfr_vae.md``).

Yuan et al. 2025, "DLFR-VAE: Dynamic Latent Frame Rate VAE for Video Generation" (arXiv 2502.11897). A clip of
``F = 1 + L M`` frames is split into the causal first frame and ``M`` chunks of ``L`` frames (default 16). Each chunk
gets a temporal down-sampling factor ``m_i`` in ``factors`` (default {1, 2, 4}) from its content complexity (§3.1)

    C(S_i) = 1 / (n - 1) Σ_j (1 - SSIM(x_j, x_{j+1}))          (``jquant.frame_rate.similarity``)

either by thresholds ``θ_1 < ... < θ_{N-1}`` (``C < θ_1`` -> the largest factor, ``C >= θ_{N-1}`` -> the smallest)
or by a budget: the target average temporal compression ``r`` (e.g. 6, 8, 12 against the VAE's native 4): chunks
ranked by ``C``, the lowest-``C`` ones get the largest factor until ``M L / Σ_i (L / (c_t m_i)) >= r``.

The VAE then pools each chunk's features by ``m_i`` at a depth where they are still at the full frame rate and
repeats them at the mirror depth of the decoder (§3.2, ``AutoencoderKLHunyuanVideo.encode(videos, frame_rates=...)``;
the weights are unchanged), so the latent has ``1 + Σ_i (L / c_t) / m_i`` frames (``ChunkRates.latent_frames``).
The pixel-level baseline (average groups of ``m_i`` frames before encoding, repeat after decoding) is the fallback
and the test oracle (``encode(..., path="pixel")``).

Every clip has its own schedule, so these functions take one clip at a time (``videos [1, F, H, W, C]``) where the
rates come from the content; ``encode`` with given rates takes a batch that shares them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jquant.frame_rate.similarity import neighbour_ssim
from jquant.models.hunyuan_video_vae import AutoencoderKLHunyuanVideo
from jquant.models.hunyuan_video_vae_blocks import pool_chunks, repeat_chunks

LatentPath = Literal["feature", "pixel"]
DEFAULT_FACTORS = (1, 2, 4)


@dataclasses.dataclass(frozen=True)
class ChunkRates:
    """A clip's schedule: ``factors[i]`` = ``m_i``, the extra temporal down-sampling of chunk ``i`` (``chunk`` pixel
    frames after the causal first frame), on top of the VAE's ``temporal_ratio`` ``c_t``."""

    factors: tuple[int, ...]
    chunk: int = 16
    temporal_ratio: int = 4

    def __post_init__(self):
        object.__setattr__(self, "factors", tuple(int(m) for m in self.factors))
        if not self.factors or min(self.factors) < 1:
            raise ValueError(f"ChunkRates.factors={self.factors!r} must be positive ints, one per chunk.")
        if self.chunk < 1 or any(self.chunk % (self.temporal_ratio * m) for m in self.factors):
            raise ValueError(f"ChunkRates.chunk={self.chunk} must be a multiple of temporal_ratio "
                             f"({self.temporal_ratio}) x every factor ({sorted(set(self.factors))}).")

    @property
    def pixel_frames(self) -> int:
        """``1 + L M``."""
        return 1 + self.chunk * len(self.factors)

    @property
    def latent_frames(self) -> int:
        """The shape law ``1 + Σ_i (L / c_t) / m_i``."""
        return 1 + sum(self.chunk // (self.temporal_ratio * m) for m in self.factors)

    @property
    def compression(self) -> float:
        """Average temporal compression of the chunks: ``L M / (latent_frames - 1)`` (the VAE's ``c_t`` at all
        ``m_i = 1``)."""
        return self.chunk * len(self.factors) / (self.latent_frames - 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VariableRateLatent:
    """Latents ``[B, rates.latent_frames, h, w, L]`` (unscaled posterior means) with the schedule that made them and
    the path (``"feature"``: pooled inside the VAE; ``"pixel"``: the pixel-level baseline) that decodes them."""

    latents: jax.Array
    rates: ChunkRates = dataclasses.field(metadata={"static": True})
    path: LatentPath = dataclasses.field(default="feature", metadata={"static": True})


# ----------------------------------------------------------------------------
# Scheduler
# ----------------------------------------------------------------------------


def _check_clip(videos: jax.Array, chunk: int, temporal_ratio: int, factors: Sequence[int]) -> int:
    """The number of chunks ``M`` of ``videos [B, 1 + chunk M, H, W, C]``."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 \
            or chunk % (temporal_ratio * max(factors)):
        raise ValueError(f"chunk={chunk!r} must be a positive multiple of the VAE's temporal compression "
                         f"({temporal_ratio}) x the largest factor ({max(factors)}), e.g. {temporal_ratio * max(factors)}.")
    if videos.ndim != 5:
        raise ValueError(f"videos must be [batch, frames, height, width, channels], got shape {videos.shape}.")
    frames = videos.shape[1]
    if frames < 1 + chunk:
        raise ValueError(f"videos have {frames} frames, shorter than the first frame plus one chunk (1 + chunk = "
                         f"{1 + chunk}); pass a longer clip or a smaller chunk.")
    if (frames - 1) % chunk:
        raise ValueError(f"videos have {frames} frames; a dynamic frame rate needs 1 + chunk k = 1 + {chunk}k: "
                         f"drop the last {(frames - 1) % chunk} frames.")
    return (frames - 1) // chunk


def _check_factors(factors: Sequence[int]) -> tuple[int, ...]:
    factors = tuple(sorted(set(factors))) if factors else ()
    if not factors or any(isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1 for m in factors):
        raise ValueError(f"factors={factors!r} must be positive ints, e.g. (1, 2, 4).")
    return tuple(int(m) for m in factors)


def chunk_complexity(videos: jax.Array, chunk: int = 16, *, downsample: int = 1, data_range: float = 2.0,
                     temporal_ratio: int = 4, factors: Sequence[int] = DEFAULT_FACTORS) -> np.ndarray:
    """``C [B, M]``: the content complexity of each chunk of ``videos [B, 1 + chunk M, H, W, C]`` (values in
    ``[-1, 1]``: ``data_range`` 2), over the ``chunk - 1`` neighbouring pairs inside the chunk, on a copy average-pooled
    by ``downsample`` in height and width (SSIM needs at least 11 x 11 pixels after it)."""
    factors = _check_factors(factors)
    m = _check_clip(jnp.asarray(videos), chunk, temporal_ratio, factors)
    videos = jnp.asarray(videos, jnp.float32)
    b, f, h, w, c = videos.shape
    if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1 \
            or h % downsample or w % downsample or min(h, w) // downsample < 11:
        raise ValueError(f"downsample={downsample!r} must be a positive int dividing height {h} and width {w} and "
                         "leaving frames of at least 11 x 11 pixels (SSIM's window).")
    small = videos.reshape(b, f, h // downsample, downsample, w // downsample, downsample, c).mean(axis=(3, 5))
    distance = 1 - np.asarray(neighbour_ssim(small, 1, data_range=data_range), np.float64)  # [B, F - 1]
    # chunk i holds frames 1 + i L .. (i + 1) L, so its pairs (j, j + 1) start at j = 1 + i L .. (i + 1) L - 1
    return np.stack([distance[:, 1 + i * chunk:(i + 1) * chunk].mean(axis=1) for i in range(m)], axis=1)


def factors_from_thresholds(complexity: Sequence[float], thresholds: Sequence[float],
                            factors: Sequence[int] = DEFAULT_FACTORS) -> tuple[int, ...]:
    """One clip's ``m_i``: level ``k`` = the number of thresholds ``<= C_i`` (``thresholds`` increasing, one fewer than
    ``factors``; finite ones in ``[0, 1]``, ``±inf`` allowed), then the ``k``-th factor from the largest down: ``+inf``
    everywhere gives every chunk the largest factor, ``-inf`` the smallest."""
    factors = _check_factors(factors)
    theta = np.asarray(thresholds, np.float64)
    if theta.shape != (len(factors) - 1,) or np.any(theta[1:] < theta[:-1]) or np.any(np.isnan(theta)) \
            or np.any(np.isfinite(theta) & ((theta < 0) | (theta > 1))):
        raise ValueError(f"thresholds={list(thresholds)!r} must be {len(factors) - 1} increasing values of 1 - SSIM "
                         f"(one fewer than factors={factors}), each in [0, 1] or +-inf.")
    levels = (np.asarray(complexity, np.float64)[:, None] >= theta[None, :]).sum(axis=1)
    return tuple(factors[::-1][k] for k in levels)


def factors_for_budget(complexity: Sequence[float], target_compression: float, *, chunk: int = 16,
                       temporal_ratio: int = 4, factors: Sequence[int] = DEFAULT_FACTORS) -> tuple[int, ...]:
    """One clip's ``m_i`` for an average temporal compression of at least ``target_compression`` (module docstring):
    chunks in increasing ``C`` (ties by position) take the larger factors, one step at a time, until the latent has at
    most ``L M / target`` frames after the first; a more complex chunk never gets a larger factor than a simpler one."""
    factors = _check_factors(factors)
    c = np.asarray(complexity, np.float64)
    lo, hi = temporal_ratio * factors[0], temporal_ratio * factors[-1]
    if isinstance(target_compression, bool) or not isinstance(target_compression, (int, float)) \
            or not lo <= target_compression <= hi:
        raise ValueError(f"target_compression={target_compression!r} must be in [{lo}, {hi}]: the VAE's "
                         f"{temporal_ratio}x times the smallest to the largest factor of {factors}.")
    budget = chunk * len(c) / target_compression
    chosen = [factors[0]] * len(c)
    for i in np.argsort(c, kind="stable"):
        for m in factors[1:]:
            if sum(chunk // (temporal_ratio * x) for x in chosen) <= budget + 1e-9:
                return tuple(chosen)
            chosen[i] = m
    return tuple(chosen)


def schedule(videos: jax.Array, *, chunk: int = 16, target_compression: float | None = None,
             thresholds: Sequence[float] | None = None, factors: Sequence[int] = DEFAULT_FACTORS,
             downsample: int = 1, temporal_ratio: int = 4) -> list[ChunkRates]:
    """One ``ChunkRates`` per clip of ``videos [B, 1 + chunk M, H, W, C]`` (values in ``[-1, 1]``): complexity per
    chunk (``chunk_complexity``), then exactly one of ``target_compression`` (budget mode) or ``thresholds``."""
    if (target_compression is None) == (thresholds is None):
        raise ValueError("schedule: pass exactly one of target_compression (e.g. 8) or thresholds (e.g. [0.05, 0.2]).")
    complexity = chunk_complexity(videos, chunk, downsample=downsample, temporal_ratio=temporal_ratio,
                                  factors=factors)
    if thresholds is not None:
        picks = [factors_from_thresholds(c, thresholds, factors) for c in complexity]
    else:
        picks = [factors_for_budget(c, target_compression, chunk=chunk, temporal_ratio=temporal_ratio,
                                    factors=factors) for c in complexity]
    return [ChunkRates(p, chunk, temporal_ratio) for p in picks]


# ----------------------------------------------------------------------------
# Encode / decode
# ----------------------------------------------------------------------------


def _check_model(model: AutoencoderKLHunyuanVideo, rates: ChunkRates) -> None:
    if not isinstance(rates, ChunkRates):
        raise ValueError(f"rates must be a ChunkRates, got {type(rates).__name__}.")
    if rates.temporal_ratio != model.config.temporal_compression_ratio:
        raise ValueError(f"rates.temporal_ratio={rates.temporal_ratio} differs from the VAE's temporal compression "
                         f"{model.config.temporal_compression_ratio}.")


def encode(model: AutoencoderKLHunyuanVideo, videos: jax.Array, rates: ChunkRates, *, path: LatentPath = "feature",
           depth: int | None = None) -> VariableRateLatent:
    """``videos [B, rates.pixel_frames, H, W, C_in]`` -> their posterior means ``[B, rates.latent_frames, h, w, L]``:
    ``"feature"`` pools the VAE's features at ``depth`` (``config.frame_rate_depths[0]``, default the deepest);
    ``"pixel"`` averages the frames by ``m_i`` before a plain encode (the baseline and oracle)."""
    _check_model(model, rates)
    if path == "feature":
        mean = model.encode(videos, frame_rates=rates.factors, rate_chunk=rates.chunk, rate_depth=depth).mean
    elif path == "pixel":
        videos = jnp.asarray(videos)
        if videos.ndim != 5 or videos.shape[1] != rates.pixel_frames:
            raise ValueError(f"videos must be [B, {rates.pixel_frames}, H, W, C] for {len(rates.factors)} chunks of "
                             f"{rates.chunk} frames; got shape {videos.shape}.")
        mean = model.encode(pool_chunks(videos, rates.factors, rates.chunk)).mean
    else:
        raise ValueError(f"path={path!r} must be 'feature' or 'pixel'.")
    return VariableRateLatent(mean, rates, path)


def decode(model: AutoencoderKLHunyuanVideo, latent: VariableRateLatent, *, depth: int | None = None) -> jax.Array:
    """Videos ``[B, rates.pixel_frames, H, W, C_out]`` from a ``VariableRateLatent`` by its own path (``encode``);
    ``depth``: the decoder's repeat depth (``config.frame_rate_depths[1]``, default the shallowest)."""
    rates = latent.rates
    _check_model(model, rates)
    if latent.path == "pixel":
        return repeat_chunks(model.decode(latent.latents), rates.factors, rates.chunk)
    return model.decode(latent.latents, frame_rates=rates.factors, rate_chunk=rates.chunk, rate_depth=depth)


def uniform_rates(frames: int, *, chunk: int = 16, temporal_ratio: int = 4) -> ChunkRates:
    """The fixed-rate schedule (every ``m_i = 1``) of a clip of ``frames = 1 + chunk M`` frames."""
    if frames < 1 + chunk or (frames - 1) % chunk:
        raise ValueError(f"frames={frames} must be 1 + chunk k = 1 + {chunk}k with k >= 1.")
    return ChunkRates((1,) * ((frames - 1) // chunk), chunk, temporal_ratio)

