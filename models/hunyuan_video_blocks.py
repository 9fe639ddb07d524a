"""HunyuanVideo's transformer blocks (diffusers ``transformer_hunyuan_video.py``): token refiner, double- and
single-stream blocks. The model, its inputs and checkpoint I/O are in ``jquant.models.hunyuan_video``.

Token refiner block (``HunyuanVideoIndividualTokenRefinerBlock``) on projected text ``c [B, T, d]`` with the refiner
conditioning ``y_r`` and the text self-attention mask ``M [B, T, T]``::

    c += gate_msa · W_o(Attn(LN_1(c), M));   c += gate_mlp · W_2 SiLU(W_1 LN_2(c))       (LN_i with weight and bias)
    (gate_msa, gate_mlp) = Linear(SiLU(y_r))

Double-stream block (adaLN-Zero on both streams, RMS qk-norm; Flux's block with the video first)::

    (shift, scale, gate)_{msa, mlp} = Linear(SiLU(y))                                for x, and for c
    q, k, v = [W_q, W_k, W_v](LN(x)(1 + scale) + shift) ; [A_q, A_k, A_v](LN(c)(1 + scale_c) + shift_c)
    q_x, k_x <- RoPE(RMSNorm(q_x), RMSNorm(k_x));  q_c, k_c <- RMSNorm(.)   (RoPE on the video tokens only)
    o = softmax(q kᵀ / √d_h + padding) v over [x; c]
    x += gate · W_o(o_x) ;  x += gate_mlp · FF(LN(x)(1 + scale_mlp) + shift_mlp)       (FF: GELU-tanh)
    c likewise with A_o, FF_c

Single-stream block on ``h = [x; c]`` (parallel attention and MLP, one output projection)::

    shift, scale, gate = Linear(SiLU(y));  n = LN(h)(1 + scale) + shift
    h += gate · W_out([Attn(n) ; GELU_tanh(W_mlp n)])     (Attn: RMS qk-norm, RoPE on the video rows, no W_o)

The joint attention's padding is diffusers': key ``j`` of sample ``b`` is visible to every query when
``j < N + Σ_t text_mask[b, t]`` (``N`` video tokens), i.e. the text mask is read as right padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jquant import ops
from jquant.models.layers import Linear
from jquant.models.sd3 import QKNorm, layer_norm
from jquant.ops.mask import Padding

_LN_EPS = 1e-6
REFINER_MLP_RATIO = 4.0  # diffusers builds the refiner with its default mlp_ratio, not the config's


def linear(n_in: int, n_out: int, cfg, rngs: nnx.Rngs) -> Linear:
    """A biased linear site in the config's parameter dtype."""
    return Linear(n_in, n_out, use_bias=True, sharding=(None, None), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class AffineLayerNorm(nnx.Module):
    """``LN(x) w + b`` over the last axis (PyTorch ``nn.LayerNorm(elementwise_affine=True, eps=1e-6)``)."""

    def __init__(self, dim: int, cfg):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.dtype(cfg.param_dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, _LN_EPS) * self.weight.get_value().astype(x.dtype) + self.bias.get_value().astype(x.dtype)


class FeedForward(nnx.Module):
    """``W_2 act(W_1 x)`` with hidden width ``hidden`` (diffusers ``FeedForward``: ``"gelu-approximate"`` in the
    DiT blocks, ``"linear-silu"`` in the token refiner)."""

    def __init__(self, dim: int, hidden: int, cfg, rngs: nnx.Rngs, *, activation: str):
        self.proj = linear(dim, hidden, cfg, rngs)
        self.out = linear(hidden, dim, cfg, rngs)
        self.activation = activation

    def __call__(self, x: jax.Array, groups: jax.Array | None = None) -> jax.Array:
        h = self.proj(x, groups=groups)
        h = jax.nn.gelu(h, approximate=True) if self.activation == "gelu-tanh" else jax.nn.silu(h)
        return self.out(h, groups=groups)


def heads(y: jax.Array, n: int, norm: QKNorm | None = None) -> jax.Array:
    """``[B, T, n D]`` -> ``[B, T, n, D]``, RMS-normalised per head when ``norm`` is given."""
    b, t, d = y.shape
    y = y.reshape(b, t, n, d // n)
    return y if norm is None else norm(y)


def rope_video(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE (interleaved pairs) on the first ``N = cos.shape[0]`` tokens of ``x [B, T, H, D]``, the video tokens;
    the text tokens after them are left as they are (diffusers applies ``image_rotary_emb`` to the latent stream)."""
    n = cos.shape[0]
    return jnp.concatenate([ops.apply_rope(x[:, :n], cos, sin, "interleaved"), x[:, n:]], axis=1)


def joint_attention(q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array,
                    key_lengths: jax.Array) -> jax.Array:
    """``q, k, v [B, N + T, H, D]`` ordered ``[video; text]``: RoPE on the video rows, attention over the keys
    ``j < key_lengths[b]`` -> ``[B, N + T, H D]``."""
    q, k = rope_video(q, cos, sin), rope_video(k, cos, sin)
    b, n = q.shape[:2]
    return ops.attention(q, k, v, Padding(key_lengths)).reshape(b, n, -1)


class RefinerBlock(nnx.Module):
    """One token-refiner block (module docstring): self-attention over the text under a dense mask, a SiLU MLP,
    both gated by the refiner conditioning."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.heads = cfg.num_attention_heads
        self.norm1, self.norm2 = AffineLayerNorm(d, cfg), AffineLayerNorm(d, cfg)
        self.to_q, self.to_k, self.to_v, self.to_out = (linear(d, d, cfg, rngs) for _ in range(4))
        self.ff = FeedForward(d, int(d * REFINER_MLP_RATIO), cfg, rngs, activation="silu")
        self.norm_out = linear(d, 2 * d, cfg, rngs)

    def __call__(self, c: jax.Array, temb: jax.Array, mask: jax.Array) -> jax.Array:
        """``c [B, T, d]``, ``temb [B, d]``, ``mask [B, T, T]`` bool (query row, key column)."""
        gate_msa, gate_mlp = jnp.split(self.norm_out(jax.nn.silu(temb))[:, None], 2, axis=-1)
        n = self.norm1(c)
        b, t = c.shape[:2]
        o = ops.attention(heads(self.to_q(n), self.heads), heads(self.to_k(n), self.heads),
                          heads(self.to_v(n), self.heads), mask).reshape(b, t, -1)
        c = c + self.to_out(o) * gate_msa
        return c + self.ff(self.norm2(c)) * gate_mlp


class DoubleBlock(nnx.Module):
    """One double-stream block (module docstring)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        self.norm1, self.norm1_context = linear(d, 6 * d, cfg, rngs), linear(d, 6 * d, cfg, rngs)
        self.to_q, self.to_k, self.to_v, self.to_out = (linear(d, d, cfg, rngs) for _ in range(4))
        self.add_q_proj, self.add_k_proj, self.add_v_proj, self.to_add_out = (linear(d, d, cfg, rngs)
                                                                              for _ in range(4))
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (QKNorm(hd, cfg) for _ in range(4))
        mlp = int(d * cfg.mlp_ratio)
        self.ff = FeedForward(d, mlp, cfg, rngs, activation="gelu-tanh")
        self.ff_context = FeedForward(d, mlp, cfg, rngs, activation="gelu-tanh")

    def __call__(self, x: jax.Array, c: jax.Array, temb: jax.Array, bucket: jax.Array, cos: jax.Array,
                 sin: jax.Array, key_lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, N, d]`` video tokens, ``c [B, T, d]`` text tokens, ``temb [B, d]``, ``bucket [B]`` int,
        ``cos, sin [N, d_h]`` (the video tokens' RoPE tables), ``key_lengths [B]`` int (visible joint keys)."""
        g, y = bucket[:, None], jax.nn.silu(temb)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = jnp.split(self.norm1(y, groups=bucket)[:, None], 6, -1)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = jnp.split(
            self.norm1_context(y, groups=bucket)[:, None], 6, -1)
        h = layer_norm(x, _LN_EPS) * (1 + scale) + shift
        hc = layer_norm(c, _LN_EPS) * (1 + c_scale) + c_shift
        n = self.heads
        q = jnp.concatenate([heads(self.to_q(h, groups=g), n, self.norm_q),
                             heads(self.add_q_proj(hc, groups=g), n, self.norm_added_q)], axis=1)
        k = jnp.concatenate([heads(self.to_k(h, groups=g), n, self.norm_k),
                             heads(self.add_k_proj(hc, groups=g), n, self.norm_added_k)], axis=1)
        v = jnp.concatenate([heads(self.to_v(h, groups=g), n), heads(self.add_v_proj(hc, groups=g), n)], axis=1)
        o = joint_attention(q, k, v, cos, sin, key_lengths)
        length = x.shape[1]
        x = x + gate * self.to_out(o[:, :length], groups=g)
        c = c + c_gate * self.to_add_out(o[:, length:], groups=g)
        x = x + gate_mlp * self.ff(layer_norm(x, _LN_EPS) * (1 + scale_mlp) + shift_mlp, g)
        c = c + c_gate_mlp * self.ff_context(layer_norm(c, _LN_EPS) * (1 + c_scale_mlp) + c_shift_mlp, g)
        return x, c

    def calibration_forward(self, hidden: tuple[jax.Array, jax.Array], context: tuple) -> tuple[jax.Array, jax.Array]:
        return self(*hidden, *context)


class SingleBlock(nnx.Module):
    """One single-stream block on the joint sequence ``[x; c]`` (module docstring)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        mlp = int(d * cfg.mlp_ratio)
        self.heads = cfg.num_attention_heads
        self.norm = linear(d, 3 * d, cfg, rngs)
        self.to_q, self.to_k, self.to_v = (linear(d, d, cfg, rngs) for _ in range(3))
        self.norm_q, self.norm_k = QKNorm(hd, cfg), QKNorm(hd, cfg)
        self.proj_mlp = linear(d, mlp, cfg, rngs)
        self.proj_out = linear(d + mlp, d, cfg, rngs)

    def __call__(self, h: jax.Array, temb: jax.Array, bucket: jax.Array, cos: jax.Array, sin: jax.Array,
                 key_lengths: jax.Array) -> jax.Array:
        """``h [B, N + T, d]`` (video first), ``temb [B, d]``, ``bucket [B]``, ``cos, sin [N, d_h]``,
        ``key_lengths [B]``."""
        g = bucket[:, None]
        shift, scale, gate = jnp.split(self.norm(jax.nn.silu(temb), groups=bucket)[:, None], 3, -1)
        n = layer_norm(h, _LN_EPS) * (1 + scale) + shift
        mlp = jax.nn.gelu(self.proj_mlp(n, groups=g), approximate=True)
        o = joint_attention(heads(self.to_q(n, groups=g), self.heads, self.norm_q),
                            heads(self.to_k(n, groups=g), self.heads, self.norm_k),
                            heads(self.to_v(n, groups=g), self.heads), cos, sin, key_lengths)
        return h + gate * self.proj_out(jnp.concatenate([o, mlp], axis=-1), groups=g)

    def calibration_forward(self, hidden: jax.Array, context: tuple) -> jax.Array:
        return self(hidden, *context)
