"""SD3-style MMDiT (diffusers' ``SD3Transformer2DModel``), channels last: the text-to-image transformer family.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (§4, Fig. 2): image
latents ``x [B, H, W, C]`` are patchified (``p x p`` conv) into ``L = HW / p²`` tokens plus a fixed 2-D sin-cos
position embedding; text states ``c [B, S, D_text]`` are projected (``context_embedder``); the conditioning
vector is ``y = TimestepEmbedding(sinusoid_256(t)) + TextProjection(pooled)``. Each joint block, with adaLN-Zero
modulation of both streams from ``y``::

    (shift, scale, gate)_{msa, mlp} = Linear(SiLU(y))                              for x, and for c
    q, k, v = [W_q, W_k, W_v](LN(x)(1 + scale) + shift) ; [A_q, A_k, A_v](LN(c)(1 + scale_c) + shift_c)
    (optional RMS qk-norm per head; SD3.5)   o = softmax(q kᵀ / √d_h) v over the joint sequence [x; c]
    x += gate · W_o(o_x) ;  x += gate_mlp · FF(LN(x)(1 + scale_mlp) + shift_mlp)      (FF: GELU-tanh, 4x)
    c likewise with A_o, FF_c — except in the last block (context_pre_only: c only feeds keys and values,
    modulated by AdaLayerNormContinuous, and is dropped)

then ``out = W_out(LN(x)(1 + scale) + shift)`` (AdaLayerNormContinuous) is unpatchified to ``[B, H, W, C]``.
``t`` follows diffusers (the SD3 pipeline passes ``1000 σ``); ``flow_velocity`` takes ``σ`` in ``[0, 1]``.

Quantization: every linear inside the joint blocks is a site that receives the sample's timestep bucket as its
group id (``activation_groups``: ``bucket_edges`` split σ into buckets), so GPTQ can weigh statistics per bucket
and static activation scales can differ per bucket. Calibration data is ``{"latents" [N, H, W, C], "sigmas"
[N] in [0, 1], "text" [N, S, D_text], "pooled" [N, P]}`` (drawn along sampler trajectories); one stage walks
the joint blocks with hidden ``(x, c)`` and context ``(y, bucket)``. The patch embedding, the time / text
embedders, ``context_embedder``, ``norm_out`` and ``proj_out`` are the family's ``keep_float`` (the interfaces
PTQ4DiT, Q-DiT and ViDiT-Q keep in higher precision).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import ops
from jquant.ops.mask import Full
from jquant.calib.data import check_group_ids, num_samples
from jquant.models.config_io import check_dtypes_available, dataclass_config_from_json, dataclass_config_to_json
from jquant.models.family import Family
from jquant.models.layers import Conv, Linear
from jquant.models.tensor_io import export_parameters, load_parameters
from jquant.sites import ActivationGroups
from jquant.transforms.adaln_smoothing import ModulatedNorm

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
JointAttention = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (q, k, v [B, N, H, D]) -> [B, N, H, D]
LayerAttention = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]  # (layer, q, k, v) -> [B, N, H, D]
CLASS_NAME = "SD3Transformer2DModel"
_EPS = 1e-6
_TIME_CHANNELS = 256
POS_EMBED = "pos_embed.pos_embed"  # diffusers' persistent buffer: the fixed sin-cos table, checked on import


@dataclasses.dataclass(frozen=True, kw_only=True)
class SD3Config:
    """Sizes of an SD3-style MMDiT (diffusers' config fields) plus ``bucket_edges`` (σ edges of the timestep
    buckets used as activation groups) and the compute / storage dtypes."""

    sample_size: int = 8
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int | None = None
    num_layers: int = 4
    attention_head_dim: int = 32
    num_attention_heads: int = 4
    joint_attention_dim: int = 128
    caption_projection_dim: int = 128
    pooled_projection_dim: int = 128
    pos_embed_max_size: int = 8
    qk_norm: str | None = None
    bucket_edges: tuple[float, ...] = (0.25, 0.5, 0.75)
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "bucket_edges", tuple(float(e) for e in self.bucket_edges))
        for name in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                     "pos_embed_max_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SD3Config.{name} must be a positive int, got {value!r}.")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"SD3Config: caption_projection_dim={self.caption_projection_dim} must equal the inner "
                             f"dimension num_attention_heads x attention_head_dim = {self.inner_dim} (the joint "
                             "attention concatenates both streams).")
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"SD3Config.qk_norm={self.qk_norm!r} is not supported; use None or 'rms_norm'.")
        if self.sample_size // self.patch_size > self.pos_embed_max_size:
            raise ValueError(f"SD3Config: sample_size / patch_size = {self.sample_size // self.patch_size} patches "
                             f"exceed pos_embed_max_size={self.pos_embed_max_size}.")
        if list(self.bucket_edges) != sorted(set(self.bucket_edges)) or not all(0 < e < 1 for e in self.bucket_edges):
            raise ValueError(f"SD3Config.bucket_edges must increase strictly inside (0, 1), got {self.bucket_edges}.")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    def replace(self, **changes) -> SD3Config:
        return dataclasses.replace(self, **changes)


def _linear(n_in: int, n_out: int, cfg: SD3Config, rngs: nnx.Rngs, std: float = 0.02) -> Linear:
    return Linear(n_in, n_out, use_bias=True, sharding=(None, None), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
                  init_std=std)


def layer_norm(x: jax.Array, eps: float = _EPS) -> jax.Array:
    """LayerNorm without affine parameters over the last axis, in at least float32."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = _EPS) -> jax.Array:
    """RMSNorm over the last axis, in at least float32."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps) * weight.astype(xf.dtype)).astype(x.dtype)


def timestep_sinusoid(t: jax.Array, dim: int = _TIME_CHANNELS, max_period: float = 10000.0) -> jax.Array:
    """diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``: ``[cos(t ω), sin(t ω)]``,
    ``ω_i = max_period^(-i / (dim / 2))`` -> ``[B, dim]``, in float32 whatever the model's dtype (as diffusers
    computes it). Angles reach 10³ rad, so float32 ``exp`` / ``sin`` implementations that differ in the last
    ulp (XLA's and PyTorch's) give embeddings that differ by ~1e-5 relative: that bounds parity, float64 too."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def sincos_2d(dim: int, grid: int, base_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """diffusers' ``get_2d_sincos_pos_embed(dim, grid, base_size, interpolation_scale)`` -> ``[grid², dim]``
    (float64): half the channels encode the column, half the row. The grid coordinates are computed in
    float32, as diffusers does, so the table matches its buffer to float64 round-off."""
    coords = (np.arange(grid, dtype=np.float32) / np.float32(grid / base_size) / np.float32(interpolation_scale)
              ).astype(np.float64)
    w, h = np.meshgrid(coords, coords)  # w varies along columns

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)


def position_table(cfg: SD3Config) -> np.ndarray:
    """The fixed sin-cos position table ``[pos_embed_max_size², inner_dim]`` float32 (diffusers' ``pos_embed``
    buffer, built with ``base_size = sample_size / patch_size``)."""
    return sincos_2d(cfg.inner_dim, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size).astype(np.float32)


class MLP2(nnx.Module):
    """``linear_2(SiLU(linear_1(x)))`` (diffusers' TimestepEmbedding and PixArtAlphaTextProjection)."""

    def __init__(self, n_in: int, n_out: int, cfg: SD3Config, rngs: nnx.Rngs):
        self.linear_1 = _linear(n_in, n_out, cfg, rngs)
        self.linear_2 = _linear(n_out, n_out, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class FeedForward(nnx.Module):
    """``W_2 GELU_tanh(W_1 x)`` with a 4x hidden width (diffusers' ``FeedForward(activation_fn="gelu-approximate")``)."""

    def __init__(self, dim: int, cfg: SD3Config, rngs: nnx.Rngs):
        self.proj = _linear(dim, 4 * dim, cfg, rngs)
        self.out = _linear(4 * dim, dim, cfg, rngs)

    def __call__(self, x: jax.Array, groups: jax.Array | None) -> jax.Array:
        return self.out(jax.nn.gelu(self.proj(x, groups=groups), approximate=True), groups=groups)


class QKNorm(nnx.Module):
    """RMSNorm weights over a head's features (SD3.5's ``qk_norm="rms_norm"``)."""

    def __init__(self, head_dim: int, cfg: SD3Config):
        self.weight = nnx.Param(jnp.ones((head_dim,), jnp.dtype(cfg.param_dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight.get_value())


class JointBlock(nnx.Module):
    """One joint transformer block (module docstring); ``context_pre_only`` for the last block."""

    def __init__(self, cfg: SD3Config, *, context_pre_only: bool, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.heads, self.context_pre_only = cfg.num_attention_heads, context_pre_only
        self.norm1 = _linear(d, 6 * d, cfg, rngs)
        self.norm1_context = _linear(d, (2 if context_pre_only else 6) * d, cfg, rngs)
        self.to_q, self.to_k, self.to_v, self.to_out = (_linear(d, d, cfg, rngs) for _ in range(4))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (_linear(d, d, cfg, rngs) for _ in range(3))
        self.to_add_out = None if context_pre_only else _linear(d, d, cfg, rngs)
        qk = cfg.qk_norm is not None
        hd = cfg.attention_head_dim
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (
            (QKNorm(hd, cfg) for _ in range(4)) if qk else (None,) * 4)
        self.ff = FeedForward(d, cfg, rngs)
        self.ff_context = None if context_pre_only else FeedForward(d, cfg, rngs)

    def _heads(self, y: jax.Array, norm: QKNorm | None) -> jax.Array:
        b, n, d = y.shape
        y = y.reshape(b, n, self.heads, d // self.heads)
        return y if norm is None else norm(y)

    def __call__(self, x: jax.Array, c: jax.Array, temb: jax.Array, bucket: jax.Array,
                 attention: JointAttention | None = None) -> tuple[jax.Array, jax.Array]:
        """``x [B, L, d]`` image tokens, ``c [B, S, d]`` text tokens, ``temb [B, d]``, ``bucket [B]`` int;
        ``attention(q, k, v) -> o`` (``[B, L + S, H, D]``, image first) replaces full joint attention."""
        g = bucket[:, None]
        y = jax.nn.silu(temb)
        mod = self.norm1(y, groups=bucket)[:, None, :]
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        mod_c = self.norm1_context(y, groups=bucket)[:, None, :]
        if self.context_pre_only:
            c_scale, c_shift = jnp.split(mod_c, 2, axis=-1)  # AdaLayerNormContinuous: scale first
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = jnp.split(mod_c, 6, axis=-1)
        h = layer_norm(x) * (1 + scale) + shift
        hc = layer_norm(c) * (1 + c_scale) + c_shift
        q = jnp.concatenate([self._heads(self.to_q(h, groups=g), self.norm_q),
                             self._heads(self.add_q_proj(hc, groups=g), self.norm_added_q)], axis=1)
        k = jnp.concatenate([self._heads(self.to_k(h, groups=g), self.norm_k),
                             self._heads(self.add_k_proj(hc, groups=g), self.norm_added_k)], axis=1)
        v = jnp.concatenate([self._heads(self.to_v(h, groups=g), None),
                             self._heads(self.add_v_proj(hc, groups=g), None)], axis=1)
        b, n = q.shape[:2]
        o = ops.attention(q, k, v, Full()) if attention is None else attention(q, k, v)
        o = o.reshape(b, n, -1)
        length = x.shape[1]
        x = x + gate * self.to_out(o[:, :length], groups=g)
        x = x + gate_mlp * self.ff(layer_norm(x) * (1 + scale_mlp) + shift_mlp, g)
        if self.context_pre_only:
            return x, c
        c = c + c_gate * self.to_add_out(o[:, length:], groups=g)
        c = c + c_gate_mlp * self.ff_context(layer_norm(c) * (1 + c_scale_mlp) + c_shift_mlp, g)
        return x, c

    def calibration_forward(self, hidden: tuple[jax.Array, jax.Array], context: tuple[jax.Array, jax.Array]):
        return self(*hidden, *context)


class SD3Transformer(nnx.Module):
    """The MMDiT (module docstring). ``__call__(latents [B, H, W, C], timesteps [B], text [B, S, D_text],
    pooled [B, P]) -> [B, H, W, C_out]`` with diffusers' timestep convention."""

    def __init__(self, config: SD3Config, *, rngs: nnx.Rngs):
        self.config = config
        cfg, d, p = config, config.inner_dim, config.patch_size
        self.pos_embed_proj = Conv(cfg.in_channels, d, (p, p), stride=p, use_bias=True,
                                   param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.timestep_embedder = MLP2(_TIME_CHANNELS, d, cfg, rngs)
        self.text_embedder = MLP2(cfg.pooled_projection_dim, d, cfg, rngs)
        self.context_embedder = _linear(cfg.joint_attention_dim, cfg.caption_projection_dim, cfg, rngs)
        self.transformer_blocks = nnx.List([JointBlock(cfg, context_pre_only=i == cfg.num_layers - 1, rngs=rngs)
                                            for i in range(cfg.num_layers)])
        self.norm_out = _linear(d, 2 * d, cfg, rngs)
        self.proj_out = _linear(d, p * p * cfg.output_channels, cfg, rngs)

    # -- inputs -------------------------------------------------------------------------------------------------
    def bucket(self, sigmas: jax.Array) -> jax.Array:
        """Timestep bucket ids ``[B]``: how many of ``bucket_edges`` each σ reaches."""
        return jnp.sum(jnp.asarray(sigmas)[:, None] >= jnp.asarray(self.config.bucket_edges), axis=1).astype(jnp.int32)

    def _check(self, latents, text, pooled) -> None:
        cfg = self.config
        shape = tuple(latents.shape)
        if len(shape) != 4 or shape[-1] != cfg.in_channels or shape[1] % cfg.patch_size or shape[2] % cfg.patch_size:
            raise ValueError(f"SD3Transformer: latents must be [B, H, W, {cfg.in_channels}] (channels last) with H and "
                             f"W multiples of patch_size={cfg.patch_size}; got {shape}.")
        if max(shape[1], shape[2]) // cfg.patch_size > cfg.pos_embed_max_size:
            raise ValueError(f"SD3Transformer: latents {shape[1]}x{shape[2]} exceed pos_embed_max_size="
                             f"{cfg.pos_embed_max_size} patches of {cfg.patch_size}.")
        if text.ndim != 3 or text.shape[0] != shape[0] or text.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(f"SD3Transformer: text must be [B={shape[0]}, S, {cfg.joint_attention_dim}], got "
                             f"{tuple(text.shape)}.")
        if pooled.shape != (shape[0], cfg.pooled_projection_dim):
            raise ValueError(f"SD3Transformer: pooled must be [{shape[0]}, {cfg.pooled_projection_dim}], got "
                             f"{tuple(pooled.shape)}.")

    def _positions(self, h: int, w: int) -> np.ndarray:
        """The cropped sin-cos table ``[h w, d]`` (diffusers' ``cropped_pos_embed``; a constant of the config)."""
        m = self.config.pos_embed_max_size
        top, left = (m - h) // 2, (m - w) // 2
        table = position_table(self.config).reshape(m, m, -1)
        return table[top:top + h, left:left + w].reshape(h * w, -1)

    def embed(self, latents, timesteps, text, pooled, sigmas=None):
        """``(x [B, L, d], c [B, S, d], temb [B, d], bucket [B])`` — the blocks' inputs. ``sigmas`` (for the
        buckets) default to ``timesteps / 1000``."""
        self._check(latents, text, pooled)
        dt = jnp.dtype(self.config.dtype)
        x = self.pos_embed_proj(jnp.asarray(latents, dt))
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d) + self._positions(h, w).astype(dt)
        temb = (self.timestep_embedder(timestep_sinusoid(timesteps).astype(dt))
                + self.text_embedder(jnp.asarray(pooled, dt)))
        c = self.context_embedder(jnp.asarray(text, dt))
        sig = jnp.asarray(timesteps, jnp.float32) / 1000.0 if sigmas is None else sigmas
        return x, c, temb, self.bucket(sig)

    def head(self, x: jax.Array, temb: jax.Array, h: int, w: int) -> jax.Array:
        """AdaLayerNormContinuous + ``proj_out`` + unpatchify: ``[B, L, d]`` -> ``[B, H, W, C_out]``."""
        scale, shift = jnp.split(self.norm_out(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
        out = self.proj_out(layer_norm(x) * (1 + scale) + shift)
        p, c = self.config.patch_size, self.config.output_channels
        b = out.shape[0]
        out = out.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h, w, c)

    def __call__(self, latents: jax.Array, timesteps: jax.Array, text: jax.Array, pooled: jax.Array) -> jax.Array:
        x, c, temb, bucket = self.embed(latents, timesteps, text, pooled)
        for block in self.transformer_blocks:
            x, c = block(x, c, temb, bucket)
        return self.head(x, temb, latents.shape[1], latents.shape[2])

    def flow_velocity(self, latents: jax.Array, sigmas: jax.Array, text: jax.Array, pooled: jax.Array, *,
                      attention: LayerAttention | None = None) -> jax.Array:
        """The rectified-flow velocity at noise level ``sigmas [B]`` in ``[0, 1]`` (SD3 feeds ``t = 1000 σ``).
        ``attention(layer, q, k, v) -> o`` replaces each block's full joint attention (DiTFastAttn's plans; the
        token order is ``joint_layout``'s)."""
        x, c, temb, bucket = self.embed(latents, 1000.0 * sigmas, text, pooled, sigmas=sigmas)
        for i, block in enumerate(self.transformer_blocks):
            x, c = block(x, c, temb, bucket, None if attention is None else functools.partial(attention, i))
        return self.head(x, temb, latents.shape[1], latents.shape[2])

    def joint_layout(self, latent_shape: tuple[int, ...], text_len: int) -> tuple[int, int, int]:
        """``(n_image, n_text, text_start)`` of the joint attention for latents ``[.., h, w, C]`` and ``text_len``
        text tokens: the image tokens come first, ``(h / p) (w / p)`` of them, then the text."""
        h, w = latent_shape[-3], latent_shape[-2]
        p = self.config.patch_size
        n_image = (h // p) * (w // p)
        return n_image, int(text_len), n_image

    def calibration_call(self, batch: dict) -> jax.Array:
        """The velocity of a calibration batch (``check_calibration``'s dict): what whole-model statistics run."""
        return self.flow_velocity(batch["latents"], batch["sigmas"], batch["text"], batch["pooled"])

    def modulated_norm_groups(self) -> list[ModulatedNorm]:
        """The adaLN-modulated inputs of every block (``jquant.transforms.adaln_smoothing``): ``norm1``'s
        (shift, scale) = columns ``[0, d), [d, 2d)`` before to_q/k/v and ``[3d, 4d), [4d, 5d)`` before ``ff.proj``;
        ``norm1_context`` the same before add_q/k/v_proj and ``ff_context.proj`` (the last, context-pre-only block:
        scale ``[0, d)``, shift ``[d, 2d)``)."""
        d = self.config.inner_dim
        groups = []
        for i, block in enumerate(self.transformer_blocks):
            p = f"transformer_blocks/{i}"
            groups.append(ModulatedNorm(f"{p}/norm1", (0, d), (d, 2 * d), (f"{p}/to_q", f"{p}/to_k", f"{p}/to_v")))
            groups.append(ModulatedNorm(f"{p}/norm1", (3 * d, 4 * d), (4 * d, 5 * d), (f"{p}/ff/proj",)))
            context = (f"{p}/add_q_proj", f"{p}/add_k_proj", f"{p}/add_v_proj")
            if block.context_pre_only:
                groups.append(ModulatedNorm(f"{p}/norm1_context", (d, 2 * d), (0, d), context))
            else:
                groups.append(ModulatedNorm(f"{p}/norm1_context", (0, d), (d, 2 * d), context))
                groups.append(ModulatedNorm(f"{p}/norm1_context", (3 * d, 4 * d), (4 * d, 5 * d),
                                            (f"{p}/ff_context/proj",)))
        return groups

    def joint_attention_layers(self) -> int:
        """Joint attentions per call (one per block), the layers of an attention plan."""
        return len(self.transformer_blocks)

    # -- calibration contract ---------------------------------------------------------------------------------
    def blocks(self) -> list[JointBlock]:
        return list(self.transformer_blocks)

    def block_inputs(self, batch: dict):
        """``((x, c), (temb, bucket))`` of a calibration batch (σ in ``[0, 1]``)."""
        sigmas = jnp.asarray(batch["sigmas"], jnp.float32)
        x, c, temb, bucket = self.embed(batch["latents"], 1000.0 * sigmas, batch["text"], batch["pooled"],
                                        sigmas=sigmas)
        return (x, c), (temb, bucket)

    def activation_groups(self) -> ActivationGroups:
        edges = (0.0, *self.config.bucket_edges, 1.0)
        names = tuple(f"sigma[{a:g},{b:g}{']' if b == 1.0 else ')'}" for a, b in zip(edges[:-1], edges[1:]))
        return ActivationGroups(names=names, sites=r"transformer_blocks/.*")

    def check_calibration(self, calib) -> dict:
        """``{"latents" [N, H, W, C], "sigmas" [N] in [0, 1], "text" [N, S, D_text], "pooled" [N, P]}`` -> float32
        numpy arrays (leaves agreeing on N, shapes this model takes)."""
        keys = {"latents", "sigmas", "text", "pooled"}
        if not isinstance(calib, dict) or set(calib) != keys:
            raise ValueError(f"SD3Transformer calibration must be a dict with keys {sorted(keys)} (latents, noise "
                             "levels, text states and pooled text drawn along sampler trajectories), got "
                             f"{sorted(calib) if isinstance(calib, dict) else type(calib).__name__}.")
        num_samples(calib)
        out = {k: np.asarray(v, np.float32) for k, v in calib.items()}
        self._check(out["latents"], out["text"], out["pooled"])
        s = out["sigmas"]
        if s.ndim != 1 or not np.all(np.isfinite(s)):
            raise ValueError(f"calib['sigmas'] must be finite, one per sample [N], got shape {s.shape}.")
        edges = np.asarray(self.config.bucket_edges)
        buckets = np.where(s < 0, -1, np.where(s > 1, len(edges) + 1, np.sum(s[:, None] >= edges, axis=1)))
        check_group_ids(buckets, self.activation_groups(), "calib['sigmas'] (as timestep buckets; σ must lie in "
                        "[0, 1])")
        return out


def init_model(config: SD3Config, key: jax.Array) -> SD3Transformer:
    """A randomly initialised MMDiT (linears ~ N(0, 0.02), biases 0)."""
    check_dtypes_available(config)
    return SD3Transformer(config, rngs=nnx.Rngs(params=key))


def abstract_model(config: SD3Config) -> SD3Transformer:
    return nnx.eval_shape(lambda: SD3Transformer(config, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------------------------
# diffusers import / export
# ---------------------------------------------------------------------------------------------------------------

_HANDLED = {"sample_size", "patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
            "pos_embed_max_size", "qk_norm", "dual_attention_layers"}
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path"}


def config_from_diffusers(config: dict, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None,
                          bucket_edges: tuple[float, ...] | None = None) -> SD3Config:
    """An ``SD3Config`` from a diffusers ``config.json`` dict; attributes this reader does not handle are refused."""
    unknown = sorted(set(config) - _HANDLED - _IGNORED)
    if unknown:
        raise ValueError(f"SD3 config.json has attributes jquant does not handle: {unknown}; it would silently "
                         "compute something else, so it is refused.")
    if tuple(config.get("dual_attention_layers") or ()):
        raise ValueError(f"SD3 config.json has dual_attention_layers={config['dual_attention_layers']} (SD3.5 "
                         "MMDiT-X); jquant's SD3 family does not implement the second attention yet.")
    values = {k: config[k] for k in _HANDLED - {"dual_attention_layers"} if k in config}
    extra = {} if bucket_edges is None else {"bucket_edges": bucket_edges}
    return SD3Config(**values, **extra, dtype=dtype, param_dtype=param_dtype or dtype)


def config_to_diffusers(cfg: SD3Config) -> dict:
    fields = {k: getattr(cfg, k) for k in _HANDLED - {"dual_attention_layers"}}
    return {"_class_name": CLASS_NAME, **fields, "dual_attention_layers": []}


def _tensor_names(model: SD3Transformer) -> dict[str, tuple[tuple, str]]:
    """diffusers tensor name -> (jquant state path, layout) for every parameter."""
    names: dict[str, tuple[tuple, str]] = {}

    def linear(prefix: str, path: tuple):
        names[f"{prefix}.weight"] = ((*path, "kernel"), "linear")
        names[f"{prefix}.bias"] = ((*path, "bias"), "vector")

    names["pos_embed.proj.weight"] = (("pos_embed_proj", "kernel"), "conv")
    names["pos_embed.proj.bias"] = (("pos_embed_proj", "bias"), "vector")
    for part, ours in (("timestep_embedder", "timestep_embedder"), ("text_embedder", "text_embedder")):
        for lin in ("linear_1", "linear_2"):
            linear(f"time_text_embed.{part}.{lin}", (ours, lin))
    linear("context_embedder", ("context_embedder",))
    for i, block in enumerate(model.transformer_blocks):
        pre, at = f"transformer_blocks.{i}", ("transformer_blocks", i)
        linear(f"{pre}.norm1.linear", (*at, "norm1"))
        linear(f"{pre}.norm1_context.linear", (*at, "norm1_context"))
        for ours, theirs in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0"),
                             ("add_q_proj", "add_q_proj"), ("add_k_proj", "add_k_proj"),
                             ("add_v_proj", "add_v_proj"), ("to_add_out", "to_add_out")):
            if getattr(block, ours) is not None:
                linear(f"{pre}.attn.{theirs}", (*at, ours))
        if block.norm_q is not None:
            for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                names[f"{pre}.attn.{n}.weight"] = ((*at, n, "weight"), "vector")
        for ff in ("ff", "ff_context"):
            if getattr(block, ff) is not None:
                linear(f"{pre}.{ff}.net.0.proj", (*at, ff, "proj"))
                linear(f"{pre}.{ff}.net.2", (*at, ff, "out"))
    linear("norm_out.linear", ("norm_out",))
    linear("proj_out", ("proj_out",))
    return names


def _from_torch(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return value.T
    if layout == "conv":  # [C_out, C_in, kh, kw] -> [kh kw C_in, C_out]
        return value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    return value


def _to_torch(value: np.ndarray, layout: str, cfg: SD3Config) -> np.ndarray:
    if layout == "linear":
        return value.T
    if layout == "conv":
        p = cfg.patch_size
        return value.reshape(p, p, cfg.in_channels, -1).transpose(3, 2, 0, 1)
    return value


def from_tensors(cfg: SD3Config, tensors: dict[str, np.ndarray], *, source: str = "tensors") -> SD3Transformer:
    """A model of ``cfg`` holding diffusers-named ``tensors`` (every tensor used, none missing; the fixed position
    table checked against the config's)."""
    abstract = abstract_model(cfg)
    tensors = dict(tensors)
    table = tensors.pop(POS_EMBED, None)
    expected = position_table(cfg)
    if table is None or table.shape != (1, *expected.shape) or not np.allclose(table[0], expected, rtol=1e-5,
                                                                                  atol=1e-6):
        raise ValueError(f"{source}: {POS_EMBED} is missing or is not the fixed 2-D sin-cos table of this config "
                         "(sample_size / patch_size base, pos_embed_max_size grid); learned or edited position "
                         "tables are not supported.")
    entries = {path: (name, functools.partial(_from_torch, layout=layout))
               for name, (path, layout) in _tensor_names(abstract).items()}
    return load_parameters(abstract, entries, tensors, param_dtype=cfg.param_dtype, source=source,
                           what="SD3Transformer2DModel")


def from_diffusers(path: str | os.PathLike, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None,
                   bucket_edges: tuple[float, ...] | None = None) -> SD3Transformer:
    """Read a diffusers ``SD3Transformer2DModel`` folder (``config.json`` + safetensors)."""
    from jquant.models import hf_io

    config = hf_io.read_diffusers_config(path, (CLASS_NAME,))
    cfg = config_from_diffusers(config, dtype=dtype, param_dtype=param_dtype, bucket_edges=bucket_edges)
    check_dtypes_available(cfg)
    return from_tensors(cfg, hf_io.read_safetensors(path, weights_name=hf_io.DIFFUSERS_FILE), source=str(path))


def to_tensors(model: SD3Transformer) -> dict[str, np.ndarray]:
    """diffusers-named tensors of a float ``model`` (PyTorch layouts, plus the fixed position table)."""
    entries = {path: (name, functools.partial(_to_torch, layout=layout, cfg=model.config))
               for name, (path, layout) in _tensor_names(model).items()}
    return {**export_parameters(model, entries), POS_EMBED: position_table(model.config)[None]}


def to_diffusers(model: SD3Transformer, path: str | os.PathLike, *, overwrite: bool = False,
                 extra_files=None) -> Path:
    """Write ``model`` as a diffusers ``SD3Transformer2DModel`` folder, atomically."""
    from jquant.models import hf_io

    return hf_io.write_checkpoint(path, config_to_diffusers(model.config), to_tensors(model), overwrite=overwrite,
                                  weights_name=hf_io.DIFFUSERS_FILE, extra_files=extra_files)


FAMILY = Family(
    name="sd3",
    config_class=SD3Config,
    model_class=SD3Transformer,
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, SD3Config),
    checkpoint_protocol="the manifest's config holds the SD3Config fields (config_io.dataclass_config_to_json).",
    diffusers_class_names=(CLASS_NAME,),
    from_diffusers=from_diffusers,
    to_diffusers=to_diffusers,
    presets={
        # 32x32 RGB through jq-vae-tiny -> 8x8x4 latents, patch 2 -> 16 image tokens; text states of jq-llama-tiny.
        "jq-mmdit-tiny": SD3Config(sample_size=8, patch_size=2, in_channels=4, num_layers=6, attention_head_dim=32,
                                   num_attention_heads=4, joint_attention_dim=192, caption_projection_dim=128,
                                   pooled_projection_dim=192, pos_embed_max_size=8),
    },
    keep_float=("pos_embed_proj", "timestep_embedder/linear_1", "timestep_embedder/linear_2", "text_embedder/linear_1",
                "text_embedder/linear_2", "context_embedder", "norm_out", "proj_out"),
)
