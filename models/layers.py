"""Building blocks shared by the model families.

This is the only place model code touches compute: every matmul calls
``jquant.ops.linear``, every attention ``jquant.ops.attention``.  Parameters
carry logical sharding names (see ``jquant.sharding``):

  ``vocab``  vocabulary rows        ``embed``  residual stream
  ``heads``  query-head features    ``kv``     key/value-head features
  ``mlp``    feed-forward hidden    ``norm``   norm weights (replicated)
  ``expert`` the expert axis of stacked expert weights

Weights are stored ``[in, out]``; stacked expert weights ``[E, in, out]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import ops
from jquant.calib.capture import record_expert_input, record_input
from jquant.kv import LayerKVCache
from jquant.ops.experts import combine, route, sort_by_expert
from jquant.ops.linear import add_side_branch, split_leading_channel
from jquant.sites import SiteSpec

ShardingNames = tuple[str | None, ...]


def _param(value: jax.Array, names: ShardingNames) -> nnx.Param:
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


_BUCKETED_INIT_MAX = 1 << 22


def _normal_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype, std: float) -> jax.Array:
    """``std * N(0, 1)`` of ``shape``.

    Up to ``2**22`` elements the draw is the first ``prod(shape)`` entries of a flat vector whose length is the next
    power of two, so the random generator compiles once per size bucket instead of once per parameter shape (each
    threefry compile costs about half a second on a CPU), at the price of drawing up to twice the numbers (at most
    16 MB in float32); larger tensors draw their exact shape. The values depend only on ``key``, ``shape`` and
    ``dtype``, traced or not."""
    size = math.prod(shape)
    if size > _BUCKETED_INIT_MAX:
        return std * jax.random.normal(key, shape, dtype)
    bucket = 1 << max(size - 1, 0).bit_length()
    return std * jax.random.normal(key, (bucket,), dtype)[:size].reshape(shape)


class ChannelSplit(nnx.Module):
    """MQuant's RMS side branch of a :class:`Linear` (spec §3.4): ``side [out]`` is the rotated kernel's row 0 kept
    in float (the kernel's row 0 is then zero), ``active`` a 0/1 scalar (0: the layer did not pass the split
    criterion and runs unsplit). Set by ``jquant.transforms.channel_split``."""

    def __init__(self, side: jax.Array, active: jax.Array):
        self.side = nnx.Param(side)
        self.active = nnx.Param(active)


class Linear(nnx.Module):
    """``y = Q_a(x H) @ kernel + bias`` with ``kernel [in, out]``.

    ``H`` is an optional online Hadamard rotation of the input (``input_rotation``:
    its order, ``>= x``'s feature size, zero-padding when larger; its transpose is
    folded into ``kernel`` by ``jquant.transforms``), or a block-diagonal one ``I ⊗ H_B`` of order
    ``input_block_hadamard = B`` on consecutive channel blocks (6Bit-Diffusion), and ``Q_a`` the optional
    activation quantizer (``activation``). Calibration statistics are recorded
    after the rotation, on what the kernel really multiplies.

    ``lora``: an optional low-rank adapter module (``jquant.finetune.LoRA``, set by
    ``jquant.finetune.add_lora``); it is called as ``lora(x, kernel, bias)`` and computes
    ``x kernel + s (x A) B + bias`` through ``jquant.ops.lora_linear`` with a frozen kernel.

    ``channel_split``: an optional :class:`ChannelSplit` (MQuant's RMS): ``y = Q_a(m) @ kernel + x'[..., 0] side``
    where ``x' = x H`` and ``m`` is ``x'`` with channel 0 zeroed (``jquant.ops.linear.split_leading_channel``);
    calibration records ``m``, so static scales and GPTQ see only the quantized branch.
    """

    QUANT_SITE = SiteSpec(param="kernel", contraction_axis=0, kind="linear")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        sharding: ShardingNames,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
    ):
        self.kernel = _param(_normal_init(rngs.params(), (in_features, out_features), param_dtype, init_std), sharding)
        self.bias = _param(jnp.zeros((out_features,), param_dtype), sharding[-1:]) if use_bias else None
        self.activation = None  # an activation Format (or one per group) once a recipe quantizes this layer's inputs
        self.activation_scale = nnx.data(None)  # a calibrated Param for static formats: scalar, or [G] per group
        self.input_rotation = None  # the order of an online Hadamard applied to the input (set by transforms)
        self.input_block_hadamard = None  # the block order B of an online I ⊗ H_B on the input (set by transforms)
        self.lora = nnx.data(None)  # a LoRA adapter module (set by jquant.finetune.add_lora)
        self.channel_split = nnx.data(None)  # a ChannelSplit (MQuant's RMS, set by jquant.transforms.channel_split)

    def __call__(self, x: jax.Array, affinity: jax.Array | None = None, *, groups: jax.Array | None = None) -> jax.Array:
        """``x [..., in]`` -> ``[..., out]``; ``affinity [...]`` (per-token weights, e.g. a shared expert's gate)
        only adds affinity-weighted calibration statistics. ``groups`` (int ids broadcastable to ``x.shape[:-1]``:
        a modality per token, a timestep bucket per sample) selects per-group activation formats and static
        scales, and splits calibration statistics by group (``jquant.calib.capture``)."""
        if self.input_rotation is not None:
            x = ops.online_hadamard(x, self.input_rotation)
        if self.input_block_hadamard is not None:
            x = ops.block_hadamard(x, self.input_block_hadamard)
        split = self.channel_split
        if split is not None:
            x, lead = split_leading_channel(x, split.active.get_value())
        record_input(self, x, affinity, groups)
        bias = None if self.bias is None else self.bias.get_value()
        if self.lora is not None:
            y = self.lora(x, self.kernel.get_value(), bias)
        else:
            scale = None if self.activation_scale is None else self.activation_scale.get_value()
            y = ops.linear(x, self.kernel.get_value(), bias, activation=self.activation, activation_scale=scale,
                           groups=groups)
        return y if split is None else add_side_branch(y, lead, split.side.get_value())


class CausalConv1d(nnx.Module):
    """Depthwise causal convolution over ``channels`` with ``width`` taps (``jquant.ops.causal_conv1d``).

    ``weight [K, C]`` is a site of kind ``depthwise``: each channel has its own ``K`` taps, so weight formats
    quantize along the taps (axis 0) and only input-free algorithms apply; ``activation`` (and a static
    ``activation_scale``) quantize the ``C`` input channels of each position (MambaQuant's site a1).
    """

    QUANT_SITE = SiteSpec(param="weight", contraction_axis=0, kind="depthwise")

    def __init__(self, channels: int, width: int, *, use_bias: bool, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(width)
        w = jax.random.uniform(rngs.params(), (width, channels), param_dtype, -bound, bound)
        self.weight = _param(w, (None, "mlp"))
        self.bias = _param(jnp.zeros((channels,), param_dtype), ("mlp",)) if use_bias else None
        self.activation = None  # an activation Format once a recipe quantizes this convolution's inputs
        self.activation_scale = nnx.data(None)  # a calibrated Param for static formats

    def __call__(self, x: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, T, C]``, ``state [B, K-1, C]`` -> ``y [B, T, C]``, new state."""
        record_input(self, x)
        bias = None if self.bias is None else self.bias.get_value()
        scale = None if self.activation_scale is None else self.activation_scale.get_value()
        return ops.causal_conv1d(x, self.weight.get_value(), bias, state, activation=self.activation,
                                 activation_scale=scale)


class Conv(nnx.Module):
    """``y = conv(Q_a(x), kernel) + bias`` over 1 to 3 spatial axes, channels last (``jquant.ops.conv``).

    ``x [B, *spatial, C_in]`` -> ``[B, *out_spatial, C_out]``. ``kernel`` is the matrix view
    ``[K C_in, C_out]`` (``K = prod(kernel_size)``, rows ordered kernel offset first, channel last),
    so recipes and algorithms treat it as a linear's ``[in, out]`` weight; calibration records the
    im2col patches ``[B, *out_spatial, K C_in]`` the kernel multiplies (``ops.conv_patches``), whose
    ``Σ Pᵀ P`` is GPTQ's Hessian. ``padding`` / ``padding_mode`` as in ``ops.conv`` (``"causal"``
    pads the first spatial axis only before). ``activation`` (and ``activation_scale``) quantize
    ``x`` per position along its channels.
    """

    QUANT_SITE = SiteSpec(param="kernel", contraction_axis=0, kind="conv")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        *,
        use_bias: bool,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int | tuple[int, int], ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        padding_mode: Literal["zeros", "replicate"] = "zeros",
        sharding: ShardingNames = (None, None),
        init_std: float = 0.02,
    ):
        if not (isinstance(kernel_size, tuple) and 1 <= len(kernel_size) <= 3):
            raise ValueError(f"Conv: kernel_size={kernel_size!r} must be a tuple of 1 to 3 ints (one per spatial "
                             "axis), e.g. (3, 3) for a 2-D convolution.")
        rows = math.prod(kernel_size) * in_channels
        self.kernel = _param(_normal_init(rngs.params(), (rows, out_channels), param_dtype, init_std), sharding)
        self.bias = _param(jnp.zeros((out_channels,), param_dtype), sharding[-1:]) if use_bias else None
        self.kernel_size, self.stride, self.dilation, self.padding_mode = kernel_size, stride, dilation, padding_mode
        self.padding = padding if isinstance(padding, (int, str)) else tuple(
            p if isinstance(p, int) else tuple(p) for p in padding)
        self.activation = None  # an activation Format once a recipe quantizes this layer's inputs
        self.activation_scale = nnx.data(None)  # a calibrated Param for static formats

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, *spatial, C_in]`` -> ``[B, *out_spatial, C_out]``."""
        geometry = dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                        dilation=self.dilation, padding_mode=self.padding_mode)
        if getattr(self, "capture_inputs", False):
            record_input(self, ops.conv_patches(x, **geometry))
        bias = None if self.bias is None else self.bias.get_value()
        scale = None if self.activation_scale is None else self.activation_scale.get_value()
        return ops.conv(x, self.kernel.get_value(), bias, activation=self.activation, activation_scale=scale,
                        **geometry)


class Embed(nnx.Module):
    """Token embedding table ``[V, D]``; ``attend`` reuses it as a tied output head."""

    QUANT_SITE = SiteSpec(param="embedding", contraction_axis=1, kind="embedding")

    def __init__(self, vocab_size: int, dim: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs, init_std: float = 0.02):
        self.embedding = _param(_normal_init(rngs.params(), (vocab_size, dim), param_dtype, init_std), ("vocab", "embed"))

    def __call__(self, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """``ids [B, T]`` -> ``[B, T, D]``."""
        return ops.embedding_lookup(self.embedding.get_value(), ids, dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied head: ``x [B, T, D]`` -> logits ``[B, T, V]`` (``x @ embedding^T``)."""
        return ops.linear(x, ops.as_array(self.embedding.get_value(), x.dtype).T)


class RMSNorm(nnx.Module):
    """``y = w * x / sqrt(mean(x^2) + eps)``, normalised in at least float32 (as Hugging Face does)."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype):
        self.weight = _param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        acc = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(acc)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary position embedding settings.

    ``kind="default"`` is RoPE with base ``theta``; ``"linear"`` divides
    positions by ``factor``; ``"llama3"`` is Llama 3.1's smooth frequency
    scaling (low/high frequency factors around
    ``original_max_position_embeddings``).
    """

    theta: float = 10000.0
    kind: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("default", "linear", "llama3"):
            raise ValueError(f"RopeConfig.kind must be 'default', 'linear' or 'llama3', got {self.kind!r}.")
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"RopeConfig: theta and factor must be positive, got theta={self.theta}, factor={self.factor}.")


def rope_inverse_frequencies(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` in float32 (Hugging Face's rounding)."""
    inv_freq = ops.inverse_frequencies(head_dim, rope.theta)
    if rope.kind == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.kind == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """``positions [B, T]`` -> ``cos, sin [B, T, D]`` (angles in float32, cast to ``dtype``; ``jquant.ops.rope``)."""
    angles = ops.rope_angles(positions[..., None], dims=(2 * len(inv_freq),), inv_freq=(inv_freq,))
    return ops.rope_cos_sin(angles, "half", dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` by ``cos/sin [B, T, D]`` (rotate-half layout, as in Hugging Face Llama)."""
    return ops.apply_rope(x, cos, sin, "half")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Shape and options of a grouped-query self-attention layer."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    sliding_window: int | None = None
    rope: RopeConfig = RopeConfig()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"AttentionConfig: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}."
            )


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3).

    Paths: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (and ``q_norm``, ``k_norm``).
    Run-time options set by transforms and recipes: ``qk_rotation`` applies an online
    Hadamard over the head dimension to queries and keys after RoPE (leaves ``q kᵀ``
    unchanged, spreads key outliers before KV quantization); ``kv_cache`` (a
    ``jquant.kv.KVCacheConfig``) quantizes cached keys and values, with ``kv_smoothing``
    (WKVQuant's channel smoothing) when set. Without a cache the layer attends as token-by-token
    decoding with that cache would (``ops.attention_quantized_past``); ``init_cache`` builds
    caches of that config.
    """

    def __init__(self, cfg: AttentionConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, h * hd, use_bias=cfg.qkv_bias, sharding=("embed", "heads"), **kw)
        self.k_proj = Linear(d, k * hd, use_bias=cfg.qkv_bias, sharding=("embed", "kv"), **kw)
        self.v_proj = Linear(d, k * hd, use_bias=cfg.qkv_bias, sharding=("embed", "kv"), **kw)
        self.o_proj = Linear(h * hd, d, use_bias=cfg.out_bias, sharding=("heads", "embed"), **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, eps=cfg.norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(hd, eps=cfg.norm_eps, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.qk_rotation = False
        self.kv_cache = None  # a jquant.kv.KVCacheConfig once keys/values are quantized
        self.kv_smoothing = nnx.data(None)  # a KVSmoothing (WKVQuant)
        self.capture_kv = False  # when set, calls sow q, keys (before and after RoPE), values and the KV error

    def _rotate_keys(self, k: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        k = apply_rope(k, cos, sin)
        return ops.online_hadamard(k) if self.qk_rotation else k

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: LayerKVCache | None, cache_start: jax.Array | None
    ) -> tuple[jax.Array, LayerKVCache | None]:
        """``x [B, T, hidden]`` at ``positions [B, T]`` -> ``[B, T, hidden]`` and the updated cache.

        Without a cache the layer attends causally within ``x``. With one, the
        new keys/values are written at slots ``cache_start ..`` and the queries
        attend over every filled slot.
        """
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k_raw = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k_raw = self.q_norm(q), self.k_norm(k_raw)
        inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope)
        cos, sin = rope_cos_sin(positions, inv_freq, x.dtype)
        q = apply_rope(q, cos, sin)
        if self.qk_rotation:
            q = ops.online_hadamard(q)
        k = self._rotate_keys(k_raw, cos, sin)
        kvc = self.kv_cache
        pre_rope = kvc is not None and kvc.pre_rope
        if self.capture_kv:
            for name, value in (("q", q), ("k_pre_rope", k_raw), ("k", k), ("v", v)):
                self.sow(nnx.Intermediate, f"kv_{name}", value)
        smoothing = self.kv_smoothing.pairs() if self.kv_smoothing is not None else (None, None)
        k_src = k_raw if pre_rope else k
        if cache is None:
            mask = ops.causal_mask(positions, positions, None, sliding_window=cfg.sliding_window)
            if kvc is None:
                out = ops.attention(q, k, v, mask)
            else:
                k_hat = k_src if kvc.key is None else ops.quantize_kv(k_src, kvc.key, smoothing[0], sink=kvc.sink)
                v_hat = v if kvc.value is None else ops.quantize_kv(v, kvc.value, smoothing[1], sink=kvc.sink)
                if pre_rope:
                    k_hat = self._rotate_keys(k_hat, cos, sin)
                if kvc.simple:
                    out = ops.attention(q, k_hat, v_hat, mask)
                else:
                    out = ops.attention_quantized_past(
                        q, k, v, k_hat, v_hat, mask,
                        kvc.quantized_mask(kvc.key, positions, positions), kvc.quantized_mask(kvc.value, positions, positions))
                if self.capture_kv:  # the attention-output error KV quantization causes here (clip searches)
                    error = (out.astype(jnp.float32) - ops.attention(q, k, v, mask).astype(jnp.float32)) ** 2
                    self.sow(nnx.Intermediate, "kv_attention_error", jnp.mean(error, axis=(1, 2, 3)))
        else:
            if cache.config != kvc:
                raise ValueError(
                    f"Attention: the cache holds keys/values as {getattr(cache.config, 'name', 'float')} but the "
                    f"layer's kv_cache is {getattr(kvc, 'name', 'float')}; build the cache with "
                    "model.init_cache(...), which follows the layers."
                )
            cache, k_all, v_all = cache.update(k_src, v, cache_start, smoothing)
            slots = jnp.arange(cache.capacity, dtype=jnp.int32)
            k_pos = jnp.broadcast_to(slots, (b, cache.capacity))
            if pre_rope:
                k_all = self._rotate_keys(k_all, *rope_cos_sin(k_pos, inv_freq, x.dtype))
            mask = ops.causal_mask(positions, k_pos, k_pos < cache_start + t, sliding_window=cfg.sliding_window)
            out = ops.attention(q, k_all, v_all, mask)
        return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim)), cache


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``. Paths: ``gate_proj``, ``up_proj``, ``down_proj``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, use_bias: bool, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(hidden_size, intermediate_size, sharding=("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, sharding=("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, sharding=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, affinity: jax.Array | None = None) -> jax.Array:
        """``affinity [...]``: per-token weights recorded for calibration (a gated shared expert's gate)."""
        h = jax.nn.silu(self.gate_proj(x, affinity)) * self.up_proj(x, affinity)
        return self.down_proj(h, affinity)


class ExpertLinear(nnx.Module):
    """``E`` stacked linears ``kernel [E, in, out]`` applied to rows grouped by expert (a quantization site).

    ``activation`` quantizes each expert's input rows: one ``Format`` for all experts, or a tuple with one
    entry (a ``Format`` or None) per expert, as mixed-precision recipes (MxMoE) assign them.
    """

    QUANT_SITE = SiteSpec(param="kernel", contraction_axis=1, kind="experts")

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, sharding: ShardingNames,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs, init_std: float = 0.02):
        shape = (num_experts, in_features, out_features)
        self.kernel = _param(_normal_init(rngs.params(), shape, param_dtype, init_std), ("expert", *sharding))
        self.activation = None

    def __call__(self, x: jax.Array, group_sizes: jax.Array, affinity: jax.Array | None = None) -> jax.Array:
        """Rows ``x [M, in]`` sorted by expert (``group_sizes [E]``; ``affinity [M]`` the rows' routing weights,
        recorded for calibration) -> ``[M, out]``."""
        record_expert_input(self, x, group_sizes, affinity)
        if self.activation is not None:
            formats = self.activation if isinstance(self.activation, tuple) else (self.activation,) * group_sizes.shape[0]
            x = ops.quantize_expert_activations(x, group_sizes, formats)
        return ops.grouped_matmul(x, self.kernel.get_value(), group_sizes)


class Experts(nnx.Module):
    """``E`` SwiGLU experts over grouped rows: ``down(silu(gate(x)) * up(x))``. Paths ``gate_proj``, ``up_proj``,
    ``down_proj`` (each an ``ExpertLinear``)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = ExpertLinear(num_experts, hidden_size, intermediate_size, sharding=("embed", "mlp"), **kw)
        self.up_proj = ExpertLinear(num_experts, hidden_size, intermediate_size, sharding=("embed", "mlp"), **kw)
        self.down_proj = ExpertLinear(num_experts, intermediate_size, hidden_size, sharding=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, group_sizes: jax.Array, affinity: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x, group_sizes, affinity)) * self.up_proj(x, group_sizes, affinity)
        return self.down_proj(h, group_sizes, affinity)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseMoEConfig:
    """A sparse mixture-of-experts feed-forward layer.

    ``top_k`` of ``num_experts`` routed SwiGLU experts of width ``intermediate_size``; ``normalize``
    renormalises the top-k probabilities (Mixtral, ``norm_topk_prob``); ``scale`` multiplies them
    (DeepSeek's ``routed_scaling_factor``). ``shared_size`` > 0 adds an always-on SwiGLU expert of that
    width, gated by ``sigmoid(shared_expert_gate(x))`` when ``shared_gate`` (Qwen-MoE) and ungated
    otherwise (DeepSeek-MoE).
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    normalize: bool
    scale: float = 1.0
    shared_size: int = 0
    shared_gate: bool = False

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"SparseMoEConfig.num_experts must be at least 1, got {self.num_experts}.")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"SparseMoEConfig.top_k={self.top_k} must be between 1 and num_experts={self.num_experts}; "
                             "a token cannot be routed to more experts than exist.")
        if self.shared_gate and self.shared_size <= 0:
            raise ValueError("SparseMoEConfig.shared_gate needs a shared expert (shared_size > 0).")


class SparseMoE(nnx.Module):
    """``y = Σ_{j∈topk} c_j E_j(x) [+ g_s(x) E_s(x)]`` (MoEQuant spec §3.1). Paths: ``gate`` (the router, a
    ``Linear [D, E]``), ``experts/{gate,up,down}_proj``, ``shared_expert/*`` and ``shared_expert_gate``.

    With ``capture_routing`` set, a call sows the chosen experts ``[B, T, k]`` (``routed_experts``) and their
    weights (``routed_weights``) as ``nnx.Intermediate`` values, for load statistics and EBSS.
    """

    def __init__(self, cfg: SparseMoEConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.gate = Linear(d, cfg.num_experts, use_bias=False, sharding=("embed", None), param_dtype=param_dtype, rngs=rngs)
        self.experts = Experts(cfg.num_experts, d, cfg.intermediate_size, param_dtype=param_dtype, rngs=rngs)
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.shared_expert = SwiGLU(d, cfg.shared_size, use_bias=False, **kw) if cfg.shared_size else None
        self.shared_expert_gate = (Linear(d, 1, use_bias=False, sharding=("embed", None), **kw)
                                   if cfg.shared_gate else None)
        self.capture_routing = False

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, T, D]`` -> ``[B, T, D]``."""
        return self.forward_with_load_loss(x)[0]

    def forward_with_load_loss(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, T, D]`` -> (``[B, T, D]``, the Switch-Transformer load-balancing loss ``E Σ_e f_e P_e``).

        ``f_e`` is the fraction of the ``N k`` assignments that go to expert ``e``, ``P_e`` its mean router
        probability; the loss is 1 for a perfectly balanced router and ``E`` for a collapsed one.
        """
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        logits = self.gate(x).reshape(b * t, -1)  # [B, T, D] in: calibration statistics stay per sequence
        routing = route(logits, self.cfg.top_k, normalize=self.cfg.normalize, scale=self.cfg.scale)
        if self.capture_routing:
            self.sow(nnx.Intermediate, "routed_experts", routing.experts.reshape(b, t, -1))
            self.sow(nnx.Intermediate, "routed_weights", routing.weights.reshape(b, t, -1))
        grouping = sort_by_expert(routing.experts, self.cfg.num_experts)
        affinity = routing.weights.reshape(-1)[grouping.order]
        out = self.experts(flat[grouping.token], grouping.group_sizes, affinity)
        y = combine(out, routing, grouping, b * t).reshape(b, t, d)
        if self.shared_expert is not None:
            if self.shared_expert_gate is not None:
                gate = jax.nn.sigmoid(self.shared_expert_gate(x))  # [B, T, 1]: MoEQuant's shared-expert affinity
                y = y + gate * self.shared_expert(x, gate[..., 0])
            else:
                y = y + self.shared_expert(x)
        fraction = grouping.group_sizes.astype(jnp.float32) / routing.experts.size
        load_loss = self.cfg.num_experts * jnp.sum(fraction * jnp.mean(routing.probs, axis=0))
        return y, load_loss
