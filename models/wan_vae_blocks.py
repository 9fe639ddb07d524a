"""The causal 3-D blocks of Wan 2.1's video VAE (diffusers 0.42 ``autoencoder_kl_wan.py``), channels last.

Every tensor is ``[B, F, H, W, C]`` (frames, height, width, channels). Module and parameter names mirror
diffusers' (``resnets/0/conv1/kernel`` is ``resnets.0.conv1.weight``; the resamplers' ``resample`` conv is
diffusers' ``resample.1``, the second entry of its ``nn.Sequential``). With ``φ`` = SiLU:

- ``CausalConv3d`` (``WanCausalConv3d``): a ``k_t x k x k`` convolution, causal in time. Its input is prefixed
  with ``k_t - 1`` past frames: the previous chunk's last input frames (the *cache*), or zeros at the start of a
  clip; height and width are zero-padded by ``(k - 1) / 2`` on each side.
- ``RMSNorm`` (``WanRMS_norm``): ``y = x / max(||x||₂, 1e-12) · sqrt(C) · γ``, the L2 norm taken over the
  channels at each position (``torch.nn.functional.normalize``), so it has no statistics across frames.
- ``ResidualBlock``: ``y = S(x) + conv2(φ(N_2(conv1(φ(N_1(x))))))``, ``S`` a 1x1x1 conv when the width changes.
- ``AttentionBlock``: per frame, ``y = x + proj(softmax(q kᵀ / sqrt(C)) v)`` over the ``H W`` positions of
  ``N(x)``, one head of all ``C`` channels, ``(q, k, v) = to_qkv(N(x))`` (a 1x1 conv to ``3 C``).
- ``Downsample`` (``WanResample`` ``downsample2d`` / ``downsample3d``): per frame, zero-pad one row and column
  after and a 3x3 conv of stride 2; with ``temporal`` then ``time_conv`` (kernel 3 x 1 x 1, stride 2 in time, no
  padding) over the frames: the clip's first frame passes unchanged and frame ``j ≥ 1`` of the output is
  ``time_conv(x_{2j-2}, x_{2j-1}, x_{2j})``; ``F = 1 + 2 m`` frames become ``1 + m``.
- ``Upsample`` (``upsample2d`` / ``upsample3d``): with ``temporal``, ``time_conv`` (a causal 3 x 1 x 1 conv to
  ``2 C`` channels) runs over the frames after the clip's first one (zeros before them: the first frame is not
  in its past), and each of those frames becomes two (channels ``[0, C)`` then ``[C, 2 C)``) while the first
  frame stays single, so ``f`` frames become ``2 f - 1``; then per frame nearest x2 and a 3x3 conv to
  ``out_channels`` (``C / 2`` in Wan 2.1's decoder).

diffusers runs the encoder on the first frame, then on chunks of 4 frames, and the decoder one latent frame at a
time, passing each causal conv's last two input frames along (``feat_cache``). Every block above is causal and
has no statistics across frames, so running a whole clip at once gives the same frames; each block here takes
and returns its cache as a value (``cache=None`` starts a clip), so a clip can also be run in any chunks whose
frame counts the temporal resamplers can halve (see ``models.wan_vae``).

The encoder's down blocks and mid block and the decoder's mid block and up blocks are the units calibrated block
by block (``calibration_forward``, a whole clip at once).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jquant import ops
from jquant.models.image_layers import conv2d
from jquant.models.layers import Conv

CACHE_FRAMES = 2  # diffusers' CACHE_T: past input frames a 3-frame causal conv keeps
Cache = Any
"""A block's carried state: the causal convs' past input frames (arrays ``[B, k_t - 1, H, W, C]``) in nested
dicts / lists mirroring the modules; None starts a clip."""


def per_frame(fn, x: jax.Array) -> jax.Array:
    """A 2-D function applied to every frame: ``[B, F, H, W, C]`` -> ``[B, F, H', W', C']``."""
    b, f = x.shape[:2]
    y = fn(x.reshape(b * f, *x.shape[2:]))
    return y.reshape(b, f, *y.shape[1:])


class CausalConv3d(Conv):
    """``x [B, F, H, W, C_in]`` -> ``[B, F, H, W, C_out]``, causal in time with zero padding (module docstring);
    a ``conv`` site (``Conv``'s parameters, so ``conv1/kernel`` is diffusers' ``conv1.weight``)."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int], *, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        k_t, k_h, k_w = kernel
        super().__init__(c_in, c_out, kernel, use_bias=True, param_dtype=param_dtype, rngs=rngs,
                         padding=((0, 0), (k_h // 2, k_h // 2), (k_w // 2, k_w // 2)),
                         init_std=(math.prod(kernel) * c_in) ** -0.5)
        self.time_pad = k_t - 1

    def __call__(self, x: jax.Array, cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """``(y, cache')``: ``cache`` the last ``k_t - 1`` frames of the input so far (None: zeros, the clip's
        start), ``cache'`` the same after this chunk (None for ``k_t = 1``, which has no past)."""
        if not self.time_pad:
            return super().__call__(x), None
        past = jnp.zeros((x.shape[0], self.time_pad, *x.shape[2:]), x.dtype) if cache is None else cache
        x = jnp.concatenate([past.astype(x.dtype), x], axis=1)
        return super().__call__(x), x[:, -self.time_pad:]


class RMSNorm(nnx.Module):
    """``y = x / max(||x||₂, 1e-12) · sqrt(C) · γ`` over the channels (``WanRMS_norm``): ``[..., C]`` -> same.

    Normalised in at least float32. ``γ [C]`` is diffusers' ``gamma [C, 1, 1, 1]`` (``[C, 1, 1]`` for the
    attention's per-frame norm: ``torch_ndim`` records which).
    """

    def __init__(self, channels: int, *, torch_ndim: int, param_dtype: jnp.dtype):
        self.gamma = nnx.Param(jnp.ones((channels,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        self.torch_ndim = torch_ndim

    def __call__(self, x: jax.Array) -> jax.Array:
        acc = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(acc)
        norm = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True)), 1e-12)
        y = (xf / norm).astype(x.dtype)
        return y * (x.shape[-1] ** 0.5) * self.gamma[...].astype(x.dtype)


class ResidualBlock(nnx.Module):
    """``y = S(x) + conv2(φ(N_2(conv1(φ(N_1(x))))))``: ``[B, F, H, W, c_in]`` -> ``[B, F, H, W, c_out]``."""

    def __init__(self, c_in: int, c_out: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(c_in, torch_ndim=4, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(c_in, c_out, (3, 3, 3), param_dtype=param_dtype, rngs=rngs)
        self.norm2 = RMSNorm(c_out, torch_ndim=4, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(c_out, c_out, (3, 3, 3), param_dtype=param_dtype, rngs=rngs)
        self.conv_shortcut = (CausalConv3d(c_in, c_out, (1, 1, 1), param_dtype=param_dtype, rngs=rngs)
                              if c_in != c_out else None)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, dict]:
        cache, new = cache or {}, {}
        h, new["conv1"] = self.conv1(jax.nn.silu(self.norm1(x)), cache.get("conv1"))
        h, new["conv2"] = self.conv2(jax.nn.silu(self.norm2(h)), cache.get("conv2"))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)[0]) + h, new

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        return self(x)[0]


class AttentionBlock(nnx.Module):
    """Per-frame single-head self-attention with a residual (module docstring): ``[B, F, H, W, C]`` -> same."""

    def __init__(self, channels: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(channels, torch_ndim=3, param_dtype=param_dtype)
        self.to_qkv = conv2d(channels, 3 * channels, 1, param_dtype=param_dtype, rngs=rngs)
        self.proj = conv2d(channels, channels, 1, param_dtype=param_dtype, rngs=rngs)

    def _frame(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(n, h * w, 1, 3 * c), 3, axis=-1)
        return self.proj(ops.attention(q, k, v, ops.Full()).reshape(n, h, w, c))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + per_frame(self._frame, x)


class Downsample(nnx.Module):
    """``[B, F, H, W, C]`` -> ``[B, F', ceil(H / 2), ceil(W / 2), C]``, ``F' = F`` or, with ``temporal``, the
    stride-2 causal time conv (module docstring): ``1 + (F - 1) / 2`` for a clip's first chunk, ``F / 2`` after."""

    def __init__(self, channels: int, *, temporal: bool, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resample = conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), param_dtype=param_dtype,
                               rngs=rngs)
        self.time_conv = Conv(channels, channels, (3, 1, 1), use_bias=True, stride=(2, 1, 1),
                              param_dtype=param_dtype, rngs=rngs, init_std=(3 * channels) ** -0.5) if temporal else None

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, jax.Array | None]:
        """``(y, cache')``: the cache is the last frame seen (after the spatial conv)."""
        x = per_frame(self.resample, x)
        if self.time_conv is None:
            return x, None
        head, past = (x[:, :1], x[:, :1]) if cache is None else (x[:, :0], cache)
        rest = x[:, 1:] if cache is None else x
        if not rest.shape[1]:
            return head, past
        stream = jnp.concatenate([past.astype(x.dtype), rest], axis=1)
        return jnp.concatenate([head, self.time_conv(stream)], axis=1), stream[:, -1:]

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        return self(x)[0]


class Upsample(nnx.Module):
    """``[B, F, H, W, C]`` -> ``[B, F', 2 H, 2 W, out_channels]``, ``F' = F`` or, with ``temporal``, each frame
    but the clip's first doubled by ``time_conv`` (module docstring): ``2 F - 1`` for the first chunk, ``2 F`` after."""

    def __init__(self, channels: int, out_channels: int, *, temporal: bool, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resample = conv2d(channels, out_channels, 3, padding=1, param_dtype=param_dtype, rngs=rngs)
        self.time_conv = (CausalConv3d(channels, 2 * channels, (3, 1, 1), param_dtype=param_dtype, rngs=rngs)
                          if temporal else None)

    def _double_frames(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, jax.Array]:
        head, rest = (x[:, :1], x[:, 1:]) if cache is None else (x[:, :0], x)
        if not rest.shape[1]:
            b, _, h, w, c = x.shape
            return head, jnp.zeros((b, CACHE_FRAMES, h, w, c), x.dtype)
        y, cache = self.time_conv(rest, cache)
        b, f, h, w, c2 = y.shape
        pairs = y.reshape(b, f, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)
        return jnp.concatenate([head, pairs.reshape(b, 2 * f, h, w, c2 // 2)], axis=1), cache

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, jax.Array | None]:
        """``(y, cache')``: the cache is ``time_conv``'s (zeros after a first chunk of one frame)."""
        if self.time_conv is not None:
            x, cache = self._double_frames(x, cache)

        def frame(f: jax.Array) -> jax.Array:
            return self.resample(jnp.repeat(jnp.repeat(f, 2, axis=1), 2, axis=2))

        return per_frame(frame, x), cache


class MidBlock(nnx.Module):
    """``resnets[0]``, ``attentions[0]``, ``resnets[1]`` at ``channels``: ``[B, F, H, W, C]`` -> same."""

    def __init__(self, channels: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(channels, channels, param_dtype=param_dtype, rngs=rngs)
                                 for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(channels, param_dtype=param_dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, list]:
        cache = cache or [None, None]
        x, first = self.resnets[0](x, cache[0])
        x, second = self.resnets[1](self.attentions[0](x), cache[1])
        return x, [first, second]

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        return self(x)[0]


class UpBlock(nnx.Module):
    """``num_layers`` resnets (``c_in -> c_out``, then ``c_out -> c_out``), then an ``Upsample`` to ``c_out / 2``
    channels if ``upsample`` (Wan 2.1's ``WanUpBlock``)."""

    def __init__(self, c_in: int, c_out: int, *, num_layers: int, upsample: bool, temporal: bool,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(c_in if i == 0 else c_out, c_out, param_dtype=param_dtype, rngs=rngs)
                                 for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample(c_out, c_out // 2, temporal=temporal, param_dtype=param_dtype,
                                             rngs=rngs)]) if upsample else None

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, dict]:
        cache, new = cache or {}, {}
        for i, resnet in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = resnet(x, cache.get(f"resnet_{i}"))
        if self.upsamplers is not None:
            x, new["upsampler"] = self.upsamplers[0](x, cache.get("upsampler"))
        return x, new

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        return self(x)[0]
