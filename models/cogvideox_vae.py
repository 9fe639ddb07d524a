"""CogVideoX's causal 3-D video VAE (diffusers' ``AutoencoderKLCogVideoX``), channels last.

Yang et al. 2024, "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer" (its 3D causal
VAE). An encoder ``E`` maps videos ``x [B, F, H, W, C_in]`` in ``[-1, 1]`` to the diagonal Gaussian posterior
``N(μ, diag(exp(logvar)))`` over latents ``z [B, 1 + (F - 1) / t, H / s, W / s, L]`` (``s = 2^(n - 1)`` for
``n = len(block_out_channels)``, ``t = temporal_compression_ratio``), and a decoder ``D`` maps latents back.
With ``φ`` = SiLU and the blocks of ``models.cogvideox_vae_blocks``::

    E:  h = conv_in(x); h = down_blocks(h)   (the first log2 t downsample time too); h = mid_block(h)
        (μ, logvar) = split(conv_out(φ(GN(h)))),  logvar clipped to [-30, 20]
    D:  h = conv_in(z); h = mid_block(h, z); h = up_blocks(h, z)   (the first log2 t upsample time too)
        x̂ = conv_out(φ(SpatialNorm(h, z)))

Every conv is causal in time, so the first frame is encoded on its own and each later latent frame summarises
``t`` frames. diffusers encodes in frame batches of 8 and decodes latents in batches of 2 (GroupNorm statistics
are per batch, causal convs carry their past across batches; see the blocks module), so the valid lengths are
whole batches: ``F = 1 + 8 m`` frames and ``1 + 2 m`` latent frames (``F = 1 + 8 m`` encodes to
``1 + 8 m / t`` latent frames). Long clips are encoded and decoded in chunks of whole batches with the causal
convs' past frames passed along as a cache value (``encode_chunk`` / ``decode_chunk``; ``encode`` / ``decode``
with ``chunk_frames``): the result equals the one-shot result. A streaming caller jits ``encode_chunk`` (or
``decode_chunk``) and loops over chunks: one compilation for the first chunk's shape, one for the later chunks'.

``model(videos)`` is diffusers' forward, ``decode(encode(videos).mode())``. The CogVideoX pipelines' diffusion
latents are ``z * scaling_factor`` (``latents``) and decode ``latents / scaling_factor`` (``decode_latents``).

Quantization: every conv is a ``conv`` site. Calibration data is ``{"videos": [N, F, H, W, C_in]}``; GPTQ
walks two stages (``calibration_stages``): the encoder's down blocks and mid block on the videos, then the
decoder's mid and up blocks on the posterior means. The convs outside those blocks (encoder and decoder
``conv_in`` / ``conv_out`` and the decoder's output spatial norm: the pixel and latent interfaces) are the
family's ``keep_float``.

diffusers import / export: tensor names are the parameter paths joined with dots (``kernel`` -> ``weight``);
conv weights ``[C_out, C_in, *k]`` <-> the ``[K C_in, C_out]`` matrix view.
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
from jquant.models.cogvideox_vae_blocks import (LATENT_FRAMES_BATCH, SAMPLE_FRAMES_BATCH, Cache, CausalConv3d,
                                                DownBlock3D, MidBlock3D, SpatialNorm3D, UpBlock3D,
                                                batched_group_norm)
from jquant.models.config_io import check_dtypes_available, dataclass_config_from_json, dataclass_config_to_json
from jquant.models.family import Family
from jquant.models.image_layers import GroupNorm
from jquant.models.tensor_io import export_torch_tensors, import_torch_tensors, torch_layouts
from jquant.models.vae import Posterior

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
CLASS_NAME = "AutoencoderKLCogVideoX"
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this range


@dataclasses.dataclass(frozen=True, kw_only=True)
class CogVideoXVAEConfig:
    """Sizes of an ``AutoencoderKLCogVideoX`` (diffusers' config fields and defaults: CogVideoX-2b/5b's VAE).

    ``block_out_channels[i]``: channels of encoder down block ``i`` (decoder up blocks in reverse), each
    divisible by ``norm_num_groups``; down blocks have ``layers_per_block`` resnets, up blocks one more.
    ``temporal_compression_ratio`` ``t`` is 1, 2 or 4 (the first ``log2 t`` resampling blocks act on time too;
    at 8 the encoder's frame batches would shrink below two frames). ``scaling_factor`` sets the diffusion
    latents; ``sample_height`` / ``sample_width`` / ``force_upcast`` / ``invert_scale_latents`` are pipeline
    hints kept for export. ``dtype`` / ``param_dtype``: compute and storage dtype names.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    force_upcast: bool = True
    invert_scale_latents: bool = False
    dtype: DTypeName = "float32"
    param_dtype: DTypeName = "float32"

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
                     "sample_height", "sample_width"):
            _check_positive_int(getattr(self, name), f"CogVideoXVAEConfig.{name}")
        if not self.block_out_channels:
            raise ValueError("CogVideoXVAEConfig.block_out_channels must name at least one block's channels, "
                             "e.g. (128, 256, 256, 512).")
        for c in self.block_out_channels:
            _check_positive_int(c, "CogVideoXVAEConfig.block_out_channels entries")
            if c % self.norm_num_groups:
                raise ValueError(f"CogVideoXVAEConfig: block_out_channels {self.block_out_channels} must all be "
                                 f"divisible by norm_num_groups={self.norm_num_groups} (GroupNorm splits them).")
        ratio, resamplers = self.temporal_compression_ratio, len(self.block_out_channels) - 1
        if ratio not in (1, 2, 4) or ratio > 2**resamplers:
            raise ValueError(f"CogVideoXVAEConfig.temporal_compression_ratio={ratio!r}: use 1, 2 or 4, at most "
                             f"2^{resamplers} (one temporal halving per downsampling block, here {resamplers}).")
        for name in ("norm_eps", "scaling_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"CogVideoXVAEConfig.{name} must be a finite positive number, got {value!r}.")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16", "float64"):
                raise ValueError(f"CogVideoXVAEConfig.{name} must be float32, bfloat16, float16 or float64, "
                                 f"got {getattr(self, name)!r}.")

    @property
    def spatial_compression(self) -> int:
        """``s``: frame height (and width) over latent height (and width)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_levels(self) -> int:
        """``log2 t``: how many resampling blocks act on time."""
        return self.temporal_compression_ratio.bit_length() - 1

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of ``frames = 1 + 8 m`` frames: ``1 + (frames - 1) / t``."""
        return 1 + (frames - 1) // self.temporal_compression_ratio

    def replace(self, **changes) -> CogVideoXVAEConfig:
        return dataclasses.replace(self, **changes)


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


class Encoder3D(nnx.Module):
    """``x [B, F, H, W, C_in]`` -> moments ``[B, 1 + (F - 1) / t, H / s, W / s, 2L]``, with its causal cache."""

    def __init__(self, cfg: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
        pd, widths, levels = jnp.dtype(cfg.param_dtype), cfg.block_out_channels, cfg.temporal_levels
        norms = {"groups": cfg.norm_num_groups, "eps": cfg.norm_eps, "param_dtype": pd, "rngs": rngs}
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0], 3, param_dtype=pd, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock3D(widths[max(i - 1, 0)], c, num_layers=cfg.layers_per_block, downsample=i < len(widths) - 1,
                        compress_time=i < levels, frames_batch=SAMPLE_FRAMES_BATCH >> min(i, levels), **norms)
            for i, c in enumerate(widths)])
        self.mid_block = MidBlock3D(widths[-1], frames_batch=SAMPLE_FRAMES_BATCH >> levels, latent_channels=None,
                                    **norms)
        self.norm_out = GroupNorm(widths[-1], cfg.norm_num_groups, eps=1e-6, param_dtype=pd)
        self.conv_out = CausalConv3d(widths[-1], 2 * cfg.latent_channels, 3, param_dtype=pd, rngs=rngs)
        self.out_frames_batch = SAMPLE_FRAMES_BATCH >> levels

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, dict]:
        cache, new = cache or {}, {}
        h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        for i, block in enumerate(self.down_blocks):
            h, new[f"down_block_{i}"] = block(h, cache.get(f"down_block_{i}"))
        h, new["mid_block"] = self.mid_block(h, cache=cache.get("mid_block"))
        moments, new["conv_out"] = self.tail(h, cache.get("conv_out"))
        return moments, new

    def tail(self, h: jax.Array, cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The mid block's output -> moments: ``conv_out(φ(GN(h)))``, and ``conv_out``'s cache."""
        return self.conv_out(jax.nn.silu(batched_group_norm(self.norm_out, h, self.out_frames_batch)), cache)


class Decoder3D(nnx.Module):
    """``z [B, f, h, w, L]`` -> videos ``[B, 1 + t (f - 1), s h, s w, C_out]``, with its causal cache."""

    def __init__(self, cfg: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
        pd, levels, latent = jnp.dtype(cfg.param_dtype), cfg.temporal_levels, cfg.latent_channels
        widths = cfg.block_out_channels[::-1]
        norms = {"groups": cfg.norm_num_groups, "eps": cfg.norm_eps, "param_dtype": pd, "rngs": rngs}
        self.conv_in = CausalConv3d(latent, widths[0], 3, param_dtype=pd, rngs=rngs)
        self.mid_block = MidBlock3D(widths[0], frames_batch=LATENT_FRAMES_BATCH, latent_channels=latent, **norms)
        self.up_blocks = nnx.List([
            UpBlock3D(widths[max(i - 1, 0)], c, num_layers=cfg.layers_per_block + 1, upsample=i < len(widths) - 1,
                      compress_time=i < levels, frames_batch=LATENT_FRAMES_BATCH << min(i, levels),
                      latent_channels=latent, **norms)
            for i, c in enumerate(widths)])
        self.norm_out = SpatialNorm3D(widths[-1], latent, groups=cfg.norm_num_groups, param_dtype=pd, rngs=rngs)
        self.conv_out = CausalConv3d(widths[-1], cfg.out_channels, 3, param_dtype=pd, rngs=rngs)
        self.out_frames_batch = LATENT_FRAMES_BATCH << levels

    def __call__(self, z: jax.Array, cache: Cache = None) -> tuple[jax.Array, dict]:
        cache, new = cache or {}, {}
        h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
        h, new["mid_block"] = self.mid_block(h, z, cache.get("mid_block"))
        for i, block in enumerate(self.up_blocks):
            h, new[f"up_block_{i}"] = block(h, z, cache.get(f"up_block_{i}"))
        h = jax.nn.silu(self.norm_out(h, z, self.out_frames_batch))
        videos, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
        return videos, new


class AutoencoderKLCogVideoX(nnx.Module):
    """The video VAE (module docstring). Videos ``[B, F, H, W, C_in]`` in ``[-1, 1]``, ``F = 1 + 8 m``, ``H`` and
    ``W`` multiples of ``s``; latents ``[B, 1 + 2 m', h, w, L]``."""

    def __init__(self, config: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder3D(config, rngs=rngs)
        self.decoder = Decoder3D(config, rngs=rngs)

    def encode(self, videos: jax.Array, chunk_frames: int | None = None) -> Posterior:
        """``videos [B, F, H, W, C_in]`` -> the posterior ``(mean, logvar)``, each ``[B, 1 + (F - 1) / t, H / s,
        W / s, L]``. ``chunk_frames`` (a multiple of 8): encode the first ``1 + chunk_frames`` frames, then
        ``chunk_frames`` at a time, the causal cache passed along (``encode_chunk``); the same result."""
        self._check_videos(tuple(videos.shape), first=True)
        if chunk_frames is None:
            return self.encode_chunk(videos)[0]
        cache, means, logvars = None, [], []
        for start, stop in _chunks(videos.shape[1], chunk_frames, SAMPLE_FRAMES_BATCH):
            (mean, logvar), cache = self.encode_chunk(videos[:, start:stop], cache)
            means.append(mean)
            logvars.append(logvar)
        return Posterior(jnp.concatenate(means, axis=1), jnp.concatenate(logvars, axis=1))

    def encode_chunk(self, videos: jax.Array, cache: Cache = None) -> tuple[Posterior, dict]:
        """One chunk of a clip: ``(posterior of its latent frames, cache for the next chunk)``. The first chunk
        (``cache=None``) holds ``1 + 8 m`` frames, later ones ``8 m``; the cache is a pytree of arrays."""
        self._check_videos(tuple(videos.shape), first=cache is None)
        moments, cache = self.encoder(videos.astype(self.config.dtype), cache)
        return self._posterior(moments), cache

    def decode(self, latents: jax.Array, chunk_frames: int | None = None) -> jax.Array:
        """``latents [B, f, h, w, L]`` (unscaled ``z``, ``f = 1 + 2 m``) -> videos ``[B, 1 + t (f - 1), s h, s w,
        C_out]``. ``chunk_frames`` (even): decode ``1 + chunk_frames`` latent frames first, then
        ``chunk_frames`` at a time with the causal cache (``decode_chunk``); the same result."""
        self._check_latents(tuple(latents.shape), first=True)
        if chunk_frames is None:
            return self.decode_chunk(latents)[0]
        cache, parts = None, []
        for start, stop in _chunks(latents.shape[1], chunk_frames, LATENT_FRAMES_BATCH):
            videos, cache = self.decode_chunk(latents[:, start:stop], cache)
            parts.append(videos)
        return jnp.concatenate(parts, axis=1)

    def decode_chunk(self, latents: jax.Array, cache: Cache = None) -> tuple[jax.Array, dict]:
        """One chunk of latents: ``(its frames, cache for the next chunk)``; the first chunk (``cache=None``)
        holds ``1 + 2 m`` latent frames, later ones ``2 m``."""
        self._check_latents(tuple(latents.shape), first=cache is None)
        return self.decoder(latents.astype(self.config.dtype), cache)

    def __call__(self, videos: jax.Array) -> jax.Array:
        """diffusers' forward: ``decode(encode(videos).mode())``, ``[B, F, H, W, C_in]`` -> ``[B, F, H, W, C_out]``."""
        return self.decode(self.encode(videos).mode())

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(f, h, w, L)`` of the latents of one ``frames x height x width`` clip (refused as ``encode`` refuses it)."""
        cfg = self.config
        self._check_videos((1, frames, height, width, cfg.in_channels), first=True)
        s = cfg.spatial_compression
        return cfg.latent_frames(frames), height // s, width // s, cfg.latent_channels

    def latents(self, videos: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Diffusion latents ``z * scaling_factor`` (the CogVideoX pipelines): ``z`` the posterior mode, or a
        sample drawn with ``key``."""
        posterior = self.encode(videos)
        z = posterior.mode() if key is None else posterior.sample(key)
        return z * self.config.scaling_factor

    def decode_latents(self, latents: jax.Array, chunk_frames: int | None = None) -> jax.Array:
        """Videos from diffusion latents: ``decode(latents / scaling_factor)`` (the pipelines' last step), in chunks of
        ``chunk_frames`` latent frames if given."""
        return self.decode(jnp.asarray(latents, self.config.dtype) / self.config.scaling_factor,
                           chunk_frames=chunk_frames)

    def _posterior(self, moments: jax.Array) -> Posterior:
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, *_LOGVAR_RANGE))

    def _check_videos(self, shape: tuple[int, ...], *, first: bool) -> None:
        cfg, s = self.config, self.config.spatial_compression
        frames_ok = len(shape) == 5 and (shape[1] % SAMPLE_FRAMES_BATCH == (1 if first else 0)) and shape[1] > 0
        if not frames_ok or shape[-1] != cfg.in_channels or shape[2] % s or shape[3] % s:
            frames = ("F = 1 + 8 m frames (1, 9, 17, ...: the first frame, then diffusers' frame batches of 8)"
                      if first else "F = 8 m frames (a chunk after the first holds whole frame batches of 8)")
            raise ValueError(f"AutoencoderKLCogVideoX: videos must be [B, F, H, W, {cfg.in_channels}] (channels "
                             f"last) with {frames} and H, W multiples of {s}; got shape {shape}. Transpose "
                             "[B, C, F, H, W] videos with x.transpose(0, 2, 3, 4, 1); trim or pad the frames.")

    def _check_latents(self, shape: tuple[int, ...], *, first: bool) -> None:
        latent = self.config.latent_channels
        frames_ok = len(shape) == 5 and (shape[1] % LATENT_FRAMES_BATCH == (1 if first else 0)) and shape[1] > 0
        if not frames_ok or shape[-1] != latent:
            frames = ("f = 1 + 2 m latent frames (1, 3, 5, ...)" if first
                      else "f = 2 m latent frames (a chunk after the first holds whole latent batches of 2)")
            raise ValueError(f"AutoencoderKLCogVideoX: latents must be [B, f, h, w, {latent}] (channels last) with "
                             f"{frames}; got shape {shape}.")

    def check_calibration(self, calib) -> dict:
        """Calibration data ``{"videos": [N, F, H, W, C_in]}`` (finite, valid shape), as float32 numpy."""
        cfg = self.config
        if not isinstance(calib, dict) or set(calib) != {"videos"}:
            found = sorted(calib) if isinstance(calib, dict) else type(calib).__name__
            raise ValueError(f"AutoencoderKLCogVideoX calibration must be a dict {{'videos': [N, F, H, W, "
                             f"{cfg.in_channels}]}} (channels last, values in [-1, 1]), got {found}.")
        videos = np.asarray(calib["videos"], np.float32)
        self._check_videos(videos.shape, first=True)
        if not np.all(np.isfinite(videos)):
            raise ValueError("calib['videos'] holds NaN or Inf; pass finite videos in [-1, 1].")
        return {"videos": videos}

    def calibration_stages(self) -> list[Stage]:
        """Encoder blocks on the videos, then decoder blocks (context: the latents their spatial norms read) on the
        posterior means; each calibration clip is one chunk."""
        encoder, decoder = self.encoder, self.decoder
        return [Stage(blocks=[*encoder.down_blocks, encoder.mid_block], enter=_enter_encoder),
                Stage(blocks=[decoder.mid_block, *decoder.up_blocks], enter=_enter_decoder)]


def _chunks(frames: int, chunk_frames: int, batch: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the chunks of a clip: ``1 + chunk_frames`` frames first, then ``chunk_frames``."""
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1 or chunk_frames % batch:
        raise ValueError(f"AutoencoderKLCogVideoX: chunk_frames={chunk_frames!r} must be a positive multiple of "
                         f"{batch} (whole frame batches), or None for one chunk.")
    bounds = [(0, min(frames, 1 + chunk_frames))]
    while bounds[-1][1] < frames:
        bounds.append((bounds[-1][1], min(frames, bounds[-1][1] + chunk_frames)))
    return bounds


def _enter_encoder(m: AutoencoderKLCogVideoX, batch: dict, previous) -> tuple[jax.Array, None]:
    """``calibration_stages``' entries (module level, so each compiles once per model structure)."""
    return m.encoder.conv_in(jnp.asarray(batch["videos"], m.config.dtype))[0], None


def _enter_decoder(m: AutoencoderKLCogVideoX, batch: dict, previous) -> tuple[jax.Array, jax.Array]:
    mean = m._posterior(m.encoder.tail(previous[0])[0]).mean
    return m.decoder.conv_in(mean)[0], mean


def init_model(config: CogVideoXVAEConfig, key: jax.Array) -> AutoencoderKLCogVideoX:
    """A randomly initialised VAE (weights ~ N(0, 1 / fan_in), norms 1, biases 0)."""
    check_dtypes_available(config)
    return AutoencoderKLCogVideoX(config, rngs=nnx.Rngs(params=key))


def abstract_model(config: CogVideoXVAEConfig) -> AutoencoderKLCogVideoX:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: AutoencoderKLCogVideoX(config, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------
# diffusers import / export
# ----------------------------------------------------------------------------

_DOWN_BLOCK, _UP_BLOCK = "CogVideoXDownBlock3D", "CogVideoXUpBlock3D"
# diffusers config keys this converter computes or keeps (keys starting with "_" are bookkeeping).
_DIFFUSERS_KEYS = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "latent_channels",
    "layers_per_block", "act_fn", "norm_eps", "norm_num_groups", "temporal_compression_ratio", "sample_height",
    "sample_width", "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
    "use_quant_conv", "use_post_quant_conv", "invert_scale_latents",
}
_FIELDS = ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_eps", "norm_num_groups",
           "sample_height", "sample_width", "scaling_factor", "force_upcast", "invert_scale_latents")


def config_from_diffusers(config: dict, *, dtype: DTypeName = "float32",
                          param_dtype: DTypeName | None = None) -> CogVideoXVAEConfig:
    """A ``CogVideoXVAEConfig`` from an ``AutoencoderKLCogVideoX`` ``config.json`` dict (diffusers' defaults for
    absent keys). Refuses what this implementation does not compute: other block types or activations, quant
    convs, shift / per-channel latent statistics (the CogVideoX pipelines use none), unknown keys."""
    unknown = sorted(k for k in config if k not in _DIFFUSERS_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"AutoencoderKLCogVideoX config.json has attributes the converter does not handle: {unknown}.")
    widths = tuple(config.get("block_out_channels", CogVideoXVAEConfig.block_out_channels))
    for key, block in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
        types = tuple(config.get(key, (block,) * 4))
        if types != (block,) * len(widths):
            raise ValueError(f"AutoencoderKLCogVideoX config.json {key}={list(types)}: only {len(widths)} x {block!r} "
                             "(one per block_out_channels entry) is supported.")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"AutoencoderKLCogVideoX config.json act_fn={config['act_fn']!r}: only 'silu' is supported.")
    for key in ("use_quant_conv", "use_post_quant_conv"):
        if config.get(key):
            raise ValueError(f"AutoencoderKLCogVideoX config.json sets {key}: quant convs are not supported (no "
                             "CogVideoX checkpoint has them).")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise ValueError(f"AutoencoderKLCogVideoX config.json sets {key}: only scaling_factor is supported (the "
                             "CogVideoX pipelines scale latents by it alone).")
    ratio = config.get("temporal_compression_ratio", 4)
    if not (isinstance(ratio, (int, float)) and float(ratio).is_integer()):
        raise ValueError(f"AutoencoderKLCogVideoX config.json temporal_compression_ratio={ratio!r} must be 1, 2 or 4.")
    defaults = CogVideoXVAEConfig()
    values = {name: config.get(name, getattr(defaults, name)) for name in _FIELDS}
    return CogVideoXVAEConfig(block_out_channels=widths, temporal_compression_ratio=int(ratio), **values, dtype=dtype,
                              param_dtype=param_dtype or dtype)


def config_to_diffusers(cfg: CogVideoXVAEConfig) -> dict:
    """The ``config.json`` dict of an ``AutoencoderKLCogVideoX`` with ``cfg``'s architecture."""
    n = len(cfg.block_out_channels)
    return {
        "_class_name": CLASS_NAME, **{name: getattr(cfg, name) for name in _FIELDS},
        "down_block_types": [_DOWN_BLOCK] * n, "up_block_types": [_UP_BLOCK] * n,
        "block_out_channels": list(cfg.block_out_channels), "act_fn": "silu",
        "temporal_compression_ratio": cfg.temporal_compression_ratio, "shift_factor": None, "latents_mean": None,
        "latents_std": None, "use_quant_conv": False, "use_post_quant_conv": False,
    }


def from_tensors(cfg: CogVideoXVAEConfig, tensors: dict[str, np.ndarray], *,
                 source: str = "tensors") -> AutoencoderKLCogVideoX:
    """Build the VAE from diffusers-named arrays (PyTorch layouts), validating every one first."""
    check_dtypes_available(cfg)
    abstract = abstract_model(cfg)
    return import_torch_tensors(abstract, tensors, torch_layouts(abstract), param_dtype=cfg.param_dtype,
                                source=source, what="AutoencoderKLCogVideoX")


def from_diffusers(path: str | os.PathLike, *, dtype: DTypeName = "float32",
                   param_dtype: DTypeName | None = None) -> AutoencoderKLCogVideoX:
    """Load a diffusers ``AutoencoderKLCogVideoX`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

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


def to_tensors(model: AutoencoderKLCogVideoX) -> dict[str, np.ndarray]:
    """diffusers-named numpy arrays of a float ``model`` (PyTorch layouts); quantized sites are refused."""
    return export_torch_tensors(model, torch_layouts(model))


def to_diffusers(model: AutoencoderKLCogVideoX, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a diffusers ``AutoencoderKLCogVideoX`` folder, atomically (``hf_io.write_checkpoint``);
    ``overwrite=True`` replaces a folder jquant wrote earlier."""
    from jquant.models import hf_io

    return hf_io.write_checkpoint(path, config_to_diffusers(model.config), to_tensors(model), overwrite=overwrite,
                                  weights_name=hf_io.DIFFUSERS_FILE)


FAMILY = Family(
    name="cogvideox_vae",
    config_class=CogVideoXVAEConfig,
    model_class=AutoencoderKLCogVideoX,
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, CogVideoXVAEConfig),
    checkpoint_protocol="the manifest's config holds the CogVideoXVAEConfig fields "
                        "(config_io.dataclass_config_to_json).",
    diffusers_class_names=(CLASS_NAME,),
    from_diffusers=from_diffusers,
    to_diffusers=to_diffusers,
    keep_float=("encoder/conv_in/conv", "encoder/conv_out/conv", "decoder/conv_in/conv", "decoder/conv_out/conv",
                "decoder/norm_out/conv_y/conv", "decoder/norm_out/conv_b/conv"),
)
