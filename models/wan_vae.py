"""Wan 2.1's causal 3-D video VAE (diffusers' ``AutoencoderKLWan``), channels last.

Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models" (§3.1, Wan-VAE). An encoder ``E``
maps videos ``x [B, F, H, W, C_in]`` in ``[-1, 1]`` to the diagonal Gaussian posterior ``N(μ, diag(exp(logvar)))``
over latents ``z [B, 1 + (F - 1) / t, H / s, W / s, z_dim]`` (``s = 2^(n - 1)`` for ``n = len(dim_mult)``,
``t = 2^(number of temporal downsamplings)``), and a decoder ``D`` maps latents back. With ``φ`` = SiLU, ``N``
the channel RMS norm and the blocks of ``models.wan_vae_blocks``::

    E:  h = conv_in(x); h = down_blocks(h)   (resnets, then a spatial [+ temporal] downsample per level)
        h = mid_block(h); (μ, logvar) = split(quant_conv(conv_out(φ(N(h))))),  logvar clipped to [-30, 20]
    D:  h = conv_in(post_quant_conv(z)); h = mid_block(h); h = up_blocks(h)   (each upsample halves the width)
        x̂ = clip(conv_out(φ(N(h))), -1, 1)

Every conv is causal in time (zeros before the clip) and nothing mixes frames otherwise, so the first frame is
encoded on its own and each later latent frame summarises ``t`` frames: valid clips hold ``F = 1 + t m``
frames (``t = 4`` for Wan 2.1: 1, 5, 9, ...) and any ``f ≥ 1`` latent frames decode to ``1 + t (f - 1)``.
diffusers encodes the first frame and then chunks of 4 frames, and decodes one latent frame at a time, with a
cache of each causal conv's past frames (``feat_cache``); the result is the same as one pass over the clip,
which is what ``encode`` / ``decode`` compute by default. ``encode_chunk`` / ``decode_chunk`` take and return
that cache as a value (``encode`` / ``decode`` with ``chunk_frames`` use them): a clip encoded in chunks of any
multiple of ``t`` frames (decoded in chunks of any number of latent frames) gives the one-pass result.

``model(videos)`` is diffusers' forward, ``decode(encode(videos).mode())``. The Wan pipelines' diffusion latents
are ``(z - latents_mean) / latents_std`` per channel (``latents``), and they decode
``latents · latents_std + latents_mean`` (``decode_latents``).

Quantization: every conv is a ``conv`` site. Calibration data is ``{"videos": [N, F, H, W, C_in]}``; GPTQ
walks two stages (``calibration_stages``): the encoder's down blocks and mid block on the videos, then the
decoder's mid and up blocks on the posterior means. The six convs outside those blocks (encoder and decoder
``conv_in`` / ``conv_out``, ``quant_conv``, ``post_quant_conv``: the pixel and latent interfaces) are the
family's ``keep_float``.

diffusers import / export: tensor names are the parameter paths joined with dots (``kernel`` -> ``weight``,
a resampler's ``resample`` -> ``resample.1``); conv weights ``[C_out, C_in, *k]`` <-> the ``[K C_in, C_out]``
matrix view, RMS norm ``gamma [C, 1, 1(, 1)]`` <-> ``[C]``. Wan 2.2's VAE (``is_residual``, ``patch_size``)
and encoder attention (``attn_scales``) are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.calib.sequential import Stage
from jquant.models.config_io import check_dtypes_available, dataclass_config_from_json, dataclass_config_to_json
from jquant.models.family import Family
from jquant.models.tensor_io import Layout, export_torch_tensors, import_torch_tensors, torch_layouts
from jquant.models.vae import Posterior
from jquant.models.wan_vae_blocks import (Cache, CausalConv3d, Downsample, MidBlock, ResidualBlock, RMSNorm,
                                          UpBlock)

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
CLASS_NAME = "AutoencoderKLWan"
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this range
# Wan 2.1's latent statistics (diffusers' AutoencoderKLWan defaults).
_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                 -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WanVAEConfig:
    """Sizes of an ``AutoencoderKLWan`` (diffusers' config fields and defaults: Wan 2.1's VAE).

    Encoder level ``i`` has ``base_dim · dim_mult[i]`` channels and ``num_res_blocks`` resnets, then (but the last)
    a spatial downsample, temporal too where ``temperal_downsample[i]`` (diffusers' spelling; at most two, so
    ``t ≤ 4``: diffusers encodes in chunks of 4 frames). The decoder mirrors it from ``decoder_base_dim`` (None:
    ``base_dim``) with ``num_res_blocks + 1`` resnets per level. ``latents_mean`` / ``latents_std`` (``z_dim``
    each) normalise the diffusion latents; ``scale_factor_temporal`` / ``scale_factor_spatial`` are pipeline hints
    kept for export. ``dtype`` / ``param_dtype``: compute and storage dtype names.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = _LATENTS_MEAN
    latents_std: tuple[float, ...] = _LATENTS_STD
    in_channels: int = 3
    out_channels: int = 3
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8
    dtype: DTypeName = "float32"
    param_dtype: DTypeName = "float32"

    def __post_init__(self):
        for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            _check_positive_int(getattr(self, name), f"WanVAEConfig.{name}")
        if self.decoder_base_dim is not None:
            _check_positive_int(self.decoder_base_dim, "WanVAEConfig.decoder_base_dim")
        if not self.dim_mult:
            raise ValueError("WanVAEConfig.dim_mult must name at least one level's width multiplier, e.g. (1, 2, 4, 4).")
        for m in self.dim_mult:
            _check_positive_int(m, "WanVAEConfig.dim_mult entries")
        levels = len(self.dim_mult) - 1
        if len(self.temperal_downsample) != levels or not all(isinstance(b, bool) for b in self.temperal_downsample):
            raise ValueError(f"WanVAEConfig.temperal_downsample={self.temperal_downsample!r} must hold {levels} bools "
                             "(one per downsampling level: len(dim_mult) - 1), e.g. (False, True, True).")
        if sum(self.temperal_downsample) > 2:
            raise ValueError(f"WanVAEConfig.temperal_downsample={self.temperal_downsample!r}: at most two temporal "
                             "downsamplings (t <= 4; diffusers encodes chunks of 4 frames).")
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if len(values) != self.z_dim or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ValueError(f"WanVAEConfig.{name} must hold z_dim={self.z_dim} finite numbers, got {values!r}.")
        if not all(v > 0 for v in self.latents_std):
            raise ValueError(f"WanVAEConfig.latents_std must be positive, got {self.latents_std!r}.")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16", "float64"):
                raise ValueError(f"WanVAEConfig.{name} must be float32, bfloat16, float16 or float64, "
                                 f"got {getattr(self, name)!r}.")

    @property
    def spatial_compression(self) -> int:
        """``s``: frame height (and width) over latent height (and width)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_compression(self) -> int:
        """``t``: each latent frame after the first summarises ``t`` frames."""
        return 2 ** sum(self.temperal_downsample)

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of ``frames = 1 + t m`` frames: ``1 + (frames - 1) / t``."""
        return 1 + (frames - 1) // self.temporal_compression

    def replace(self, **changes) -> WanVAEConfig:
        return dataclasses.replace(self, **changes)


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _run(blocks, h: jax.Array, caches: list | None) -> tuple[jax.Array, list]:
    """``h`` through ``blocks`` in order, each with its cache: ``(output, new caches)``."""
    new = []
    for block, cache in zip(blocks, caches or [None] * len(blocks)):
        h, cache = block(h, cache)
        new.append(cache)
    return h, new


class Encoder3d(nnx.Module):
    """``x [B, F, H, W, C_in]`` -> ``conv_out`` moments ``[B, 1 + (F - 1) / t, H / s, W / s, 2 z_dim]``, with its
    causal cache (``down_blocks`` is diffusers' flat list: per level the resnets, then the downsampler)."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], (3, 3, 3), param_dtype=pd, rngs=rngs)
        blocks = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            blocks += [ResidualBlock(c_in if j == 0 else c_out, c_out, param_dtype=pd, rngs=rngs)
                       for j in range(cfg.num_res_blocks)]
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Downsample(c_out, temporal=cfg.temperal_downsample[i], param_dtype=pd, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], param_dtype=pd, rngs=rngs)
        self.norm_out = RMSNorm(dims[-1], torch_ndim=4, param_dtype=pd)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, (3, 3, 3), param_dtype=pd, rngs=rngs)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, dict]:
        cache, new = cache or {}, {}
        h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        h, new["down_blocks"] = _run(self.down_blocks, h, cache.get("down_blocks"))
        h, new["mid_block"] = self.mid_block(h, cache.get("mid_block"))
        moments, new["conv_out"] = self.tail(h, cache.get("conv_out"))
        return moments, new

    def tail(self, h: jax.Array, cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The mid block's output -> ``conv_out(φ(N(h)))``, and ``conv_out``'s cache."""
        return self.conv_out(jax.nn.silu(self.norm_out(h)), cache)


class Decoder3d(nnx.Module):
    """``post_quant_conv(z) [B, f, h, w, z_dim]`` -> videos ``[B, 1 + t (f - 1), s h, s w, C_out]`` (before the
    clip to [-1, 1]), with its causal cache."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        pd, mult = jnp.dtype(cfg.param_dtype), cfg.dim_mult
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * u for u in (mult[-1], *mult[::-1])]
        temporal = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], (3, 3, 3), param_dtype=pd, rngs=rngs)
        self.mid_block = MidBlock(dims[0], param_dtype=pd, rngs=rngs)
        self.up_blocks = nnx.List([
            UpBlock(c_in // 2 if i else c_in, c_out, num_layers=cfg.num_res_blocks + 1, upsample=i < len(mult) - 1,
                    temporal=i < len(mult) - 1 and temporal[i], param_dtype=pd, rngs=rngs)
            for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:]))])
        self.norm_out = RMSNorm(dims[-1], torch_ndim=4, param_dtype=pd)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, (3, 3, 3), param_dtype=pd, rngs=rngs)

    def __call__(self, z: jax.Array, cache: Cache = None) -> tuple[jax.Array, dict]:
        cache, new = cache or {}, {}
        h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
        h, new["mid_block"] = self.mid_block(h, cache.get("mid_block"))
        h, new["up_blocks"] = _run(self.up_blocks, h, cache.get("up_blocks"))
        videos, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(h)), cache.get("conv_out"))
        return videos, new


class AutoencoderKLWan(nnx.Module):
    """The video VAE (module docstring). Videos ``[B, F, H, W, C_in]`` in ``[-1, 1]``, ``F = 1 + t m``, ``H`` and
    ``W`` multiples of ``s``; latents ``[B, f, H / s, W / s, z_dim]``."""

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
        pd, z = jnp.dtype(config.param_dtype), config.z_dim
        self.config = config
        self.encoder = Encoder3d(config, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, (1, 1, 1), param_dtype=pd, rngs=rngs)
        self.post_quant_conv = CausalConv3d(z, z, (1, 1, 1), param_dtype=pd, rngs=rngs)
        self.decoder = Decoder3d(config, rngs=rngs)

    def encode(self, videos: jax.Array, chunk_frames: int | None = None) -> Posterior:
        """``videos [B, F, H, W, C_in]`` -> the posterior ``(mean, logvar)``, each ``[B, 1 + (F - 1) / t, H / s,
        W / s, z_dim]``. ``chunk_frames`` (a multiple of ``t``): encode the first ``1 + chunk_frames`` frames, then
        ``chunk_frames`` at a time, the causal cache passed along (``encode_chunk``); the same result."""
        self._check_videos(tuple(videos.shape), first=True)
        if chunk_frames is None:
            return self.encode_chunk(videos)[0]
        cache, means, logvars = None, [], []
        for start, stop in _chunks(videos.shape[1], chunk_frames, self.config.temporal_compression):
            (mean, logvar), cache = self.encode_chunk(videos[:, start:stop], cache)
            means.append(mean)
            logvars.append(logvar)
        return Posterior(jnp.concatenate(means, axis=1), jnp.concatenate(logvars, axis=1))

    def encode_chunk(self, videos: jax.Array, cache: Cache = None) -> tuple[Posterior, dict]:
        """One chunk of a clip: ``(posterior of its latent frames, cache for the next chunk)``. The first chunk
        (``cache=None``) holds ``1 + t m`` frames, later ones ``t m`` (m ≥ 1); the cache is a pytree of arrays."""
        self._check_videos(tuple(videos.shape), first=cache is None)
        moments, cache = self.encoder(videos.astype(self.config.dtype), cache)
        return self._posterior(self.quant_conv(moments)[0]), cache

    def decode(self, latents: jax.Array, chunk_frames: int | None = None) -> jax.Array:
        """``latents [B, f, h, w, z_dim]`` (unnormalised ``z``) -> videos ``[B, 1 + t (f - 1), s h, s w, C_out]`` in
        ``[-1, 1]``. ``chunk_frames``: decode ``1 + chunk_frames`` latent frames first, then ``chunk_frames`` at a
        time with the causal cache (``decode_chunk``); the same result."""
        self._check_latents(tuple(latents.shape))
        if chunk_frames is None:
            return self.decode_chunk(latents)[0]
        cache, parts = None, []
        for start, stop in _chunks(latents.shape[1], chunk_frames, 1):
            videos, cache = self.decode_chunk(latents[:, start:stop], cache)
            parts.append(videos)
        return jnp.concatenate(parts, axis=1)

    def decode_chunk(self, latents: jax.Array, cache: Cache = None) -> tuple[jax.Array, dict]:
        """One chunk of latents (any ``f ≥ 1`` frames): ``(its frames, cache for the next chunk)``; ``cache=None``
        starts a clip (its first latent frame decodes to one frame, every other to ``t``)."""
        self._check_latents(tuple(latents.shape))
        z = self.post_quant_conv(latents.astype(self.config.dtype))[0]
        videos, cache = self.decoder(z, cache)
        return jnp.clip(videos, -1.0, 1.0), cache

    def __call__(self, videos: jax.Array) -> jax.Array:
        """diffusers' forward: ``decode(encode(videos).mode())``, ``[B, F, H, W, C_in]`` -> ``[B, F, H, W, C_out]``."""
        return self.decode(self.encode(videos).mode())

    def _latent_statistics(self) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        return jnp.asarray(cfg.latents_mean, cfg.dtype), jnp.asarray(cfg.latents_std, cfg.dtype)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(f, h, w, z_dim)`` of the latents of one ``frames x height x width`` clip (refused as ``encode`` refuses
        it)."""
        cfg = self.config
        self._check_videos((1, frames, height, width, cfg.in_channels), first=True)
        s = cfg.spatial_compression
        return cfg.latent_frames(frames), height // s, width // s, cfg.z_dim

    def latents(self, videos: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Diffusion latents ``(z - latents_mean) / latents_std`` per channel (the Wan pipelines): ``z`` the posterior
        mode, or a sample drawn with ``key``."""
        posterior = self.encode(videos)
        z = posterior.mode() if key is None else posterior.sample(key)
        mean, std = self._latent_statistics()
        return (z - mean) / std

    def decode_latents(self, latents: jax.Array, chunk_frames: int | None = None) -> jax.Array:
        """Videos from diffusion latents: ``decode(latents · latents_std + latents_mean)`` (the pipelines' last step),
        in chunks of ``chunk_frames`` latent frames if given."""
        mean, std = self._latent_statistics()
        return self.decode(jnp.asarray(latents, self.config.dtype) * std + mean, chunk_frames=chunk_frames)

    def _posterior(self, moments: jax.Array) -> Posterior:
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, *_LOGVAR_RANGE))

    def _check_videos(self, shape: tuple[int, ...], *, first: bool) -> None:
        cfg, s, t = self.config, self.config.spatial_compression, self.config.temporal_compression
        frames_ok = len(shape) == 5 and shape[1] >= 1 and (shape[1] - first) % t == 0
        if not frames_ok or shape[-1] != cfg.in_channels or shape[2] % s or shape[3] % s:
            frames = (f"F = 1 + {t} m frames ({', '.join(str(1 + t * m) for m in range(3))}, ...: the first frame "
                      f"alone, then {t} frames per latent frame)" if first else
                      f"F = {t} m frames, m >= 1 (each chunk after the first holds {t} frames per latent frame)")
            raise ValueError(f"AutoencoderKLWan: videos must be [B, F, H, W, {cfg.in_channels}] (channels last) with "
                             f"{frames} and H, W multiples of {s}; got shape {shape}. Transpose [B, C, F, H, W] "
                             "videos with x.transpose(0, 2, 3, 4, 1); trim or pad the frames.")

    def _check_latents(self, shape: tuple[int, ...]) -> None:
        z = self.config.z_dim
        if len(shape) != 5 or shape[1] < 1 or shape[-1] != z:
            raise ValueError(f"AutoencoderKLWan: latents must be [B, f, h, w, {z}] (channels last, f >= 1 latent "
                             f"frames); got shape {shape}.")

    def check_calibration(self, calib) -> dict:
        """Calibration data ``{"videos": [N, F, H, W, C_in]}`` (finite, valid shape), as float32 numpy."""
        cfg = self.config
        if not isinstance(calib, dict) or set(calib) != {"videos"}:
            found = sorted(calib) if isinstance(calib, dict) else type(calib).__name__
            raise ValueError(f"AutoencoderKLWan calibration must be a dict {{'videos': [N, F, H, W, "
                             f"{cfg.in_channels}]}} (channels last, values in [-1, 1]), got {found}.")
        videos = np.asarray(calib["videos"], np.float32)
        self._check_videos(videos.shape, first=True)
        if not np.all(np.isfinite(videos)):
            raise ValueError("calib['videos'] holds NaN or Inf; pass finite videos in [-1, 1].")
        return {"videos": videos}

    def calibration_stages(self) -> list[Stage]:
        """Encoder blocks on the videos, then decoder blocks on the posterior means; each clip in one pass."""
        encoder, decoder = self.encoder, self.decoder
        return [Stage(blocks=[*encoder.down_blocks, encoder.mid_block], enter=_enter_encoder),
                Stage(blocks=[decoder.mid_block, *decoder.up_blocks], enter=_enter_decoder)]


def _chunks(frames: int, chunk_frames: int, multiple: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the chunks of a clip: ``1 + chunk_frames`` frames first, then ``chunk_frames``."""
    if (isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1
            or chunk_frames % multiple):
        raise ValueError(f"AutoencoderKLWan: chunk_frames={chunk_frames!r} must be a positive multiple of {multiple} "
                         "(whole latent frames), or None for one pass.")
    bounds = [(0, min(frames, 1 + chunk_frames))]
    while bounds[-1][1] < frames:
        bounds.append((bounds[-1][1], min(frames, bounds[-1][1] + chunk_frames)))
    return bounds


def _enter_encoder(m: AutoencoderKLWan, batch: dict, previous) -> tuple[jax.Array, None]:
    """``calibration_stages``' entries (module level, so each compiles once per model structure)."""
    return m.encoder.conv_in(jnp.asarray(batch["videos"], m.config.dtype))[0], None


def _enter_decoder(m: AutoencoderKLWan, batch: dict, previous) -> tuple[jax.Array, None]:
    mean = m._posterior(m.quant_conv(m.encoder.tail(previous[0])[0])[0]).mean
    return m.decoder.conv_in(m.post_quant_conv(mean)[0])[0], None


def init_model(config: WanVAEConfig, key: jax.Array) -> AutoencoderKLWan:
    """A randomly initialised VAE (weights ~ N(0, 1 / fan_in), norms 1, biases 0)."""
    check_dtypes_available(config)
    return AutoencoderKLWan(config, rngs=nnx.Rngs(params=key))


def abstract_model(config: WanVAEConfig) -> AutoencoderKLWan:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: AutoencoderKLWan(config, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------
# diffusers import / export
# ----------------------------------------------------------------------------

# diffusers config keys this converter computes or keeps (keys starting with "_" are bookkeeping).
_DIFFUSERS_KEYS = {
    "base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
    "dropout", "latents_mean", "latents_std", "is_residual", "in_channels", "out_channels", "patch_size",
    "scale_factor_temporal", "scale_factor_spatial",
}
_FIELDS = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample",
           "latents_mean", "latents_std", "in_channels", "out_channels", "scale_factor_temporal",
           "scale_factor_spatial")


def config_from_diffusers(config: dict, *, dtype: DTypeName = "float32",
                          param_dtype: DTypeName | None = None) -> WanVAEConfig:
    """A ``WanVAEConfig`` from an ``AutoencoderKLWan`` ``config.json`` dict (diffusers' defaults for absent keys).
    Refuses what this implementation does not compute: Wan 2.2's VAE (``is_residual``, ``patch_size``), encoder
    attention (``attn_scales``), dropout, unknown keys."""
    unknown = sorted(k for k in config if k not in _DIFFUSERS_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"AutoencoderKLWan config.json has attributes the converter does not handle: {unknown}.")
    if config.get("is_residual") or config.get("patch_size") is not None:
        raise ValueError(f"AutoencoderKLWan config.json sets is_residual={config.get('is_residual')!r}, "
                         f"patch_size={config.get('patch_size')!r}: that is Wan 2.2's VAE (residual down/up blocks, "
                         "patchified frames); only Wan 2.1's (is_residual false, patch_size null) is supported.")
    if config.get("attn_scales"):
        raise ValueError(f"AutoencoderKLWan config.json attn_scales={config['attn_scales']!r}: encoder attention "
                         "blocks are not supported (Wan 2.1's VAE has attn_scales []).")
    if config.get("dropout", 0.0):
        raise ValueError(f"AutoencoderKLWan config.json dropout={config['dropout']!r}: only 0.0 is supported (the "
                         "VAE runs in inference mode).")
    defaults = WanVAEConfig()
    values = {name: config.get(name, getattr(defaults, name)) for name in _FIELDS}
    return WanVAEConfig(**values, dtype=dtype, param_dtype=param_dtype or dtype)


def config_to_diffusers(cfg: WanVAEConfig) -> dict:
    """The ``config.json`` dict of an ``AutoencoderKLWan`` with ``cfg``'s architecture."""
    values = {name: getattr(cfg, name) for name in _FIELDS}
    return {"_class_name": CLASS_NAME, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()},
            "attn_scales": [], "dropout": 0.0, "is_residual": False, "patch_size": None}


def _layouts(model: AutoencoderKLWan) -> dict[tuple, tuple[str, Layout]]:
    """``torch_layouts`` with Wan's names: RMS-norm ``gamma`` stored ``[C, *ones]``, ``resample`` as ``resample.1``."""
    def special(node) -> dict[str, Layout]:
        return {"gamma": ("channel", (1,) * (node.torch_ndim - 1))} if isinstance(node, RMSNorm) else {}

    return torch_layouts(model, special=special, rename=lambda p: "resample.1" if p == "resample" else p)


def from_tensors(cfg: WanVAEConfig, tensors: dict[str, np.ndarray], *, source: str = "tensors") -> AutoencoderKLWan:
    """Build the VAE from diffusers-named arrays (PyTorch layouts), validating every one first."""
    check_dtypes_available(cfg)
    abstract = abstract_model(cfg)
    return import_torch_tensors(abstract, tensors, _layouts(abstract), param_dtype=cfg.param_dtype, source=source,
                                what="AutoencoderKLWan")


def from_diffusers(path: str | os.PathLike, *, dtype: DTypeName = "float32",
                   param_dtype: DTypeName | None = None) -> AutoencoderKLWan:
    """Load a diffusers ``AutoencoderKLWan`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    ``dtype`` is the compute dtype; ``param_dtype`` defaults to the dtype the tensors are stored in. A folder of
    another ``_class_name`` is refused with a ValueError naming it; missing, misshapen or unexpected tensors are
    refused before any model is built.
    """
    from jquant.models import hf_io

    config = hf_io.read_diffusers_config(path, (CLASS_NAME,))
    tensors = hf_io.read_safetensors(path, weights_name=hf_io.DIFFUSERS_FILE)
    cfg = config_from_diffusers(config, dtype=dtype,
                                param_dtype=param_dtype or hf_io.stored_dtype(tensors, default=dtype))
    return from_tensors(cfg, tensors, source=str(path))


def to_tensors(model: AutoencoderKLWan) -> dict[str, np.ndarray]:
    """diffusers-named numpy arrays of a float ``model`` (PyTorch layouts); quantized sites are refused."""
    return export_torch_tensors(model, _layouts(model))


def to_diffusers(model: AutoencoderKLWan, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a diffusers ``AutoencoderKLWan`` folder, atomically (``hf_io.write_checkpoint``);
    ``overwrite=True`` replaces a folder jquant wrote earlier."""
    from jquant.models import hf_io

    return hf_io.write_checkpoint(path, config_to_diffusers(model.config), to_tensors(model), overwrite=overwrite,
                                  weights_name=hf_io.DIFFUSERS_FILE)


FAMILY = Family(
    name="wan_vae",
    config_class=WanVAEConfig,
    model_class=AutoencoderKLWan,
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, WanVAEConfig),
    checkpoint_protocol="the manifest's config holds the WanVAEConfig fields (config_io.dataclass_config_to_json).",
    diffusers_class_names=(CLASS_NAME,),
    from_diffusers=from_diffusers,
    to_diffusers=to_diffusers,
    presets={
        # Not trained yet: 0.8M parameters, 4-channel latents for jq-wan-tiny (in_channels 4); clips of 1 + 4 m
        # frames at multiples of 8 pixels (17 x 64 x 64 -> 5 x 8 x 8 x 4 latents). After training set the latent
        # statistics: config.replace(latents_mean=<per-channel mean>, latents_std=<per-channel std>).
        "jq-wan-vae-tiny": WanVAEConfig(base_dim=16, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                                        latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4),
    },
    keep_float=("encoder/conv_in", "encoder/conv_out", "quant_conv", "post_quant_conv", "decoder/conv_in",
                "decoder/conv_out"),
)
