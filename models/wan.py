"""Wan 2.1's video diffusion transformer (diffusers' ``WanTransformer3DModel``), channels last.

Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models" (§3.2; diffusers
``transformer_wan.py``). Video latents ``z [B, F, H, W, C]`` are cut into ``(p_t, p_h, p_w)`` patches by a 3-D
convolution (``patch_embedding``), ``L = (F / p_t)(H / p_h)(W / p_w)`` tokens in (frame, row, column) order.
Text states ``c [B, S, D_text]`` (the pipeline zero-pads them to its maximum length; no mask) are embedded by a
GELU-tanh MLP. The timestep ``t`` (the pipeline passes ``1000 σ``) gives ``temb = TE(sinusoid_{freq_dim}(t))``
and one modulation shared by every block, ``e = time_proj(SiLU(temb))`` ``[B, 6, D]``. Each block adds its own
table ``T_i [6, D]`` (the "shared modulation table")::

    (shift, scale, gate, c_shift, c_scale, c_gate) = T_i + e
    x += gate · SelfAttn(LN(x)(1 + scale) + shift)          q, k: RMSNorm over all heads [D], then 3-D RoPE
    x += CrossAttn(LN_affine(x), text)                     q, k: RMSNorm over all heads; no RoPE
    x += c_gate · FFN(LN(x)(1 + c_scale) + c_shift)        FFN: W_2 GELU_tanh(W_1 ·), width ffn_dim

then ``out = proj_out(LN(x)(1 + scale) + shift)`` with ``(shift, scale) = T_out + temb`` (``T_out [2, D]``),
unpatchified to ``[B, F, H, W, C_out]``. The norms, modulation and residual sums run in at least float32.

RoPE (diffusers' ``WanRotaryPosEmbed``): the head's rotated pairs ("interleaved" layout) are split over
(frame, row, column) with ``h_dim = w_dim = 2 ⌊d_h / 6⌋`` and ``t_dim = d_h - 2 h_dim`` features, each axis its
own ``theta = 10000`` ladder, positions ``0 .. rope_max_seq_len - 1``. ``frame_positions [F / p_t]`` replaces
the frame positions (default ``arange``), so frame-merging samplers can keep a merged frame's original time.

Quantization: every linear inside the blocks receives the sample's timestep bucket as its group id
(``activation_groups``: ``bucket_edges`` split σ). Calibration data is ``{"latents" [N, F, H, W, C], "sigmas"
[N] in [0, 1], "text" [N, S, D_text]}``; one stage walks the blocks with hidden ``x`` and context
``(text, e, bucket, cos, sin)``. ``keep_float``: the patch embedding, the condition embedder (time MLP, the
shared ``time_proj`` modulation, text MLP) and ``proj_out``. The shared modulation cannot take adaLN smoothing
(``jquant.transforms.adaln_smoothing`` folds per-block modulation linears), so no ``modulated_norm_groups``.
Image-to-video models (``image_dim``, ``added_kv_proj_dim``) are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import ops
from jquant.calib.data import check_group_ids, num_samples
from jquant.calib.sequential import Stage
from jquant.models.config_io import check_dtypes_available, dataclass_config_from_json, dataclass_config_to_json
from jquant.models.family import Family
from jquant.models.layers import Conv, Linear
from jquant.models.sd3 import layer_norm, rms_norm, timestep_sinusoid
from jquant.models.tensor_io import export_parameters, load_parameters
from jquant.ops.mask import Full
from jquant.sites import ActivationGroups

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
CLASS_NAME = "WanTransformer3DModel"
ROPE_THETA = 10000.0  # WanRotaryPosEmbed(theta=10000), not a config attribute
QK_NORM = "rms_norm_across_heads"


@dataclasses.dataclass(frozen=True, kw_only=True)
class WanConfig:
    """Sizes of a Wan 2.1 transformer (diffusers' config fields) plus ``bucket_edges`` (σ edges of the timestep
    buckets used as activation groups) and the compute / storage dtypes."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    in_channels: int = 4
    out_channels: int | None = None
    text_dim: int = 128
    freq_dim: int = 64
    ffn_dim: int = 256
    num_layers: int = 2
    cross_attn_norm: bool = True
    qk_norm: str = QK_NORM
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    bucket_edges: tuple[float, ...] = (0.25, 0.5, 0.75)
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "bucket_edges", tuple(float(e) for e in self.bucket_edges))
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        positive = ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim", "ffn_dim",
                    "num_layers", "rope_max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {value!r}.")
        if len(self.patch_size) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1
                                            for p in self.patch_size):
            raise ValueError(f"WanConfig.patch_size={self.patch_size} must be three positive ints (frames, height, "
                             "width), e.g. (1, 2, 2).")
        if self.out_channels is not None and (isinstance(self.out_channels, bool)
                                              or not isinstance(self.out_channels, int) or self.out_channels < 1):
            raise ValueError(f"WanConfig.out_channels must be None or a positive int, got {self.out_channels!r}.")
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            raise ValueError(f"WanConfig.attention_head_dim={self.attention_head_dim} must be even and >= 6 (the 3-D "
                             "RoPE splits the head's pairs over frame, row and column).")
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim={self.freq_dim} must be even (cos and sin halves).")
        if not isinstance(self.cross_attn_norm, bool):
            raise ValueError(f"WanConfig.cross_attn_norm must be a bool, got {self.cross_attn_norm!r}.")
        if self.qk_norm != QK_NORM:
            raise ValueError(f"WanConfig.qk_norm={self.qk_norm!r}: diffusers' Wan applies the RMS norm across heads "
                             f"whatever this field says; use {QK_NORM!r} so the config says what is computed.")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"WanConfig.eps must be a positive float, got {self.eps!r}.")
        if list(self.bucket_edges) != sorted(set(self.bucket_edges)) or not all(0 < e < 1 for e in self.bucket_edges):
            raise ValueError(f"WanConfig.bucket_edges must increase strictly inside (0, 1), got {self.bucket_edges}.")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Rotated features per axis ``(t_dim, h_dim, w_dim)``: ``h_dim = w_dim = 2 ⌊d_h / 6⌋``."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw

    def replace(self, **changes) -> WanConfig:
        return dataclasses.replace(self, **changes)


def _linear(n_in: int, n_out: int, cfg: WanConfig, rngs: nnx.Rngs) -> Linear:
    return Linear(n_in, n_out, use_bias=True, sharding=(None, None), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def rope_tables(cfg: WanConfig, frames: int, height: int, width: int,
                frame_positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [frames height width, d_h]`` float32 of the token grid (frame, row, column), row-major, in the
    "interleaved" layout (diffusers' ``WanRotaryPosEmbed`` output). ``frame_positions [frames]`` (default
    ``arange(frames)``) are the frames' RoPE positions; rows and columns are ``arange``. The angles are float32
    (``ops.rope_angles``) where diffusers rounds float64 angles' cos / sin: at position ``p`` the tables differ by
    about ``p · 1e-7``."""
    f = jnp.arange(frames, dtype=jnp.float32) if frame_positions is None else jnp.asarray(frame_positions, jnp.float32)
    if f.shape != (frames,):
        raise ValueError(f"WanTransformer: frame_positions must be one position per latent frame after patching, "
                         f"[{frames}], got shape {tuple(f.shape)}.")
    grid = jnp.meshgrid(f, jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij")
    positions = jnp.stack(grid, axis=-1).reshape(-1, 3)
    angles = ops.rope_angles(positions, dims=cfg.rope_dims, theta=ROPE_THETA, freq_dtype=np.float64)
    return ops.rope_cos_sin(angles, "interleaved")


class MLP(nnx.Module):
    """``linear_2(act(linear_1(x)))``: diffusers' ``TimestepEmbedding`` (SiLU) and ``PixArtAlphaTextProjection``
    (GELU-tanh)."""

    def __init__(self, n_in: int, n_out: int, act: Callable[[jax.Array], jax.Array], cfg: WanConfig,
                 rngs: nnx.Rngs):
        self.linear_1, self.linear_2 = _linear(n_in, n_out, cfg, rngs), _linear(n_out, n_out, cfg, rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


class ConditionEmbedder(nnx.Module):
    """diffusers' ``WanTimeTextImageEmbedding`` without the image embedder: ``(temb [B, D], e [B, 6, D],
    text [B, S, D])`` from timesteps ``[B]`` and text states ``[B, S, D_text]``."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLP(cfg.freq_dim, d, jax.nn.silu, cfg, rngs)
        self.time_proj = _linear(d, 6 * d, cfg, rngs)
        self.text_embedder = MLP(cfg.text_dim, d, _gelu_tanh, cfg, rngs)

    def __call__(self, timesteps: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        dt = text.dtype
        temb = self.time_embedder(timestep_sinusoid(timesteps, self.freq_dim).astype(dt))
        e = self.time_proj(jax.nn.silu(temb))
        return temb, e.reshape(e.shape[0], 6, -1), self.text_embedder(text)


class Attention(nnx.Module):
    """``to_out(softmax(q kᵀ / √d_h) v)`` with ``q = RMS(to_q x)``, ``k = RMS(to_k ctx)`` normalised over all
    heads' features ``[D]`` (``norm_q`` / ``norm_k``), ``v = to_v ctx``; RoPE on q, k when tables are given."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.heads, self.eps = cfg.num_attention_heads, cfg.eps
        self.to_q, self.to_k, self.to_v, self.to_out = (_linear(d, d, cfg, rngs) for _ in range(4))
        self.norm_q = nnx.Param(jnp.ones((d,), jnp.dtype(cfg.param_dtype)))
        self.norm_k = nnx.Param(jnp.ones((d,), jnp.dtype(cfg.param_dtype)))

    def __call__(self, x: jax.Array, context: jax.Array, groups: jax.Array,
                 rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """``x [B, L, D]`` queries, ``context [B, S, D]`` keys / values, ``groups`` broadcastable to ``[B, L]``,
        ``rope = (cos, sin) [L, d_h]`` (self-attention only)."""
        b, n, d = x.shape
        q = rms_norm(self.to_q(x, groups=groups), self.norm_q.get_value(), self.eps).reshape(b, n, self.heads, -1)
        k = rms_norm(self.to_k(context, groups=groups), self.norm_k.get_value(), self.eps)
        k = k.reshape(b, context.shape[1], self.heads, -1)
        v = self.to_v(context, groups=groups).reshape(b, context.shape[1], self.heads, -1)
        if rope is not None:
            q, k = (ops.apply_rope(y, *rope, "interleaved") for y in (q, k))
        o = ops.attention(q, k, v, Full())
        return self.to_out(o.reshape(b, n, d), groups=groups)


class FeedForward(nnx.Module):
    """``out(GELU_tanh(proj x))`` of width ``ffn_dim`` (diffusers' ``FeedForward(activation_fn="gelu-approximate")``:
    ``ffn.net.0.proj``, ``ffn.net.2``)."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        self.proj = _linear(cfg.inner_dim, cfg.ffn_dim, cfg, rngs)
        self.out = _linear(cfg.ffn_dim, cfg.inner_dim, cfg, rngs)

    def __call__(self, x: jax.Array, groups: jax.Array) -> jax.Array:
        return self.out(_gelu_tanh(self.proj(x, groups=groups)), groups=groups)


class AffineLayerNorm(nnx.Module):
    """LayerNorm with weight and bias over ``[D]`` in at least float32 (``cross_attn_norm``)."""

    def __init__(self, cfg: WanConfig):
        d, pdt = cfg.inner_dim, jnp.dtype(cfg.param_dtype)
        self.weight, self.bias = nnx.Param(jnp.ones((d,), pdt)), nnx.Param(jnp.zeros((d,), pdt))
        self.eps = cfg.eps

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(x.astype(jnp.promote_types(x.dtype, jnp.float32)), self.eps)
        return (y * self.weight.get_value().astype(y.dtype) + self.bias.get_value().astype(y.dtype)).astype(x.dtype)


class Block(nnx.Module):
    """One Wan block (module docstring)."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.eps = cfg.eps
        self.attn1, self.attn2 = Attention(cfg, rngs), Attention(cfg, rngs)
        self.norm2 = AffineLayerNorm(cfg) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(cfg, rngs)
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (6, d), jnp.dtype(cfg.param_dtype))
                                           / d ** 0.5)

    def __call__(self, x: jax.Array, text: jax.Array, e: jax.Array, bucket: jax.Array, cos: jax.Array,
                 sin: jax.Array) -> jax.Array:
        """``x [B, L, D]`` video tokens, ``text [B, S, D]`` embedded text, ``e [B, 6, D]`` the shared modulation,
        ``bucket [B]`` int, ``cos, sin [L, d_h]``."""
        g = bucket[:, None]
        acc = jnp.promote_types(x.dtype, jnp.float32)
        mod = self.scale_shift_table.get_value().astype(acc)[None] + e.astype(acc)
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, i:i + 1] for i in range(6))
        h = (layer_norm(x.astype(acc), self.eps) * (1 + scale) + shift).astype(x.dtype)
        x = (x.astype(acc) + self.attn1(h, h, g, (cos, sin)) * gate).astype(x.dtype)
        h = x if self.norm2 is None else self.norm2(x)
        x = x + self.attn2(h, text, g)
        h = (layer_norm(x.astype(acc), self.eps) * (1 + c_scale) + c_shift).astype(x.dtype)
        return (x.astype(acc) + self.ffn(h, g).astype(acc) * c_gate).astype(x.dtype)

    def calibration_forward(self, hidden: jax.Array, context: tuple) -> jax.Array:
        return self(hidden, *context)


class WanTransformer(nnx.Module):
    """The Wan 2.1 transformer (module docstring). ``__call__(latents [B, F, H, W, C], timesteps [B], text
    [B, S, D_text]) -> [B, F, H, W, C_out]`` with diffusers' timestep convention (``1000 σ``)."""

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg, d = config, config.inner_dim
        self.patch_embedding = Conv(cfg.in_channels, d, cfg.patch_size, stride=cfg.patch_size, use_bias=True,
                                    param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.condition_embedder = ConditionEmbedder(cfg, rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (2, d), jnp.dtype(cfg.param_dtype))
                                           / d ** 0.5)
        self.proj_out = _linear(d, int(np.prod(cfg.patch_size)) * cfg.output_channels, cfg, rngs)

    # -- inputs -------------------------------------------------------------------------------------------------
    def bucket(self, sigmas: jax.Array) -> jax.Array:
        """Timestep bucket ids ``[B]``: how many of ``bucket_edges`` each σ reaches."""
        return jnp.sum(jnp.asarray(sigmas)[:, None] >= jnp.asarray(self.config.bucket_edges), axis=1).astype(jnp.int32)

    def _check(self, latents, timesteps, text) -> None:
        cfg, shape = self.config, tuple(np.shape(latents))
        pt, ph, pw = cfg.patch_size
        if len(shape) != 5 or shape[-1] != cfg.in_channels:
            raise ValueError(f"WanTransformer: latents must be [B, F, H, W, {cfg.in_channels}] (channels last), got "
                             f"{shape}.")
        if shape[1] % pt or shape[2] % ph or shape[3] % pw:
            raise ValueError(f"WanTransformer: latents [B, F, H, W, C] = {shape} need F, H, W multiples of "
                             f"patch_size={cfg.patch_size}; crop or pad the latents.")
        grid = (shape[1] // pt, shape[2] // ph, shape[3] // pw)
        if max(grid) > cfg.rope_max_seq_len:
            raise ValueError(f"WanTransformer: latents {shape} give a {grid} patch grid; RoPE covers positions below "
                             f"rope_max_seq_len={cfg.rope_max_seq_len} per axis.")
        if len(np.shape(text)) != 3 or np.shape(text)[0] != shape[0] or np.shape(text)[-1] != cfg.text_dim:
            raise ValueError(f"WanTransformer: text must be [B={shape[0]}, S, {cfg.text_dim}], got "
                             f"{tuple(np.shape(text))}.")
        if tuple(np.shape(timesteps)) != (shape[0],):
            raise ValueError(f"WanTransformer: timesteps must be one value per sample [{shape[0]}], got shape "
                             f"{tuple(np.shape(timesteps))}.")

    def embed(self, latents, timesteps, text, sigmas=None, frame_positions=None):
        """``(x [B, L, D], temb [B, D], (text [B, S, D], e [B, 6, D], bucket [B], cos, sin [L, d_h]))``: the
        blocks' inputs. ``sigmas`` (for the buckets) default to ``timesteps / 1000``."""
        self._check(latents, timesteps, text)
        dt = jnp.dtype(self.config.dtype)
        x = self.patch_embedding(jnp.asarray(latents, dt))
        b, f, h, w, d = x.shape
        temb, e, c = self.condition_embedder(jnp.asarray(timesteps, jnp.float32), jnp.asarray(text, dt))
        cos, sin = rope_tables(self.config, f, h, w, frame_positions)
        sig = jnp.asarray(timesteps, jnp.float32) / 1000.0 if sigmas is None else jnp.asarray(sigmas, jnp.float32)
        return x.reshape(b, f * h * w, d), temb, (c, e, self.bucket(sig), cos, sin)

    def head(self, x: jax.Array, temb: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Output norm (``T_out + temb``: shift, scale) + ``proj_out`` + unpatchify: ``[B, L, D]`` ->
        ``[B, F, H, W, C_out]`` for latents of ``shape``."""
        acc = jnp.promote_types(x.dtype, jnp.float32)
        mod = self.scale_shift_table.get_value().astype(acc)[None] + temb.astype(acc)[:, None]
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        out = self.proj_out((layer_norm(x.astype(acc), self.config.eps) * (1 + scale) + shift).astype(x.dtype))
        (pt, ph, pw), c = self.config.patch_size, self.config.output_channels
        b, frames, height, width = shape[:4]
        out = out.reshape(b, frames // pt, height // ph, width // pw, pt, ph, pw, c)
        return out.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, frames, height, width, c)

    def _forward(self, latents, timesteps, text, sigmas, frame_positions) -> jax.Array:
        x, temb, context = self.embed(latents, timesteps, text, sigmas, frame_positions)
        for block in self.blocks:
            x = block(x, *context)
        return self.head(x, temb, tuple(np.shape(latents)))

    def __call__(self, latents: jax.Array, timesteps: jax.Array, text: jax.Array, *,
                 frame_positions: jax.Array | None = None) -> jax.Array:
        """diffusers' forward in jquant's layout: ``timesteps [B]`` in ``[0, 1000]``; ``frame_positions
        [F / p_t]`` overrides the RoPE frame positions (default ``arange``)."""
        return self._forward(latents, timesteps, text, None, frame_positions)

    def flow_velocity(self, latents: jax.Array, sigmas: jax.Array, text: jax.Array, *,
                      frame_positions: jax.Array | None = None) -> jax.Array:
        """The flow-matching velocity ``[B, F, H, W, C]`` (``noise - x0``) of latents ``[B, F, H, W, C]`` at noise
        levels ``sigmas [B]`` in ``[0, 1]`` (the Wan pipeline feeds ``t = 1000 σ``, its schedulers' timesteps);
        ``frame_positions`` as in ``__call__``."""
        if self.config.output_channels != self.config.in_channels:
            raise ValueError(f"WanTransformer.flow_velocity: out_channels={self.config.output_channels} differs from "
                             f"in_channels={self.config.in_channels}; a velocity has the latents' channels.")
        sigmas = jnp.asarray(sigmas, jnp.float32)
        return self._forward(latents, 1000.0 * sigmas, text, sigmas, frame_positions)

    def calibration_call(self, batch: dict) -> jax.Array:
        """The velocity of a calibration batch (``check_calibration``'s dict): what whole-model statistics run."""
        return self.flow_velocity(batch["latents"], batch["sigmas"], batch["text"])

    # -- calibration contract ---------------------------------------------------------------------------------
    def calibration_stages(self) -> list[Stage]:
        """One stage over the blocks: hidden ``x``, context ``(text, e, bucket, cos, sin)``."""
        return [Stage(blocks=list(self.blocks), enter=_enter_blocks)]

    def activation_groups(self) -> ActivationGroups:
        edges = (0.0, *self.config.bucket_edges, 1.0)
        names = tuple(f"sigma[{a:g},{b:g}{']' if b == 1.0 else ')'}" for a, b in zip(edges[:-1], edges[1:]))
        return ActivationGroups(names=names, sites=r"blocks/.*")

    def check_calibration(self, calib) -> dict:
        """``{"latents" [N, F, H, W, C], "sigmas" [N] in [0, 1], "text" [N, S, D_text]}`` -> float32 numpy arrays
        (leaves agreeing on N, shapes this model takes)."""
        keys = {"latents", "sigmas", "text"}
        if not isinstance(calib, dict) or set(calib) != keys:
            raise ValueError(f"WanTransformer calibration must be a dict with keys {sorted(keys)} (latents, noise "
                             "levels and text states drawn along sampler trajectories), got "
                             f"{sorted(calib) if isinstance(calib, dict) else type(calib).__name__}.")
        num_samples(calib)
        out = {k: np.asarray(v, np.float32) for k, v in calib.items()}
        s = out["sigmas"]
        self._check(out["latents"], s, out["text"])
        if not np.all(np.isfinite(s)):
            raise ValueError("calib['sigmas'] must be finite.")
        edges = np.asarray(self.config.bucket_edges)
        buckets = np.where(s < 0, -1, np.where(s > 1, len(edges) + 1, np.sum(s[:, None] >= edges, axis=1)))
        check_group_ids(buckets, self.activation_groups(), "calib['sigmas'] (as timestep buckets; σ must lie in "
                        "[0, 1])")
        return out


def _enter_blocks(m: WanTransformer, batch: dict, previous):
    """``calibration_stages``' entry (module level, so it compiles once per model structure)."""
    sigmas = jnp.asarray(batch["sigmas"], jnp.float32)
    x, _, context = m.embed(batch["latents"], 1000.0 * sigmas, batch["text"], sigmas)
    return x, context


def init_model(config: WanConfig, key: jax.Array) -> WanTransformer:
    """A randomly initialised Wan transformer (linears ~ N(0, 0.02), biases 0, norm weights 1, modulation tables
    ~ N(0, 1 / D) as diffusers initialises them)."""
    check_dtypes_available(config)
    return WanTransformer(config, rngs=nnx.Rngs(params=key))


def abstract_model(config: WanConfig) -> WanTransformer:
    return nnx.eval_shape(lambda: WanTransformer(config, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------------------------
# diffusers import / export
# ---------------------------------------------------------------------------------------------------------------

_HANDLED = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
            "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "rope_max_seq_len")
_IMAGE_TO_VIDEO = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path"}


def config_from_diffusers(config: dict, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None,
                          bucket_edges: tuple[float, ...] | None = None) -> WanConfig:
    """A ``WanConfig`` from a diffusers ``config.json`` dict; attributes this reader does not handle are refused."""
    unknown = sorted(set(config) - set(_HANDLED) - set(_IMAGE_TO_VIDEO) - _IGNORED)
    if unknown:
        raise ValueError(f"Wan config.json has attributes jquant does not handle: {unknown}; it would silently "
                         "compute something else, so it is refused.")
    image = {k: config[k] for k in _IMAGE_TO_VIDEO if config.get(k) is not None}
    if image:
        raise ValueError(f"Wan config.json sets {image}: an image-to-video model (CLIP image embedder and added "
                         "key / value projections), which jquant's wan family does not implement; use a text-to-video "
                         "checkpoint (these attributes null).")
    values = {k: config[k] for k in _HANDLED if k in config}
    if "patch_size" in values:
        values["patch_size"] = tuple(values["patch_size"])
    extra = {} if bucket_edges is None else {"bucket_edges": bucket_edges}
    return WanConfig(**values, **extra, dtype=dtype, param_dtype=param_dtype or dtype)


def config_to_diffusers(cfg: WanConfig) -> dict:
    fields = {k: getattr(cfg, k) for k in _HANDLED}
    return {"_class_name": CLASS_NAME, **fields, "patch_size": list(cfg.patch_size),
            **{k: None for k in _IMAGE_TO_VIDEO}}


def _tensor_names(model: WanTransformer) -> dict[str, tuple[tuple, str]]:
    """diffusers tensor name -> (jquant state path, layout) for every parameter."""
    names: dict[str, tuple[tuple, str]] = {}

    def linear(prefix: str, path: tuple):
        names[f"{prefix}.weight"] = ((*path, "kernel"), "linear")
        names[f"{prefix}.bias"] = ((*path, "bias"), "vector")

    names["patch_embedding.weight"] = (("patch_embedding", "kernel"), "conv")
    names["patch_embedding.bias"] = (("patch_embedding", "bias"), "vector")
    for part in ("time_embedder", "text_embedder"):
        for lin in ("linear_1", "linear_2"):
            linear(f"condition_embedder.{part}.{lin}", ("condition_embedder", part, lin))
    linear("condition_embedder.time_proj", ("condition_embedder", "time_proj"))
    for i, block in enumerate(model.blocks):
        pre, at = f"blocks.{i}", ("blocks", i)
        names[f"{pre}.scale_shift_table"] = ((*at, "scale_shift_table"), "table")
        for attn in ("attn1", "attn2"):
            for ours, theirs in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
                linear(f"{pre}.{attn}.{theirs}", (*at, attn, ours))
            for norm in ("norm_q", "norm_k"):
                names[f"{pre}.{attn}.{norm}.weight"] = ((*at, attn, norm), "vector")
        if block.norm2 is not None:
            names[f"{pre}.norm2.weight"] = ((*at, "norm2", "weight"), "vector")
            names[f"{pre}.norm2.bias"] = ((*at, "norm2", "bias"), "vector")
        linear(f"{pre}.ffn.net.0.proj", (*at, "ffn", "proj"))
        linear(f"{pre}.ffn.net.2", (*at, "ffn", "out"))
    names["scale_shift_table"] = (("scale_shift_table",), "table")
    linear("proj_out", ("proj_out",))
    return names


def _from_torch(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return value.T
    if layout == "conv":  # [C_out, C_in, kt, kh, kw] -> [kt kh kw C_in, C_out]
        return np.asarray(ops.conv_weight_matrix(value))
    if layout == "table":  # [1, n, D] -> [n, D]
        return value.reshape(value.shape[1:])
    return value


def _to_torch(value: np.ndarray, layout: str, cfg: WanConfig) -> np.ndarray:
    if layout == "linear":
        return value.T
    if layout == "conv":
        return value.reshape(*cfg.patch_size, cfg.in_channels, -1).transpose(4, 3, 0, 1, 2)
    if layout == "table":
        return value[None]
    return value


def from_tensors(cfg: WanConfig, tensors: dict[str, np.ndarray], *, source: str = "tensors") -> WanTransformer:
    """A model of ``cfg`` holding diffusers-named ``tensors`` (every tensor used, none missing)."""
    abstract = abstract_model(cfg)
    entries = {path: (name, functools.partial(_from_torch, layout=layout))
               for name, (path, layout) in _tensor_names(abstract).items()}
    return load_parameters(abstract, entries, tensors, param_dtype=cfg.param_dtype, source=source, what=CLASS_NAME)


def from_diffusers(path: str | os.PathLike, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None,
                   bucket_edges: tuple[float, ...] | None = None) -> WanTransformer:
    """Read a diffusers ``WanTransformer3DModel`` folder (``config.json`` + safetensors)."""
    from jquant.models import hf_io

    config = hf_io.read_diffusers_config(path, (CLASS_NAME,))
    cfg = config_from_diffusers(config, dtype=dtype, param_dtype=param_dtype, bucket_edges=bucket_edges)
    check_dtypes_available(cfg)
    return from_tensors(cfg, hf_io.read_safetensors(path, weights_name=hf_io.DIFFUSERS_FILE), source=str(path))


def to_tensors(model: WanTransformer) -> dict[str, np.ndarray]:
    """diffusers-named tensors of a float ``model`` (PyTorch layouts)."""
    entries = {path: (name, functools.partial(_to_torch, layout=layout, cfg=model.config))
               for name, (path, layout) in _tensor_names(model).items()}
    return export_parameters(model, entries)


def to_diffusers(model: WanTransformer, path: str | os.PathLike, *, overwrite: bool = False,
                 extra_files=None) -> Path:
    """Write ``model`` as a diffusers ``WanTransformer3DModel`` folder, atomically."""
    from jquant.models import hf_io

    return hf_io.write_checkpoint(path, config_to_diffusers(model.config), to_tensors(model), overwrite=overwrite,
                                  weights_name=hf_io.DIFFUSERS_FILE, extra_files=extra_files)


FAMILY = Family(
    name="wan",
    config_class=WanConfig,
    model_class=WanTransformer,
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, WanConfig),
    checkpoint_protocol="the manifest's config holds the WanConfig fields (config_io.dataclass_config_to_json).",
    diffusers_class_names=(CLASS_NAME,),
    from_diffusers=from_diffusers,
    to_diffusers=to_diffusers,
    presets={
        # Not trained yet: video latents of 4 channels, patch (1, 2, 2); text states of jq-llama-tiny (192).
        "jq-wan-tiny": WanConfig(num_attention_heads=4, attention_head_dim=32, in_channels=4, text_dim=192,
                                 freq_dim=64, ffn_dim=384, num_layers=4),
    },
    keep_float=("patch_embedding", "condition_embedder/(time|text)_embedder/linear_[12]",
                "condition_embedder/time_proj", "proj_out"),
)
