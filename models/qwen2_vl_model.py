"""Qwen2-VL and Qwen2.5-VL: a vision tower (``qwen2_vl_vision``) feeding a Qwen2 decoder with M-RoPE.

Shapes: ``B`` batch, ``L`` tokens, ``D`` text hidden size, ``n`` images, ``M`` merged image features.

The prompt holds one ``image_token_id`` placeholder per merged image feature, each image's placeholders
contiguous; the features replace their embeddings in order (Wang et al. 2024, *Qwen2-VL*, §2.1).
Every token has a modality, ``modality [B, L]`` (0 text, 1 image: the processor's ``mm_token_type_ids``),
and an M-RoPE position ``positions [B, L, 3]`` (temporal, height, width; ``rope_index``, transformers'
``get_rope_index``): text tokens count on from the previous token on all three components; an image
of ``t x h x w`` merged patches starting at ``s`` has positions ``(s + i, s + j, s + k)`` and the text
after it continues from ``s + max(h, w)``. The decoder's rotary pairs are split into
``mrope_section`` sections reading the (t, h, w) components in turn (``jquant.ops.rope``). Decoding
after a prefill uses ``cache index + rope_deltas`` on all components, ``rope_deltas [B]`` = the last
prefill position + 1 minus the prompt length.

Parameter paths: ``visual/...`` (``qwen2_vl_vision.VisionTower``), then the Llama family's decoder
names: ``embed_tokens``, ``layers/{i}/{self_attn,mlp}/...``, ``norm``, ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import ops
from jquant.calib.data import num_samples
from jquant.calib.sequential import Stage
from jquant.kv import KVCache
from jquant.models.config_io import check_dtypes_available
from jquant.models.layers import Attention, AttentionConfig, Embed, Linear, RMSNorm, apply_rope
from jquant.models.llama import DecoderLayer, DecoderLM, LlamaConfig
from jquant.models.qwen2_vl_vision import VisionConfig, VisionTower, check_grid
from jquant.sites import ActivationGroups

VLFamily = Literal["qwen2_vl", "qwen2_5_vl"]
DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
TEXT, IMAGE = 0, 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2VLConfig:
    """A Qwen2-VL / Qwen2.5-VL model: ``text`` (a Qwen2 decoder: q/k/v biases), ``vision`` (its
    ``variant`` equals ``family``), ``mrope_section`` (rotary pairs per (t, h, w) section, summing to
    ``head_dim / 2``) and the special token ids. ``dtype`` / ``param_dtype`` apply to both towers."""

    family: VLFamily = "qwen2_vl"
    text: LlamaConfig
    vision: VisionConfig
    mrope_section: tuple[int, ...]
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    dtype: DTypeName = "float32"
    param_dtype: DTypeName = "float32"

    def __post_init__(self):
        name = type(self).__name__
        if self.family not in ("qwen2_vl", "qwen2_5_vl"):
            raise ValueError(f"{name}.family must be 'qwen2_vl' or 'qwen2_5_vl', got {self.family!r}.")
        if self.vision.variant != self.family:
            raise ValueError(f"{name}: vision.variant={self.vision.variant!r} must equal family={self.family!r}.")
        t = self.text
        if (t.family, t.qkv_bias, t.out_bias, t.mlp_bias, t.qk_norm, t.sliding_window) != ("qwen2", True, False, False,
                                                                                           False, None):
            raise ValueError(f"{name}.text must be a Qwen2 decoder (LlamaConfig(family='qwen2', qkv_bias=True), no "
                             "o/mlp bias, no qk_norm, no sliding window): Qwen2-VL's language model is Qwen2.")
        if t.rope.kind != "default":
            raise ValueError(f"{name}: M-RoPE uses plain RoPE frequencies; text.rope.kind={t.rope.kind!r} is not supported.")
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        if len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != t.head_dim or min(self.mrope_section) < 0:
            raise ValueError(f"{name}.mrope_section={self.mrope_section} must be three pair counts (t, h, w) with "
                             f"2 * sum = head_dim = {t.head_dim}.")
        if self.vision.out_hidden_size != t.hidden_size:
            raise ValueError(f"{name}: vision.out_hidden_size={self.vision.out_hidden_size} must equal the text "
                             f"hidden_size={t.hidden_size} (the merger writes into the token embeddings).")
        ids = (self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id)
        if not all(0 <= i < t.vocab_size for i in ids) or len(set(ids)) != 4:
            raise ValueError(f"{name}: the image, video, vision-start and vision-end token ids {ids} must be distinct "
                             f"ids in the vocabulary [0, {t.vocab_size}).")
        object.__setattr__(self, "text", t.replace(dtype=self.dtype, param_dtype=self.param_dtype))

    # the decoder's shape, read by DecoderLM (caches, layouts) and by generate (context, vocabulary)
    num_layers = property(lambda self: self.text.num_layers)
    num_heads = property(lambda self: self.text.num_heads)
    num_kv_heads = property(lambda self: self.text.num_kv_heads)
    head_dim = property(lambda self: self.text.head_dim)
    hidden_size = property(lambda self: self.text.hidden_size)
    intermediate_size = property(lambda self: self.text.intermediate_size)
    vocab_size = property(lambda self: self.text.vocab_size)
    max_position_embeddings = property(lambda self: self.text.max_position_embeddings)
    qk_norm = property(lambda self: False)

    def replace(self, **changes) -> Qwen2VLConfig:
        return dataclasses.replace(self, **changes)


class VLInputs(NamedTuple):
    """A prompt's per-token inputs: ``tokens [B, L]``, ``positions [B, L, 3]`` (M-RoPE), ``modality [B, L]``
    (0 text, 1 image) and ``rope_deltas [B]`` (the decoding offset)."""

    tokens: np.ndarray
    positions: np.ndarray
    modality: np.ndarray
    rope_deltas: np.ndarray


def _runs(mask_row: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of True in a 1-D bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask_row.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def rope_index(cfg: Qwen2VLConfig, tokens, image_grid_thw=None, mm_token_type_ids=None) -> VLInputs:
    """M-RoPE positions and modalities of ``tokens [B, L]`` with images of ``image_grid_thw [n, 3]`` (module docstring).

    Each run of image placeholders is one image, taken in order (batch row, then position); the run
    must hold that image's ``t h w / m²`` placeholders. ``mm_token_type_ids`` (the processor's, optional)
    must mark exactly the placeholders.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be an int [batch, length] array, got shape {tokens.shape} dtype {tokens.dtype}.")
    b, length = tokens.shape
    image = tokens == cfg.image_token_id
    if mm_token_type_ids is not None:
        types = np.asarray(mm_token_type_ids)
        if types.shape != tokens.shape or not np.array_equal(types, image.astype(types.dtype)):
            raise ValueError(f"mm_token_type_ids must be 1 exactly at the image tokens (id {cfg.image_token_id}) and 0 "
                             "elsewhere, with the shape of tokens (videos, type 2, are not supported); got "
                             f"{types.shape} disagreeing with the placeholders.")
    if np.any(tokens == cfg.video_token_id):
        raise ValueError(f"tokens hold the video token id {cfg.video_token_id}; videos are not supported, only images.")
    runs = [(row, s, e) for row in range(b) for s, e in _runs(image[row])]
    if image_grid_thw is None:
        if runs:
            raise ValueError(f"tokens hold {int(image.sum())} image placeholders (id {cfg.image_token_id}) but no "
                             "images were given; pass pixel_values and image_grid_thw, or drop the placeholders.")
        grid = np.zeros((0, 3), np.int64)
    else:
        grid = check_grid(cfg.vision, image_grid_thw)
        if not runs:
            raise ValueError(f"{len(grid)} images were given but tokens hold no image token (id {cfg.image_token_id}); "
                             "put each image's placeholders into the prompt (vision_start, image tokens, vision_end).")
    m = cfg.vision.spatial_merge_size
    sizes = (np.prod(grid, axis=1) // m ** 2).tolist()
    if len(runs) != len(grid) or [e - s for _, s, e in runs] != sizes:
        raise ValueError(f"tokens hold image placeholder runs of lengths {[e - s for _, s, e in runs]} but "
                         f"image_grid_thw={grid.tolist()} needs one run per image of t*h*w/{m ** 2} = {sizes} tokens; "
                         "give one image per run, with as many placeholders as it has merged patches.")
    positions = np.zeros((b, length, 3), np.int64)
    deltas = np.zeros((b,), np.int64)
    images = iter(grid.tolist())
    for row in range(b):
        cursor, previous = 0, 0
        for start, end in [(s, e) for r, s, e in runs if r == row] + [(length, length)]:
            text = np.arange(start - previous) + cursor
            positions[row, previous:start] = text[:, None]
            cursor += start - previous
            if start == length:
                break
            t, h, w = next(images)
            ti, hi, wi = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
            positions[row, start:end] = np.stack([ti, hi, wi], axis=-1).reshape(-1, 3) + cursor
            cursor += max(h, w) // m
            previous = end
        deltas[row] = positions[row].max() + 1 - length if length else 0
    return VLInputs(tokens.astype(np.int32), positions.astype(np.int32), image.astype(np.int32),
                    deltas.astype(np.int32))


class MRopeAttention(Attention):
    """``layers.Attention`` with M-RoPE: ``positions [B, T, 3]`` rotate the (t, h, w) sections; the causal mask
    follows the sequence order (image tokens share positions), not the rotary positions. ``order [B, T]`` (AIFS,
    MQuant §3.3) gives each token's original index when the prompt was permuted: the mask is then
    ``M'_ij = [order_j <= order_i]``. ``qk_rotation`` applies an online Hadamard to queries and keys after RoPE."""

    def __init__(self, cfg: AttentionConfig, sections: tuple[int, ...], *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        super().__init__(cfg, param_dtype=param_dtype, rngs=rngs)
        self.sections = sections

    def __call__(self, x, positions, cache, cache_start, groups: jax.Array | None = None,
                 order: jax.Array | None = None):
        """``x [B, T, hidden]`` at M-RoPE ``positions [B, T, 3]`` -> ``[B, T, hidden]``, updated cache; ``groups
        [B, T]`` (the modalities) select the projections' per-group activation formats; ``order [B, T]`` (each
        token's index in the unpermuted chunk, default ``0..T-1``) orders the causal mask."""
        if self.kv_cache is not None or self.kv_smoothing is not None:
            raise ValueError("Qwen2-VL attention does not support KV-cache quantization yet; quantize weights and "
                             "activations only (recipes without a KV format).")
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x, groups=groups).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x, groups=groups).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x, groups=groups).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        angles = ops.rope_angles(positions, dims=(cfg.head_dim,), theta=cfg.rope.theta, sections=self.sections)
        cos, sin = ops.rope_cos_sin(angles, "half", x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qk_rotation:
            q, k = ops.online_hadamard(q), ops.online_hadamard(k)
        if order is None:
            order = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is None:
            out = ops.attention(q, k, v, ops.causal_mask(order, order))
            return self.o_proj(out.reshape(b, t, -1), groups=groups), None
        cache, k_all, v_all = cache.update(k, v, cache_start)
        slots = jnp.broadcast_to(jnp.arange(cache.capacity, dtype=jnp.int32), (b, cache.capacity))
        # the chunk's slots hold its tokens in the (possibly permuted) given order: key order = their original index
        start = jnp.asarray(cache_start)
        key_order = jax.lax.dynamic_update_slice(slots, (order + start).astype(slots.dtype),
                                                 (jnp.zeros_like(start), start))
        mask = ops.causal_mask(order + cache_start, key_order, slots < cache_start + t)
        return self.o_proj(ops.attention(q, k_all, v_all, mask).reshape(b, t, -1), groups=groups), cache


class VLDecoderLayer(DecoderLayer):
    """The Llama-family pre-norm block with ``MRopeAttention``; its context is ``(positions [B, T, 3], modality
    [B, T])`` or, for a permuted (AIFS) prompt, ``(positions, modality, order [B, T])``; every linear receives the
    modality as its group id (``activation_groups``)."""

    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg.text, rngs=rngs)
        self.self_attn = MRopeAttention(cfg.text.attention, cfg.mrope_section, param_dtype=jnp.dtype(cfg.param_dtype),
                                        rngs=rngs)

    def __call__(self, x, context, cache, cache_start):
        positions, modality, *order = context
        h, cache = self.self_attn(self.input_layernorm(x), positions, cache, cache_start, groups=modality,
                                  order=order[0] if order else None)
        x = x + h
        h, mlp = self.post_attention_layernorm(x), self.mlp
        h = jax.nn.silu(mlp.gate_proj(h, groups=modality)) * mlp.up_proj(h, groups=modality)
        return x + mlp.down_proj(h, groups=modality), cache


class Qwen2VL(DecoderLM):
    """Qwen2-VL / Qwen2.5-VL.

    ``model(tokens, pixel_values, image_grid_thw)`` -> logits ``[B, L, V]`` (images optional);
    ``model.prefill(tokens, cache, pixel_values, image_grid_thw)`` -> ``(logits, cache, rope_deltas)``, then
    ``model.step(tokens, cache, rope_deltas=...)`` decodes (``generate`` does both, greedily).
    """

    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.visual = VisionTower(cfg.vision, param_dtype=pdt, rngs=rngs)
        self.embed_tokens = Embed(cfg.text.vocab_size, cfg.text.hidden_size, param_dtype=pdt, rngs=rngs)
        self.layers = nnx.List([VLDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.text.num_layers)])
        self.norm = RMSNorm(cfg.text.hidden_size, eps=cfg.text.rms_norm_eps, param_dtype=pdt)
        self.lm_head = (None if cfg.text.tie_embeddings else
                        Linear(cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False, sharding=("embed", "vocab"),
                               param_dtype=pdt, rngs=rngs))

    def prepare_inputs(self, tokens, image_grid_thw=None, mm_token_type_ids=None) -> VLInputs:
        """``rope_index`` of this model's config (host-side: the layout depends on where the placeholders are)."""
        return rope_index(self.config, tokens, image_grid_thw, mm_token_type_ids)

    def embed(self, tokens: jax.Array, pixel_values=None, vision_context: tuple | None = None) -> jax.Array:
        """Token embeddings ``[B, L, D]`` with the merged image features written over the placeholders in order
        (``vision_context``: ``visual.context(image_grid_thw, num_patches)``)."""
        x = self.embed_tokens(tokens, jnp.dtype(self.config.dtype))
        if pixel_values is None:
            return x
        features = self.visual(pixel_values, vision_context, x.dtype)  # [M, D]
        return scatter_features(x, tokens == self.config.image_token_id, features)

    def forward(self, tokens, positions, pixel_values=None, vision_context=None, layer_caches=None, start=None,
                order=None):
        """The traceable forward: ``tokens [B, L]`` at ``positions [B, L, 3]`` -> (logits, new layer caches).
        ``order [B, L]``: each token's original index when the prompt is permuted (AIFS; ``aifs_permutation``)."""
        x = self.embed(tokens, pixel_values, vision_context)
        context = (positions, self.modality(tokens)) + (() if order is None else (order,))
        return self._decode(x, context, layer_caches, start)

    def modality(self, tokens: jax.Array) -> jax.Array:
        """``[B, L]`` int32: 1 at the image placeholders, 0 elsewhere (``TEXT``, ``IMAGE``)."""
        return (tokens == self.config.image_token_id).astype(jnp.int32)

    def activation_groups(self) -> ActivationGroups:
        """The decoder's linears see each token's modality: per-modality activation formats and static scales."""
        return ActivationGroups(names=("text", "image"), sites=r"layers/.*")

    def equivalence_layout(self):
        """The decoder's layout (``DecoderLM``) with the vision merger's last linear as an input writer: it writes
        the image features into the residual stream, so a residual rotation folds into it (MQuant §3.1)."""
        return dataclasses.replace(super().equivalence_layout(), input_writers=("visual/merger/fc2",))

    def _host_inputs(self, tokens, pixel_values, image_grid_thw, mm_token_type_ids):
        """Checked positions and vision context of a concrete prompt (host-side: they depend on the layout)."""
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pass pixel_values and image_grid_thw together (images_to_patches returns both).")
        inputs = self.prepare_inputs(tokens, image_grid_thw, mm_token_type_ids)
        if pixel_values is None:
            return inputs, None, None
        pixel_values = jnp.asarray(pixel_values)
        return inputs, pixel_values, self.visual.context(image_grid_thw, pixel_values.shape[0])

    def __call__(self, tokens, pixel_values=None, image_grid_thw=None, *, mm_token_type_ids=None) -> jax.Array:
        """Causal forward -> logits ``[B, L, V]``; without images, ``tokens`` may be traced (plain 1-D positions)."""
        if pixel_values is None and image_grid_thw is None and isinstance(tokens, jax.core.Tracer):
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32)[:, None], (*tokens.shape, 3))
            return self.forward(tokens, positions)[0]
        inputs, pixel_values, context = self._host_inputs(tokens, pixel_values, image_grid_thw, mm_token_type_ids)
        graphdef, state = nnx.split(self)
        return _forward(graphdef, state, jnp.asarray(inputs.tokens), jnp.asarray(inputs.positions), pixel_values,
                        context)

    def prefill(self, tokens, cache: KVCache, pixel_values=None, image_grid_thw=None, *, mm_token_type_ids=None,
                aifs: bool = False):
        """Run the prompt into an empty ``cache`` -> ``(logits [B, L, V], cache, rope_deltas [B])``.

        ``aifs`` (MQuant §3.3): run the prompt permuted, image tokens first (``aifs_permutation``), with their
        original M-RoPE positions and the mask ``[π(j) <= π(i)]``, so each modality is one contiguous block; the
        cache stays permuted (decoding after it is unchanged) and the logits come back in the original order.
        """
        inputs, pixel_values, context = self._host_inputs(tokens, pixel_values, image_grid_thw, mm_token_type_ids)
        if int(cache.length) != 0:
            raise ValueError(f"prefill needs an empty cache (length 0), got length {int(cache.length)}; decode further "
                             "tokens with step(tokens, cache, rope_deltas=...).")
        tokens, positions, order = inputs.tokens, inputs.positions, None
        if aifs:
            order = aifs_permutation(inputs.modality)
            tokens, positions = permute_rows(tokens, order), permute_rows(positions, order)
            order = jnp.asarray(order)
        graphdef, state = nnx.split(self)
        logits, layers = _forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), pixel_values, context,
                                  cache.layers, cache.length, order)
        if aifs:  # row i of the permuted output is original token order[i]: scatter back
            logits = permute_rows(logits, jnp.argsort(order, axis=1))
        length = cache.length + inputs.tokens.shape[1]
        return logits, KVCache(layers=layers, length=length), jnp.asarray(inputs.rope_deltas)

    def step(self, tokens: jax.Array, cache: KVCache, *, rope_deltas: jax.Array | None = None):
        """Append text ``tokens [B, T]`` after the cached ones at positions ``cache index + rope_deltas [B]``."""
        start = cache.length
        b, t = tokens.shape
        index = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if rope_deltas is not None:
            index = index + jnp.asarray(rope_deltas, jnp.int32)[:, None]
        x = self.embed_tokens(tokens, jnp.dtype(self.config.dtype))
        context = (jnp.broadcast_to(index[..., None], (b, t, 3)), self.modality(tokens))
        logits, layers = self._decode(x, context, cache.layers, start)
        return logits, KVCache(layers=layers, length=start + t)

    def _decode(self, x, context, layer_caches, start):
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, context, None if layer_caches is None else layer_caches[i], start)
            new_caches.append(c)
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits, tuple(new_caches) if layer_caches is not None else None

    # -- calibration contract: the vision blocks, the merger, then the decoder blocks ---------------------------
    def check_calibration(self, calib) -> dict:
        """``{"tokens" [N, L], "pixel_values" [N, P, K], "image_grid_thw" [N, n, 3]}`` (one prompt and its images per
        sample; ``P`` patches each) -> the arrays the stages read: ``tokens``, ``positions [N, L, 3]``, ``modality
        [N, L]`` (0 text, 1 image: the group of each token), ``pixel_values`` and the vision context ``cos``, ``sin``
        ``[N, P, D]``, ``full``, ``window`` ``[N, P, P]``."""
        keys = {"tokens", "pixel_values", "image_grid_thw"}
        if not isinstance(calib, dict) or set(calib) != keys:
            raise ValueError(f"Qwen2-VL calibration must be a dict with keys {sorted(keys)}: tokens [N, L] with image "
                             "placeholders, pixel_values [N, P, K] and image_grid_thw [N, n, 3] (the same patch count P "
                             f"per sample); got {sorted(calib) if isinstance(calib, dict) else type(calib).__name__}.")
        num_samples(calib)
        tokens, pixels = np.asarray(calib["tokens"]), np.asarray(calib["pixel_values"], np.float32)
        grids = np.asarray(calib["image_grid_thw"])
        if pixels.ndim != 3 or grids.ndim != 3:
            raise ValueError(f"calib['pixel_values'] must be [N, P, K] and calib['image_grid_thw'] [N, n, 3], got shapes "
                             f"{pixels.shape} and {grids.shape}.")
        rows = [self.prepare_inputs(tokens[i:i + 1], grids[i]) for i in range(len(tokens))]
        contexts = [self.visual.context(grids[i], pixels.shape[1]) for i in range(len(tokens))]
        out = {name: np.concatenate([getattr(r, name) for r in rows]) for name in ("tokens", "positions", "modality")}
        for k, name in enumerate(("cos", "sin", "full", "window")):
            out[name] = np.concatenate([np.asarray(c[k]) for c in contexts])
        return dict(out, pixel_values=pixels)

    def calibration_stages(self) -> list[Stage]:
        """Vision blocks on the patches, the merger, then the decoder blocks on the merged embeddings."""
        return [Stage(blocks=list(self.visual.blocks), enter=_enter_vision),
                Stage(blocks=[self.visual.merger], enter=_enter_merger),
                Stage(blocks=list(self.layers), enter=_enter_text)]

    def calibration_call(self, batch: dict) -> jax.Array:
        """Logits of a ``check_calibration`` batch (whole-model statistics)."""
        return self.forward(batch["tokens"], batch["positions"], batch["pixel_values"], _vision_context(batch))[0]

    def block_inputs(self, tokens: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Text-only inputs of the decoder blocks: the embeddings and ``(positions, modality)`` (1-D positions on
        all three M-RoPE components)."""
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (b, t, 3))
        return self.embed_tokens(tokens, jnp.dtype(self.config.dtype)), (positions, self.modality(tokens))


def _enter_vision(m: Qwen2VL, batch: dict, previous):
    """``calibration_stages``' entries (module level, so each compiles once per model structure)."""
    return m.visual.embed(batch["pixel_values"], jnp.dtype(m.config.dtype)), _vision_context(batch)


def _enter_merger(m: Qwen2VL, batch: dict, previous):
    return previous


def _enter_text(m: Qwen2VL, batch: dict, previous):
    features = previous[0]
    x = m.embed_tokens(batch["tokens"], jnp.dtype(m.config.dtype))
    x = scatter_features(x, batch["tokens"] == m.config.image_token_id, features)
    return x, (batch["positions"], batch["modality"])


def aifs_permutation(modality) -> np.ndarray:
    """AIFS's ``π [B, L]`` (MQuant §3.3): new index ``i`` holds old token ``π(i)``; image tokens (modality 1) first,
    then text, each in original order (a stable sort)."""
    modality = np.asarray(modality)
    return np.argsort(modality != IMAGE, axis=1, kind="stable").astype(np.int32)


def permute_rows(x, order):
    """``x [B, L, ...]`` with row ``i`` of sample ``b`` taken from row ``order[b, i]``."""
    xp = jnp if isinstance(x, jax.Array) or isinstance(order, jax.Array) else np
    index = xp.asarray(order).reshape(*np.shape(order), *([1] * (np.ndim(x) - 2)))
    return xp.take_along_axis(xp.asarray(x), index, axis=1)


def _vision_context(batch: dict) -> tuple:
    return batch["cos"], batch["sin"], batch["full"], batch["window"]


def scatter_features(x: jax.Array, placeholders: jax.Array, features: jax.Array) -> jax.Array:
    """``x [B, L, D]`` with row ``i`` of ``features [M, D]`` (or ``[B, M, D]``, flattened) written at the ``i``-th
    True of ``placeholders [B, L]`` (row-major order, as ``torch.masked_scatter``)."""
    features = features.reshape(-1, x.shape[-1])  # [B, M, D] (one image set per sample) -> [B M, D]
    index = jnp.clip(jnp.cumsum(placeholders.reshape(-1)) - 1, 0, features.shape[0] - 1)
    gathered = features[index].reshape(x.shape).astype(x.dtype)
    return jnp.where(placeholders[..., None], gathered, x)


def generate(model: Qwen2VL, tokens, max_new_tokens: int, pixel_values=None, image_grid_thw=None, *,
             mm_token_type_ids=None, aifs: bool = False) -> np.ndarray:
    """Greedy continuation of ``tokens [B, L]`` (with images) by ``max_new_tokens`` -> ``[B, L + n]`` int32
    (``aifs``: a permuted prefill, ``Qwen2VL.prefill``)."""
    tokens = np.asarray(tokens)
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}.")
    cache = model.init_cache(tokens.shape[0], tokens.shape[1] + max_new_tokens)
    logits, cache, deltas = model.prefill(tokens, cache, pixel_values, image_grid_thw,
                                          mm_token_type_ids=mm_token_type_ids, aifs=aifs)
    graphdef, state = nnx.split(model)
    out = [tokens, np.asarray(jnp.argmax(logits[:, -1], axis=-1))[:, None]]
    for _ in range(max_new_tokens - 1):
        logits, cache = _step(graphdef, state, jnp.asarray(out[-1], jnp.int32), cache, deltas)
        out.append(np.asarray(jnp.argmax(logits[:, -1], axis=-1))[:, None])
    return np.concatenate(out, axis=1).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, tokens, cache, deltas):
    return nnx.merge(graphdef, state).step(tokens, cache, rope_deltas=deltas)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions, pixel_values, context, layer_caches=None, start=None, order=None):
    out = nnx.merge(graphdef, state).forward(tokens, positions, pixel_values, context, layer_caches, start, order)
    return out if layer_caches is not None else out[0]


def init_model(cfg: Qwen2VLConfig, key: jax.Array) -> Qwen2VL:
    """A randomly initialised model (weights ~ N(0, 0.02), norms 1, biases 0)."""
    check_dtypes_available(cfg)
    return Qwen2VL(cfg, rngs=nnx.Rngs(params=key))


def abstract_model(cfg: Qwen2VLConfig) -> Qwen2VL:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves."""
    return nnx.eval_shape(lambda: Qwen2VL(cfg, rngs=nnx.Rngs(0)))
