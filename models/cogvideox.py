"""CogVideoX's video transformer (diffusers' ``CogVideoXTransformer3DModel``), channels last.

Yang et al. 2024, "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer" (§2.2, Fig. 3): latents
``z [B, F, H, W, C]`` are cut into ``p x p`` patches per frame (CogVideoX 1.0: a ``p x p`` conv; 1.5: a linear on
``p_t x p x p`` patches) giving ``N = (F / p_t)(H / p)(W / p)`` video tokens in (frame, row, column) order; text
states ``c [B, S, D_text]`` are projected (``text_proj``) and the joint sequence is ``[c; x]`` (text first).
Positions are either a fixed 3-D sin-cos table added to the video tokens (2B: a quarter of the channels for the
frame, three quarters for (column, row)) or 3-D RoPE inside attention (5B / 1.5: per-head dims ``(D/4, 3D/8,
3D/8)`` for (frame, row, column), interleaved pairs, video tokens only). With ``e = TimestepEmbedding(sinusoid_d(t))``
each block is (expert adaLN: one modulation for the video stream, another for the text stream)::

    (shift, scale, gate, shift_c, scale_c, gate_c) = W_1 SiLU(e)                        (CogVideoXLayerNormZero)
    [h_c; h] = [LN(c)(1 + scale_c) + shift_c ; LN(x)(1 + scale) + shift]              (LN: shared, affine)
    q, k, v = W_q, W_k, W_v [h_c; h];  q, k <- RoPE(LN_q(q)), RoPE(LN_k(k)) (video part; per-head affine LN)
    [o_c; o] = W_o softmax(q kᵀ / √d_h) v;   x += gate o,  c += gate_c o_c
    (same modulation with W_2)  [f_c; f] = FF([h_c; h]);   x += gate f,  c += gate_c f_c      (FF: GELU-tanh, 4x)

then ``out = W_out(LN_out(LN_final(x))(1 + scale) + shift)`` (``(shift, scale) = W SiLU(e)``), unpatchified to
``[B, F, H, W, C_out]``. The model predicts v (``α_t ε - σ_t x_0``) for a DDIM schedule; ``t`` is the integer
training timestep in ``[0, 1000)`` as in diffusers.

Block inputs and outputs are the pair ``(x [B, N, d], c [B, S, d])`` and every block shares one context
``(temb [B, D_t], bucket [B], rope)``; ``embed`` -> ``blocks()`` -> ``head`` is ``__call__`` taken apart, which is
what a per-block cache (a temporal delta cache keeps ``block(x, c) - (x, c)`` for both streams) or a frame-merging
sampler (``embed(..., frame_positions=...)``, ``rotary(...)``: RoPE at other frame positions) builds on.

Quantization: every linear inside the blocks (adaLN modulations, attention projections, feed-forward) is a site
that receives the sample's timestep bucket as its group id (``activation_groups``; ``bucket_edges`` in timestep
units). Calibration data is ``{"latents" [N, F, H, W, C], "timesteps" [N] in [0, 1000], "text" [N, S, D_text]}``;
one stage walks the blocks with hidden ``(x, c)``. The patch embedding, ``text_proj``, the time embedding,
``norm_out`` and ``proj_out`` are the family's ``keep_float``.
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
from jquant.models.sd3 import MLP2, FeedForward, JointAttention, LayerAttention, layer_norm, timestep_sinusoid
from jquant.models.tensor_io import export_parameters, load_parameters
from jquant.ops.mask import Full
from jquant.sites import ActivationGroups

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
Rope = tuple[jax.Array, jax.Array] | None  # (cos, sin) [N, d_h] for the video tokens, or None (sin-cos table)
Route = Callable[[str, jax.Array], jax.Array]  # (routed linear's name, its input) -> its group ids
CLASS_NAME = "CogVideoXTransformer3DModel"
NUM_TRAIN_TIMESTEPS = 1000
ROPE_THETA = 10000.0
_QK_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class CogVideoXConfig:
    """Sizes of a CogVideoX transformer (diffusers' config fields), ``bucket_edges`` (timesteps splitting the
    schedule into the activation groups' buckets) and the compute / storage dtypes."""

    num_attention_heads: int = 2
    attention_head_dim: int = 16
    in_channels: int = 4
    out_channels: int | None = None
    time_embed_dim: int = 32
    text_embed_dim: int = 32
    num_layers: int = 2
    attention_bias: bool = True
    sample_width: int = 8
    sample_height: int = 8
    sample_frames: int = 9
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 8
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    patch_bias: bool = True
    bucket_edges: tuple[float, ...] = (250.0, 500.0, 750.0)
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "bucket_edges", tuple(float(e) for e in self.bucket_edges))
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "time_embed_dim", "text_embed_dim",
                     "num_layers", "sample_width", "sample_height", "sample_frames", "patch_size",
                     "temporal_compression_ratio", "max_text_seq_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CogVideoXConfig.{name} must be a positive int, got {value!r}.")
        if self.patch_size_t is not None and not self.use_rotary_positional_embeddings:
            raise ValueError(f"CogVideoXConfig: patch_size_t={self.patch_size_t} (CogVideoX 1.5) needs "
                             "use_rotary_positional_embeddings=True; diffusers' sin-cos table has no temporal patches.")
        if self.use_rotary_positional_embeddings and self.attention_head_dim % 16:
            raise ValueError(f"CogVideoXConfig: attention_head_dim={self.attention_head_dim} must be a multiple of 16 "
                             "for 3-D RoPE (even d/4 frame, 3d/8 row and 3d/8 column features).")
        if not self.use_rotary_positional_embeddings and self.inner_dim % 16:
            raise ValueError(f"CogVideoXConfig: the inner dimension {self.inner_dim} must be a multiple of 16 for the "
                             "3-D sin-cos position table.")
        if list(self.bucket_edges) != sorted(set(self.bucket_edges)) or not all(
                0 < e < NUM_TRAIN_TIMESTEPS for e in self.bucket_edges):
            raise ValueError(f"CogVideoXConfig.bucket_edges must increase strictly inside (0, {NUM_TRAIN_TIMESTEPS}) "
                             f"(timesteps), got {self.bucket_edges}.")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def patch_volume(self) -> int:
        return (self.patch_size_t or 1) * self.patch_size ** 2

    def replace(self, **changes) -> CogVideoXConfig:
        return dataclasses.replace(self, **changes)


def _linear(n_in: int, n_out: int, cfg: CogVideoXConfig, rngs: nnx.Rngs, bias: bool = True) -> Linear:
    return Linear(n_in, n_out, use_bias=bias, sharding=(None, None), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


# ---------------------------------------------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------------------------------------------

def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """diffusers' ``get_1d_sincos_pos_embed_from_grid``: ``[sin(p ω), cos(p ω)]``, ``ω_i = 10000^(-2i/dim)``
    (float64)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = pos.astype(np.float64).reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_3d(cfg: CogVideoXConfig, h: int, w: int, frame_positions: np.ndarray) -> np.ndarray:
    """diffusers' ``get_3d_sincos_pos_embed`` over a ``[F, h, w]`` token grid -> ``[F h w, d]`` float64: ``d / 4``
    channels for the frame, then ``3d / 8`` for the column and ``3d / 8`` for the row. Grid coordinates are the
    float32 quotients diffusers computes (``index / interpolation_scale``)."""
    d = cfg.inner_dim
    rows = np.arange(h, dtype=np.float32) / np.float32(cfg.spatial_interpolation_scale)
    cols = np.arange(w, dtype=np.float32) / np.float32(cfg.spatial_interpolation_scale)
    frames = np.asarray(frame_positions, np.float32) / np.float32(cfg.temporal_interpolation_scale)
    col_grid, row_grid = np.meshgrid(cols, rows)  # [h, w]
    spatial = np.concatenate([_sincos_1d(3 * d // 8, col_grid), _sincos_1d(3 * d // 8, row_grid)], axis=1)
    temporal = _sincos_1d(d // 4, frames)
    n = len(frames)
    spatial = np.broadcast_to(spatial, (n, h * w, 3 * d // 4))
    return np.concatenate([np.repeat(temporal[:, None], h * w, axis=1), spatial], axis=-1).reshape(n * h * w, d)


def _crop_region(h: int, w: int, base_w: int, base_h: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The CogVideoX pipeline's ``get_resize_crop_region_for_grid((h, w), base_w, base_h)``."""
    if h / w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / h * w))
    else:
        rw, rh = base_w, int(round(base_w / w * h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_positions(cfg: CogVideoXConfig, h: int, w: int, frame_positions: np.ndarray) -> np.ndarray:
    """(frame, row, column) RoPE positions ``[F h w, 3]`` float32 of a ``[F, h, w]`` token grid, as the CogVideoX
    pipelines build them (``_prepare_rotary_positional_embeddings``): 1.0 resizes the grid into the base grid
    ``sample_height / p x sample_width / p`` (crop region, ``linspace(start, stop (n - 1) / n, n)``); 1.5
    (``patch_size_t``) uses integer rows and columns."""
    if cfg.patch_size_t is None:
        (top, left), (bottom, right) = _crop_region(h, w, cfg.sample_width // cfg.patch_size,
                                                    cfg.sample_height // cfg.patch_size)
        rows = np.linspace(top, bottom * (h - 1) / h, h)
        cols = np.linspace(left, right * (w - 1) / w, w)
    else:
        rows, cols = np.arange(h), np.arange(w)
    grid = np.meshgrid(np.asarray(frame_positions, np.float64), rows, cols, indexing="ij")
    return np.stack([g.reshape(-1) for g in grid], axis=-1).astype(np.float32)


def default_frame_positions(frames: int) -> np.ndarray:
    """Latent frame positions ``[F]`` the pipelines use (``linspace(0, F (F - 1) / F, F)``, i.e. ``0 .. F - 1``)."""
    return np.linspace(0, frames * (frames - 1) / frames, frames).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------------------------

class AffineLayerNorm(nnx.Module):
    """``LN(x) w + b`` over the last axis (``torch.nn.LayerNorm`` with affine parameters), in at least float32."""

    def __init__(self, dim: int, eps: float, cfg: CogVideoXConfig):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.dtype(cfg.param_dtype)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.eps) * self.weight.get_value().astype(x.dtype) + self.bias.get_value().astype(x.dtype)


class LayerNormZero(nnx.Module):
    """diffusers' ``CogVideoXLayerNormZero``: ``(shift, scale, gate) x 2 = linear(SiLU(temb))``, one shared affine
    LayerNorm; returns the modulated ``(x, c)`` and the gates ``[B, 1, d]`` of both streams."""

    def __init__(self, cfg: CogVideoXConfig, rngs: nnx.Rngs):
        self.linear = _linear(cfg.time_embed_dim, 6 * cfg.inner_dim, cfg, rngs)
        self.norm = AffineLayerNorm(cfg.inner_dim, cfg.norm_eps, cfg)

    def __call__(self, x, c, temb, bucket):
        mod = self.linear(jax.nn.silu(temb), groups=bucket)[:, None, :]
        shift, scale, gate, c_shift, c_scale, c_gate = jnp.split(mod, 6, axis=-1)
        return (self.norm(x) * (1 + scale) + shift, self.norm(c) * (1 + c_scale) + c_shift, gate, c_gate)


class Attention(nnx.Module):
    """Full self-attention over ``[c; x]`` with per-head affine LayerNorm on q, k and RoPE on the video part."""

    def __init__(self, cfg: CogVideoXConfig, rngs: nnx.Rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = (_linear(d, d, cfg, rngs, cfg.attention_bias) for _ in range(3))
        self.norm_q, self.norm_k = AffineLayerNorm(hd, _QK_EPS, cfg), AffineLayerNorm(hd, _QK_EPS, cfg)
        self.to_out = _linear(d, d, cfg, rngs)

    def __call__(self, h: jax.Array, text_len: int, rope: Rope, groups: Route,
                 attention: JointAttention | None = None) -> jax.Array:
        """``h [B, S + N, d]`` (text first) -> ``[B, S + N, d]``; ``groups(name, x)`` gives the group ids of linear
        ``attn1/<name>`` for its input ``x``; ``attention(q, k, v)`` replaces full attention."""
        b, n, d = h.shape

        def heads(y):
            return y.reshape(b, n, self.heads, d // self.heads)

        q = self.norm_q(heads(self.to_q(h, groups=groups("attn1/to_q", h))))
        k = self.norm_k(heads(self.to_k(h, groups=groups("attn1/to_k", h))))
        v = heads(self.to_v(h, groups=groups("attn1/to_v", h)))
        if rope is not None:
            cos, sin = rope
            q = jnp.concatenate([q[:, :text_len], ops.apply_rope(q[:, text_len:], cos, sin, "interleaved")], axis=1)
            k = jnp.concatenate([k[:, :text_len], ops.apply_rope(k[:, text_len:], cos, sin, "interleaved")], axis=1)
        o = (ops.attention(q, k, v, Full()) if attention is None else attention(q, k, v)).reshape(b, n, d)
        return self.to_out(o, groups=groups("attn1/to_out", o))


class AdaLayerNorm(nnx.Module):
    """diffusers' ``AdaLayerNorm(chunk_dim=1)`` (CogVideoX's ``norm_out``): ``(shift, scale) = linear(SiLU(temb))``,
    ``LN(x)(1 + scale) + shift`` with an affine LayerNorm."""

    def __init__(self, cfg: CogVideoXConfig, rngs: nnx.Rngs):
        self.linear = _linear(cfg.time_embed_dim, 2 * cfg.inner_dim, cfg, rngs)
        self.norm = AffineLayerNorm(cfg.inner_dim, cfg.norm_eps, cfg)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.linear(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
        return self.norm(x) * (1 + scale) + shift


class CogVideoXBlock(nnx.Module):
    """One expert-adaLN transformer block (module docstring). ``ROUTED_LINEARS``: the linears a ``route`` may give
    their own group ids (the attention projections and the feed-forward; the adaLN modulations keep the bucket)."""

    ROUTED_LINEARS = ("attn1/to_q", "attn1/to_k", "attn1/to_v", "attn1/to_out", "ff/proj", "ff/out")

    def __init__(self, cfg: CogVideoXConfig, rngs: nnx.Rngs):
        self.norm1 = LayerNormZero(cfg, rngs)
        self.attn1 = Attention(cfg, rngs)
        self.norm2 = LayerNormZero(cfg, rngs)
        self.ff = FeedForward(cfg.inner_dim, cfg, rngs)

    def __call__(self, x: jax.Array, c: jax.Array, temb: jax.Array, bucket: jax.Array, rope: Rope,
                 attention: JointAttention | None = None, *, route: Route | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """``x [B, N, d]`` video tokens, ``c [B, S, d]`` text tokens, ``temb [B, D_t]``, ``bucket [B]`` int, ``rope``
        the video tokens' ``(cos, sin) [N, d_h]`` or None -> the updated ``(x, c)``. ``route(name, x)`` (a name of
        ``ROUTED_LINEARS`` and that linear's input ``[B, S + N, in]``) returns the group ids the linear is called
        with instead of the timestep bucket (e.g. a precision chosen per step: ``jquant.video_mixed``)."""
        s, g = c.shape[1], bucket[:, None]

        def groups(name: str, _: jax.Array) -> jax.Array:
            return g

        groups = groups if route is None else route
        h, hc, gate, c_gate = self.norm1(x, c, temb, bucket)
        o = self.attn1(jnp.concatenate([hc, h], axis=1), s, rope, groups, attention)
        x, c = x + gate * o[:, s:], c + c_gate * o[:, :s]
        h, hc, gate, c_gate = self.norm2(x, c, temb, bucket)
        hf = jnp.concatenate([hc, h], axis=1)
        a = jax.nn.gelu(self.ff.proj(hf, groups=groups("ff/proj", hf)), approximate=True)  # sd3.FeedForward, routed
        f = self.ff.out(a, groups=groups("ff/out", a))
        return x + gate * f[:, s:], c + c_gate * f[:, :s]

    def calibration_forward(self, hidden: tuple[jax.Array, jax.Array], context: tuple):
        return self(*hidden, *context)


class PatchEmbed(nnx.Module):
    """Video patches -> tokens ``[B, N, d]`` (1.0: a ``p x p`` conv per frame; 1.5: a linear on ``(C, p_t, p, p)``
    patches) and ``text_proj``: text states -> ``[B, S, d]``."""

    def __init__(self, cfg: CogVideoXConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.inner_dim
        self.proj = (Conv(cfg.in_channels, d, (p, p), stride=p, use_bias=cfg.patch_bias,
                          param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs) if cfg.patch_size_t is None
                     else _linear(cfg.in_channels * cfg.patch_volume, d, cfg, rngs))
        self.text_proj = _linear(cfg.text_embed_dim, d, cfg, rngs)

    def __call__(self, latents: jax.Array) -> jax.Array:
        b, f, hh, ww, ch = latents.shape
        p = self.cfg.patch_size
        if self.cfg.patch_size_t is None:
            x = self.proj(latents.reshape(b * f, hh, ww, ch))
            return x.reshape(b, -1, x.shape[-1])
        pt = self.cfg.patch_size_t
        x = latents.reshape(b, f // pt, pt, hh // p, p, ww // p, p, ch).transpose(0, 1, 3, 5, 7, 2, 4, 6)
        return self.proj(x.reshape(b, -1, ch * self.cfg.patch_volume))


class CogVideoXTransformer(nnx.Module):
    """The CogVideoX transformer (module docstring). ``__call__(latents [B, F, H, W, C], timesteps [B], text
    [B, S, D_text]) -> [B, F, H, W, C_out]`` with diffusers' timestep convention (the model's v prediction)."""

    def __init__(self, config: CogVideoXConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg, d = config, config.inner_dim
        self.patch_embed = PatchEmbed(cfg, rngs)
        self.time_embedding = MLP2(d, cfg.time_embed_dim, cfg, rngs)
        self.transformer_blocks = nnx.List([CogVideoXBlock(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm_final = AffineLayerNorm(d, cfg.norm_eps, cfg)
        self.norm_out = AdaLayerNorm(cfg, rngs)
        self.proj_out = _linear(d, cfg.patch_volume * cfg.output_channels, cfg, rngs)

    # -- inputs -------------------------------------------------------------------------------------------------
    def bucket(self, timesteps: jax.Array) -> jax.Array:
        """Timestep bucket ids ``[B]``: how many of ``bucket_edges`` each timestep reaches."""
        t = jnp.asarray(timesteps, jnp.float32)
        return jnp.sum(t[:, None] >= jnp.asarray(self.config.bucket_edges), axis=1).astype(jnp.int32)

    def _check(self, latents, timesteps, text) -> None:
        cfg, name = self.config, "CogVideoXTransformer"
        shape, p, pt = tuple(latents.shape), cfg.patch_size, cfg.patch_size_t or 1
        if len(shape) != 5 or shape[-1] != cfg.in_channels:
            raise ValueError(f"{name}: latents must be [B, F, H, W, {cfg.in_channels}] (frames, height, width, "
                             f"channels last), got {shape}.")
        if shape[1] % pt or shape[2] % p or shape[3] % p:
            raise ValueError(f"{name}: latents {shape} need frames a multiple of patch_size_t={pt} and height and "
                             f"width multiples of patch_size={p}; pad or crop the latents.")
        if text.ndim != 3 or text.shape[0] != shape[0] or text.shape[-1] != cfg.text_embed_dim:
            raise ValueError(f"{name}: text must be [B={shape[0]}, S, {cfg.text_embed_dim}], got {tuple(text.shape)}.")
        if not cfg.use_rotary_positional_embeddings and text.shape[1] != cfg.max_text_seq_length:
            raise ValueError(f"{name}: text has {text.shape[1]} tokens, but a sin-cos position model takes exactly "
                             f"max_text_seq_length={cfg.max_text_seq_length} (pad the prompt states to that length).")
        if tuple(jnp.shape(timesteps)) != (shape[0],):
            raise ValueError(f"{name}: timesteps must be one per sample [{shape[0]}], got shape "
                             f"{jnp.shape(timesteps)}.")

    def grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The token grid ``(F / p_t, H / p, W / p)`` of latents ``[.., F, H, W, C]``."""
        cfg = self.config
        f, h, w = latent_shape[-4:-1]
        return f // (cfg.patch_size_t or 1), h // cfg.patch_size, w // cfg.patch_size

    def rotary(self, h: int, w: int, frame_positions: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """``(cos, sin) [F h w, d_h]`` (float32, interleaved pairs) of the video tokens of an ``[F, h, w]`` token grid
        whose frames sit at ``frame_positions [F]``."""
        cfg = self.config
        hd = cfg.attention_head_dim
        positions = jnp.asarray(rope_positions(cfg, h, w, frame_positions))
        angles = ops.rope_angles(positions, dims=(hd // 4, hd // 8 * 3, hd // 8 * 3), theta=ROPE_THETA)
        return ops.rope_cos_sin(angles, "interleaved")

    def embed(self, latents, timesteps, text, *, frame_positions: np.ndarray | None = None):
        """``(x [B, N, d], c [B, S, d], (temb [B, D_t], bucket [B], rope))``: the blocks' inputs. ``frame_positions``
        ``[F / p_t]`` (default ``0, 1, ..``) places the token frames for the positions (RoPE or sin-cos)."""
        self._check(latents, timesteps, text)
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        f, h, w = self.grid(latents.shape)
        frames = default_frame_positions(f) if frame_positions is None else np.asarray(frame_positions, np.float32)
        if frames.shape != (f,):
            raise ValueError(f"CogVideoXTransformer: frame_positions must be [{f}] (one per token frame), got "
                             f"{frames.shape}.")
        temb = self.time_embedding(timestep_sinusoid(timesteps, cfg.inner_dim).astype(dt))
        x = self.patch_embed(jnp.asarray(latents, dt))
        c = self.patch_embed.text_proj(jnp.asarray(text, dt))
        rope = None
        if cfg.use_rotary_positional_embeddings:
            rope = self.rotary(h, w, frames)
        else:
            x = x + jnp.asarray(sincos_3d(cfg, h, w, frames), dt)
        return x, c, (temb, self.bucket(timesteps), rope)

    def head(self, x: jax.Array, temb: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
        """``norm_final``, AdaLayerNorm (shift first) and ``proj_out``, unpatchified: ``[B, N, d]`` ->
        ``[B, F, H, W, C_out]``."""
        cfg = self.config
        out = self.proj_out(self.norm_out(self.norm_final(x), temb))
        f, h, w = self.grid(latent_shape)
        b, p, pt, co = out.shape[0], cfg.patch_size, cfg.patch_size_t or 1, cfg.output_channels
        out = out.reshape(b, f, h, w, co, pt, p, p).transpose(0, 1, 5, 2, 6, 3, 7, 4)
        return out.reshape(b, f * pt, h * p, w * p, co)

    def __call__(self, latents: jax.Array, timesteps: jax.Array, text: jax.Array, *,
                 attention: LayerAttention | None = None) -> jax.Array:
        """``attention(layer, q, k, v) -> o`` replaces each block's full attention (text tokens first)."""
        x, c, context = self.embed(latents, timesteps, text)
        for i, block in enumerate(self.transformer_blocks):
            x, c = block(x, c, *context, None if attention is None else functools.partial(attention, i))
        return self.head(x, context[0], latents.shape)

    # -- flow matching (text-to-video pipelines) and the block protocol of per-block samplers ------------------
    def flow_embed(self, latents: jax.Array, sigmas: jax.Array, text: jax.Array
                   ) -> tuple[tuple[jax.Array, jax.Array], tuple]:
        """``((x [B, N, d], c [B, S, d]), (temb, bucket, rope))``: the blocks' hidden pair (video stream first) and
        shared context at noise levels ``sigmas [B]`` in ``[0, 1]`` (fed as ``t = 1000 σ``)."""
        x, c, context = self.embed(latents, 1000.0 * jnp.asarray(sigmas, jnp.float32), text)
        return (x, c), context

    def flow_head(self, hidden: tuple[jax.Array, jax.Array], context: tuple, latent_shape: tuple[int, ...]
                  ) -> jax.Array:
        """The velocity ``[B, F, H, W, C]`` from the last block's hidden pair (``head`` of the video stream)."""
        return self.head(hidden[0], context[0], latent_shape)

    def flow_velocity(self, latents: jax.Array, sigmas: jax.Array, text: jax.Array) -> jax.Array:
        """The rectified-flow velocity ``ε - x_0`` ``[B, F, H, W, C]`` of latents ``[B, F, H, W, C]`` at noise levels
        ``sigmas [B]`` in ``[0, 1]`` (fed as ``t = 1000 σ``, as the other video families), text states ``[B, S,
        D_text]``: ``flow_head(blocks(flow_embed(..)))``. CogVideoX itself predicts a DDIM v; this is the output
        of a CogVideoX-architecture model trained with jquant's flow-matching objective
        (``jquant.sampling.training.flow_matching_loss``), which is what joins ``jquant.text_to_video.TextToVideo``."""
        if self.config.output_channels != self.config.in_channels:
            raise ValueError(f"CogVideoXTransformer.flow_velocity: out_channels={self.config.output_channels} differs "
                             f"from in_channels={self.config.in_channels}; a velocity has the latents' channels.")
        hidden, context = self.flow_embed(latents, sigmas, text)
        for block in self.transformer_blocks:
            hidden = block(*hidden, *context)
        return self.flow_head(hidden, context, latents.shape)

    def joint_layout(self, latent_shape: tuple[int, ...], text_len: int) -> tuple[int, int, int]:
        """``(n_video, n_text, text_start)`` of the joint attention: the text first, then the video tokens."""
        f, h, w = self.grid(latent_shape)
        return f * h * w, int(text_len), 0

    def joint_attention_layers(self) -> int:
        """Joint attentions per call (one per block), the layers of an attention plan."""
        return len(self.transformer_blocks)

    def calibration_call(self, batch: dict) -> jax.Array:
        """The model output of a calibration batch (``check_calibration``'s dict)."""
        return self(batch["latents"], batch["timesteps"], batch["text"])

    # -- calibration contract ---------------------------------------------------------------------------------
    def blocks(self) -> list[CogVideoXBlock]:
        return list(self.transformer_blocks)

    def calibration_stages(self) -> list[Stage]:
        """One stage over the blocks with hidden ``(x, c)`` and context ``(temb, bucket, rope)``."""
        return [Stage(blocks=self.blocks(), enter=_enter_blocks)]

    def activation_groups(self) -> ActivationGroups:
        edges = (0.0, *self.config.bucket_edges, float(NUM_TRAIN_TIMESTEPS))
        names = tuple(f"t[{a:g},{b:g}{']' if b == NUM_TRAIN_TIMESTEPS else ')'}" for a, b in zip(edges[:-1], edges[1:]))
        return ActivationGroups(names=names, sites=r"transformer_blocks/.*")

    def check_calibration(self, calib) -> dict:
        """``{"latents" [N, F, H, W, C], "timesteps" [N] in [0, 1000], "text" [N, S, D_text]}`` (or ``"sigmas" [N]`` in
        ``[0, 1]`` instead of the timesteps) -> float32 numpy arrays with the timesteps (leaves agreeing on N, shapes
        this model takes)."""
        keys, flow = {"latents", "timesteps", "text"}, {"latents", "sigmas", "text"}
        if not isinstance(calib, dict) or set(calib) not in (keys, flow):
            raise ValueError(f"CogVideoXTransformer calibration must be a dict with keys {sorted(keys)} (latents, "
                             "timesteps and text states drawn along sampler trajectories), or "
                             f"{sorted(flow)} (a text-to-video pipeline's trajectory_calibration), got "
                             f"{sorted(calib) if isinstance(calib, dict) else type(calib).__name__}.")
        num_samples(calib)
        out = {k: np.asarray(v, np.float32) for k, v in calib.items()}
        if "sigmas" in out:  # flow_velocity's convention: t = 1000 σ
            out["timesteps"] = NUM_TRAIN_TIMESTEPS * out.pop("sigmas")
        t = out["timesteps"]
        self._check(out["latents"], t, out["text"])
        if not np.all(np.isfinite(t)):
            raise ValueError("calib['timesteps'] must be finite.")
        edges = np.asarray(self.config.bucket_edges)
        buckets = np.where(t < 0, -1, np.where(t > NUM_TRAIN_TIMESTEPS, len(edges) + 1,
                                               np.sum(t[:, None] >= edges, axis=1)))
        check_group_ids(buckets, self.activation_groups(),
                        f"calib['timesteps'] (as timestep buckets; t must lie in [0, {NUM_TRAIN_TIMESTEPS}])")
        return out


def _enter_blocks(m: CogVideoXTransformer, batch: dict, previous):
    """``calibration_stages``' entry (module level, so it compiles once per model structure)."""
    x, c, context = m.embed(batch["latents"], jnp.asarray(batch["timesteps"], jnp.float32), batch["text"])
    return (x, c), context


def init_model(config: CogVideoXConfig, key: jax.Array) -> CogVideoXTransformer:
    """A randomly initialised CogVideoX transformer (linears ~ N(0, 0.02), biases 0, norms 1)."""
    check_dtypes_available(config)
    return CogVideoXTransformer(config, rngs=nnx.Rngs(params=key))


def abstract_model(config: CogVideoXConfig) -> CogVideoXTransformer:
    return nnx.eval_shape(lambda: CogVideoXTransformer(config, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------------------------
# diffusers import / export
# ---------------------------------------------------------------------------------------------------------------

_HANDLED = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "time_embed_dim",
            "text_embed_dim", "num_layers", "attention_bias", "sample_width", "sample_height", "sample_frames",
            "patch_size", "patch_size_t", "temporal_compression_ratio", "max_text_seq_length", "norm_eps",
            "spatial_interpolation_scale", "temporal_interpolation_scale", "use_rotary_positional_embeddings",
            "patch_bias")
# Attributes whose other values compute something jquant does not implement: (diffusers' default, why refused).
_FIXED = {"flip_sin_to_cos": True, "freq_shift": 0, "ofs_embed_dim": None, "activation_fn": "gelu-approximate",
          "timestep_activation_fn": "silu", "norm_elementwise_affine": True, "use_learned_positional_embeddings": False}
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "dropout"}


def config_from_diffusers(config: dict, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None,
                          bucket_edges: tuple[float, ...] | None = None) -> CogVideoXConfig:
    """A ``CogVideoXConfig`` from a diffusers ``config.json`` dict; attributes this reader does not handle, and
    variants it does not implement (``ofs`` embeddings, learned positions, other activations), are refused."""
    unknown = sorted(set(config) - set(_HANDLED) - set(_FIXED) - _IGNORED)
    if unknown:
        raise ValueError(f"CogVideoX config.json has attributes jquant does not handle: {unknown}; it would silently "
                         "compute something else, so it is refused.")
    for key, value in _FIXED.items():
        if key in config and config[key] != value:
            raise ValueError(f"CogVideoX config.json has {key}={config[key]!r}; jquant's CogVideoX family implements "
                             f"only {key}={value!r} (CogVideoX 1.0 / 1.5 text-to-video transformers).")
    values = {k: config[k] for k in _HANDLED if k in config}
    if "out_channels" not in config:
        values["out_channels"] = 16  # diffusers' default
    extra = {} if bucket_edges is None else {"bucket_edges": bucket_edges}
    return CogVideoXConfig(**values, **extra, dtype=dtype, param_dtype=param_dtype or dtype)


def config_to_diffusers(cfg: CogVideoXConfig) -> dict:
    fields = {k: getattr(cfg, k) for k in _HANDLED}
    fields["out_channels"] = cfg.output_channels
    return {"_class_name": CLASS_NAME, **fields, **_FIXED}


def _tensor_names(model: CogVideoXTransformer) -> dict[str, tuple[tuple, str]]:
    """diffusers tensor name -> (jquant state path, layout) for every parameter."""
    names: dict[str, tuple[tuple, str]] = {}

    def linear(prefix: str, path: tuple, bias: bool = True):
        names[f"{prefix}.weight"] = ((*path, "kernel"), "linear")
        if bias:
            names[f"{prefix}.bias"] = ((*path, "bias"), "vector")

    def norm(prefix: str, path: tuple):
        names[f"{prefix}.weight"] = ((*path, "weight"), "vector")
        names[f"{prefix}.bias"] = ((*path, "bias"), "vector")

    cfg = model.config
    conv = cfg.patch_size_t is None
    names["patch_embed.proj.weight"] = (("patch_embed", "proj", "kernel"), "conv" if conv else "linear")
    if cfg.patch_bias or not conv:  # 1.5's linear patch embedding always has a bias
        names["patch_embed.proj.bias"] = (("patch_embed", "proj", "bias"), "vector")
    linear("patch_embed.text_proj", ("patch_embed", "text_proj"))
    for lin in ("linear_1", "linear_2"):
        linear(f"time_embedding.{lin}", ("time_embedding", lin))
    for i in range(len(model.transformer_blocks)):
        pre, at = f"transformer_blocks.{i}", ("transformer_blocks", i)
        for n in ("norm1", "norm2"):
            linear(f"{pre}.{n}.linear", (*at, n, "linear"))
            norm(f"{pre}.{n}.norm", (*at, n, "norm"))
        for proj in ("to_q", "to_k", "to_v"):
            linear(f"{pre}.attn1.{proj}", (*at, "attn1", proj), cfg.attention_bias)
        linear(f"{pre}.attn1.to_out.0", (*at, "attn1", "to_out"))
        norm(f"{pre}.attn1.norm_q", (*at, "attn1", "norm_q"))
        norm(f"{pre}.attn1.norm_k", (*at, "attn1", "norm_k"))
        linear(f"{pre}.ff.net.0.proj", (*at, "ff", "proj"))
        linear(f"{pre}.ff.net.2", (*at, "ff", "out"))
    norm("norm_final", ("norm_final",))
    linear("norm_out.linear", ("norm_out", "linear"))
    norm("norm_out.norm", ("norm_out", "norm"))
    linear("proj_out", ("proj_out",))
    return names


def _from_torch(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return value.T
    if layout == "conv":  # [C_out, C_in, kh, kw] -> [kh kw C_in, C_out]
        return value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    return value


def _to_torch(value: np.ndarray, layout: str, cfg: CogVideoXConfig) -> np.ndarray:
    if layout == "linear":
        return value.T
    if layout == "conv":
        p = cfg.patch_size
        return value.reshape(p, p, cfg.in_channels, -1).transpose(3, 2, 0, 1)
    return value


def from_tensors(cfg: CogVideoXConfig, tensors: dict[str, np.ndarray], *, source: str = "tensors"
                 ) -> CogVideoXTransformer:
    """A model of ``cfg`` holding diffusers-named ``tensors`` (every tensor used, none missing)."""
    abstract = abstract_model(cfg)
    entries = {path: (name, functools.partial(_from_torch, layout=layout))
               for name, (path, layout) in _tensor_names(abstract).items()}
    return load_parameters(abstract, entries, tensors, param_dtype=cfg.param_dtype, source=source, what=CLASS_NAME)


def from_diffusers(path: str | os.PathLike, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None,
                   bucket_edges: tuple[float, ...] | None = None) -> CogVideoXTransformer:
    """Read a diffusers ``CogVideoXTransformer3DModel`` folder (``config.json`` + safetensors)."""
    from jquant.models import hf_io

    config = hf_io.read_diffusers_config(path, (CLASS_NAME,))
    cfg = config_from_diffusers(config, dtype=dtype, param_dtype=param_dtype, bucket_edges=bucket_edges)
    check_dtypes_available(cfg)
    return from_tensors(cfg, hf_io.read_safetensors(path, weights_name=hf_io.DIFFUSERS_FILE), source=str(path))


def to_tensors(model: CogVideoXTransformer) -> dict[str, np.ndarray]:
    """diffusers-named tensors of a float ``model`` (PyTorch layouts)."""
    entries = {path: (name, functools.partial(_to_torch, layout=layout, cfg=model.config))
               for name, (path, layout) in _tensor_names(model).items()}
    return export_parameters(model, entries)


def to_diffusers(model: CogVideoXTransformer, path: str | os.PathLike, *, overwrite: bool = False,
                 extra_files=None) -> Path:
    """Write ``model`` as a diffusers ``CogVideoXTransformer3DModel`` folder, atomically."""
    from jquant.models import hf_io

    return hf_io.write_checkpoint(path, config_to_diffusers(model.config), to_tensors(model), overwrite=overwrite,
                                  weights_name=hf_io.DIFFUSERS_FILE, extra_files=extra_files)


FAMILY = Family(
    name="cogvideox",
    config_class=CogVideoXConfig,
    model_class=CogVideoXTransformer,
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, CogVideoXConfig),
    checkpoint_protocol="the manifest's config holds the CogVideoXConfig fields (config_io.dataclass_config_to_json).",
    diffusers_class_names=(CLASS_NAME,),
    from_diffusers=from_diffusers,
    to_diffusers=to_diffusers,
    presets={
        # Trained by experiments/train_video_models.py --stage cogvideox (flow matching, not CogVideoX's DDIM v, on the
        # latents of jq-video-vae-tiny: 17 frames of 32x32 -> 5 x 8 x 8 x 16, sample_frames 17 = (5 - 1) x 4 + 1,
        # patches 2 -> 5 x 4 x 4 video tokens) beside jq-video-tiny; 5 blocks of 2 heads x 64 with 3-D RoPE (5B style;
        # frame 16, row 24, column 24 features), ~2.1 M parameters as jq-video-tiny; text states of jq-llama-tiny (192)
        # padded to the stage's 64 tokens (max_text_seq_length; RoPE models take any length).
        "jq-cogvideox-tiny": CogVideoXConfig(num_attention_heads=2, attention_head_dim=64, in_channels=16,
                                             out_channels=16, time_embed_dim=128, text_embed_dim=192, num_layers=5,
                                             sample_width=8, sample_height=8, sample_frames=17, patch_size=2,
                                             max_text_seq_length=64, use_rotary_positional_embeddings=True),
    },
    keep_float=("patch_embed/proj", "patch_embed/text_proj", "time_embedding/linear_1", "time_embedding/linear_2",
                "norm_out/linear", "proj_out"),
)
