"""HunyuanVideo's causal 3-D VAE (diffusers' ``AutoencoderKLHunyuanVideo``), channels last.

Kong et al. 2024, "HunyuanVideo: A Systematic Framework For Large Video Generative Models" (§3.1): a causal 3-D
VAE maps videos ``x [B, F, H, W, C_in]`` in ``[-1, 1]`` with ``F = 1 + c_t k`` frames to the diagonal Gaussian
posterior over latents ``z [B, 1 + k, H / c_s, W / c_s, L]`` (``c_t`` = 4 temporal, ``c_s`` spatial compression;
the first frame is encoded on its own, like an image). With ``φ`` = SiLU and the blocks of
``models.hunyuan_video_vae_blocks`` (every conv causal in time)::

    E:  h = conv_in(x); h = down_blocks(h); h = mid_block(h); m = conv_out(φ(GN(h)))      [B, f, h, w, 2L]
        (μ, logvar) = split(quant_conv(m)),  logvar clipped to [-30, 20]
    D:  h = conv_in(post_quant_conv(z)); h = mid_block(h); h = up_blocks(h); x̂ = conv_out(φ(GN(h)))

Down block ``i`` of ``n`` halves height and width if ``i < log2(c_s)`` and the frames (``F -> (F - 1) / 2 + 1``)
if ``n - 3 <= i < n - 1``; up block ``i`` doubles the same axes (frames ``F -> 2 (F - 1) + 1``): diffusers'
rule for ``temporal_compression_ratio`` 4, the only one its decoder builds. ``config.block_strides`` lists them
and each block carries its own ``temporal_stride`` / ``spatial_stride``. ``model(videos)`` is diffusers' forward,
``decode(encode(videos).mode())``; the HunyuanVideo pipelines scale latents by ``scaling_factor`` only
(``model.latents`` / ``model.decode_latents``).

Long clips: ``encode(videos, chunk_frames=n)`` / ``decode(latents, chunk_frames=n)`` run the clip in chunks
(the first ``1 + n`` frames, then ``n`` at a time) through ``encode_chunk`` / ``decode_chunk``, pure functions of
``(chunk, cache)``: the cache holds the causal convs' past frames and the mid-block attention's past keys and
values. Unlike diffusers' overlapping temporal tiles, this equals the one-shot result. The GroupNorms normalize
over the whole clip, so the chunks are run in ``num_norms + 1`` passes, each normalizing with the statistics
the previous pass accumulated (``hunyuan_video_vae_blocks`` docstring): memory is one chunk's activations plus
the attention's keys and values, compute ``num_norms + 1`` times a one-shot pass.

Dynamic latent frame rate (DLFR-VAE, spec ``dlfr_vae.md`` §3.2; the scheduler is ``jquant.frame_rate.dlfr``):
``encode(videos, frame_rates=(m_1, ..., m_M), rate_chunk=L)`` takes ``1 + L M`` frames, runs the encoder to a depth
where features are still at the full frame rate (``config.frame_rate_depths[0]``: after ``conv_in`` and the leading
down blocks of temporal stride 1; HunyuanVideo's layout: after ``down_blocks[0]``, the bundled tiny VAE's: after
``conv_in``), average-pools chunk ``i``'s feature frames in windows of ``m_i`` (frame 0 alone, never across chunks),
and finishes unchanged: ``1 + Σ_i (L / 4) / m_i`` latent frames. ``decode(latents, frame_rates=..., rate_chunk=L)``
repeats chunk ``i``'s feature frames ``m_i`` times once every temporal upsampler has run
(``config.frame_rate_depths[1]``). All ``m_i = 1`` is bit-identical to the plain path. ``compression_variant()``:
VGDFR's half-resolution "compression VAE" (spec ``vgdfr.md`` §3.2(b)), the same weights with the encoder's last
spatially striding down block at spatial stride 1 and ``up_blocks[0]`` upsampling time only (HunyuanVideo's
``down_blocks.2`` and ``up_blocks.0``): ``decode`` gives ``(c_s / 2)``-times the latent size
(``config.pixel_ratio``), ``encode`` takes it back.

Quantization: every conv is a ``conv`` site, the mid-block attention projections ``linear`` sites. Calibration
data is ``{"videos": [N, F, H, W, C_in]}``; GPTQ walks two stages (encoder down and mid blocks on the videos,
decoder mid and up blocks on the decoded posterior means). The six interface convs (encoder / decoder
``conv_in`` and ``conv_out``, ``quant_conv``, ``post_quant_conv``) are the family's ``keep_float``.
diffusers import / export as ``models.vae`` (conv weights ``[C_out, C_in, k, k, k]`` <-> ``[k³ C_in, C_out]``).
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
from jquant.models.hunyuan_video_vae_blocks import (Cache, CausalConv3d, DownBlockCausal3D, MidBlockCausal3D,
                                                    UpBlockCausal3D, next_pass, norm_stream, num_norms, pool_chunks,
                                                    repeat_chunks)
from jquant.models.image_layers import GroupNorm
from jquant.models.layers import Conv
from jquant.models.tensor_io import export_torch_tensors, import_torch_tensors, torch_layouts
from jquant.models.vae import Posterior

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
CLASS_NAME = "AutoencoderKLHunyuanVideo"
_EPS = 1e-6  # every GroupNorm of diffusers' HunyuanVideo encoder / decoder
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution


@dataclasses.dataclass(frozen=True, kw_only=True)
class HunyuanVideoVAEConfig:
    """Sizes and latent scaling of an ``AutoencoderKLHunyuanVideo`` (diffusers' config fields and defaults).

    ``block_out_channels[i]``: channels of down block ``i`` (up blocks in reverse), each divisible by
    ``norm_num_groups``; down blocks have ``layers_per_block`` resnets, up blocks one more. The compression ratios
    must be what the blocks do (module docstring): ``temporal_compression_ratio`` 4 (at least three blocks) and
    ``spatial_compression_ratio`` ``2^m``, ``m <= len(block_out_channels)``. ``dtype`` / ``param_dtype``: compute
    and storage dtype names. ``compression_variant``: VGDFR's half-resolution "compression VAE" (module docstring),
    the same weights with one spatial halving removed on each side (not a diffusers attribute).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.476986
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4
    mid_block_add_attention: bool = True
    compression_variant: bool = False
    dtype: DTypeName = "float32"
    param_dtype: DTypeName = "float32"

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
                     "spatial_compression_ratio", "temporal_compression_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HunyuanVideoVAEConfig.{name} must be a positive int, got {value!r}.")
        widths = self.block_out_channels
        if not widths or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in widths):
            raise ValueError(f"HunyuanVideoVAEConfig.block_out_channels={widths!r} must be positive ints, one per "
                             "block, e.g. (128, 256, 512, 512).")
        if any(c % self.norm_num_groups for c in widths):
            raise ValueError(f"HunyuanVideoVAEConfig: block_out_channels {widths} must all be divisible by "
                             f"norm_num_groups={self.norm_num_groups} (GroupNorm splits them into groups).")
        if self.temporal_compression_ratio != 4 or len(widths) < 3:
            raise ValueError(f"HunyuanVideoVAEConfig: temporal_compression_ratio={self.temporal_compression_ratio} "
                             f"with {len(widths)} blocks; diffusers' decoder builds only ratio 4, which needs at "
                             "least three blocks (the last two before the final one halve the frames).")
        s = self.spatial_compression_ratio
        if s & (s - 1) or s.bit_length() - 1 > len(widths):
            raise ValueError(f"HunyuanVideoVAEConfig: spatial_compression_ratio={s} must be a power of two of at most "
                             f"2^{len(widths)} (one halving per block, from the first).")
        if not (isinstance(self.scaling_factor, (int, float)) and math.isfinite(self.scaling_factor)
                and self.scaling_factor > 0):
            raise ValueError(f"HunyuanVideoVAEConfig.scaling_factor must be a finite positive number, got "
                             f"{self.scaling_factor!r}.")
        if not isinstance(self.compression_variant, bool) or self.compression_variant and s < 2:
            raise ValueError(f"HunyuanVideoVAEConfig.compression_variant={self.compression_variant!r} must be a bool, "
                             f"and True needs a spatial_compression_ratio of at least 2 (got {s}).")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16", "float64"):
                raise ValueError(f"HunyuanVideoVAEConfig.{name} must be float32, bfloat16, float16 or float64, "
                                 f"got {getattr(self, name)!r}.")

    @property
    def block_strides(self) -> tuple[tuple[int, int], ...]:
        """``(temporal, spatial)`` stride of down block ``i`` (= the factor of up block ``i``): diffusers' rule."""
        n, spatial_layers = len(self.block_out_channels), self.spatial_compression_ratio.bit_length() - 1
        return tuple((2 if n - 3 <= i < n - 1 else 1, 2 if i < spatial_layers else 1) for i in range(n))

    @property
    def encoder_strides(self) -> tuple[tuple[int, int], ...]:
        """``(temporal, spatial)`` stride of each down block: ``block_strides``, except that the compression variant's
        last spatially striding block keeps height and width (VGDFR's ``down_blocks.2`` (2,2,2) -> (2,1,1))."""
        return _drop_spatial(self.block_strides, -1) if self.compression_variant else self.block_strides

    @property
    def decoder_strides(self) -> tuple[tuple[int, int], ...]:
        """``(temporal, spatial)`` factor of each up block: ``block_strides``, except that the compression variant's
        first spatially upsampling block (``up_blocks.0``) upsamples only time (VGDFR: (1,2,2) -> (1,1,1))."""
        return _drop_spatial(self.block_strides, 0) if self.compression_variant else self.block_strides

    @property
    def pixel_ratio(self) -> int:
        """Pixels per latent position along height and width: ``spatial_compression_ratio``, halved for the
        compression variant."""
        return self.spatial_compression_ratio // (2 if self.compression_variant else 1)

    @property
    def frame_rate_depths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Where a dynamic frame rate may pool / repeat features (features at the full frame rate): encoder depths
        ``d`` (pool after ``conv_in`` and ``d`` down blocks, all of temporal stride 1) and decoder depths ``d`` (repeat
        after ``conv_in``, the mid block and ``d`` up blocks, all temporal upsamplers among them). The defaults
        (``encode`` / ``decode`` ``rate_depth=None``) are the deepest encoder depth and the shallowest decoder one."""
        temporal = [t for t, _ in self.block_strides]
        leading = next(i for i, t in enumerate(temporal) if t > 1)
        last = max(i for i, t in enumerate(temporal) if t > 1)
        n = len(temporal)
        return tuple(range(leading + 1)), tuple(range(last + 1, n + 1))

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of ``frames = 1 + 4k`` frames: ``1 + (frames - 1) / 4``."""
        return 1 + (frames - 1) // self.temporal_compression_ratio

    def replace(self, **changes) -> HunyuanVideoVAEConfig:
        return dataclasses.replace(self, **changes)


def _drop_spatial(strides: tuple[tuple[int, int], ...], which: int) -> tuple[tuple[int, int], ...]:
    """``strides`` with the spatial stride of its first (``which=0``) or last (``-1``) spatially striding block set
    to 1."""
    spatial = [i for i, (_, s) in enumerate(strides) if s > 1]
    i = spatial[which]
    return tuple((t, 1) if j == i else (t, s) for j, (t, s) in enumerate(strides))


class Encoder3D(nnx.Module):
    """``x [B, F, H, W, C_in]`` -> moments ``[B, f, h, w, 2L]`` (before ``quant_conv``)."""

    def __init__(self, cfg: HunyuanVideoVAEConfig, *, rngs: nnx.Rngs):
        pd, widths, groups = jnp.dtype(cfg.param_dtype), cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0], 3, param_dtype=pd, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlockCausal3D(widths[max(i - 1, 0)], c, num_layers=cfg.layers_per_block, temporal_stride=t,
                              spatial_stride=s, groups=groups, eps=_EPS, param_dtype=pd, rngs=rngs,
                              resample=base != (1, 1))
            for i, (c, (t, s), base) in enumerate(zip(widths, cfg.encoder_strides, cfg.block_strides))])
        self.mid_block = MidBlockCausal3D(widths[-1], add_attention=cfg.mid_block_add_attention, groups=groups,
                                          eps=_EPS, param_dtype=pd, rngs=rngs)
        self.conv_norm_out = GroupNorm(widths[-1], groups, eps=_EPS, param_dtype=pd)
        self.conv_out = CausalConv3d(widths[-1], 2 * cfg.latent_channels, 3, param_dtype=pd, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.stream(x, None)[0]

    def stream(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
        """The next frames (``1 + 4a`` for the clip's first chunk, then ``4b``) -> their latent frames' moments."""
        get = (lambda key: None) if cache is None else cache.get
        out = {}
        x, out["conv_in"] = self.conv_in.stream(x, get("conv_in"))
        out["down_blocks"] = []
        for i, block in enumerate(self.down_blocks):
            x, c = block.stream(x, None if cache is None else cache["down_blocks"][i])
            out["down_blocks"].append(c)
        x, out["mid_block"] = self.mid_block.stream(x, get("mid_block"))
        x, out["conv_norm_out"] = norm_stream(self.conv_norm_out, x, get("conv_norm_out"))
        x, out["conv_out"] = self.conv_out.stream(jax.nn.silu(x), get("conv_out"))
        return x, out

    def dynamic(self, x: jax.Array, factors: tuple[int, ...], chunk: int, depth: int) -> jax.Array:
        """The whole clip ``x [B, 1 + chunk M, H, W, C_in]`` -> moments ``[B, 1 + Σ_i chunk / (4 m_i), h, w, 2L]``:
        after ``conv_in`` and ``depth`` down blocks (still at the full frame rate), chunk ``i``'s features are
        average-pooled over ``m_i = factors[i]`` frames (``pool_chunks``), then the rest runs unchanged."""
        x = self.conv_in(x)
        for i, block in enumerate(self.down_blocks):
            if i == depth:
                x = pool_chunks(x, factors, chunk)
            x = block(x)
        x = norm_stream(self.conv_norm_out, self.mid_block(x), None)[0]  # as ``stream``: bit-identical for m_i = 1
        return self.conv_out(jax.nn.silu(x))

    def tail(self, h: jax.Array) -> jax.Array:
        """The mid block's output (whole clip) -> moments: ``conv_out(φ(GN(h)))``."""
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder3D(nnx.Module):
    """``z [B, f, h, w, L]`` (after ``post_quant_conv``) -> videos ``[B, 1 + 4 (f - 1), c_s h, c_s w, C_out]``."""

    def __init__(self, cfg: HunyuanVideoVAEConfig, *, rngs: nnx.Rngs):
        pd, groups = jnp.dtype(cfg.param_dtype), cfg.norm_num_groups
        widths = cfg.block_out_channels[::-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, widths[0], 3, param_dtype=pd, rngs=rngs)
        self.mid_block = MidBlockCausal3D(widths[0], add_attention=cfg.mid_block_add_attention, groups=groups,
                                          eps=_EPS, param_dtype=pd, rngs=rngs)
        self.up_blocks = nnx.List([
            UpBlockCausal3D(widths[max(i - 1, 0)], c, num_layers=cfg.layers_per_block + 1, temporal_stride=t,
                            spatial_stride=s, groups=groups, eps=_EPS, param_dtype=pd, rngs=rngs,
                            resample=base != (1, 1))
            for i, (c, (t, s), base) in enumerate(zip(widths, cfg.decoder_strides, cfg.block_strides))])
        self.conv_norm_out = GroupNorm(widths[-1], groups, eps=_EPS, param_dtype=pd)
        self.conv_out = CausalConv3d(widths[-1], cfg.out_channels, 3, param_dtype=pd, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.stream(z, None)[0]

    def stream(self, z: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
        """The next latent frames (``1 + a`` for the clip's first chunk, then ``b``) -> their ``1 + 4a`` / ``4b``
        frames."""
        get = (lambda key: None) if cache is None else cache.get
        out = {}
        x, out["conv_in"] = self.conv_in.stream(z, get("conv_in"))
        x, out["mid_block"] = self.mid_block.stream(x, get("mid_block"))
        out["up_blocks"] = []
        for i, block in enumerate(self.up_blocks):
            x, c = block.stream(x, None if cache is None else cache["up_blocks"][i])
            out["up_blocks"].append(c)
        x, out["conv_norm_out"] = norm_stream(self.conv_norm_out, x, get("conv_norm_out"))
        x, out["conv_out"] = self.conv_out.stream(jax.nn.silu(x), get("conv_out"))
        return x, out


    def dynamic(self, z: jax.Array, factors: tuple[int, ...], chunk: int, depth: int) -> jax.Array:
        """``z [B, 1 + Σ_i chunk / (4 m_i), h, w, L]`` -> videos ``[B, 1 + chunk M, H, W, C_out]``: after ``conv_in``,
        the mid block and ``depth`` up blocks (every temporal upsampler done), each feature frame of chunk ``i`` is
        repeated ``m_i = factors[i]`` times (``repeat_chunks``), then the rest runs unchanged."""
        x = self.mid_block(self.conv_in(z))
        for i, block in enumerate(self.up_blocks):
            if i == depth:
                x = repeat_chunks(x, factors, chunk)
            x = block(x)
        if depth == len(self.up_blocks):
            x = repeat_chunks(x, factors, chunk)
        return self.conv_out(jax.nn.silu(norm_stream(self.conv_norm_out, x, None)[0]))


def _conv1(c_in: int, c_out: int, pd: jnp.dtype, rngs: nnx.Rngs) -> Conv:
    return Conv(c_in, c_out, (1, 1, 1), use_bias=True, param_dtype=pd, rngs=rngs, init_std=c_in**-0.5)


class AutoencoderKLHunyuanVideo(nnx.Module):
    """The VAE (module docstring). Videos ``[B, F, H, W, C_in]`` in ``[-1, 1]``, ``F = 1 + 4k``, ``H`` and ``W``
    multiples of ``spatial_compression_ratio``."""

    def __init__(self, config: HunyuanVideoVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        pd, latent = jnp.dtype(config.param_dtype), config.latent_channels
        self.encoder = Encoder3D(config, rngs=rngs)
        self.decoder = Decoder3D(config, rngs=rngs)
        self.quant_conv = _conv1(2 * latent, 2 * latent, pd, rngs)
        self.post_quant_conv = _conv1(latent, latent, pd, rngs)

    # -- whole clips and chunks -------------------------------------------------------------------------------

    def encode(self, videos: jax.Array, chunk_frames: int | None = None, *,
               frame_rates: tuple[int, ...] | None = None, rate_chunk: int = 16,
               rate_depth: int | None = None) -> Posterior:
        """``videos [B, 1 + 4k, H, W, C_in]`` -> the posterior ``(mean, logvar)``, each ``[B, 1 + k, h, w, L]``.
        ``chunk_frames`` (a multiple of 4): run the clip in chunks of that many frames (module docstring).
        ``frame_rates`` (static ints ``m_i``, one per chunk of ``rate_chunk`` frames after the first frame): a dynamic
        latent frame rate, ``1 + Σ_i rate_chunk / (4 m_i)`` latent frames (module docstring); ``rate_depth`` one of
        ``config.frame_rate_depths[0]`` (default: the deepest)."""
        videos = self._videos(videos)
        if frame_rates is not None:
            factors, depth = self._check_rates(videos.shape[1], frame_rates, rate_chunk, rate_depth, 0, chunk_frames)
            return self._posterior(self.encoder.dynamic(videos, factors, rate_chunk, depth))
        if chunk_frames is None:
            return self._posterior(self.encoder(videos))
        sizes = _chunk_sizes(videos.shape[1], chunk_frames, self.config.temporal_compression_ratio, "chunk_frames")
        return self._posterior(_run_passes(_encoder_step, self, videos, sizes))

    def decode(self, latents: jax.Array, chunk_frames: int | None = None, *,
               frame_rates: tuple[int, ...] | None = None, rate_chunk: int = 16,
               rate_depth: int | None = None) -> jax.Array:
        """``latents [B, f, h, w, L]`` (unscaled ``z``) -> videos ``[B, 1 + 4 (f - 1), c_s h, c_s w, C_out]``.
        ``chunk_frames``: run the latents in chunks of that many latent frames (module docstring). ``frame_rates``:
        latents of a dynamic frame rate (``encode``), ``f = 1 + Σ_i rate_chunk / (4 m_i)``, decoded to ``1 + rate_chunk
        M`` frames; ``rate_depth`` one of ``config.frame_rate_depths[1]`` (default: the shallowest)."""
        z = self._latents(latents)
        if frame_rates is not None:
            factors, depth = self._check_rates(None, frame_rates, rate_chunk, rate_depth, 1, chunk_frames)
            t = self.config.temporal_compression_ratio
            expected = 1 + sum(rate_chunk // (t * m) for m in factors)
            if z.shape[1] != expected:
                raise ValueError(f"AutoencoderKLHunyuanVideo.decode: latents have {z.shape[1]} frames; frame_rates="
                                 f"{factors} with rate_chunk={rate_chunk} need 1 + Σ rate_chunk / (4 m_i) = "
                                 f"{expected}.")
            return self.decoder.dynamic(self.post_quant_conv(z), factors, rate_chunk, depth)
        if chunk_frames is None:
            return self.decoder(self.post_quant_conv(z))
        sizes = _chunk_sizes(z.shape[1], chunk_frames, 1, "chunk_frames")
        return _run_passes(_decoder_step, self, z, sizes)

    def __call__(self, videos: jax.Array) -> jax.Array:
        """diffusers' forward: ``decode(encode(videos).mode())``, ``[B, F, H, W, C_in]`` -> ``[B, F, H, W, C_out]``."""
        return self.decode(self.encode(videos).mode())

    def encode_chunk(self, videos: jax.Array, cache: Cache = None) -> tuple[Posterior, dict]:
        """The clip's next frames ``[B, 1 + 4a | 4b, H, W, C_in]`` (``1 + 4a`` with ``cache=None`` or a cache from
        ``next_pass``: the clip's start; ``b >= 1``) -> their ``1 + a`` / ``b`` latent frames' posterior and the
        cache for the next chunk (a pytree of arrays; module docstring)."""
        first = cache is None or cache["conv_in"]["past"] is None
        self._check_video_shape(tuple(videos.shape), first=first)
        moments, cache = self.encoder.stream(videos.astype(self.config.dtype), cache)
        return self._posterior(moments), cache

    def decode_chunk(self, latents: jax.Array, cache: Cache = None) -> tuple[jax.Array, dict]:
        """The next latent frames ``[B, 1 + a | b, h, w, L]`` -> their ``1 + 4a`` / ``4b`` video frames, and the
        cache for the next chunk."""
        return self.decoder.stream(self.post_quant_conv(self._latents(latents)), cache)

    def compression_variant(self) -> AutoencoderKLHunyuanVideo:
        """VGDFR's half-resolution "compression VAE" (spec ``vgdfr.md`` §3.2(b)): a model sharing this one's weights
        whose config has ``compression_variant=True``, so ``decode`` maps ``[B, T, h, w, L]`` to ``[B, 4 (T - 1) + 1,
        (c_s / 2) h, (c_s / 2) w, C_out]`` and ``encode`` maps those frames back to ``[B, T, h, w, L]``. Float models
        only (a quantized one has another structure)."""
        variant = abstract_model(self.config.replace(compression_variant=True))
        graphdef, state = nnx.split(self)
        if graphdef != nnx.graphdef(abstract_model(self.config)):
            raise ValueError("AutoencoderKLHunyuanVideo.compression_variant: only a float model (as built or loaded, "
                             "not quantized) has a compression variant; take the variant before quantizing.")
        return nnx.merge(nnx.graphdef(variant), state)

    # -- the pipelines' latents ---------------------------------------------------------------------------------

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(f, h, w, L)`` of one clip's latents: ``(1 + (frames - 1) / c_t, height / c_s, width / c_s, L)``;
        frame counts and sizes the VAE does not take are refused as ``encode`` refuses them."""
        cfg = self.config
        self._check_video_shape((1, frames, height, width, cfg.in_channels))
        s = cfg.pixel_ratio
        return cfg.latent_frames(frames), height // s, width // s, cfg.latent_channels

    def latents(self, videos: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Diffusion latents ``z * scaling_factor``: ``z`` the posterior mode, or a sample drawn with ``key``."""
        posterior = self.encode(videos)
        z = posterior.mode() if key is None else posterior.sample(key)
        return z * self.config.scaling_factor

    def decode_latents(self, latents: jax.Array, chunk_frames: int | None = None) -> jax.Array:
        """Videos from diffusion latents: ``decode(latents / scaling_factor)`` (the HunyuanVideo pipeline's step), in
        chunks of ``chunk_frames`` latent frames if given."""
        return self.decode(self._latents(latents) / self.config.scaling_factor, chunk_frames=chunk_frames)

    # -- checks -----------------------------------------------------------------------------------------------------

    def _posterior(self, moments: jax.Array) -> Posterior:
        mean, logvar = jnp.split(self.quant_conv(moments), 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, *_LOGVAR_RANGE))

    def _videos(self, videos: jax.Array) -> jax.Array:
        self._check_video_shape(tuple(videos.shape))
        return videos.astype(self.config.dtype)

    def _check_video_shape(self, shape: tuple[int, ...], *, first: bool = True) -> None:
        """``first``: a whole clip or its first chunk (``1 + 4k`` frames); else a later chunk (``4k``, ``k >= 1``)."""
        cfg = self.config
        s, t = cfg.pixel_ratio, cfg.temporal_compression_ratio
        if len(shape) != 5 or shape[-1] != cfg.in_channels or shape[2] % s or shape[3] % s:
            raise ValueError(f"AutoencoderKLHunyuanVideo: videos must be [B, F, H, W, {cfg.in_channels}] (channels "
                             f"last) with H and W multiples of {s}; got shape {shape}. Transpose diffusers' "
                             "[B, C, F, H, W] with x.transpose(0, 2, 3, 4, 1).")
        if not first and (shape[1] % t or not shape[1]):
            raise ValueError(f"AutoencoderKLHunyuanVideo: a chunk after the clip's first holds a positive multiple of "
                             f"{t} frames; got {shape[1]}.")
        if first and shape[1] % t != 1:
            raise ValueError(f"AutoencoderKLHunyuanVideo: videos have {shape[1]} frames; the causal VAE takes 1 + {t}k "
                             f"frames (1, {1 + t}, {1 + 2 * t}, ...): drop the last {(shape[1] - 1) % t} frames.")

    def _check_rates(self, frames: int | None, frame_rates, chunk, depth, side: int,
                     chunk_frames) -> tuple[tuple[int, ...], int]:
        """Validated ``(factors, depth)`` of a dynamic frame rate (``side`` 0 encoder, 1 decoder)."""
        t, name = self.config.temporal_compression_ratio, ("encode", "decode")[side]
        if chunk_frames is not None:
            raise ValueError(f"AutoencoderKLHunyuanVideo.{name}: frame_rates and chunk_frames cannot be combined; "
                             "pass one of them.")
        factors = tuple(frame_rates)
        if not factors or any(isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1 for m in factors):
            raise ValueError(f"AutoencoderKLHunyuanVideo.{name}: frame_rates={frame_rates!r} must be positive ints, "
                             "one per chunk.")
        factors = tuple(int(m) for m in factors)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or any(chunk % (t * m) for m in factors):
            raise ValueError(f"AutoencoderKLHunyuanVideo.{name}: rate_chunk={chunk!r} must be a positive multiple of "
                             f"{t} x every frame rate factor ({sorted(set(factors))}), e.g. 16.")
        if frames is not None and frames != 1 + chunk * len(factors):
            raise ValueError(f"AutoencoderKLHunyuanVideo.{name}: {len(factors)} frame_rates with rate_chunk={chunk} "
                             f"need 1 + {chunk} x {len(factors)} = {1 + chunk * len(factors)} frames; got {frames}.")
        depths = self.config.frame_rate_depths[side]
        depth = (depths[-1] if side == 0 else depths[0]) if depth is None else depth
        if depth not in depths:
            raise ValueError(f"AutoencoderKLHunyuanVideo.{name}: rate_depth={depth!r} must be one of {list(depths)} "
                             "(the depths where features are at the full frame rate: config.frame_rate_depths).")
        return factors, depth

    def _latents(self, latents: jax.Array) -> jax.Array:
        shape, channels = tuple(latents.shape), self.config.latent_channels
        if len(shape) != 5 or shape[-1] != channels:
            raise ValueError(f"AutoencoderKLHunyuanVideo: latents must be [B, f, h, w, {channels}] (channels last); "
                             f"got shape {shape}.")
        return latents.astype(self.config.dtype)

    # -- calibration --------------------------------------------------------------------------------------------

    def check_calibration(self, calib) -> dict:
        """Calibration data ``{"videos": [N, 1 + 4k, H, W, C_in]}`` (finite), as float32 numpy."""
        if not isinstance(calib, dict) or set(calib) != {"videos"}:
            found = sorted(calib) if isinstance(calib, dict) else type(calib).__name__
            raise ValueError(f"AutoencoderKLHunyuanVideo calibration must be a dict {{'videos': [N, F, H, W, "
                             f"{self.config.in_channels}]}} (channels last, values in [-1, 1]), got {found}.")
        videos = np.asarray(calib["videos"], np.float32)
        self._check_video_shape(videos.shape)
        if not np.all(np.isfinite(videos)):
            raise ValueError("calib['videos'] holds NaN or Inf; pass finite videos in [-1, 1].")
        return {"videos": videos}

    def calibration_stages(self) -> list[Stage]:
        """Encoder blocks on the videos, then decoder blocks on the decoded posterior means (module docstring)."""
        encoder, decoder = self.encoder, self.decoder
        return [Stage(blocks=[*encoder.down_blocks, encoder.mid_block], enter=_enter_encoder),
                Stage(blocks=[decoder.mid_block, *decoder.up_blocks], enter=_enter_decoder)]


def _chunk_sizes(frames: int, chunk_frames, multiple: int, name: str) -> list[int]:
    """``[1 + n, n, ..., rest]`` summing to ``frames`` (``1 + multiple k``), ``n = chunk_frames``."""
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1 \
            or chunk_frames % multiple:
        raise ValueError(f"{name}={chunk_frames!r} must be a positive multiple of {multiple} (the first chunk holds "
                         f"1 + {name} frames, the next ones {name}).")
    sizes, left = [min(frames, 1 + chunk_frames)], frames - min(frames, 1 + chunk_frames)
    while left:
        sizes.append(min(left, chunk_frames))
        left -= sizes[-1]
    return sizes


def _enter_encoder(m: AutoencoderKLHunyuanVideo, batch: dict, previous) -> tuple[jax.Array, None]:
    """``calibration_stages``' entries (module level, so each compiles once per model structure)."""
    return m.encoder.conv_in(m._videos(batch["videos"])), None


def _enter_decoder(m: AutoencoderKLHunyuanVideo, batch: dict, previous) -> tuple[jax.Array, None]:
    mean = m._posterior(m.encoder.tail(previous[0])).mean
    return m.decoder.conv_in(m.post_quant_conv(mean)), None


@functools.partial(jax.jit, static_argnums=0)
def _encoder_step(graphdef: nnx.GraphDef, state: nnx.State, chunk: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
    return nnx.merge(graphdef, state).encoder.stream(chunk, cache)


@functools.partial(jax.jit, static_argnums=0)
def _decoder_step(graphdef: nnx.GraphDef, state: nnx.State, chunk: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
    model = nnx.merge(graphdef, state)
    return model.decoder.stream(model.post_quant_conv(chunk), cache)


def _run_passes(step, model: AutoencoderKLHunyuanVideo, x: jax.Array, sizes: list[int]) -> jax.Array:
    """The chunks of ``x`` through ``step`` until every GroupNorm has the clip's statistics (module docstring).
    The model is split once; ``step`` is jitted over ``(state, chunk, cache)`` and compiles once per chunk shape
    and cache structure (the clip's first chunk, the others)."""
    graphdef, state = nnx.split(model)
    starts = np.cumsum([0, *sizes[:-1]])
    shapes = jax.eval_shape(lambda chunk: step(graphdef, state, chunk, None)[1], x[:, :sizes[0]])
    cache, done = next_pass(shapes, placeholder_statistics=True), 0
    while True:
        outputs = []
        for start, size in zip(starts, sizes):
            y, cache = step(graphdef, state, x[:, start:start + size], cache)
            outputs.append(y)
        if done == num_norms(cache):
            return jnp.concatenate(outputs, axis=1)
        cache, done = next_pass(cache), done + 1


def init_model(config: HunyuanVideoVAEConfig, key: jax.Array) -> AutoencoderKLHunyuanVideo:
    """A randomly initialised VAE (weights ~ N(0, 1 / fan_in), norms 1, biases 0)."""
    check_dtypes_available(config)
    return AutoencoderKLHunyuanVideo(config, rngs=nnx.Rngs(params=key))


def abstract_model(config: HunyuanVideoVAEConfig) -> AutoencoderKLHunyuanVideo:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: AutoencoderKLHunyuanVideo(config, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------
# diffusers import / export
# ----------------------------------------------------------------------------

_DOWN_BLOCK, _UP_BLOCK = "HunyuanVideoDownBlock3D", "HunyuanVideoUpBlock3D"
_DIFFUSERS_KEYS = {
    "in_channels", "out_channels", "latent_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "norm_num_groups", "scaling_factor", "spatial_compression_ratio",
    "temporal_compression_ratio", "mid_block_add_attention",
}


def config_from_diffusers(config: dict, *, dtype: DTypeName = "float32",
                          param_dtype: DTypeName | None = None) -> HunyuanVideoVAEConfig:
    """A config from an ``AutoencoderKLHunyuanVideo`` ``config.json`` dict (diffusers' defaults for absent keys);
    other block types or activations and unknown keys are refused."""
    unknown = sorted(k for k in config if k not in _DIFFUSERS_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{CLASS_NAME} config.json has attributes the converter does not handle: {unknown}.")
    defaults = HunyuanVideoVAEConfig()
    widths = tuple(config.get("block_out_channels", defaults.block_out_channels))
    for key, block in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
        types = tuple(config.get(key, (block,) * 4))
        if types != (block,) * len(widths):
            raise ValueError(f"{CLASS_NAME} config.json {key}={list(types)}: only {len(widths)} x {block!r} (one per "
                             "block_out_channels entry) is supported.")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"{CLASS_NAME} config.json act_fn={config['act_fn']!r}: only 'silu' is supported.")
    fields = ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
              "scaling_factor", "spatial_compression_ratio", "temporal_compression_ratio", "mid_block_add_attention")
    values = {name: config.get(name, getattr(defaults, name)) for name in fields}
    return HunyuanVideoVAEConfig(block_out_channels=widths, **values, dtype=dtype, param_dtype=param_dtype or dtype)


def config_to_diffusers(cfg: HunyuanVideoVAEConfig) -> dict:
    """The ``config.json`` dict of an ``AutoencoderKLHunyuanVideo`` with ``cfg``'s architecture (not the compression
    variant's, which diffusers does not describe: export the base model)."""
    if cfg.compression_variant:
        raise ValueError(f"{CLASS_NAME}: the compression variant has no diffusers config; export the base model "
                         "(config.replace(compression_variant=False), same weights).")
    n = len(cfg.block_out_channels)
    return {
        "_class_name": CLASS_NAME, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "latent_channels": cfg.latent_channels, "down_block_types": [_DOWN_BLOCK] * n,
        "up_block_types": [_UP_BLOCK] * n, "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block, "act_fn": "silu", "norm_num_groups": cfg.norm_num_groups,
        "scaling_factor": cfg.scaling_factor, "spatial_compression_ratio": cfg.spatial_compression_ratio,
        "temporal_compression_ratio": cfg.temporal_compression_ratio,
        "mid_block_add_attention": cfg.mid_block_add_attention,
    }


def from_tensors(cfg: HunyuanVideoVAEConfig, tensors: dict[str, np.ndarray], *,
                 source: str = "tensors") -> AutoencoderKLHunyuanVideo:
    """Build the VAE from diffusers-named arrays (PyTorch layouts), validating every one first."""
    check_dtypes_available(cfg)
    abstract = abstract_model(cfg)
    return import_torch_tensors(abstract, tensors, torch_layouts(abstract), param_dtype=cfg.param_dtype,
                                source=source, what=CLASS_NAME)


def from_diffusers(path: str | os.PathLike, *, dtype: DTypeName = "float32",
                   param_dtype: DTypeName | None = None) -> AutoencoderKLHunyuanVideo:
    """Load a diffusers ``AutoencoderKLHunyuanVideo`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``); another ``_class_name`` and missing, misshapen or unexpected tensors
    are refused before any model is built. ``param_dtype`` defaults to the stored dtype."""
    from jquant.models import hf_io

    config = hf_io.read_diffusers_config(path, (CLASS_NAME,))
    tensors = hf_io.read_safetensors(path, weights_name=hf_io.DIFFUSERS_FILE)
    cfg = config_from_diffusers(config, dtype=dtype,
                                param_dtype=param_dtype or hf_io.stored_dtype(tensors, default=dtype))
    return from_tensors(cfg, tensors, source=str(path))


def to_tensors(model: AutoencoderKLHunyuanVideo) -> dict[str, np.ndarray]:
    """diffusers-named numpy arrays of a float ``model`` (PyTorch layouts); quantized sites are refused."""
    return export_torch_tensors(model, torch_layouts(model))


def to_diffusers(model: AutoencoderKLHunyuanVideo, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a diffusers ``AutoencoderKLHunyuanVideo`` folder, atomically."""
    from jquant.models import hf_io

    return hf_io.write_checkpoint(path, config_to_diffusers(model.config), to_tensors(model), overwrite=overwrite,
                                  weights_name=hf_io.DIFFUSERS_FILE)


FAMILY = Family(
    name="hunyuan_video_vae",
    config_class=HunyuanVideoVAEConfig,
    model_class=AutoencoderKLHunyuanVideo,
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, HunyuanVideoVAEConfig),
    checkpoint_protocol="the manifest's config holds the HunyuanVideoVAEConfig fields "
                        "(config_io.dataclass_config_to_json).",
    diffusers_class_names=(CLASS_NAME,),
    from_diffusers=from_diffusers,
    to_diffusers=to_diffusers,
    presets={
        # The bundled tiny video VAE (trained on 32x32 emoji clips): RGB clips of 1 + 4k frames at 32x32 -> 16-channel
        # latents of 1 + k frames at 8x8 (spatial 4x, temporal 4x: 12x fewer numbers; HunyuanVideo's own 48x, with 4
        # channels, blurred the 13-16 px emoji of the clips past recognition). jq-vae-tiny's sizes (three blocks of
        # (32, 64, 64) channels, one resnet each (decoder: two), 16 groups; blocks 0 and 1 halve frames, height and
        # width, block 2 keeps them), so it is inflated from jq-vae-tiny before training (models/vae_inflation.py: a
        # half-width VAE trained from scratch for 2000 steps let the judge read 4% of its reconstructions);
        # scaling_factor is set after training (1 / the latents' std).
        "jq-video-vae-tiny": HunyuanVideoVAEConfig(
            block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=16, norm_num_groups=16,
            scaling_factor=1.0, spatial_compression_ratio=4, temporal_compression_ratio=4),
    },
    keep_float=("encoder/conv_in/conv", "encoder/conv_out/conv", "quant_conv", "post_quant_conv",
                "decoder/conv_in/conv", "decoder/conv_out/conv"),
)
