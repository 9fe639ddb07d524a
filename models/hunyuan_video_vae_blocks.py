"""Channels-last causal 3-D blocks of HunyuanVideo's VAE (diffusers 0.42 ``autoencoder_kl_hunyuan_video.py``), each
runnable on a whole clip or chunk by chunk with an explicit cache.

Every tensor is ``[B, F, H, W, C]`` (frames, height, width, channels). With ``φ`` = SiLU and ``GN`` = GroupNorm
over the frames, positions and the group's channels (``models.image_layers.GroupNorm``):

- ``CausalConv3d``: pad time with ``k - 1`` copies of the first frame before (replicate, nothing after), height and
  width by ``k // 2`` each side (replicate), then a ``k x k x k`` conv with stride ``(s_t, s_h, s_w)``; so output
  frame ``t`` reads input frames ``s_t t - k + 1 .. s_t t`` (clamped at 0): causal in time;
- ``ResnetBlockCausal3D``: ``y = S(x) + conv2(φ(GN_2(conv1(φ(GN_1(x))))))``, ``S`` a 1x1x1 causal conv when the
  channel count changes;
- ``DownsampleCausal3D``: one causal conv of stride ``(s_t, s_s, s_s)``: ``F -> (F - 1) / s_t + 1`` frames;
- ``UpsampleCausal3D``: nearest-neighbour upsampling, the first frame in space only and the others in time and
  space (``F -> 1 + s_t (F - 1)`` frames), then a causal 3x3x3 conv;
- ``CausalFrameAttention``: ``y = x + W_o softmax(q kᵀ / sqrt(C) + M) v`` over the ``F H W`` positions of
  ``GN(x)`` (one head of ``C`` channels), ``M`` the frame-causal mask: a position of frame ``f`` sees every position
  of frames ``<= f`` (diffusers' ``prepare_causal_attention_mask``);
- ``DownBlockCausal3D`` (resnets, optional downsampler), ``UpBlockCausal3D`` (resnets, optional upsampler),
  ``MidBlockCausal3D`` (resnet, [attention, resnet]): the units calibration walks block by block. Each block's
  temporal and spatial strides are explicit attributes (``temporal_stride``, ``spatial_stride``).

**Chunks.** Every module has ``stream(x, cache) -> (y, cache)``: ``x`` is the next frames of the clip and ``cache``
(a pytree of arrays, ``None`` at the clip's start) what the module needs from the frames before: each causal conv
the input frames its next window still reads (``"past"``), the attention the past frames' keys and values
(``"kv"``), the upsampler whether the first frame was seen (its conv's ``"past"``). ``__call__(x)`` is
``stream(x, None)`` on the whole clip. Everything is causal except GroupNorm, whose statistics span the whole
clip; a norm's cache holds the statistics it normalizes with (``"stats"``: per-sample, per-group mean and
variance; ``None``: the chunk's own) and accumulates those of the frames it has seen (``"acc"``: count, mean and
sum of squared deviations, merged chunk by chunk after Chan et al. 1979). ``next_pass(cache)`` starts another
pass over the clip normalizing with the accumulated statistics. A norm's input depends only on the norms before
it, so after ``num_norms(cache)`` passes (the first may normalize with any statistics) every norm has the whole
clip's statistics and one more pass equals the one-shot result
(``AutoencoderKLHunyuanVideo.encode(videos, chunk_frames=n)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jquant import ops
from jquant.models.image_layers import GroupNorm
from jquant.models.layers import Conv, Linear

Cache = dict | None


# ----------------------------------------------------------------------------
# GroupNorm with carried statistics
# ----------------------------------------------------------------------------


def _grouped(norm: GroupNorm, x: jax.Array) -> jax.Array:
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return x.astype(acc).reshape(x.shape[0], -1, norm.num_groups, x.shape[-1] // norm.num_groups)


def norm_stream(norm: GroupNorm, x: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
    """``GN(x)`` of a chunk ``x [B, f, H, W, C]`` with the cache's statistics (the chunk's own where it has none);
    returns the normalized chunk and the cache with the chunk's statistics merged into ``"acc"``."""
    cache = cache or {"stats": None, "acc": None}
    grouped = _grouped(norm, x)  # [B, f H W, G, C / G]
    count = jnp.asarray(grouped.shape[1] * grouped.shape[3], grouped.dtype)
    mean = grouped.mean(axis=(1, 3))  # [B, G]
    m2 = jnp.square(grouped - mean[:, None, :, None]).sum(axis=(1, 3))
    acc = (count, mean, m2)
    if cache["acc"] is not None:  # Chan et al.: merge two groups' (count, mean, M2)
        n_a, mean_a, m2_a = cache["acc"]
        total = n_a + count
        delta = mean - mean_a
        acc = (total, mean_a + delta * (count / total), m2_a + m2 + jnp.square(delta) * (n_a * count / total))
    mu, var = cache["stats"] if cache["stats"] is not None else (mean, m2 / count)
    y = (grouped - mu[:, None, :, None]) * jax.lax.rsqrt(var[:, None, :, None] + norm.eps)
    y = y.reshape(x.shape) * norm.weight[...].astype(y.dtype) + norm.bias[...].astype(y.dtype)
    return y.astype(x.dtype), {"stats": cache["stats"], "acc": acc}


def next_pass(cache: dict, *, placeholder_statistics: bool = False) -> dict:
    """The cache for another pass over the clip: every norm normalizes with the statistics accumulated in this
    pass (biased variance ``M2 / count``); the convs' past frames and the attention's keys and values are cleared.

    ``placeholder_statistics``: mean 0 and variance 1 instead (``cache`` may hold ``jax.ShapeDtypeStruct`` leaves,
    e.g. ``jax.eval_shape`` of a first chunk), so a first pass has the same cache structure as the later ones and a
    jitted chunk step compiles once for all passes.
    """
    if isinstance(cache, list):
        return [next_pass(value, placeholder_statistics=placeholder_statistics) for value in cache]
    if not isinstance(cache, dict):
        return cache
    if "acc" in cache:
        count, mean, m2 = cache["acc"]
        if placeholder_statistics:
            return {"stats": (jnp.zeros(mean.shape, mean.dtype), jnp.ones(mean.shape, mean.dtype)), "acc": None}
        return {"stats": (mean, m2 / count), "acc": None}
    return {key: (None if key in ("past", "kv") else next_pass(value, placeholder_statistics=placeholder_statistics))
            for key, value in cache.items()}


def num_norms(cache: dict) -> int:
    """How many GroupNorms a cache (after one chunk) describes: the passes before the statistics are exact."""
    if isinstance(cache, list):
        return sum(num_norms(value) for value in cache)
    if not isinstance(cache, dict):
        return 0
    return 1 if "acc" in cache else sum(num_norms(value) for value in cache.values())


def _sub(cache: Cache, key: str):
    return None if cache is None else cache.get(key)


# ----------------------------------------------------------------------------
# Convolutions and resampling
# ----------------------------------------------------------------------------


class CausalConv3d(nnx.Module):
    """diffusers' ``HunyuanVideoCausalConv3d`` (module docstring): ``[B, F, H, W, c_in]`` -> ``[B, F', H', W', c_out]``
    with ``F' = (F - 1) // s_t + 1``; the kernel lives in ``conv`` (diffusers' ``.conv.weight``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, stride: tuple[int, int, int] = (1, 1, 1),
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        pad = kernel // 2
        self.conv = Conv(c_in, c_out, (kernel,) * 3, use_bias=True, param_dtype=param_dtype, rngs=rngs,
                         stride=stride, padding=((0, 0), (pad, pad), (pad, pad)), padding_mode="replicate",
                         init_std=(kernel**3 * c_in) ** -0.5)
        self.time_kernel, self.time_stride = kernel, stride[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.stream(x, None)[0]

    def stream(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
        """The next frames ``x`` -> their outputs; ``cache["past"]``: the input frames the next window still reads."""
        k, s = self.time_kernel, self.time_stride
        past = _sub(cache, "past")
        front = jnp.repeat(x[:, :1], k - 1, axis=1) if past is None else past
        frames = jnp.concatenate([front, x], axis=1)
        n_out = (frames.shape[1] - k) // s + 1
        if n_out < 1:
            raise ValueError(f"CausalConv3d: a chunk of {x.shape[1]} frames after {front.shape[1]} cached ones is too "
                             f"short for a kernel of {k} frames with stride {s}; use longer chunks.")
        return self.conv(frames), {"past": frames[:, n_out * s:]}


# ----------------------------------------------------------------------------
# Dynamic frame rate: per-chunk temporal pooling and repetition
# ----------------------------------------------------------------------------


def pool_chunks(x: jax.Array, factors: tuple[int, ...], chunk: int) -> jax.Array:
    """DLFR-VAE's temporal down-sampling (spec ``dlfr_vae.md`` §3.2): ``x [B, 1 + chunk M, ...]`` -> ``[B, 1 +
    Σ_i chunk / m_i, ...]``. Frame 0 stays alone; chunk ``i`` (frames ``1 + i chunk .. (i + 1) chunk``) is averaged
    over windows of ``m_i = factors[i]`` frames (window = stride, aligned to the chunk's start, never across chunks).
    Chunks with ``m_i = 1`` are copied, so all-ones factors return ``x`` itself. ``factors`` / ``chunk``: Python
    ints, each ``m_i`` dividing ``chunk``."""
    if all(m == 1 for m in factors):
        return x
    parts = [x[:, :1]]
    for i, m in enumerate(factors):
        part = x[:, 1 + i * chunk:1 + (i + 1) * chunk]
        parts.append(part if m == 1 else part.reshape(x.shape[0], chunk // m, m, *x.shape[2:]).mean(axis=2))
    return jnp.concatenate(parts, axis=1)


def repeat_chunks(x: jax.Array, factors: tuple[int, ...], chunk: int) -> jax.Array:
    """The mirror of ``pool_chunks``: ``x [B, 1 + Σ_i chunk / m_i, ...]`` -> ``[B, 1 + chunk M, ...]``, every frame
    of chunk ``i`` repeated ``m_i`` times (nearest in time); frame 0 once. All-ones factors return ``x`` itself."""
    if all(m == 1 for m in factors):
        return x
    parts, start = [x[:, :1]], 1
    for m in factors:
        parts.append(jnp.repeat(x[:, start:start + chunk // m], m, axis=1))
        start += chunk // m
    return jnp.concatenate(parts, axis=1)


def _nearest(x: jax.Array, factors: tuple[int, int, int]) -> jax.Array:
    for axis, factor in zip((1, 2, 3), factors):
        if factor > 1:
            x = jnp.repeat(x, factor, axis=axis)
    return x


class DownsampleCausal3D(nnx.Module):
    """One ``CausalConv3d`` of stride ``(s_t, s_s, s_s)`` (diffusers' ``HunyuanVideoDownsampleCausal3D``)."""

    def __init__(self, channels: int, stride: tuple[int, int, int], *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = CausalConv3d(channels, channels, 3, stride=stride, param_dtype=param_dtype, rngs=rngs)

    def stream(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
        y, conv = self.conv.stream(x, _sub(cache, "conv"))
        return y, {"conv": conv}


class UpsampleCausal3D(nnx.Module):
    """Nearest x``(s_t, s_s, s_s)`` (the clip's first frame in space only), then a causal 3x3x3 conv (diffusers'
    ``HunyuanVideoUpsampleCausal3D``): ``[B, F, H, W, C]`` -> ``[B, 1 + s_t (F - 1), s_s H, s_s W, C]``."""

    def __init__(self, channels: int, factor: tuple[int, int, int], *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = CausalConv3d(channels, channels, 3, param_dtype=param_dtype, rngs=rngs)
        self.factor = factor

    def stream(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
        conv_cache = _sub(cache, "conv")
        if conv_cache is None or conv_cache["past"] is None:  # this chunk starts the clip
            spatial = (1, *self.factor[1:])
            x = jnp.concatenate([_nearest(x[:, :1], spatial), _nearest(x[:, 1:], self.factor)], axis=1)
        else:
            x = _nearest(x, self.factor)
        y, conv = self.conv.stream(x, conv_cache)
        return y, {"conv": conv}


# ----------------------------------------------------------------------------
# Resnet and attention
# ----------------------------------------------------------------------------


class ResnetBlockCausal3D(nnx.Module):
    """``y = S(x) + conv2(φ(GN_2(conv1(φ(GN_1(x))))))``: ``[B, F, H, W, c_in]`` -> ``[B, F, H, W, c_out]``."""

    def __init__(self, c_in: int, c_out: int, *, groups: int, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(c_in, groups, eps=eps, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(c_in, c_out, 3, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = GroupNorm(c_out, groups, eps=eps, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(c_out, c_out, 3, param_dtype=param_dtype, rngs=rngs)
        self.conv_shortcut = (CausalConv3d(c_in, c_out, 1, param_dtype=param_dtype, rngs=rngs)
                              if c_in != c_out else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.stream(x, None)[0]

    def stream(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
        out = {}
        h, out["norm1"] = norm_stream(self.norm1, x, _sub(cache, "norm1"))
        h, out["conv1"] = self.conv1.stream(jax.nn.silu(h), _sub(cache, "conv1"))
        h, out["norm2"] = norm_stream(self.norm2, h, _sub(cache, "norm2"))
        h, out["conv2"] = self.conv2.stream(jax.nn.silu(h), _sub(cache, "conv2"))
        if self.conv_shortcut is not None:
            x, out["conv_shortcut"] = self.conv_shortcut.stream(x, _sub(cache, "conv_shortcut"))
        return x + h, out


class CausalFrameAttention(nnx.Module):
    """``y = x + to_out(attention(GN(x)))`` with the frame-causal mask (module docstring): ``[B, F, H, W, C]`` ->
    same shape. diffusers' ``Attention(heads=1, dim_head=C, residual_connection=True, bias=True)``."""

    def __init__(self, channels: int, *, groups: int, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(channels, groups, eps=eps, param_dtype=param_dtype)

        def linear() -> Linear:
            return Linear(channels, channels, use_bias=True, sharding=(None, None), param_dtype=param_dtype,
                          rngs=rngs, init_std=channels**-0.5)

        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        self.to_out = nnx.List([linear()])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.stream(x, None)[0]

    def stream(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
        """A chunk's queries attend to the cached keys / values of the frames before it and to its own frames
        up to their frame; ``cache["kv"]``: every frame's keys and values so far, each ``[B, F_seen H W, 1, C]``."""
        b, f, h, w, c = x.shape
        normed, norm = norm_stream(self.group_norm, x, _sub(cache, "group_norm"))
        tokens = normed.reshape(b, f * h * w, c)
        q, k, v = (proj(tokens).reshape(b, f * h * w, 1, c) for proj in (self.to_q, self.to_k, self.to_v))
        past = _sub(cache, "kv")
        if past is not None:
            k, v = jnp.concatenate([past[0], k], axis=1), jnp.concatenate([past[1], v], axis=1)
        seen = k.shape[1] // (h * w) - f  # frames before this chunk
        query_frame = jnp.repeat(jnp.arange(seen, seen + f), h * w)
        key_frame = jnp.repeat(jnp.arange(seen + f), h * w)
        mask = key_frame[None, :] <= query_frame[:, None]  # [f H W, F_seen H W]
        out = ops.attention(q, k, v, mask).reshape(b, f * h * w, c)
        return x + self.to_out[0](out).reshape(x.shape), {"group_norm": norm, "kv": (k, v)}


# ----------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------


def _stream_all(modules, x: jax.Array, caches: Cache) -> tuple[jax.Array, list]:
    out = []
    for i, module in enumerate(modules):
        x, c = module.stream(x, None if caches is None else caches[i])
        out.append(c)
    return x, out


class DownBlockCausal3D(nnx.Module):
    """``num_layers`` resnets (``c_in -> c_out``, then ``c_out -> c_out``), then a ``DownsampleCausal3D`` of stride
    ``(temporal_stride, spatial_stride, spatial_stride)`` unless both are 1 (``resample=True``: even then, a stride-1
    conv, as in a model with the same weights and other strides)."""

    def __init__(self, c_in: int, c_out: int, *, num_layers: int, temporal_stride: int, spatial_stride: int,
                 groups: int, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs, resample: bool = False):
        self.resnets = nnx.List([ResnetBlockCausal3D(c_in if i == 0 else c_out, c_out, groups=groups, eps=eps,
                                                     param_dtype=param_dtype, rngs=rngs) for i in range(num_layers)])
        self.temporal_stride, self.spatial_stride = temporal_stride, spatial_stride
        stride = (temporal_stride, spatial_stride, spatial_stride)
        self.downsamplers = (nnx.List([DownsampleCausal3D(c_out, stride, param_dtype=param_dtype, rngs=rngs)])
                             if stride != (1, 1, 1) or resample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.stream(x, None)[0]

    def stream(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
        x, resnets = _stream_all(self.resnets, x, _sub(cache, "resnets"))
        if self.downsamplers is None:
            return x, {"resnets": resnets}
        x, down = self.downsamplers[0].stream(x, _sub(cache, "downsampler"))
        return x, {"resnets": resnets, "downsampler": down}

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        return self(x)


class UpBlockCausal3D(nnx.Module):
    """``num_layers`` resnets (``c_in -> c_out``, then ``c_out -> c_out``), then an ``UpsampleCausal3D`` of factor
    ``(temporal_stride, spatial_stride, spatial_stride)`` unless both are 1 (``resample=True``: even then, its conv
    after a factor-1 "upsampling")."""

    def __init__(self, c_in: int, c_out: int, *, num_layers: int, temporal_stride: int, spatial_stride: int,
                 groups: int, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs, resample: bool = False):
        self.resnets = nnx.List([ResnetBlockCausal3D(c_in if i == 0 else c_out, c_out, groups=groups, eps=eps,
                                                     param_dtype=param_dtype, rngs=rngs) for i in range(num_layers)])
        self.temporal_stride, self.spatial_stride = temporal_stride, spatial_stride
        factor = (temporal_stride, spatial_stride, spatial_stride)
        self.upsamplers = (nnx.List([UpsampleCausal3D(c_out, factor, param_dtype=param_dtype, rngs=rngs)])
                           if factor != (1, 1, 1) or resample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.stream(x, None)[0]

    def stream(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
        x, resnets = _stream_all(self.resnets, x, _sub(cache, "resnets"))
        if self.upsamplers is None:
            return x, {"resnets": resnets}
        x, up = self.upsamplers[0].stream(x, _sub(cache, "upsampler"))
        return x, {"resnets": resnets, "upsampler": up}

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        return self(x)


class MidBlockCausal3D(nnx.Module):
    """``resnets[0]``, then ``attentions[0]`` (if ``add_attention``; else None) and ``resnets[1]``: same shape."""

    def __init__(self, channels: int, *, add_attention: bool, groups: int, eps: float, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlockCausal3D(channels, channels, groups=groups, eps=eps,
                                                     param_dtype=param_dtype, rngs=rngs) for _ in range(2)])
        self.attentions = (nnx.List([CausalFrameAttention(channels, groups=groups, eps=eps, param_dtype=param_dtype,
                                                          rngs=rngs)]) if add_attention else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.stream(x, None)[0]

    def stream(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, dict]:
        out = {}
        x, out["resnet0"] = self.resnets[0].stream(x, _sub(cache, "resnet0"))
        if self.attentions is not None:
            x, out["attention"] = self.attentions[0].stream(x, _sub(cache, "attention"))
        x, out["resnet1"] = self.resnets[1].stream(x, _sub(cache, "resnet1"))
        return x, out

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        return self(x)
