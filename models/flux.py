"""Flux-style transformer (diffusers' ``FluxTransformer2DModel``): double-stream then single-stream DiT blocks.

Black Forest Labs' Flux.1 (diffusers ``transformer_flux.py``). Latents ``z [B, H, W, C]`` are packed into 2x2
patches, ``L = HW / 4`` tokens of ``4C`` channels (``pack_latents``, the pipeline's ``_pack_latents``), and
embedded by a linear ``x_embedder``; text states ``c [B, S, D_text]`` by ``context_embedder``. The conditioning
vector is ``y = TE(sinusoid_256(1000 t)) [+ GE(sinusoid_256(1000 g))] + TextProjection(pooled)`` (``t = σ``;
the guidance embedding ``GE`` only in guidance-distilled models). Token positions are 3-component ids (text
``(0, 0, 0)``, image ``(0, row, column)``); RoPE rotates query / key pairs ``(2f, 2f + 1)`` ("interleaved"), the
head's pairs split over the three id axes by ``axes_dims_rope`` (``jquant.ops.rope``). The joint sequence is
``[c; x]`` (text first).

Double-stream block (adaLN-Zero on both streams, as in SD3's MMDiT, with RMS qk-norm)::

    (shift, scale, gate)_{msa, mlp} = Linear(SiLU(y))                                  for x, and for c
    q, k, v = [W_q, W_k, W_v](LN(x)(1 + scale) + shift) ; [A_q, A_k, A_v](LN(c)(1 + scale_c) + shift_c)
    q, k <- RoPE(RMSNorm(q), RMSNorm(k));   o = softmax(q kᵀ / √d_h) v over [c; x]
    x += gate · W_o(o_x) ;  x += gate_mlp · FF(LN(x)(1 + scale_mlp) + shift_mlp)        (FF: GELU-tanh, 4x)
    c likewise with A_o, FF_c

Single-stream block on ``h = [c; x]`` (parallel attention and MLP, one output projection)::

    shift, scale, gate = Linear(SiLU(y));  n = LN(h)(1 + scale) + shift
    h += gate · W_out([Attn(n) ; GELU_tanh(W_mlp n)])      (Attn: RMS qk-norm + RoPE, no output projection)

then ``out = W_out(LN(x)(1 + scale) + shift)`` (AdaLayerNormContinuous) on the image tokens, unpacked to
``[B, H, W, C]`` by ``flow_velocity``.

Quantization: every linear inside the blocks receives the sample's timestep bucket as its group id
(``activation_groups``: ``bucket_edges`` split σ), so GPTQ can weigh statistics per bucket and static activation
scales can differ per bucket. Calibration data is ``{"latents" [N, H, W, C], "sigmas" [N] in [0, 1], "text"
[N, S, D_text], "pooled" [N, P]}`` plus ``"guidance" [N]`` optionally for a guidance-embedding model (default:
the config's ``guidance``). Two stages: the double-stream blocks with hidden ``(x, c)``, then the single-stream
blocks on ``[c; x]``; both with context ``(y, bucket, cos, sin)``. The embedders (``x_embedder``,
``context_embedder``, time / guidance / pooled-text MLPs), ``norm_out`` and ``proj_out`` are the family's
``keep_float``, the interfaces DiT PTQ work (PTQ4DiT, Q-DiT, ViDiT-Q) keeps in higher precision: a small share
of the weights whose errors reach every token (the conditioning vector) or the output directly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
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
from jquant.models.layers import Linear
from jquant.models.tensor_io import export_parameters, load_parameters
from jquant.models.sd3 import MLP2, FeedForward, JointAttention, LayerAttention, QKNorm, layer_norm, timestep_sinusoid
from jquant.ops.mask import Full
from jquant.sites import ActivationGroups

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
CLASS_NAME = "FluxTransformer2DModel"
ROPE_THETA = 10000.0  # diffusers' FluxPosEmbed(theta=10000), not a config attribute
_TIME_CHANNELS = 256
_MLP_RATIO = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class FluxConfig:
    """Sizes of a Flux transformer (diffusers' config fields; ``in_channels`` counts packed 2x2 channels, 4x the
    latent channels) plus ``guidance`` (the guidance value ``flow_velocity`` feeds a guidance-embedding model
    unless told otherwise), ``bucket_edges`` (σ edges of the timestep buckets used as activation groups) and the
    compute / storage dtypes."""

    patch_size: int = 1
    in_channels: int = 16
    out_channels: int | None = None
    num_layers: int = 2
    num_single_layers: int = 4
    attention_head_dim: int = 32
    num_attention_heads: int = 4
    joint_attention_dim: int = 128
    pooled_projection_dim: int = 128
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (8, 12, 12)
    guidance: float = 3.5
    bucket_edges: tuple[float, ...] = (0.25, 0.5, 0.75)
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "bucket_edges", tuple(float(e) for e in self.bucket_edges))
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        for name in ("in_channels", "num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                     "pooled_projection_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FluxConfig.{name} must be a positive int, got {value!r}.")
        if isinstance(self.num_single_layers, bool) or not isinstance(self.num_single_layers, int) \
                or self.num_single_layers < 0:
            raise ValueError(f"FluxConfig.num_single_layers must be an int >= 0, got {self.num_single_layers!r}.")
        if self.out_channels is not None and (not isinstance(self.out_channels, int) or self.out_channels < 1):
            raise ValueError(f"FluxConfig.out_channels must be None or a positive int, got {self.out_channels!r}.")
        if self.patch_size != 1:
            raise ValueError(f"FluxConfig.patch_size={self.patch_size!r}: Flux patchifies by packing 2x2 latents "
                             "before the transformer (pack_latents); only patch_size=1 is supported.")
        if not isinstance(self.guidance_embeds, bool):
            raise ValueError(f"FluxConfig.guidance_embeds must be a bool, got {self.guidance_embeds!r}.")
        dims = self.axes_dims_rope
        if (len(dims) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 2 or d % 2 for d in dims)
                or sum(dims) != self.attention_head_dim):
            raise ValueError(f"FluxConfig.axes_dims_rope={dims} must be three positive even ints (one per position "
                             f"id axis) summing to attention_head_dim={self.attention_head_dim}.")
        if not np.isfinite(self.guidance):
            raise ValueError(f"FluxConfig.guidance must be finite, got {self.guidance!r}.")
        if list(self.bucket_edges) != sorted(set(self.bucket_edges)) or not all(0 < e < 1 for e in self.bucket_edges):
            raise ValueError(f"FluxConfig.bucket_edges must increase strictly inside (0, 1), got {self.bucket_edges}.")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    def replace(self, **changes) -> FluxConfig:
        return dataclasses.replace(self, **changes)


def _linear(n_in: int, n_out: int, cfg: FluxConfig, rngs: nnx.Rngs) -> Linear:
    return Linear(n_in, n_out, use_bias=True, sharding=(None, None), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


# ---------------------------------------------------------------------------------------------------------------
# latents <-> tokens, position ids (the Flux pipeline's _pack_latents / _unpack_latents / _prepare_*_ids)
# ---------------------------------------------------------------------------------------------------------------

def pack_latents(latents: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, (H/2)(W/2), 4C]``: 2x2 patches in row-major order, channels ordered
    ``(c, dy, dx)`` as the Flux pipeline packs NCHW latents."""
    b, h, w, c = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents: latents [B, H, W, C] need even H and W (2x2 packing), got {latents.shape}.")
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """Inverse of ``pack_latents``: ``[B, (H/2)(W/2), 4C]`` -> ``[B, H, W, C]``."""
    b, n, c4 = tokens.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or c4 % 4:
        raise ValueError(f"unpack_latents: tokens {tokens.shape} are not the 2x2 packing of a {height}x{width} latent "
                         "(even sides, (H/2)(W/2) tokens of 4C channels).")
    x = tokens.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, height, width, c4 // 4)


def image_ids(rows: int, cols: int) -> np.ndarray:
    """Position ids ``[rows cols, 3]`` float32 of a packed token grid: ``(0, row, column)``, row-major."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([np.zeros_like(r), r, c], axis=-1).reshape(-1, 3).astype(np.float32)


def text_ids(length: int) -> np.ndarray:
    """Position ids ``[length, 3]`` of text tokens: all zero (Flux gives text no position)."""
    return np.zeros((length, 3), np.float32)


# ---------------------------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------------------------

def _heads(y: jax.Array, heads: int, norm: QKNorm | None) -> jax.Array:
    b, n, d = y.shape
    y = y.reshape(b, n, heads, d // heads)
    return y if norm is None else norm(y)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array,
            attention: JointAttention | None = None) -> jax.Array:
    """RoPE on ``q, k [B, N, H, D]``, then full attention (or ``attention(q, k, v)``) -> ``[B, N, H D]``."""
    q, k = ops.apply_rope(q, cos, sin, "interleaved"), ops.apply_rope(k, cos, sin, "interleaved")
    b, n = q.shape[:2]
    o = ops.attention(q, k, v, Full()) if attention is None else attention(q, k, v)
    return o.reshape(b, n, -1)


class DoubleBlock(nnx.Module):
    """One double-stream block (module docstring)."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        self.norm1, self.norm1_context = _linear(d, 6 * d, cfg, rngs), _linear(d, 6 * d, cfg, rngs)
        self.to_q, self.to_k, self.to_v, self.to_out = (_linear(d, d, cfg, rngs) for _ in range(4))
        self.add_q_proj, self.add_k_proj, self.add_v_proj, self.to_add_out = (_linear(d, d, cfg, rngs)
                                                                              for _ in range(4))
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (QKNorm(hd, cfg) for _ in range(4))
        self.ff, self.ff_context = FeedForward(d, cfg, rngs), FeedForward(d, cfg, rngs)

    def __call__(self, x: jax.Array, c: jax.Array, temb: jax.Array, bucket: jax.Array, cos: jax.Array,
                 sin: jax.Array, attention: JointAttention | None = None) -> tuple[jax.Array, jax.Array]:
        """``x [B, L, d]`` image tokens, ``c [B, S, d]`` text tokens, ``temb [B, d]``, ``bucket [B]`` int,
        ``cos, sin [S + L, d_h]`` (text rows first); ``attention(q, k, v)`` replaces full joint attention."""
        g = bucket[:, None]
        y = jax.nn.silu(temb)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = jnp.split(self.norm1(y, groups=bucket)[:, None], 6, -1)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = jnp.split(
            self.norm1_context(y, groups=bucket)[:, None], 6, -1)
        h = layer_norm(x) * (1 + scale) + shift
        hc = layer_norm(c) * (1 + c_scale) + c_shift
        n = self.heads
        q = jnp.concatenate([_heads(self.add_q_proj(hc, groups=g), n, self.norm_added_q),
                             _heads(self.to_q(h, groups=g), n, self.norm_q)], axis=1)
        k = jnp.concatenate([_heads(self.add_k_proj(hc, groups=g), n, self.norm_added_k),
                             _heads(self.to_k(h, groups=g), n, self.norm_k)], axis=1)
        v = jnp.concatenate([_heads(self.add_v_proj(hc, groups=g), n, None),
                             _heads(self.to_v(h, groups=g), n, None)], axis=1)
        o = _attend(q, k, v, cos, sin, attention)
        text = c.shape[1]
        x = x + gate * self.to_out(o[:, text:], groups=g)
        x = x + gate_mlp * self.ff(layer_norm(x) * (1 + scale_mlp) + shift_mlp, g)
        c = c + c_gate * self.to_add_out(o[:, :text], groups=g)
        c = c + c_gate_mlp * self.ff_context(layer_norm(c) * (1 + c_scale_mlp) + c_shift_mlp, g)
        return x, c

    def calibration_forward(self, hidden: tuple[jax.Array, jax.Array], context: tuple) -> tuple[jax.Array, jax.Array]:
        return self(*hidden, *context)


class SingleBlock(nnx.Module):
    """One single-stream block on the joint sequence ``[c; x]`` (module docstring)."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        self.norm = _linear(d, 3 * d, cfg, rngs)
        self.to_q, self.to_k, self.to_v = (_linear(d, d, cfg, rngs) for _ in range(3))
        self.norm_q, self.norm_k = QKNorm(hd, cfg), QKNorm(hd, cfg)
        self.proj_mlp = _linear(d, _MLP_RATIO * d, cfg, rngs)
        self.proj_out = _linear(d + _MLP_RATIO * d, d, cfg, rngs)

    def __call__(self, h: jax.Array, temb: jax.Array, bucket: jax.Array, cos: jax.Array, sin: jax.Array,
                 attention: JointAttention | None = None) -> jax.Array:
        """``h [B, S + L, d]`` (text first), ``temb [B, d]``, ``bucket [B]``, ``cos, sin [S + L, d_h]``."""
        g = bucket[:, None]
        shift, scale, gate = jnp.split(self.norm(jax.nn.silu(temb), groups=bucket)[:, None], 3, -1)
        n = layer_norm(h) * (1 + scale) + shift
        mlp = jax.nn.gelu(self.proj_mlp(n, groups=g), approximate=True)
        o = _attend(_heads(self.to_q(n, groups=g), self.heads, self.norm_q),
                    _heads(self.to_k(n, groups=g), self.heads, self.norm_k),
                    _heads(self.to_v(n, groups=g), self.heads, None), cos, sin, attention)
        return h + gate * self.proj_out(jnp.concatenate([o, mlp], axis=-1), groups=g)

    def calibration_forward(self, hidden: jax.Array, context: tuple) -> jax.Array:
        return self(hidden, *context)


# ---------------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------------

class FluxTransformer(nnx.Module):
    """The Flux transformer (module docstring). ``__call__(tokens [B, L, C_in], img_ids [L, 3], txt_ids [S, 3],
    timesteps [B] (σ), text [B, S, D_text], pooled [B, P], guidance [B] | None) -> [B, L, C_out]`` with
    diffusers' arguments; ``flow_velocity`` takes channels-last latents."""

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg, d = config, config.inner_dim
        self.x_embedder = _linear(cfg.in_channels, d, cfg, rngs)
        self.context_embedder = _linear(cfg.joint_attention_dim, d, cfg, rngs)
        self.timestep_embedder = MLP2(_TIME_CHANNELS, d, cfg, rngs)
        self.guidance_embedder = MLP2(_TIME_CHANNELS, d, cfg, rngs) if cfg.guidance_embeds else None
        self.text_embedder = MLP2(cfg.pooled_projection_dim, d, cfg, rngs)
        self.transformer_blocks = nnx.List([DoubleBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nnx.List([SingleBlock(cfg, rngs=rngs) for _ in range(cfg.num_single_layers)])
        self.norm_out = _linear(d, 2 * d, cfg, rngs)
        self.proj_out = _linear(d, cfg.patch_size ** 2 * cfg.output_channels, cfg, rngs)

    # -- inputs -------------------------------------------------------------------------------------------------
    def bucket(self, sigmas: jax.Array) -> jax.Array:
        """Timestep bucket ids ``[B]``: how many of ``bucket_edges`` each σ reaches."""
        return jnp.sum(jnp.asarray(sigmas)[:, None] >= jnp.asarray(self.config.bucket_edges), axis=1).astype(jnp.int32)

    def _check(self, tokens, img_ids, txt_ids, timesteps, text, pooled, guidance) -> None:
        cfg, name = self.config, "FluxTransformer"
        shape = tuple(tokens.shape)
        if len(shape) != 3 or shape[-1] != cfg.in_channels:
            raise ValueError(f"{name}: tokens must be packed latents [B, L, {cfg.in_channels}] (pack_latents of "
                             f"[B, H, W, {cfg.in_channels / 4:g}] latents), got {shape}.")
        b, length = shape[:2]
        if tuple(img_ids.shape) != (length, 3):
            raise ValueError(f"{name}: img_ids must be [L={length}, 3] (image_ids(H / 2, W / 2); no batch axis), got "
                             f"{tuple(img_ids.shape)}.")
        if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(f"{name}: text must be [B={b}, S, {cfg.joint_attention_dim}], got {tuple(text.shape)}.")
        if tuple(txt_ids.shape) != (text.shape[1], 3):
            raise ValueError(f"{name}: txt_ids must be [S={text.shape[1]}, 3] (text_ids(S); no batch axis), got "
                             f"{tuple(txt_ids.shape)}.")
        if tuple(pooled.shape) != (b, cfg.pooled_projection_dim):
            raise ValueError(f"{name}: pooled must be [{b}, {cfg.pooled_projection_dim}], got {tuple(pooled.shape)}.")
        if tuple(jnp.shape(timesteps)) != (b,):
            raise ValueError(f"{name}: timesteps must be one σ per sample [{b}], got shape {jnp.shape(timesteps)}.")
        if cfg.guidance_embeds and (guidance is None or tuple(jnp.shape(guidance)) != (b,)):
            raise ValueError(f"{name}: this model embeds guidance; pass guidance [{b}] (one scale per sample), got "
                             f"{None if guidance is None else jnp.shape(guidance)}.")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError(f"{name}: guidance was given but this model has no guidance embedding "
                             "(guidance_embeds=False); pass guidance=None.")

    def embed(self, tokens, img_ids, txt_ids, timesteps, text, pooled, guidance=None):
        """``(x [B, L, d], c [B, S, d], (temb [B, d], bucket [B], cos, sin [S + L, d_h]))``: the blocks' inputs."""
        self._check(tokens, img_ids, txt_ids, timesteps, text, pooled, guidance)
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        x = self.x_embedder(jnp.asarray(tokens, dt))
        temb = self.timestep_embedder(timestep_sinusoid(jnp.asarray(timesteps, dt) * 1000).astype(dt))
        if guidance is not None:
            temb = temb + self.guidance_embedder(timestep_sinusoid(jnp.asarray(guidance, dt) * 1000).astype(dt))
        temb = temb + self.text_embedder(jnp.asarray(pooled, dt))
        c = self.context_embedder(jnp.asarray(text, dt))
        ids = jnp.concatenate([jnp.asarray(txt_ids), jnp.asarray(img_ids)], axis=0)
        angles = ops.rope_angles(ids, dims=cfg.axes_dims_rope, theta=ROPE_THETA, freq_dtype=np.float64)
        cos, sin = ops.rope_cos_sin(angles, "interleaved")
        return x, c, (temb, self.bucket(jnp.asarray(timesteps, jnp.float32)), cos, sin)

    def head(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        """AdaLayerNormContinuous + ``proj_out``: ``[B, L, d]`` -> ``[B, L, C_out]``."""
        scale, shift = jnp.split(self.norm_out(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
        return self.proj_out(layer_norm(x) * (1 + scale) + shift)

    def _blocks(self, x: jax.Array, c: jax.Array, context: tuple, attention: LayerAttention | None) -> jax.Array:
        def hook(layer: int):
            return None if attention is None else functools.partial(attention, layer)

        for i, block in enumerate(self.transformer_blocks):
            x, c = block(x, c, *context, hook(i))
        h = jnp.concatenate([c, x], axis=1)
        for i, block in enumerate(self.single_transformer_blocks):
            h = block(h, *context, hook(len(self.transformer_blocks) + i))
        return self.head(h[:, c.shape[1]:], context[0])

    def __call__(self, tokens: jax.Array, img_ids: jax.Array, txt_ids: jax.Array, timesteps: jax.Array,
                 text: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None, *,
                 attention: LayerAttention | None = None) -> jax.Array:
        """``attention(layer, q, k, v)`` replaces each block's joint attention (double blocks first, then single;
        text tokens first in the joint sequence)."""
        x, c, context = self.embed(tokens, img_ids, txt_ids, timesteps, text, pooled, guidance)
        return self._blocks(x, c, context, attention)

    def _guidance(self, guidance, batch: int):
        """Guidance ``[B]`` for a guidance-embedding model (``config.guidance`` when None), else None."""
        if not self.config.guidance_embeds:
            if guidance is not None:
                raise ValueError("FluxTransformer: guidance was given but this model has no guidance embedding "
                                 "(guidance_embeds=False); pass guidance=None.")
            return None
        value = jnp.asarray(self.config.guidance if guidance is None else guidance, jnp.float32)
        return jnp.broadcast_to(value, (batch,)) if value.ndim == 0 else value

    def _latent_inputs(self, latents, text):
        """``(tokens, img_ids, txt_ids)`` of channels-last latents ``[B, H, W, C]`` (4C = in_channels)."""
        shape = tuple(latents.shape)
        if len(shape) != 4 or 4 * shape[-1] != self.config.in_channels or shape[1] % 2 or shape[2] % 2:
            raise ValueError(f"FluxTransformer: latents must be [B, H, W, {self.config.in_channels / 4:g}] with even "
                             f"H and W (packed 2x2 into in_channels={self.config.in_channels}), got {shape}.")
        return pack_latents(latents), image_ids(shape[1] // 2, shape[2] // 2), text_ids(text.shape[1])

    def flow_velocity(self, latents: jax.Array, sigmas: jax.Array, text: jax.Array, pooled: jax.Array,
                      guidance: jax.Array | float | None = None, *,
                      attention: LayerAttention | None = None) -> jax.Array:
        """The rectified-flow velocity ``[B, H, W, C]`` of latents ``[B, H, W, C]`` at noise levels ``sigmas [B]`` in
        ``[0, 1]`` (Flux feeds ``t = σ``); ``guidance`` (scalar or ``[B]``) defaults to ``config.guidance`` for a
        guidance-embedding model and must be None otherwise; ``attention`` as in ``__call__``."""
        if self.config.output_channels != self.config.in_channels:
            raise ValueError(f"FluxTransformer.flow_velocity: out_channels={self.config.output_channels} differs from "
                             f"in_channels={self.config.in_channels}; a velocity has the latents' channels.")
        tokens, img, txt = self._latent_inputs(latents, text)
        out = self(tokens, img, txt, sigmas, text, pooled, self._guidance(guidance, tokens.shape[0]),
                   attention=attention)
        return unpack_latents(out, latents.shape[1], latents.shape[2])

    def joint_layout(self, latent_shape: tuple[int, ...], text_len: int) -> tuple[int, int, int]:
        """``(n_image, n_text, text_start)`` of the joint attention: the text first, then ``(h / 2) (w / 2)`` packed
        image tokens of latents ``[.., h, w, C]``."""
        return (latent_shape[-3] // 2) * (latent_shape[-2] // 2), int(text_len), 0

    def joint_attention_layers(self) -> int:
        """Joint attentions per call (double blocks, then single blocks), the layers of an attention plan."""
        return len(self.transformer_blocks) + len(self.single_transformer_blocks)

    # -- calibration contract ---------------------------------------------------------------------------------
    def _enter(self, batch: dict):
        tokens, img, txt = self._latent_inputs(batch["latents"], batch["text"])
        guidance = self._guidance(batch.get("guidance"), tokens.shape[0])
        x, c, context = self.embed(tokens, img, txt, jnp.asarray(batch["sigmas"], jnp.float32), batch["text"],
                                   batch["pooled"], guidance)
        return (x, c), context

    def calibration_stages(self) -> list[Stage]:
        """The double-stream blocks on ``(x, c)``, then the single-stream blocks on ``[c; x]``."""
        return [Stage(blocks=list(self.transformer_blocks), enter=_enter_double),
                Stage(blocks=list(self.single_transformer_blocks), enter=_enter_single)]

    def activation_groups(self) -> ActivationGroups:
        edges = (0.0, *self.config.bucket_edges, 1.0)
        names = tuple(f"sigma[{a:g},{b:g}{']' if b == 1.0 else ')'}" for a, b in zip(edges[:-1], edges[1:]))
        return ActivationGroups(names=names, sites=r"(single_)?transformer_blocks/.*")

    def check_calibration(self, calib) -> dict:
        """``{"latents" [N, H, W, C], "sigmas" [N] in [0, 1], "text" [N, S, D_text], "pooled" [N, P]}`` (+
        ``"guidance" [N]`` for a guidance-embedding model) -> float32 numpy arrays this model takes."""
        keys = {"latents", "sigmas", "text", "pooled"}
        allowed = keys | ({"guidance"} if self.config.guidance_embeds else set())
        if not isinstance(calib, dict) or not keys <= set(calib) <= allowed:
            guidance = ("and optionally 'guidance' [N]" if self.config.guidance_embeds else
                        "and no 'guidance' (this model has no guidance embedding)")
            raise ValueError(f"FluxTransformer calibration must be a dict with keys {sorted(keys)} {guidance}: "
                             "latents, noise levels, text states and pooled text drawn along sampler trajectories; "
                             f"got {sorted(calib) if isinstance(calib, dict) else type(calib).__name__}.")
        num_samples(calib)
        out = {k: np.asarray(v, np.float32) for k, v in calib.items()}
        n = out["sigmas"].shape[0]
        tokens, img, txt = self._latent_inputs(out["latents"], out["text"])
        self._check(tokens, img, txt, out["sigmas"], out["text"], out["pooled"],
                    self._guidance(out.get("guidance"), n))
        s = out["sigmas"]
        if not np.all(np.isfinite(s)):
            raise ValueError("calib['sigmas'] must be finite.")
        edges = np.asarray(self.config.bucket_edges)
        buckets = np.where(s < 0, -1, np.where(s > 1, len(edges) + 1, np.sum(s[:, None] >= edges, axis=1)))
        check_group_ids(buckets, self.activation_groups(), "calib['sigmas'] (as timestep buckets; σ must lie in "
                        "[0, 1])")
        return out


def _enter_double(m: FluxTransformer, batch: dict, previous):
    """``calibration_stages``' entries (module level, so each compiles once per model structure)."""
    return m._enter(batch)


def _enter_single(m: FluxTransformer, batch: dict, previous):
    (x, c), context = previous
    return jnp.concatenate([c, x], axis=1), context


def init_model(config: FluxConfig, key: jax.Array) -> FluxTransformer:
    """A randomly initialised Flux transformer (linears ~ N(0, 0.02), biases 0, qk-norm weights 1)."""
    check_dtypes_available(config)
    return FluxTransformer(config, rngs=nnx.Rngs(params=key))


def abstract_model(config: FluxConfig) -> FluxTransformer:
    return nnx.eval_shape(lambda: FluxTransformer(config, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------------------------
# diffusers import / export
# ---------------------------------------------------------------------------------------------------------------

_HANDLED = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path"}


def config_from_diffusers(config: dict, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None,
                          bucket_edges: tuple[float, ...] | None = None) -> FluxConfig:
    """A ``FluxConfig`` from a diffusers ``config.json`` dict; attributes this reader does not handle are refused."""
    unknown = sorted(set(config) - set(_HANDLED) - _IGNORED)
    if unknown:
        raise ValueError(f"Flux config.json has attributes jquant does not handle: {unknown}; it would silently "
                         "compute something else, so it is refused.")
    values = {k: config[k] for k in _HANDLED if k in config}
    extra = {} if bucket_edges is None else {"bucket_edges": bucket_edges}
    return FluxConfig(**values, **extra, dtype=dtype, param_dtype=param_dtype or dtype)


def config_to_diffusers(cfg: FluxConfig) -> dict:
    fields = {k: getattr(cfg, k) for k in _HANDLED}
    return {"_class_name": CLASS_NAME, **fields, "axes_dims_rope": list(cfg.axes_dims_rope)}


def _tensor_names(model: FluxTransformer) -> dict[str, tuple[tuple, bool]]:
    """diffusers tensor name -> (jquant state path, whether it is a transposed linear weight)."""
    names: dict[str, tuple[tuple, bool]] = {}

    def linear(prefix: str, path: tuple):
        names[f"{prefix}.weight"] = ((*path, "kernel"), True)
        names[f"{prefix}.bias"] = ((*path, "bias"), False)

    def norms(prefix: str, path: tuple, which: tuple[str, ...]):
        for n in which:
            names[f"{prefix}.{n}.weight"] = ((*path, n, "weight"), False)

    embedders = ("timestep_embedder", "text_embedder") + (("guidance_embedder",) if model.config.guidance_embeds
                                                          else ())
    for part in embedders:
        for lin in ("linear_1", "linear_2"):
            linear(f"time_text_embed.{part}.{lin}", (part, lin))
    for part in ("context_embedder", "x_embedder", "norm_out", "proj_out"):
        linear("norm_out.linear" if part == "norm_out" else part, (part,))
    for i in range(len(model.transformer_blocks)):
        pre, at = f"transformer_blocks.{i}", ("transformer_blocks", i)
        linear(f"{pre}.norm1.linear", (*at, "norm1"))
        linear(f"{pre}.norm1_context.linear", (*at, "norm1_context"))
        for ours in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            linear(f"{pre}.attn.{ours}", (*at, ours))
        linear(f"{pre}.attn.to_out.0", (*at, "to_out"))
        norms(f"{pre}.attn", at, ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
        for ff in ("ff", "ff_context"):
            linear(f"{pre}.{ff}.net.0.proj", (*at, ff, "proj"))
            linear(f"{pre}.{ff}.net.2", (*at, ff, "out"))
    for i in range(len(model.single_transformer_blocks)):
        pre, at = f"single_transformer_blocks.{i}", ("single_transformer_blocks", i)
        linear(f"{pre}.norm.linear", (*at, "norm"))
        for ours in ("to_q", "to_k", "to_v"):
            linear(f"{pre}.attn.{ours}", (*at, ours))
        norms(f"{pre}.attn", at, ("norm_q", "norm_k"))
        linear(f"{pre}.proj_mlp", (*at, "proj_mlp"))
        linear(f"{pre}.proj_out", (*at, "proj_out"))
    return names


def _transpose(value: np.ndarray) -> np.ndarray:
    return value.T


def _entries(model: FluxTransformer) -> dict[tuple, tuple[str, object]]:
    """state path -> (diffusers tensor name, layout conversion: a linear weight transposes, the rest is as is)."""
    return {path: (name, _transpose if transposed else np.asarray)
            for name, (path, transposed) in _tensor_names(model).items()}


def from_tensors(cfg: FluxConfig, tensors: dict[str, np.ndarray], *, source: str = "tensors") -> FluxTransformer:
    """A model of ``cfg`` holding diffusers-named ``tensors`` (every tensor used, none missing)."""
    abstract = abstract_model(cfg)
    return load_parameters(abstract, _entries(abstract), tensors, param_dtype=cfg.param_dtype, source=source,
                           what="FluxTransformer2DModel")


def from_diffusers(path: str | os.PathLike, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None,
                   bucket_edges: tuple[float, ...] | None = None) -> FluxTransformer:
    """Read a diffusers ``FluxTransformer2DModel`` folder (``config.json`` + safetensors)."""
    from jquant.models import hf_io

    config = hf_io.read_diffusers_config(path, (CLASS_NAME,))
    cfg = config_from_diffusers(config, dtype=dtype, param_dtype=param_dtype, bucket_edges=bucket_edges)
    check_dtypes_available(cfg)
    return from_tensors(cfg, hf_io.read_safetensors(path, weights_name=hf_io.DIFFUSERS_FILE), source=str(path))


def to_tensors(model: FluxTransformer) -> dict[str, np.ndarray]:
    """diffusers-named tensors of a float ``model`` (PyTorch layouts)."""
    return export_parameters(model, _entries(model))


def to_diffusers(model: FluxTransformer, path: str | os.PathLike, *, overwrite: bool = False,
                 extra_files=None) -> Path:
    """Write ``model`` as a diffusers ``FluxTransformer2DModel`` folder, atomically."""
    from jquant.models import hf_io

    return hf_io.write_checkpoint(path, config_to_diffusers(model.config), to_tensors(model), overwrite=overwrite,
                                  weights_name=hf_io.DIFFUSERS_FILE, extra_files=extra_files)


FAMILY = Family(
    name="flux",
    config_class=FluxConfig,
    model_class=FluxTransformer,
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, FluxConfig),
    checkpoint_protocol="the manifest's config holds the FluxConfig fields (config_io.dataclass_config_to_json).",
    diffusers_class_names=(CLASS_NAME,),
    from_diffusers=from_diffusers,
    to_diffusers=to_diffusers,
    presets={
        # 32x32 RGB through jq-vae-tiny -> 8x8x4 latents, packed 2x2 -> 16 tokens of 16 channels; text states and
        # pooled text of jq-llama-tiny (192). ~2.9M parameters. No guidance embedding: a model trained from scratch
        # with caption dropout is guided by classifier-free guidance (TextToImage), not distilled guidance.
        "jq-flux-tiny": FluxConfig(in_channels=16, num_layers=3, num_single_layers=4, attention_head_dim=32,
                                   num_attention_heads=4, joint_attention_dim=192, pooled_projection_dim=192,
                                   axes_dims_rope=(8, 12, 12)),
    },
    keep_float=("x_embedder", "context_embedder", "(timestep|guidance|text)_embedder/linear_[12]", "norm_out",
                "proj_out"),
)
