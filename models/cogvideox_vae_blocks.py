"""The causal 3-D blocks of CogVideoX's video VAE (diffusers 0.42 ``autoencoder_kl_cogvideox.py``), channels last.

Every tensor is ``[B, F, H, W, C]`` (frames, height, width, channels). Module and parameter names mirror
diffusers' (``resnets/0/conv1/conv/kernel`` is ``resnets.0.conv1.conv.weight``). With ``φ`` = SiLU:

- ``CausalConv3d``: a ``k x k x k`` convolution, causal in time. Its input is prefixed with ``k - 1`` past
  frames: the previous chunk's last input frames (the *cache*), or, at the start of a clip, the first frame
  repeated (diffusers' ``pad_mode="first"``); height and width are zero-padded by ``(k - 1) / 2``.
- Frame batches. diffusers encodes ``F`` frames in batches of ``SAMPLE_FRAMES_BATCH = 8`` (decodes latents in
  batches of ``LATENT_FRAMES_BATCH = 2``): ``max(F // b, 1)`` batches, the first holding the ``F mod b`` extra
  frames (``frame_batches``). Causal convs carry their past across batches, but every GroupNorm takes its
  statistics over one batch's frames only (``batched_group_norm``). Inside the networks a batch of ``b`` frames
  becomes ``b / 2`` frames after each temporal downsampling (``2 b`` after each temporal upsampling), so each
  block knows its level's ``frames_batch``; the trained model's outputs depend on this split, so it is part of
  the model, not a memory-saving device.
- ``ResnetBlock3D``: ``y = S(x) + conv2(φ(N_2(conv1(φ(N_1(x))))))``, ``N`` a GroupNorm per frame batch (encoder)
  or a ``SpatialNorm3D`` conditioned on the latents (decoder), ``S`` a 1x1x1 conv when the width changes.
- ``SpatialNorm3D`` (MoVQ, Zheng et al. 2022, arXiv 2209.09002): ``y = GN(f) * conv_y(z↑) + conv_b(z↑)``,
  ``z↑`` the latents resized to ``f``'s frames, height and width by nearest neighbour, the first latent frame
  given to the first frame alone when ``f`` holds an odd number (> 1) of frames.
- ``Downsample3D``: with ``compress_time``, frames averaged in pairs (an odd count keeps its first frame
  apart), then per frame: zero-pad one row and column after, 3x3 conv of stride 2.
- ``Upsample3D``: with ``compress_time``, every frame repeated twice (an odd count > 1 keeps its first frame
  single), then per frame: nearest-neighbour x2, 3x3 conv.

Applied to one frame batch, the resampling rules are diffusers' per-chunk rules; applied to a whole clip of
valid length (the first batch odd, the others even) they give the same frames, so they run on the whole array.

The encoder's down / mid blocks and the decoder's mid / up blocks are the units calibrated block by block
(``calibration_forward``); a block called with ``cache=None`` starts a clip.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.models.image_layers import Downsample2D, GroupNorm, Upsample2D
from jquant.models.layers import Conv

SAMPLE_FRAMES_BATCH = 8  # diffusers AutoencoderKLCogVideoX.num_sample_frames_batch_size
LATENT_FRAMES_BATCH = 2  # diffusers AutoencoderKLCogVideoX.num_latent_frames_batch_size
Cache = dict[str, Any] | None
"""Per module, the causal convs' past input frames (``{"conv1": [B, k - 1, H, W, C], ...}``); None starts a clip."""


def frame_batches(frames: int, batch: int) -> tuple[int, ...]:
    """diffusers' split of ``frames`` into batches of ``batch``: ``max(frames // batch, 1)`` batches, the first
    holding the ``frames mod batch`` extra frames (``frame_batches(17, 8) == (9, 8)``)."""
    count = max(frames // batch, 1)
    return (frames - (count - 1) * batch,) + (batch,) * (count - 1)


def batched_group_norm(norm: GroupNorm, x: jax.Array, frames_batch: int) -> jax.Array:
    """``norm`` (a ``GroupNorm``: its groups, eps, weight and bias) with statistics per frame batch
    (``frame_batches``): ``x [B, F, H, W, C]`` -> same shape.

    One pass over the clip: per-frame group sums are added up per batch, and the batch statistics repeated back
    over its frames, so a clip of many batches costs one normalisation (not one per batch), in at least float32.
    """
    sizes = frame_batches(x.shape[1], frames_batch)
    if len(sizes) == 1:
        return norm(x)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    b, f, *_, c = x.shape
    grouped = x.astype(acc).reshape(b, f, -1, norm.num_groups, c // norm.num_groups)  # [B, F, H W, G, C / G]
    per_frame = math.prod(x.shape[2:-1]) * (c // norm.num_groups)  # values per frame and group

    def batch_mean(values: jax.Array) -> jax.Array:
        """``values [B, F, H W, G, C / G]`` -> their mean per frame batch and group, repeated over the batch's
        frames: ``[B, F, 1, G, 1]``."""
        sums = values.sum(axis=(2, 4))  # [B, F, G]
        rest = sums[:, sizes[0]:].reshape(b, len(sizes) - 1, frames_batch, -1).sum(axis=2)
        batches = jnp.concatenate([sums[:, :sizes[0]].sum(axis=1, keepdims=True), rest], axis=1)
        means = batches / (np.asarray(sizes)[None, :, None] * per_frame)
        return jnp.repeat(means, np.asarray(sizes), axis=1, total_repeat_length=f)[:, :, None, :, None]

    centred = grouped - batch_mean(grouped)
    y = (centred * jax.lax.rsqrt(batch_mean(jnp.square(centred)) + norm.eps)).reshape(x.shape)
    return (y * norm.weight[...].astype(acc) + norm.bias[...].astype(acc)).astype(x.dtype)


def _nearest(x: jax.Array, axis: int, size: int) -> jax.Array:
    """``torch.nn.functional.interpolate(mode="nearest")`` along one axis: output ``i`` reads ``floor(i n / size)``."""
    n = x.shape[axis]
    return x if n == size else jnp.take(x, np.arange(size) * n // size, axis=axis)


def _resize_latents(z: jax.Array, frames: int, height: int, width: int) -> jax.Array:
    """``SpatialNorm3D``'s ``z↑``: latents ``[B, f, h, w, L]`` -> ``[B, frames, height, width, L]`` by nearest
    neighbour, frame 0 mapped to frame 0 alone when ``frames`` is odd and > 1."""
    def resize(part: jax.Array, n: int) -> jax.Array:
        return _nearest(_nearest(_nearest(part, 1, n), 2, height), 3, width)

    if frames > 1 and frames % 2:
        return jnp.concatenate([resize(z[:, :1], 1), resize(z[:, 1:], frames - 1)], axis=1)
    return resize(z, frames)


class CausalConv3d(nnx.Module):
    """``x [B, F, H, W, C_in]`` -> ``[B, F, H, W, C_out]``, causal in time (module docstring); a ``conv`` site."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        pad = (kernel - 1) // 2
        self.conv = Conv(c_in, c_out, (kernel,) * 3, use_bias=True, param_dtype=param_dtype, rngs=rngs,
                         padding=((0, 0), (pad, pad), (pad, pad)), init_std=(kernel**3 * c_in) ** -0.5)
        self.time_pad = kernel - 1

    def __call__(self, x: jax.Array, cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """``(y, cache')``: ``cache`` the previous chunk's last ``k - 1`` input frames (None: the first frame
        repeated), ``cache'`` this chunk's (None for a 1x1x1 kernel, which has no past)."""
        if not self.time_pad:
            return self.conv(x), None
        past = jnp.repeat(x[:, :1], self.time_pad, axis=1) if cache is None else cache
        x = jnp.concatenate([past, x], axis=1)
        return self.conv(x), x[:, -self.time_pad:]


def conv1x1x1(c_in: int, c_out: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs) -> Conv:
    """A biased pointwise 3-D ``Conv`` (diffusers' plain ``Conv3d`` of kernel 1)."""
    return Conv(c_in, c_out, (1, 1, 1), use_bias=True, param_dtype=param_dtype, rngs=rngs, init_std=c_in**-0.5)


class SpatialNorm3D(nnx.Module):
    """``y = GN(f) * conv_y(z↑) + conv_b(z↑)`` (module docstring): ``f [B, F, H, W, C]``, ``z [B, f, h, w, L]``."""

    def __init__(self, channels: int, latent_channels: int, *, groups: int, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.norm_layer = GroupNorm(channels, groups, eps=1e-6, param_dtype=param_dtype)
        self.conv_y = CausalConv3d(latent_channels, channels, 1, param_dtype=param_dtype, rngs=rngs)
        self.conv_b = CausalConv3d(latent_channels, channels, 1, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, f: jax.Array, z: jax.Array, frames_batch: int) -> jax.Array:
        z = _resize_latents(z, *f.shape[1:4])
        return batched_group_norm(self.norm_layer, f, frames_batch) * self.conv_y(z)[0] + self.conv_b(z)[0]


class ResnetBlock3D(nnx.Module):
    """``y = S(x) + conv2(φ(N_2(conv1(φ(N_1(x))))))``: ``[B, F, H, W, c_in]`` -> ``[B, F, H, W, c_out]``.

    ``latent_channels`` set: the norms are ``SpatialNorm3D`` on the latents ``z`` (decoder), else GroupNorms
    (encoder). Norm statistics are per ``frames_batch`` frames.
    """

    def __init__(self, c_in: int, c_out: int, *, groups: int, eps: float, frames_batch: int,
                 latent_channels: int | None, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        def norm(channels: int) -> GroupNorm | SpatialNorm3D:
            if latent_channels is None:
                return GroupNorm(channels, groups, eps=eps, param_dtype=param_dtype)
            return SpatialNorm3D(channels, latent_channels, groups=groups, param_dtype=param_dtype, rngs=rngs)

        self.norm1 = norm(c_in)
        self.conv1 = CausalConv3d(c_in, c_out, 3, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = norm(c_out)
        self.conv2 = CausalConv3d(c_out, c_out, 3, param_dtype=param_dtype, rngs=rngs)
        self.conv_shortcut = conv1x1x1(c_in, c_out, param_dtype=param_dtype, rngs=rngs) if c_in != c_out else None
        self.frames_batch = frames_batch

    def _norm(self, norm: GroupNorm | SpatialNorm3D, x: jax.Array, z: jax.Array | None) -> jax.Array:
        if isinstance(norm, SpatialNorm3D):
            return norm(x, z, self.frames_batch)
        return batched_group_norm(norm, x, self.frames_batch)

    def __call__(self, x: jax.Array, z: jax.Array | None = None, cache: Cache = None) -> tuple[jax.Array, dict]:
        cache, new = cache or {}, {}
        h, new["conv1"] = self.conv1(jax.nn.silu(self._norm(self.norm1, x, z)), cache.get("conv1"))
        h, new["conv2"] = self.conv2(jax.nn.silu(self._norm(self.norm2, h, z)), cache.get("conv2"))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h, new


def _per_frame(fn, x: jax.Array) -> jax.Array:
    """A 2-D module applied to every frame: ``[B, F, H, W, C]`` -> ``[B, F, H', W', C']``."""
    b, f = x.shape[:2]
    y = fn(x.reshape(b * f, *x.shape[2:]))
    return y.reshape(b, f, *y.shape[1:])


class Downsample3D(Downsample2D):
    """``[B, F, H, W, C]`` -> ``[B, F', ceil(H / 2), ceil(W / 2), C]``; with ``compress_time`` frames are averaged in
    pairs first (``F' = F / 2``, or ``1 + (F - 1) / 2`` keeping an odd count's first frame), else ``F' = F``."""

    def __init__(self, channels: int, *, compress_time: bool, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        super().__init__(channels, param_dtype=param_dtype, rngs=rngs)
        self.compress_time = compress_time

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.compress_time:
            first, rest = (x[:, :1], x[:, 1:]) if x.shape[1] % 2 else (x[:, :0], x)
            b, n = rest.shape[:2]
            x = jnp.concatenate([first, rest.reshape(b, n // 2, 2, *x.shape[2:]).mean(axis=2)], axis=1)
        return _per_frame(super().__call__, x)


class Upsample3D(Upsample2D):
    """``[B, F, H, W, C]`` -> ``[B, F', 2 H, 2 W, C]``; with ``compress_time`` every frame is repeated twice
    (``F' = 2 F``), except an odd count's (> 1) first frame (``F' = 2 F - 1``); else ``F' = F``."""

    def __init__(self, channels: int, *, compress_time: bool, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        super().__init__(channels, param_dtype=param_dtype, rngs=rngs)
        self.compress_time = compress_time

    def __call__(self, x: jax.Array) -> jax.Array:
        f = x.shape[1]
        if self.compress_time and f > 1:
            first, rest = (x[:, :1], x[:, 1:]) if f % 2 else (x[:, :0], x)
            x = jnp.concatenate([first, jnp.repeat(rest, 2, axis=1)], axis=1)
        return _per_frame(super().__call__, x)


class DownBlock3D(nnx.Module):
    """``num_layers`` resnets (``c_in -> c_out``, then ``c_out -> c_out``), then a ``Downsample3D`` if asked."""

    def __init__(self, c_in: int, c_out: int, *, num_layers: int, downsample: bool, compress_time: bool,
                 groups: int, eps: float, frames_batch: int, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock3D(c_in if i == 0 else c_out, c_out, groups=groups, eps=eps, frames_batch=frames_batch,
                          latent_channels=None, param_dtype=param_dtype, rngs=rngs) for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample3D(c_out, compress_time=compress_time, param_dtype=param_dtype,
                                                   rngs=rngs)]) if downsample else None

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, dict]:
        cache, new = cache or {}, {}
        for i, resnet in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = resnet(x, cache=cache.get(f"resnet_{i}"))
        return (x if self.downsamplers is None else self.downsamplers[0](x)), new

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        return self(x)[0]


class MidBlock3D(nnx.Module):
    """Two resnets of ``channels`` (spatial norms on the latents when ``latent_channels`` is set: the decoder's)."""

    def __init__(self, channels: int, *, groups: int, eps: float, frames_batch: int, latent_channels: int | None,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock3D(channels, channels, groups=groups, eps=eps, frames_batch=frames_batch,
                          latent_channels=latent_channels, param_dtype=param_dtype, rngs=rngs) for _ in range(2)])

    def __call__(self, x: jax.Array, z: jax.Array | None = None, cache: Cache = None) -> tuple[jax.Array, dict]:
        cache, new = cache or {}, {}
        for i, resnet in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = resnet(x, z, cache.get(f"resnet_{i}"))
        return x, new

    def calibration_forward(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        return self(x, context)[0]


class UpBlock3D(nnx.Module):
    """``num_layers`` spatially normed resnets (``c_in -> c_out``, then ``c_out -> c_out``), then an ``Upsample3D``."""

    def __init__(self, c_in: int, c_out: int, *, num_layers: int, upsample: bool, compress_time: bool, groups: int,
                 eps: float, frames_batch: int, latent_channels: int, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock3D(c_in if i == 0 else c_out, c_out, groups=groups, eps=eps, frames_batch=frames_batch,
                          latent_channels=latent_channels, param_dtype=param_dtype, rngs=rngs)
            for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample3D(c_out, compress_time=compress_time, param_dtype=param_dtype,
                                               rngs=rngs)]) if upsample else None

    def __call__(self, x: jax.Array, z: jax.Array, cache: Cache = None) -> tuple[jax.Array, dict]:
        cache, new = cache or {}, {}
        for i, resnet in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = resnet(x, z, cache.get(f"resnet_{i}"))
        return (x if self.upsamplers is None else self.upsamplers[0](x)), new

    def calibration_forward(self, x: jax.Array, context: jax.Array) -> jax.Array:
        return self(x, context)[0]
