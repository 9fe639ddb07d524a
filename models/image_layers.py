"""Channels-last 2-D building blocks of diffusers' image autoencoders (and, later, the video VAEs' spatial parts).

Every tensor is ``[B, H, W, C]``. Convolutions go through ``models.layers.Conv`` (``jquant.ops.conv``: each
kernel is a ``conv`` quantization site), the attention projections through ``models.layers.Linear`` and
the attention itself through ``jquant.ops.attention`` with a ``Full`` mask; norms and SiLU are element-wise
jnp maths. Module and parameter names mirror diffusers' (``resnets/0/conv1/kernel`` is
``resnets.0.conv1.weight``), so a diffusers tensor name is the parameter path joined with dots.

The blocks (diffusers 0.42 ``models/resnet.py``, ``downsampling.py``, ``upsampling.py``,
``unets/unet_2d_blocks.py``, ``attention_processor.py``), with ``φ`` = SiLU and ``GN`` = GroupNorm:

- ``ResnetBlock2D``: ``y = S(x) + conv2(φ(GN_2(conv1(φ(GN_1(x))))))``, ``S`` a 1x1 conv when the channel
  count changes, else the identity (no time embedding, dropout off, output scale 1: the VAE's settings);
- ``Downsample2D``: zero-pad one row and column after (bottom, right), 3x3 conv with stride 2;
- ``Upsample2D``: nearest-neighbour x2, 3x3 conv;
- ``SpatialSelfAttention``: ``y = x + W_o softmax(q kᵀ / sqrt(d)) v`` over the ``H W`` positions of
  ``GN(x)`` (``q = GN(x) W_q + b_q`` etc., heads of ``d = C / heads`` channels);
- ``DownEncoderBlock2D`` (resnets, then an optional downsampler), ``UpDecoderBlock2D`` (resnets, then an
  optional upsampler), ``UNetMidBlock2D`` (resnet, [attention, resnet] ...). These three are the units a
  VAE calibrates block by block (``calibration_forward``, ``jquant.calib.sequential``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jquant import ops
from jquant.models.layers import Conv, Linear


def conv2d(c_in: int, c_out: int, kernel: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs, stride: int = 1,
           padding: int | tuple[tuple[int, int], ...] = 0) -> Conv:
    """A biased ``kernel x kernel`` ``Conv`` from ``c_in`` to ``c_out`` channels, weights ~ N(0, 1 / fan_in)."""
    return Conv(c_in, c_out, (kernel, kernel), use_bias=True, param_dtype=param_dtype, rngs=rngs, stride=stride,
                padding=padding, init_std=(kernel * kernel * c_in) ** -0.5)


class GroupNorm(nnx.Module):
    """``y = (x - μ_g) / sqrt(σ²_g + eps) * weight + bias`` (Wu & He 2018; ``torch.nn.GroupNorm``), channels last.

    ``x [B, *spatial, C]``: the ``C`` channels split into ``num_groups`` consecutive groups; ``μ_g`` and the biased
    variance ``σ²_g`` are taken per sample over the spatial axes and the group's channels, in at least float32.
    ``weight``/``bias`` ``[C]`` (initialised to 1 and 0).
    """

    def __init__(self, num_channels: int, num_groups: int, *, eps: float, param_dtype: jnp.dtype):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible by num_groups={num_groups}.")
        self.weight = nnx.Param(jnp.ones((num_channels,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        self.num_groups, self.eps = num_groups, eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, *spatial, C]`` -> same shape and dtype."""
        acc = jnp.promote_types(x.dtype, jnp.float32)
        grouped = x.astype(acc).reshape(*x.shape[:-1], self.num_groups, x.shape[-1] // self.num_groups)
        axes = (*range(1, x.ndim - 1), x.ndim)  # the spatial axes and the channels within a group
        mean = grouped.mean(axis=axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * self.weight[...].astype(acc) + self.bias[...].astype(acc)).astype(x.dtype)


class ResnetBlock2D(nnx.Module):
    """``y = S(x) + conv2(φ(GN_2(conv1(φ(GN_1(x))))))``: ``x [B, H, W, c_in]`` -> ``[B, H, W, c_out]``."""

    def __init__(self, c_in: int, c_out: int, *, groups: int, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(c_in, groups, eps=eps, param_dtype=param_dtype)
        self.conv1 = conv2d(c_in, c_out, 3, padding=1, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = GroupNorm(c_out, groups, eps=eps, param_dtype=param_dtype)
        self.conv2 = conv2d(c_out, c_out, 3, padding=1, param_dtype=param_dtype, rngs=rngs)
        self.conv_shortcut = conv2d(c_in, c_out, 1, param_dtype=param_dtype, rngs=rngs) if c_in != c_out else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h



class Downsample2D(nnx.Module):
    """Zero-pad one row and column after, 3x3 conv of stride 2: ``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), C]``.

    diffusers' ``Downsample2D(use_conv=True, padding=0)``, the VAE encoder's downsampler.
    """

    def __init__(self, channels: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), param_dtype=param_dtype,
                           rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv: ``[B, H, W, C]`` -> ``[B, 2H, 2W, C]`` (diffusers' ``Upsample2D``)."""

    def __init__(self, channels: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, 3, padding=1, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class SpatialSelfAttention(nnx.Module):
    """``y = x + to_out(attention(GN(x)))`` over the ``H W`` positions: ``x [B, H, W, C]`` -> same shape.

    diffusers' ``Attention(residual_connection=True, norm_num_groups=groups, bias=True)`` of the UNet / VAE mid
    block; ``num_heads`` heads of ``C / num_heads`` channels (a VAE uses one head of all ``C``), every position
    attends every position (``ops.Full``), logits scaled by ``(C / num_heads) ** -0.5``.
    """

    def __init__(self, channels: int, *, groups: int, eps: float, num_heads: int = 1, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        if channels % num_heads:
            raise ValueError(f"SpatialSelfAttention: channels={channels} is not divisible by num_heads={num_heads}.")
        self.group_norm = GroupNorm(channels, groups, eps=eps, param_dtype=param_dtype)

        def linear() -> Linear:
            return Linear(channels, channels, use_bias=True, sharding=(None, None), param_dtype=param_dtype,
                          rngs=rngs, init_std=channels**-0.5)

        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        self.to_out = nnx.List([linear()])
        self.num_heads = num_heads

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = (proj(tokens).reshape(b, h * w, self.num_heads, c // self.num_heads)
                   for proj in (self.to_q, self.to_k, self.to_v))
        out = ops.attention(q, k, v, ops.Full()).reshape(b, h * w, c)
        return x + self.to_out[0](out).reshape(b, h, w, c)


class DownEncoderBlock2D(nnx.Module):
    """``num_layers`` resnets (``c_in -> c_out``, then ``c_out -> c_out``), then a ``Downsample2D`` if asked."""

    def __init__(self, c_in: int, c_out: int, *, num_layers: int, downsample: bool, groups: int, eps: float,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups=groups, eps=eps,
                                               param_dtype=param_dtype, rngs=rngs) for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample2D(c_out, param_dtype=param_dtype, rngs=rngs)]) if downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, c_in]`` -> ``[B, H', W', c_out]`` (``H' = ceil(H / 2)`` with a downsampler)."""
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        return self(x)


class UpDecoderBlock2D(nnx.Module):
    """``num_layers`` resnets (``c_in -> c_out``, then ``c_out -> c_out``), then an ``Upsample2D`` if ``upsample``."""

    def __init__(self, c_in: int, c_out: int, *, num_layers: int, upsample: bool, groups: int, eps: float,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups=groups, eps=eps,
                                               param_dtype=param_dtype, rngs=rngs) for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(c_out, param_dtype=param_dtype, rngs=rngs)]) if upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, c_in]`` -> ``[B, H', W', c_out]`` (``H' = 2 H`` with an upsampler)."""
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        return self(x)


class UNetMidBlock2D(nnx.Module):
    """``resnets[0]``, then ``attention`` (if ``add_attention``) and ``resnets[1]``: ``[B, H, W, C]`` -> same shape.

    diffusers' ``UNetMidBlock2D(num_layers=1, temb_channels=None)``; without attention ``attentions`` is None
    (diffusers keeps ``[None]``, which holds no tensor either).
    """

    def __init__(self, channels: int, *, add_attention: bool, groups: int, eps: float, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups=groups, eps=eps, param_dtype=param_dtype,
                                               rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([SpatialSelfAttention(channels, groups=groups, eps=eps, param_dtype=param_dtype,
                                                         rngs=rngs)]) if add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        return self(x)
