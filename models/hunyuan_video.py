"""HunyuanVideo's video transformer (diffusers' ``HunyuanVideoTransformer3DModel``), channels last.

Kong et al. 2024, "HunyuanVideo: A Systematic Framework For Large Video Generative Models" (§4.2, diffusers
``transformer_hunyuan_video.py``). Latents ``z [B, F, H, W, C]`` are cut into ``p_t x p x p`` patches by a 3-D
convolution (``x_embedder``), ``N = (F / p_t)(H / p)(W / p)`` video tokens in (frame, row, column) order. Text
states ``s [B, T, D_text]`` with their mask ``m [B, T]`` pass the token refiner (``context_embedder``)::

    y_r = TE_r(sinusoid_256(t)) + TP_r(Σ_t m_t s_t / Σ_t m_t)          (masked-mean pooled text)
    c = RefinerBlocks(W_in s; y_r; M),   M[i, j] = (m_i ∧ m_j) ∨ (j = 0)

and the blocks' conditioning is ``y = TE(sinusoid_256(t)) [+ GE(sinusoid_256(g))] + TP(pooled)`` (``pooled``: the
second text encoder's pooled output; ``GE`` in guidance-distilled models). RoPE covers the video tokens only:
each head's ``d_h`` features split over (frame, row, column) by ``rope_axes_dim``, interleaved pairs, θ = 256.
Then double-stream blocks on ``(x, c)``, single-stream blocks on ``[x; c]`` (``hunyuan_video_blocks``) and
``out = W_out(LN(x)(1 + scale) + shift)`` on the video tokens, un-patchified to ``[B, F, H, W, C_out]``. The text
padding enters the joint attention as diffusers builds it: every query sees the keys ``j < N + Σ_t m_t``.

The pipeline feeds ``t = 1000 σ`` (FlowMatchEulerDiscreteScheduler timesteps) and guidance ``1000 g``;
``flow_velocity`` takes σ in ``[0, 1]`` and the guidance scale ``g``, ``__call__`` diffusers' values. Frame
positions are an argument (``frame_positions [F / p_t]``, default ``0, 1, ..``): a sampler that merges latent
frames (VGDFR) can keep the merged frames' original temporal positions in RoPE, and ``flow_velocity`` gives chosen
blocks (``global_blocks``) tables at other positions (``global_frame_positions``: DyRoPE). ``embed`` (the blocks' inputs;
context ``(y, bucket, cos, sin, key_lengths)``), ``rope_tables``, the blocks and ``head`` are public, so a caller
can also run chosen layers with tables of other positions.

Quantization: every linear inside the double / single blocks receives the sample's timestep bucket as its group
id (``activation_groups``). Calibration data is ``{"latents" [N, F, H, W, C], "sigmas" [N], "text" [N, T, D_text],
"text_mask" [N, T], "pooled" [N, P]}`` (+ ``"guidance" [N]`` for a guidance-embedding model); two stages (double
blocks on ``(x, c)``, single blocks on ``[x; c]``), context ``(y, bucket, cos, sin, key lengths)``. The patch
embedding, the whole token refiner (it runs on the text only, once per prompt and step, whatever the video
length), the time / guidance / pooled-text MLPs, ``norm_out`` and ``proj_out`` are ``keep_float``.
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
from jquant.models.hunyuan_video_blocks import DoubleBlock, RefinerBlock, SingleBlock, linear
from jquant.models.layers import Conv
from jquant.models.sd3 import MLP2, layer_norm, timestep_sinusoid
from jquant.models.tensor_io import export_parameters, load_parameters
from jquant.sites import ActivationGroups
from jquant.transforms.adaln_smoothing import ModulatedNorm

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
CLASS_NAME = "HunyuanVideoTransformer3DModel"
_TIME_CHANNELS = 256
_NAME = "HunyuanVideoTransformer"


@dataclasses.dataclass(frozen=True, kw_only=True)
class HunyuanVideoConfig:
    """Sizes of a HunyuanVideo transformer (diffusers' config fields) plus ``guidance`` (the scale ``flow_velocity``
    feeds a guidance-embedding model unless told otherwise), ``bucket_edges`` (σ edges of the timestep buckets used
    as activation groups) and the compute / storage dtypes. ``image_condition_type`` may be None or
    ``"latent_concat"`` (the image latents are concatenated to the channels by the pipeline: same transformer)."""

    in_channels: int = 16
    out_channels: int | None = None
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    num_layers: int = 2
    num_single_layers: int = 2
    num_refiner_layers: int = 1
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = False
    text_embed_dim: int = 128
    pooled_projection_dim: int = 128
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (8, 12, 12)
    image_condition_type: str | None = None
    guidance: float = 6.0
    bucket_edges: tuple[float, ...] = (0.25, 0.5, 0.75)
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "bucket_edges", tuple(float(e) for e in self.bucket_edges))
        object.__setattr__(self, "rope_axes_dim", tuple(self.rope_axes_dim))
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        for name in ("in_channels", "num_attention_heads", "attention_head_dim", "num_layers", "patch_size",
                     "patch_size_t", "text_embed_dim", "pooled_projection_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HunyuanVideoConfig.{name} must be a positive int, got {value!r}.")
        for name in ("num_single_layers", "num_refiner_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"HunyuanVideoConfig.{name} must be an int >= 0, got {value!r}.")
        if self.out_channels is not None and (isinstance(self.out_channels, bool)
                                              or not isinstance(self.out_channels, int) or self.out_channels < 1):
            raise ValueError(f"HunyuanVideoConfig.out_channels must be None or a positive int, got "
                             f"{self.out_channels!r}.")
        if not self.mlp_ratio > 0 or int(self.inner_dim * self.mlp_ratio) < 1:
            raise ValueError(f"HunyuanVideoConfig.mlp_ratio={self.mlp_ratio} must give a positive MLP width.")
        if self.qk_norm != "rms_norm":
            raise ValueError(f"HunyuanVideoConfig.qk_norm={self.qk_norm!r} is not supported; use 'rms_norm'.")
        if self.image_condition_type not in (None, "latent_concat"):
            raise ValueError(f"HunyuanVideoConfig.image_condition_type={self.image_condition_type!r} is not supported "
                             "(token_replace modulates the first frame separately); use None or 'latent_concat'.")
        if not isinstance(self.guidance_embeds, bool):
            raise ValueError(f"HunyuanVideoConfig.guidance_embeds must be a bool, got {self.guidance_embeds!r}.")
        dims = self.rope_axes_dim
        if (len(dims) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 2 or d % 2 for d in dims)
                or sum(dims) != self.attention_head_dim):
            raise ValueError(f"HunyuanVideoConfig.rope_axes_dim={dims} must be three positive even ints (frame, row, "
                             f"column) summing to attention_head_dim={self.attention_head_dim}.")
        if not self.rope_theta > 0 or not np.isfinite(self.guidance):
            raise ValueError(f"HunyuanVideoConfig: rope_theta={self.rope_theta} must be positive and guidance="
                             f"{self.guidance} finite.")
        if list(self.bucket_edges) != sorted(set(self.bucket_edges)) or not all(0 < e < 1 for e in self.bucket_edges):
            raise ValueError(f"HunyuanVideoConfig.bucket_edges must increase strictly inside (0, 1), got "
                             f"{self.bucket_edges}.")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def patch(self) -> tuple[int, int, int]:
        return self.patch_size_t, self.patch_size, self.patch_size

    def replace(self, **changes) -> HunyuanVideoConfig:
        return dataclasses.replace(self, **changes)


def refiner_mask(text_mask: jax.Array) -> jax.Array:
    """The token refiner's self-attention mask ``[B, T, T]`` of ``text_mask [B, T]``: query ``i`` sees key ``j`` when
    both are real tokens, and every query sees key 0 (so a padding row is never empty), as diffusers builds it."""
    m = jnp.asarray(text_mask) != 0
    return (m[:, :, None] & m[:, None, :]) | (jnp.arange(m.shape[1]) == 0)[None, None, :]


def video_positions(grid: tuple[int, int, int], frame_positions: jax.Array | None = None) -> jax.Array:
    """Position ids ``[f h w, 3]`` float32 of a token grid ``(f, h, w)`` in (frame, row, column) order:
    ``(frame_positions[i], row, column)``, ``frame_positions`` defaulting to ``0 .. f - 1``."""
    f, h, w = grid
    frames = jnp.arange(f, dtype=jnp.float32) if frame_positions is None else jnp.asarray(frame_positions, jnp.float32)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    spatial = np.stack([rows, cols], axis=-1).reshape(1, h * w, 2).astype(np.float32)
    return jnp.concatenate([jnp.broadcast_to(frames[:, None, None], (f, h * w, 1)),
                            jnp.broadcast_to(spatial, (f, h * w, 2))], axis=-1).reshape(f * h * w, 3)


class TokenRefiner(nnx.Module):
    """diffusers' ``HunyuanVideoTokenRefiner``: ``proj_in``, the refiner conditioning (timestep + masked-mean pooled
    text) and the refiner blocks (module docstring)."""

    def __init__(self, cfg: HunyuanVideoConfig, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.proj_in = linear(cfg.text_embed_dim, d, cfg, rngs)
        self.timestep_embedder = MLP2(_TIME_CHANNELS, d, cfg, rngs)
        self.text_embedder = MLP2(cfg.text_embed_dim, d, cfg, rngs)
        self.refiner_blocks = nnx.List([RefinerBlock(cfg, rngs=rngs) for _ in range(cfg.num_refiner_layers)])

    def __call__(self, text: jax.Array, sinusoid: jax.Array, text_mask: jax.Array) -> jax.Array:
        """``text [B, T, D_text]``, ``sinusoid [B, 256]`` of the timestep, ``text_mask [B, T]`` -> ``[B, T, d]``."""
        m = (jnp.asarray(text_mask) != 0).astype(jnp.promote_types(text.dtype, jnp.float32))[..., None]
        pooled = ((text * m).sum(axis=1) / m.sum(axis=1)).astype(text.dtype)
        temb = self.timestep_embedder(sinusoid.astype(text.dtype)) + self.text_embedder(pooled)
        c = self.proj_in(text)
        mask = refiner_mask(text_mask)
        for block in self.refiner_blocks:
            c = block(c, temb, mask)
        return c


class HunyuanVideoTransformer(nnx.Module):
    """The video DiT (module docstring). ``__call__(latents [B, F, H, W, C], timesteps [B], text [B, T, D_text],
    text_mask [B, T], pooled [B, P], guidance [B] | None) -> [B, F, H, W, C_out]`` in diffusers' units
    (``t = 1000 σ``, guidance ``1000 g``); ``flow_velocity`` takes σ and ``g``."""

    def __init__(self, config: HunyuanVideoConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg, d = config, config.inner_dim
        self.x_embedder = Conv(cfg.in_channels, d, cfg.patch, stride=cfg.patch, use_bias=True,
                               param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.context_embedder = TokenRefiner(cfg, rngs=rngs)
        self.timestep_embedder = MLP2(_TIME_CHANNELS, d, cfg, rngs)
        self.guidance_embedder = MLP2(_TIME_CHANNELS, d, cfg, rngs) if cfg.guidance_embeds else None
        self.text_embedder = MLP2(cfg.pooled_projection_dim, d, cfg, rngs)
        self.transformer_blocks = nnx.List([DoubleBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nnx.List([SingleBlock(cfg, rngs=rngs) for _ in range(cfg.num_single_layers)])
        self.norm_out = linear(d, 2 * d, cfg, rngs)
        self.proj_out = linear(d, int(np.prod(cfg.patch)) * cfg.output_channels, cfg, rngs)

    # -- inputs -------------------------------------------------------------------------------------------------
    def bucket(self, sigmas: jax.Array) -> jax.Array:
        """Timestep bucket ids ``[B]``: how many of ``bucket_edges`` each σ reaches."""
        return jnp.sum(jnp.asarray(sigmas)[:, None] >= jnp.asarray(self.config.bucket_edges), axis=1).astype(jnp.int32)

    def grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The token grid ``(F / p_t, H / p, W / p)`` of latents ``[B, F, H, W, C]`` (checked)."""
        cfg, shape = self.config, tuple(latent_shape)
        if len(shape) != 5 or shape[-1] != cfg.in_channels:
            raise ValueError(f"{_NAME}: latents must be [B, F, H, W, {cfg.in_channels}] (frames, height, width, "
                             f"channels last), got {shape}.")
        for size, patch, what in zip(shape[1:4], cfg.patch, ("frames F", "height H", "width W")):
            if size % patch:
                raise ValueError(f"{_NAME}: latents {what}={size} is not a multiple of its patch size {patch} "
                                 f"(patch_size_t={cfg.patch_size_t}, patch_size={cfg.patch_size}); crop or pad it.")
        return tuple(s // p for s, p in zip(shape[1:4], cfg.patch))

    def _check(self, latents, timesteps, text, text_mask, pooled, guidance, frame_positions) -> tuple[int, int, int]:
        cfg = self.config
        grid = self.grid(latents.shape)
        b = latents.shape[0]
        if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != cfg.text_embed_dim:
            raise ValueError(f"{_NAME}: text must be [B={b}, T, {cfg.text_embed_dim}] (text_embed_dim), got "
                             f"{tuple(text.shape)}.")
        if tuple(jnp.shape(text_mask)) != tuple(text.shape[:2]):
            raise ValueError(f"{_NAME}: text_mask must be [B, T] = {tuple(text.shape[:2])} (1 for real tokens, 0 for "
                             f"right padding), got {tuple(jnp.shape(text_mask))}.")
        if tuple(pooled.shape) != (b, cfg.pooled_projection_dim):
            raise ValueError(f"{_NAME}: pooled must be [{b}, {cfg.pooled_projection_dim}], got {tuple(pooled.shape)}.")
        if tuple(jnp.shape(timesteps)) != (b,):
            raise ValueError(f"{_NAME}: timesteps / sigmas must be one per sample [{b}], got shape "
                             f"{jnp.shape(timesteps)}.")
        if cfg.guidance_embeds and (guidance is None or tuple(jnp.shape(guidance)) != (b,)):
            raise ValueError(f"{_NAME}: this model embeds guidance; pass guidance [{b}] (one scale per sample), got "
                             f"{None if guidance is None else jnp.shape(guidance)}.")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError(f"{_NAME}: guidance was given but this model has no guidance embedding "
                             "(guidance_embeds=False); pass guidance=None.")
        if frame_positions is not None and tuple(jnp.shape(frame_positions)) != (grid[0],):
            raise ValueError(f"{_NAME}: frame_positions must be [F / patch_size_t = {grid[0]}] (one temporal RoPE "
                             f"position per latent frame), got shape {jnp.shape(frame_positions)}.")
        return grid

    def rope_tables(self, grid: tuple[int, int, int], frame_positions: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
        """``cos, sin [f h w, d_h]`` float32 of the video tokens (diffusers' ``HunyuanVideoRotaryPosEmbed``, with the
        frame axis at ``frame_positions`` when given)."""
        cfg = self.config
        angles = ops.rope_angles(video_positions(grid, frame_positions), dims=cfg.rope_axes_dim, theta=cfg.rope_theta)
        return ops.rope_cos_sin(angles, "interleaved")

    def embed(self, latents, timesteps, text, text_mask, pooled, guidance=None, *, sigmas=None, frame_positions=None):
        """``(x [B, N, d], c [B, T, d], (temb [B, d], bucket [B], cos, sin [N, d_h], key_lengths [B]))``: the blocks'
        inputs. ``timesteps`` / ``guidance`` in diffusers' units; ``sigmas`` (for the buckets) default to
        ``timesteps / 1000``."""
        grid = self._check(latents, timesteps, text, text_mask, pooled, guidance, frame_positions)
        dt = jnp.dtype(self.config.dtype)
        x = self.x_embedder(jnp.asarray(latents, dt))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        sinusoid = timestep_sinusoid(timesteps)
        temb = self.timestep_embedder(sinusoid.astype(dt)) + self.text_embedder(jnp.asarray(pooled, dt))
        if guidance is not None:
            temb = temb + self.guidance_embedder(timestep_sinusoid(guidance).astype(dt))
        c = self.context_embedder(jnp.asarray(text, dt), sinusoid, text_mask)
        key_lengths = x.shape[1] + jnp.sum(jnp.asarray(text_mask) != 0, axis=1, dtype=jnp.int32)
        cos, sin = self.rope_tables(grid, frame_positions)
        sig = jnp.asarray(timesteps, jnp.float32) / 1000.0 if sigmas is None else jnp.asarray(sigmas, jnp.float32)
        return x, c, (temb, self.bucket(sig), cos, sin, key_lengths)

    def head(self, x: jax.Array, temb: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """AdaLayerNormContinuous + ``proj_out`` + un-patchify: ``[B, N, d]`` -> ``[B, F, H, W, C_out]`` (``proj_out``'s
        columns ordered (channel, t, row, column) as diffusers')."""
        scale, shift = jnp.split(self.norm_out(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
        out = self.proj_out(layer_norm(x) * (1 + scale) + shift)
        (f, h, w), (pt, p, _) = grid, self.config.patch
        b, c = out.shape[0], self.config.output_channels
        out = out.reshape(b, f, h, w, c, pt, p, p).transpose(0, 1, 5, 2, 6, 3, 7, 4)
        return out.reshape(b, f * pt, h * p, w * p, c)

    def _blocks(self, x: jax.Array, c: jax.Array, context: tuple, global_context: tuple | None = None,
                global_blocks: tuple[int, ...] = ()) -> jax.Array:
        """The double then single blocks; block ``b`` (numbered double first, then single) in ``global_blocks`` runs
        on ``global_context`` (its RoPE tables at the global frame positions), the others on ``context``."""
        pick = lambda b: global_context if b in global_blocks else context  # noqa: E731
        for b, block in enumerate(self.transformer_blocks):
            x, c = block(x, c, *pick(b))
        h = jnp.concatenate([x, c], axis=1)
        for b, block in enumerate(self.single_transformer_blocks, start=len(self.transformer_blocks)):
            h = block(h, *pick(b))
        return h[:, :x.shape[1]]

    def _global_context(self, context: tuple, grid: tuple[int, int, int], global_frame_positions,
                        global_blocks) -> tuple | None:
        """``context`` with the RoPE tables at ``global_frame_positions`` (DyRoPE), or None when not used."""
        if global_frame_positions is None:
            if global_blocks:
                raise ValueError(f"{_NAME}: global_blocks={tuple(global_blocks)} needs global_frame_positions (the "
                                 "kept latent frames' original indices).")
            return None
        n = len(self.transformer_blocks) + len(self.single_transformer_blocks)
        if not all(isinstance(b, int) and 0 <= b < n for b in global_blocks):
            raise ValueError(f"{_NAME}: global_blocks must be block indices in [0, {n}) (double blocks first, then "
                             f"single), got {tuple(global_blocks)}.")
        if tuple(jnp.shape(global_frame_positions)) != (grid[0],):
            raise ValueError(f"{_NAME}: global_frame_positions must be [F / patch_size_t = {grid[0]}], got shape "
                             f"{jnp.shape(global_frame_positions)}.")
        temb, bucket, _, _, key_lengths = context
        cos, sin = self.rope_tables(grid, global_frame_positions)
        return temb, bucket, cos, sin, key_lengths

    def __call__(self, latents: jax.Array, timesteps: jax.Array, text: jax.Array, text_mask: jax.Array,
                 pooled: jax.Array, guidance: jax.Array | None = None, *,
                 frame_positions: jax.Array | None = None) -> jax.Array:
        """diffusers' forward, channels last: ``timesteps`` and ``guidance`` as the pipeline passes them (``1000 σ``,
        ``1000 g``); ``frame_positions [F / p_t]`` replaces the RoPE frame indices ``0, 1, ..``."""
        grid = self.grid(latents.shape)
        x, c, context = self.embed(latents, timesteps, text, text_mask, pooled, guidance,
                                   frame_positions=frame_positions)
        return self.head(self._blocks(x, c, context), context[0], grid)

    def _guidance(self, guidance, batch: int):
        """Guidance scales ``[B]`` of a guidance-embedding model (``config.guidance`` when None), else None."""
        if not self.config.guidance_embeds:
            if guidance is not None:
                raise ValueError(f"{_NAME}: guidance was given but this model has no guidance embedding "
                                 "(guidance_embeds=False); pass guidance=None.")
            return None
        value = jnp.asarray(self.config.guidance if guidance is None else guidance, jnp.float32)
        return jnp.broadcast_to(value, (batch,)) if value.ndim == 0 else value

    def flow_velocity(self, latents: jax.Array, sigmas: jax.Array, text: jax.Array, text_mask: jax.Array,
                      pooled: jax.Array, *, guidance: jax.Array | float | None = None,
                      frame_positions: jax.Array | None = None, global_frame_positions: jax.Array | None = None,
                      global_blocks: tuple[int, ...] = ()) -> jax.Array:
        """The rectified-flow velocity ``[B, F, H, W, C]`` of latents ``[B, F, H, W, C]`` at noise levels ``sigmas
        [B]`` in ``[0, 1]`` (fed as ``t = 1000 σ``); ``guidance`` (scalar or ``[B]``, fed as ``1000 g``) defaults to
        ``config.guidance`` for a guidance-embedding model and must be None otherwise.

        DyRoPE (VGDFR, spec ``vgdfr.md`` §3.2(g)): the blocks numbered in the static ``global_blocks`` (double blocks
        ``0 .. num_layers - 1``, then single blocks) take RoPE at ``global_frame_positions [F]`` (the merged latent's
        original frame indices), the others at ``frame_positions`` (default ``0 .. F - 1``, the *local* ones).
        Without ``global_frame_positions`` the computation is today's."""
        if self.config.output_channels != self.config.in_channels:
            raise ValueError(f"{_NAME}.flow_velocity: out_channels={self.config.output_channels} differs from "
                             f"in_channels={self.config.in_channels}; a velocity has the latents' channels.")
        sigmas = jnp.asarray(sigmas, jnp.float32)
        g = self._guidance(guidance, latents.shape[0])
        grid = self.grid(latents.shape)
        x, c, context = self.embed(latents, 1000.0 * sigmas, text, text_mask, pooled,
                                   None if g is None else 1000.0 * g, sigmas=sigmas, frame_positions=frame_positions)
        global_context = self._global_context(context, grid, global_frame_positions, tuple(global_blocks))
        return self.head(self._blocks(x, c, context, global_context, tuple(global_blocks)), context[0], grid)

    def calibration_call(self, batch: dict) -> jax.Array:
        """The velocity of a calibration batch (``check_calibration``'s dict): what whole-model statistics run."""
        return self.flow_velocity(batch["latents"], batch["sigmas"], batch["text"], batch["text_mask"],
                                  batch["pooled"], guidance=batch.get("guidance"))

    def modulated_norm_groups(self) -> list[ModulatedNorm]:
        """The adaLN-modulated inputs of every block (``jquant.transforms.adaln_smoothing``): in a double block
        ``norm1``'s (shift, scale) = columns ``[0, d), [d, 2d)`` before to_q/k/v and ``[3d, 4d), [4d, 5d)`` before
        ``ff.proj``, ``norm1_context``'s likewise before add_q/k/v_proj and ``ff_context.proj``; in a single block
        ``norm``'s ``[0, d), [d, 2d)`` before to_q/k/v and ``proj_mlp``."""
        d = self.config.inner_dim
        groups = []
        for i in range(len(self.transformer_blocks)):
            p = f"transformer_blocks/{i}"
            groups += [ModulatedNorm(f"{p}/norm1", (0, d), (d, 2 * d), (f"{p}/to_q", f"{p}/to_k", f"{p}/to_v")),
                       ModulatedNorm(f"{p}/norm1", (3 * d, 4 * d), (4 * d, 5 * d), (f"{p}/ff/proj",)),
                       ModulatedNorm(f"{p}/norm1_context", (0, d), (d, 2 * d),
                                     (f"{p}/add_q_proj", f"{p}/add_k_proj", f"{p}/add_v_proj")),
                       ModulatedNorm(f"{p}/norm1_context", (3 * d, 4 * d), (4 * d, 5 * d), (f"{p}/ff_context/proj",))]
        for i in range(len(self.single_transformer_blocks)):
            p = f"single_transformer_blocks/{i}"
            groups.append(ModulatedNorm(f"{p}/norm", (0, d), (d, 2 * d),
                                        (f"{p}/to_q", f"{p}/to_k", f"{p}/to_v", f"{p}/proj_mlp")))
        return groups

    # -- calibration contract ---------------------------------------------------------------------------------
    def _enter(self, batch: dict):
        sigmas = jnp.asarray(batch["sigmas"], jnp.float32)
        g = self._guidance(batch.get("guidance"), sigmas.shape[0])
        x, c, context = self.embed(batch["latents"], 1000.0 * sigmas, batch["text"], batch["text_mask"],
                                   batch["pooled"], None if g is None else 1000.0 * g, sigmas=sigmas)
        return (x, c), context

    def calibration_stages(self) -> list[Stage]:
        """The double-stream blocks on ``(x, c)``, then the single-stream blocks on ``[x; c]``."""
        stages = [Stage(blocks=list(self.transformer_blocks), enter=_enter_double)]
        if len(self.single_transformer_blocks):
            stages.append(Stage(blocks=list(self.single_transformer_blocks), enter=_enter_single))
        return stages

    def activation_groups(self) -> ActivationGroups:
        edges = (0.0, *self.config.bucket_edges, 1.0)
        names = tuple(f"sigma[{a:g},{b:g}{']' if b == 1.0 else ')'}" for a, b in zip(edges[:-1], edges[1:]))
        return ActivationGroups(names=names, sites=r"(single_)?transformer_blocks/.*")

    def check_calibration(self, calib) -> dict:
        """``{"latents" [N, F, H, W, C], "sigmas" [N] in [0, 1], "text" [N, T, D_text], "text_mask" [N, T] of 0 / 1,
        "pooled" [N, P]}`` (+ ``"guidance" [N]`` for a guidance-embedding model) -> numpy arrays this model takes
        (float32; the mask int32)."""
        keys = {"latents", "sigmas", "text", "text_mask", "pooled"}
        allowed = keys | ({"guidance"} if self.config.guidance_embeds else set())
        if not isinstance(calib, dict) or not keys <= set(calib) <= allowed:
            guidance = ("and optionally 'guidance' [N]" if self.config.guidance_embeds else
                        "and no 'guidance' (this model has no guidance embedding)")
            raise ValueError(f"{_NAME} calibration must be a dict with keys {sorted(keys)} {guidance}: latents, noise "
                             "levels, text states, their mask and pooled text drawn along sampler trajectories; got "
                             f"{sorted(calib) if isinstance(calib, dict) else type(calib).__name__}.")
        num_samples(calib)
        out = {k: np.asarray(v, np.int32 if k == "text_mask" else np.float32) for k, v in calib.items()}
        mask = np.asarray(calib["text_mask"])
        if not np.isin(mask, (0, 1)).all() or (mask.ndim == 2 and not mask.any(axis=-1).all()):
            raise ValueError("calib['text_mask'] must hold 0 / 1 with at least one real token per sample.")
        n = out["sigmas"].shape[0]
        self._check(out["latents"], out["sigmas"], out["text"], out["text_mask"], out["pooled"],
                    self._guidance(out.get("guidance"), n), None)
        s = out["sigmas"]
        if not np.all(np.isfinite(s)):
            raise ValueError("calib['sigmas'] must be finite.")
        edges = np.asarray(self.config.bucket_edges)
        buckets = np.where(s < 0, -1, np.where(s > 1, len(edges) + 1, np.sum(s[:, None] >= edges, axis=1)))
        check_group_ids(buckets, self.activation_groups(), "calib['sigmas'] (as timestep buckets; σ must lie in "
                        "[0, 1])")
        return out


def _enter_double(m: HunyuanVideoTransformer, batch: dict, previous):
    """``calibration_stages``' entries (module level, so each compiles once per model structure)."""
    return m._enter(batch)


def _enter_single(m: HunyuanVideoTransformer, batch: dict, previous):
    (x, c), context = previous
    return jnp.concatenate([x, c], axis=1), context


def init_model(config: HunyuanVideoConfig, key: jax.Array) -> HunyuanVideoTransformer:
    """A randomly initialised transformer (linears and the patch conv ~ N(0, 0.02), biases 0, norm weights 1)."""
    check_dtypes_available(config)
    return HunyuanVideoTransformer(config, rngs=nnx.Rngs(params=key))


def abstract_model(config: HunyuanVideoConfig) -> HunyuanVideoTransformer:
    return nnx.eval_shape(lambda: HunyuanVideoTransformer(config, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------------------------
# diffusers import / export
# ---------------------------------------------------------------------------------------------------------------

_HANDLED = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
            "num_single_layers", "num_refiner_layers", "mlp_ratio", "patch_size", "patch_size_t", "qk_norm",
            "guidance_embeds", "text_embed_dim", "pooled_projection_dim", "rope_theta", "rope_axes_dim",
            "image_condition_type")
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path"}


def config_from_diffusers(config: dict, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None,
                          bucket_edges: tuple[float, ...] | None = None) -> HunyuanVideoConfig:
    """A ``HunyuanVideoConfig`` from a diffusers ``config.json`` dict; attributes this reader does not handle are
    refused."""
    unknown = sorted(set(config) - set(_HANDLED) - _IGNORED)
    if unknown:
        raise ValueError(f"HunyuanVideo config.json has attributes jquant does not handle: {unknown}; it would "
                         "silently compute something else, so it is refused.")
    values = {k: config[k] for k in _HANDLED if k in config}
    extra = {} if bucket_edges is None else {"bucket_edges": bucket_edges}
    return HunyuanVideoConfig(**values, **extra, dtype=dtype, param_dtype=param_dtype or dtype)


def config_to_diffusers(cfg: HunyuanVideoConfig) -> dict:
    fields = {k: getattr(cfg, k) for k in _HANDLED}
    return {"_class_name": CLASS_NAME, **fields, "rope_axes_dim": list(cfg.rope_axes_dim)}


def _tensor_names(model: HunyuanVideoTransformer) -> dict[str, tuple[tuple, str]]:
    """diffusers tensor name -> (jquant state path, layout: "linear" (transposed), "conv" or "vector")."""
    names: dict[str, tuple[tuple, str]] = {}

    def lin(prefix: str, path: tuple):
        names[f"{prefix}.weight"] = ((*path, "kernel"), "linear")
        names[f"{prefix}.bias"] = ((*path, "bias"), "vector")

    def vectors(prefix: str, path: tuple, which: tuple[str, ...], params: tuple[str, ...] = ("weight",)):
        for n in which:
            for p in params:
                names[f"{prefix}.{n}.{p}"] = ((*path, n, p), "vector")

    names["x_embedder.proj.weight"] = (("x_embedder", "kernel"), "conv")
    names["x_embedder.proj.bias"] = (("x_embedder", "bias"), "vector")
    embedders = ("timestep_embedder", "text_embedder") + (("guidance_embedder",) if model.config.guidance_embeds
                                                          else ())
    for part in embedders:
        for mlp in ("linear_1", "linear_2"):
            lin(f"time_text_embed.{part}.{mlp}", (part, mlp))
            if part != "guidance_embedder":
                lin(f"context_embedder.time_text_embed.{part}.{mlp}", ("context_embedder", part, mlp))
    lin("context_embedder.proj_in", ("context_embedder", "proj_in"))
    for i in range(len(model.context_embedder.refiner_blocks)):
        pre, at = f"context_embedder.token_refiner.refiner_blocks.{i}", ("context_embedder", "refiner_blocks", i)
        vectors(pre, at, ("norm1", "norm2"), ("weight", "bias"))
        for ours in ("to_q", "to_k", "to_v"):
            lin(f"{pre}.attn.{ours}", (*at, ours))
        lin(f"{pre}.attn.to_out.0", (*at, "to_out"))
        lin(f"{pre}.ff.net.0.proj", (*at, "ff", "proj"))
        lin(f"{pre}.ff.net.2", (*at, "ff", "out"))
        lin(f"{pre}.norm_out.linear", (*at, "norm_out"))
    for i in range(len(model.transformer_blocks)):
        pre, at = f"transformer_blocks.{i}", ("transformer_blocks", i)
        lin(f"{pre}.norm1.linear", (*at, "norm1"))
        lin(f"{pre}.norm1_context.linear", (*at, "norm1_context"))
        for ours in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            lin(f"{pre}.attn.{ours}", (*at, ours))
        lin(f"{pre}.attn.to_out.0", (*at, "to_out"))
        vectors(f"{pre}.attn", at, ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
        for ff in ("ff", "ff_context"):
            lin(f"{pre}.{ff}.net.0.proj", (*at, ff, "proj"))
            lin(f"{pre}.{ff}.net.2", (*at, ff, "out"))
    for i in range(len(model.single_transformer_blocks)):
        pre, at = f"single_transformer_blocks.{i}", ("single_transformer_blocks", i)
        lin(f"{pre}.norm.linear", (*at, "norm"))
        for ours in ("to_q", "to_k", "to_v"):
            lin(f"{pre}.attn.{ours}", (*at, ours))
        vectors(f"{pre}.attn", at, ("norm_q", "norm_k"))
        lin(f"{pre}.proj_mlp", (*at, "proj_mlp"))
        lin(f"{pre}.proj_out", (*at, "proj_out"))
    lin("norm_out.linear", ("norm_out",))
    lin("proj_out", ("proj_out",))
    return names


def _from_torch(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return value.T
    if layout == "conv":  # [C_out, C_in, kt, kh, kw] -> [kt kh kw C_in, C_out]
        return np.asarray(ops.conv_weight_matrix(value))
    return value


def _to_torch(value: np.ndarray, layout: str, cfg: HunyuanVideoConfig) -> np.ndarray:
    if layout == "linear":
        return value.T
    if layout == "conv":
        return value.reshape(*cfg.patch, cfg.in_channels, -1).transpose(4, 3, 0, 1, 2)
    return value


def from_tensors(cfg: HunyuanVideoConfig, tensors: dict[str, np.ndarray], *,
                 source: str = "tensors") -> HunyuanVideoTransformer:
    """A model of ``cfg`` holding diffusers-named ``tensors`` (every tensor used, none missing)."""
    abstract = abstract_model(cfg)
    entries = {path: (name, functools.partial(_from_torch, layout=layout))
               for name, (path, layout) in _tensor_names(abstract).items()}
    return load_parameters(abstract, entries, tensors, param_dtype=cfg.param_dtype, source=source, what=CLASS_NAME)


def from_diffusers(path: str | os.PathLike, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None,
                   bucket_edges: tuple[float, ...] | None = None) -> HunyuanVideoTransformer:
    """Read a diffusers ``HunyuanVideoTransformer3DModel`` folder (``config.json`` + safetensors)."""
    from jquant.models import hf_io

    config = hf_io.read_diffusers_config(path, (CLASS_NAME,))
    cfg = config_from_diffusers(config, dtype=dtype, param_dtype=param_dtype, bucket_edges=bucket_edges)
    check_dtypes_available(cfg)
    return from_tensors(cfg, hf_io.read_safetensors(path, weights_name=hf_io.DIFFUSERS_FILE), source=str(path))


def to_tensors(model: HunyuanVideoTransformer) -> dict[str, np.ndarray]:
    """diffusers-named tensors of a float ``model`` (PyTorch layouts)."""
    entries = {path: (name, functools.partial(_to_torch, layout=layout, cfg=model.config))
               for name, (path, layout) in _tensor_names(model).items()}
    return export_parameters(model, entries)


def to_diffusers(model: HunyuanVideoTransformer, path: str | os.PathLike, *, overwrite: bool = False,
                 extra_files=None) -> Path:
    """Write ``model`` as a diffusers ``HunyuanVideoTransformer3DModel`` folder, atomically."""
    from jquant.models import hf_io

    return hf_io.write_checkpoint(path, config_to_diffusers(model.config), to_tensors(model), overwrite=overwrite,
                                  weights_name=hf_io.DIFFUSERS_FILE, extra_files=extra_files)


FAMILY = Family(
    name="hunyuan_video",
    config_class=HunyuanVideoConfig,
    model_class=HunyuanVideoTransformer,
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, HunyuanVideoConfig),
    checkpoint_protocol=("the manifest's config holds the HunyuanVideoConfig fields "
                         "(config_io.dataclass_config_to_json)."),
    diffusers_class_names=(CLASS_NAME,),
    from_diffusers=from_diffusers,
    to_diffusers=to_diffusers,
    presets={
        # The bundled tiny video DiT: the latents of its own copy of jq-video-vae-tiny (16 channels, 8x8, e.g. 5
        # latent frames), 2x2 spatial patches, 1 temporal -> 16 tokens per frame; 4 heads x 32 with RoPE dims (frame
        # 8, row 12, column 12); 2 double + 2 single blocks, 1 refiner block; text states and pooled text of
        # jq-llama-tiny (192). No guidance embedding: a model trained from scratch with caption dropout is guided by
        # classifier-free guidance, not distilled guidance.
        "jq-video-tiny": HunyuanVideoConfig(in_channels=16, out_channels=16, num_attention_heads=4,
                                            attention_head_dim=32, num_layers=2, num_single_layers=2,
                                            num_refiner_layers=1, patch_size=2, patch_size_t=1,
                                            guidance_embeds=False, text_embed_dim=192, pooled_projection_dim=192,
                                            rope_axes_dim=(8, 12, 12)),
    },
    keep_float=("x_embedder", "context_embedder/.*", "(timestep|guidance|text)_embedder/linear_[12]", "norm_out",
                "proj_out"),
)
