"""The Qwen2-VL / Qwen2.5-VL vision tower: 3-D patch embedding, 2-D RoPE ViT blocks, 2x2 patch merger.

Shapes: ``N`` patches of all images together, ``E`` the tower width, ``m`` the spatial merge size,
``K = C Tp P P`` the features of one flattened patch (channel, frame, row, column; the processor's
``pixel_values`` layout), ``grid_thw [n_images, 3]`` each image's (frames / Tp, rows / P, columns / P).

Patches arrive block-major over ``m x m`` merge blocks (the processor's order), so the merger reads
``m²`` consecutive patches (Wang et al. 2024, *Qwen2-VL*, §2.1):

- patch embedding: ``x = pixel_values W_p`` (the Conv3d ``[E, C, Tp, P, P]`` with stride = kernel is a
  linear over the flattened patch, ``W_p [K, E]``);
- block: ``x += proj(attn(norm1(x)))``, ``x += mlp(norm2(x))`` with 2-D RoPE: head features
  ``[0, D/4)`` rotate by the patch row, ``[D/4, D/2)`` by its column (rotate-half layout, one frequency
  ladder ``θ^(-4i/D)``); attention stays within one frame of one image (Qwen2.5-VL: within one
  ``window_size``-pixel window too, except in ``fullatt_block_indexes``);
- merger: ``y = W_2 GELU(W_1 concat_{m²}(ln_q(x)))``, ``[N, E] -> [N / m², out_hidden_size]``.

Qwen2-VL blocks use LayerNorm and a ``fc1 / act / fc2`` MLP; Qwen2.5-VL blocks use RMSNorm and a
biased SwiGLU (``gate_proj``, ``up_proj``, ``down_proj``), and RMSNorm in the merger.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import ops
from jquant.models.layers import Linear, RMSNorm, SwiGLU
from jquant.transforms.vision_rotation import ViTBlockLayout, ViTLayout

Variant = Literal["qwen2_vl", "qwen2_5_vl"]
_NORM_EPS = 1e-6
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Architecture of the vision tower (validated on construction).

    ``intermediate_size`` is the block MLP width (Qwen2-VL: ``embed_dim * mlp_ratio``);
    ``window_size`` (pixels) and ``fullatt_block_indexes`` are Qwen2.5-VL's window attention;
    ``tokens_per_second`` is kept for Qwen2.5-VL's video positions (images do not use it).
    """

    variant: Variant = "qwen2_vl"
    depth: int
    embed_dim: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: int = 4

    def __post_init__(self):
        name = type(self).__name__
        if self.variant not in ("qwen2_vl", "qwen2_5_vl"):
            raise ValueError(f"{name}.variant must be 'qwen2_vl' or 'qwen2_5_vl', got {self.variant!r}.")
        for field in ("depth", "embed_dim", "num_heads", "intermediate_size", "out_hidden_size", "in_channels",
                      "patch_size", "temporal_patch_size", "spatial_merge_size"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{name}.{field} must be positive, got {getattr(self, field)}.")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"{name}: embed_dim={self.embed_dim} / num_heads={self.num_heads} must be a head dim "
                             "divisible by 4 (2-D RoPE rotates a quarter of it per image axis).")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"{name}.hidden_act={self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}.")
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        if self.variant == "qwen2_5_vl" and self.window_size // self.spatial_merge_size // self.patch_size < 1:
            raise ValueError(f"{name}.window_size={self.window_size} px must cover at least one merged patch "
                             f"(spatial_merge_size * patch_size = {self.spatial_merge_size * self.patch_size} px).")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_features(self) -> int:
        """``K = C Tp P P``, the length of one row of ``pixel_values``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2


def check_grid(cfg: VisionConfig, image_grid_thw, num_patches: int | None = None) -> np.ndarray:
    """``image_grid_thw`` as an int ``[n, 3]`` numpy array, checked against the merger (and ``num_patches``)."""
    grid = np.asarray(image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer) or np.any(grid <= 0):
        raise ValueError(f"image_grid_thw must be a positive int [n_images, 3] array of (t, h, w) patch counts, got "
                         f"{grid.tolist() if grid.size < 16 else grid.shape}.")
    m = cfg.spatial_merge_size
    if np.any(grid[:, 1:] % m):
        raise ValueError(f"image_grid_thw={grid.tolist()}: the patch rows and columns (h, w) must be multiples of "
                         f"spatial_merge_size={m} so the merger can join {m}x{m} patches; resize the images to a "
                         f"multiple of {m * cfg.patch_size} px.")
    if num_patches is not None and int(np.prod(grid, axis=1).sum()) != num_patches:
        raise ValueError(f"pixel_values has {num_patches} patches but image_grid_thw={grid.tolist()} describes "
                         f"{int(np.prod(grid, axis=1).sum())}; pass the grid the patches were cut with.")
    return grid.astype(np.int64)


def patch_layout(cfg: VisionConfig, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patch (processor order): ``positions [N, 2]`` (row, column), ``frame [N]`` (a distinct id per frame of
    each image: full attention stays within it), ``window [N]`` (Qwen2.5-VL's window id, within the frame)."""
    m = cfg.spatial_merge_size
    rows, cols, frames, windows, frame_id = [], [], [], [], 0
    span = max(cfg.window_size // m // cfg.patch_size, 1)
    for t, h, w in grid.tolist():
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        r = r.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        c = c.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        window = (r // m // span) * (w // m // span + 1) + (c // m // span)
        for _ in range(t):
            rows.append(r), cols.append(c), windows.append(window)
            frames.append(np.full(h * w, frame_id))
            frame_id += 1
    return (np.stack([np.concatenate(rows), np.concatenate(cols)], axis=-1).astype(np.int32),
            np.concatenate(frames), np.concatenate(windows))


def attention_masks(cfg: VisionConfig, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``positions [N, 2]``, the full mask ``[N, N]`` (same frame) and the window mask ``[N, N]`` (same frame and
    window; equal to the full mask for Qwen2-VL)."""
    positions, frame, window = patch_layout(cfg, grid)
    full = frame[:, None] == frame[None, :]
    windowed = full & (window[:, None] == window[None, :]) if cfg.variant == "qwen2_5_vl" else full
    return positions, full, windowed


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis (``torch.nn.LayerNorm``)."""

    def __init__(self, dim: int, *, param_dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + _NORM_EPS)
        return y * self.weight[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


def _norm(cfg: VisionConfig, dim: int, pdt: jnp.dtype) -> nnx.Module:
    return RMSNorm(dim, eps=_NORM_EPS, param_dtype=pdt) if cfg.variant == "qwen2_5_vl" else LayerNorm(dim, param_dtype=pdt)


def _linear(n_in: int, n_out: int, pdt: jnp.dtype, rngs: nnx.Rngs, *, bias: bool = True) -> Linear:
    return Linear(n_in, n_out, use_bias=bias, sharding=(None, None), param_dtype=pdt, rngs=rngs)


class VisionMLP(nnx.Module):
    """Qwen2-VL's block MLP ``fc2(act(fc1(x)))``."""

    def __init__(self, cfg: VisionConfig, pdt: jnp.dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(cfg.embed_dim, cfg.intermediate_size, pdt, rngs)
        self.fc2 = _linear(cfg.intermediate_size, cfg.embed_dim, pdt, rngs)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.act](self.fc1(x)))


class VisionAttention(nnx.Module):
    """Bidirectional attention with a fused ``qkv`` (biased) and ``proj``, 2-D RoPE on queries and keys."""

    def __init__(self, cfg: VisionConfig, pdt: jnp.dtype, rngs: nnx.Rngs):
        self.qkv = _linear(cfg.embed_dim, 3 * cfg.embed_dim, pdt, rngs)
        self.proj = _linear(cfg.embed_dim, cfg.embed_dim, pdt, rngs)
        self.num_heads = cfg.num_heads

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """``x [B, N, E]``, ``cos, sin [B, N, D]`` (float32), ``mask [B, N, N]`` bool -> ``[B, N, E]``."""
        b, n, e = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(b, n, 3, self.num_heads, e // self.num_heads), 2, 0)
        q = ops.apply_rope(q.astype(jnp.float32), cos, sin, "half").astype(x.dtype)
        k = ops.apply_rope(k.astype(jnp.float32), cos, sin, "half").astype(x.dtype)
        return self.proj(ops.attention(q, k, v, mask).reshape(b, n, e))


class VisionBlock(nnx.Module):
    """``x += attn(norm1(x))``, ``x += mlp(norm2(x))``; ``windowed`` picks the window mask (Qwen2.5-VL)."""

    def __init__(self, cfg: VisionConfig, pdt: jnp.dtype, rngs: nnx.Rngs, *, windowed: bool):
        self.norm1 = _norm(cfg, cfg.embed_dim, pdt)
        self.norm2 = _norm(cfg, cfg.embed_dim, pdt)
        self.attn = VisionAttention(cfg, pdt, rngs)
        self.mlp = (SwiGLU(cfg.embed_dim, cfg.intermediate_size, use_bias=True, param_dtype=pdt, rngs=rngs)
                    if cfg.variant == "qwen2_5_vl" else VisionMLP(cfg, pdt, rngs))
        self.windowed = windowed

    def __call__(self, x: jax.Array, context: tuple) -> jax.Array:
        """``x [B, N, E]``; ``context = (cos, sin, full_mask, window_mask)`` (``VisionTower.context``)."""
        cos, sin, full, window = context
        x = x + self.attn(self.norm1(x), cos, sin, window if self.windowed else full)
        return x + self.mlp(self.norm2(x))

    def calibration_forward(self, x: jax.Array, context: tuple) -> jax.Array:
        """The block as ``hidden [B, N, E] -> hidden`` for block-by-block calibration."""
        return self(x, context)


class PatchMerger(nnx.Module):
    """``[.., N, E] -> [.., N / m², out]``: ``fc2(GELU(fc1(concat of m² consecutive ln_q(x))))``."""

    def __init__(self, cfg: VisionConfig, pdt: jnp.dtype, rngs: nnx.Rngs):
        width = cfg.embed_dim * cfg.merge_unit
        self.ln_q = _norm(cfg, cfg.embed_dim, pdt)
        self.fc1 = _linear(width, width, pdt, rngs)
        self.fc2 = _linear(width, cfg.out_hidden_size, pdt, rngs)
        self.unit = cfg.merge_unit

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x)
        x = x.reshape(*x.shape[:-2], x.shape[-2] // self.unit, self.unit * x.shape[-1])
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))

    def calibration_forward(self, x: jax.Array, context) -> jax.Array:
        """The merger as a calibration block: ``[B, N, E] -> [B, N / m², out]`` (``context`` passes through)."""
        return self(x)


class PatchEmbed(nnx.Module):
    """The Conv3d patch embedding as the linear ``proj`` ``[K, E]`` (no bias) over flattened patches."""

    def __init__(self, cfg: VisionConfig, pdt: jnp.dtype, rngs: nnx.Rngs):
        self.proj = _linear(cfg.patch_features, cfg.embed_dim, pdt, rngs, bias=False)


class VisionTower(nnx.Module):
    """``pixel_values [N, K]`` + ``image_grid_thw [n, 3]`` -> merged image features ``[N / m², out_hidden_size]``.

    Paths: ``patch_embed/proj`` (a linear site ``[K, E]``), ``blocks/{i}/{norm1, norm2, attn/{qkv, proj},
    mlp/...}``, ``merger/{ln_q, fc1, fc2}``.
    """

    def __init__(self, cfg: VisionConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, param_dtype, rngs)
        full = set(cfg.fullatt_block_indexes)
        self.blocks = nnx.List([VisionBlock(cfg, param_dtype, rngs, windowed=cfg.variant == "qwen2_5_vl" and i not in full)
                                for i in range(cfg.depth)])
        self.merger = PatchMerger(cfg, param_dtype, rngs)

    def vit_layout(self) -> ViTLayout:
        """The residual stream for MQuant's LayerNorm -> RMSNorm conversion and rotation
        (``jquant.transforms.vision_rotation``), paths relative to the tower; Qwen2-VL's LayerNorm blocks only."""
        cfg = self.config
        if cfg.variant != "qwen2_vl":
            raise ValueError(f"vision_rotation converts LayerNorm ViT blocks (Qwen2-VL); this tower is {cfg.variant!r}, "
                             "whose RMSNorm / SwiGLU blocks it does not handle.")
        blocks = tuple(ViTBlockLayout(norm1=f"blocks/{i}/norm1", qkv=f"blocks/{i}/attn/qkv", proj=f"blocks/{i}/attn/proj",
                                      norm2=f"blocks/{i}/norm2", fc1=f"blocks/{i}/mlp/fc1", fc2=f"blocks/{i}/mlp/fc2")
                       for i in range(cfg.depth))
        return ViTLayout(embed="patch_embed/proj", blocks=blocks, merger_norm="merger/ln_q", merger_reader="merger/fc1",
                         merge_unit=cfg.merge_unit, width=cfg.embed_dim, num_heads=cfg.num_heads, norm_eps=_NORM_EPS)

    def context(self, image_grid_thw, num_patches: int) -> tuple:
        """``(cos, sin [1, N, D], full mask, window mask [1, N, N])`` of the patches of ``image_grid_thw``."""
        cfg = self.config
        grid = check_grid(cfg, image_grid_thw, num_patches)
        positions, full, window = attention_masks(cfg, grid)
        d = cfg.head_dim
        angles = ops.rope_angles(jnp.asarray(positions), dims=(d // 2, d // 2), theta=cfg.rope_theta)
        cos, sin = ops.rope_cos_sin(angles, "half", jnp.float32)
        return cos[None], sin[None], jnp.asarray(full)[None], jnp.asarray(window)[None]

    def embed(self, pixel_values: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """``pixel_values [N, K]`` (or ``[B, N, K]``, one image set per sample) -> ``[1 or B, N, E]`` in ``dtype``."""
        cfg = self.config
        if pixel_values.ndim not in (2, 3) or pixel_values.shape[-1] != cfg.patch_features:
            raise ValueError(f"pixel_values must be [num_patches, {cfg.patch_features}] (channels {cfg.in_channels} x "
                             f"frames {cfg.temporal_patch_size} x {cfg.patch_size}x{cfg.patch_size} pixels per patch), got "
                             f"shape {tuple(pixel_values.shape)}; images_to_patches makes them from images.")
        x = jnp.asarray(pixel_values, dtype)
        return self.patch_embed.proj(x[None] if x.ndim == 2 else x)

    def __call__(self, pixel_values: jax.Array, context: tuple, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """``pixel_values [N, K]`` with their ``context(image_grid_thw, N)`` -> ``[N / m², out_hidden_size]``
        (``[B, N, K]`` with a per-sample context ``[B, ...]`` -> ``[B, N / m², out_hidden_size]``)."""
        x = self.embed(pixel_values, dtype)
        for block in self.blocks:
            x = block(x, context)
        x = self.merger(x)
        return x[0] if pixel_values.ndim == 2 else x


def images_to_patches(images, cfg: VisionConfig, *, mean=(0.48145466, 0.4578275, 0.40821073),
                      std=(0.26862954, 0.26130258, 0.27577711)) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[B, H, W, C]`` in ``[0, 1]`` -> ``(pixel_values [B H W / P², K], image_grid_thw [B, 3])``.

    What ``Qwen2VLImageProcessor`` does without resizing: normalise with ``mean`` / ``std`` (CLIP's),
    repeat each image over the ``Tp`` frames, cut ``P x P`` patches ordered block-major over ``m x m``
    merge blocks, each flattened as (channel, frame, row, column). ``H`` and ``W`` must be multiples of
    ``P m``.
    """
    x = np.asarray(images, np.float32)
    p, m, tp = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
        raise ValueError(f"images must be [B, H, W, {cfg.in_channels}] (channels last), got shape {x.shape}.")
    b, h, w, c = x.shape
    if h % (p * m) or w % (p * m):
        raise ValueError(f"images of {h}x{w} px: height and width must be multiples of patch_size * "
                         f"spatial_merge_size = {p * m} px; resize or crop them first.")
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = np.repeat(x.transpose(0, 3, 1, 2)[:, None], tp, axis=1)  # [B, Tp, C, H, W]
    gh, gw = h // p, w // p
    x = x.reshape(b, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    grid = np.tile(np.array([[1, gh, gw]], np.int64), (b, 1))
    return x.reshape(b * gh * gw, c * tp * p * p), grid
