"""Blocks shared by the continuous-token autoregressive image families (``mar``: MAR-style, ``ecar``: ECAR).

Both families run a transformer over continuous VAE latent tokens, conditioned on caption tokens placed before
the image tokens, and sample each token's value with a small per-token flow head (Li et al. 2024, "Autoregressive
Image Generation without Vector Quantization", §3.1 and App. A: ``SimpleMLPAdaLN``):

- ``TextPrefix``: ``(states [B, S, D_text], pooled [B, D_text]) -> [B, 1 + S, d]`` — the pooled caption as one
  token, then the caption's hidden states, each projected to the width ``d``;
- ``SelfAttentionBlock``: pre-LN ``x += W_o attn(LN(x); mask)``, ``x += W_2 GELU(W_1 LN(x))`` (a boolean mask
  ``[N, N]``, True where a query may attend, or full attention);
- ``FlowHead``: MAR's diffusion MLP with the rectified-flow objective: ``c = TimeEmbed(1000 τ) + W_c z``,
  residual blocks ``h += gate · W_2 SiLU(W_1 (LN(h)(1 + scale) + shift))`` with ``(shift, scale, gate) =
  W_ada SiLU(c)`` (adaLN, zero-initialised as in MAR), and ``out = W_o (LN(h)(1 + scale) + shift)``; it predicts
  the velocity ``dx/dτ = ε - x_0`` at ``x_τ = (1 - τ) x_0 + τ ε`` per token.

FLOP counts (``transformer_flops``, ``head_flops``) are those of the matrix products these blocks execute (2 m n k
per ``[m, k] @ [k, n]``; attention counted dense over every (query, key) pair, as the masked XLA dot computes it).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import ops
from jquant.models.layers import Linear
from jquant.models.sd3 import layer_norm, timestep_sinusoid
from jquant.ops.mask import Full

TIME_CHANNELS = 256


def dense(n_in: int, n_out: int, param_dtype: str, rngs: nnx.Rngs, std: float = 0.02) -> Linear:
    """A biased ``Linear [n_in, n_out]`` initialised ``N(0, std²)`` (``std=0``: zeros)."""
    return Linear(n_in, n_out, use_bias=True, sharding=(None, None), param_dtype=jnp.dtype(param_dtype), rngs=rngs,
                  init_std=std)


class TextPrefix(nnx.Module):
    """Caption tokens for the transformer: ``[W_p pooled; W_s states]`` -> ``[B, 1 + S, d]``."""

    def __init__(self, text_dim: int, width: int, param_dtype: str, rngs: nnx.Rngs):
        self.pooled_proj = dense(text_dim, width, param_dtype, rngs)
        self.states_proj = dense(text_dim, width, param_dtype, rngs)

    def __call__(self, states: jax.Array, pooled: jax.Array) -> jax.Array:
        return jnp.concatenate([self.pooled_proj(pooled)[:, None], self.states_proj(states)], axis=1)


class SelfAttentionBlock(nnx.Module):
    """A pre-LN transformer block over ``x [B, N, d]`` (module docstring)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, param_dtype: str, rngs: nnx.Rngs):
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (dense(width, width, param_dtype, rngs) for _ in range(4))
        self.fc1 = dense(width, mlp_ratio * width, param_dtype, rngs)
        self.fc2 = dense(mlp_ratio * width, width, param_dtype, rngs)

    def __call__(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
        """``x [B, N, d]``; ``mask [N, N]`` bool (None: full attention) -> ``[B, N, d]``."""
        b, n, d = x.shape
        h = layer_norm(x)
        q, k, v = (f(h).reshape(b, n, self.heads, d // self.heads) for f in (self.to_q, self.to_k, self.to_v))
        o = ops.attention(q, k, v, Full() if mask is None else mask).reshape(b, n, d)
        x = x + self.to_out(o)
        return x + self.fc2(jax.nn.gelu(self.fc1(layer_norm(x)), approximate=True))


class HeadBlock(nnx.Module):
    """One adaLN residual block of the flow head: ``h += gate · W_2 SiLU(W_1 (LN(h)(1 + scale) + shift))``."""

    def __init__(self, width: int, param_dtype: str, rngs: nnx.Rngs):
        self.ada = dense(width, 3 * width, param_dtype, rngs, std=0.0)
        self.fc1 = dense(width, width, param_dtype, rngs)
        self.fc2 = dense(width, width, param_dtype, rngs)

    def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale, gate = jnp.split(self.ada(jax.nn.silu(c)), 3, axis=-1)
        return h + gate * self.fc2(jax.nn.silu(self.fc1(layer_norm(h) * (1 + scale) + shift)))


class FlowHead(nnx.Module):
    """MAR's per-token MLP head (module docstring): ``(x [..., C], τ [...], z [..., d]) -> v [..., C]``."""

    def __init__(self, channels: int, cond_width: int, width: int, depth: int, param_dtype: str, rngs: nnx.Rngs):
        self.input_proj = dense(channels, width, param_dtype, rngs)
        self.time_1 = dense(TIME_CHANNELS, width, param_dtype, rngs)
        self.time_2 = dense(width, width, param_dtype, rngs)
        self.cond_proj = dense(cond_width, width, param_dtype, rngs)
        self.blocks = nnx.List([HeadBlock(width, param_dtype, rngs) for _ in range(depth)])
        self.final_ada = dense(width, 2 * width, param_dtype, rngs, std=0.0)
        self.out = dense(width, channels, param_dtype, rngs, std=0.0)

    def __call__(self, x: jax.Array, tau: jax.Array, z: jax.Array) -> jax.Array:
        """``x [..., C]`` at noise level ``tau`` (broadcastable to ``x.shape[:-1]``), condition ``z [..., d]``."""
        lead = x.shape[:-1]
        tau = jnp.broadcast_to(jnp.asarray(tau, jnp.float32), lead).reshape(-1)
        temb = timestep_sinusoid(1000.0 * tau).astype(x.dtype).reshape(*lead, TIME_CHANNELS)
        c = self.time_2(jax.nn.silu(self.time_1(temb))) + self.cond_proj(z)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = jnp.split(self.final_ada(jax.nn.silu(c)), 2, axis=-1)
        return self.out(layer_norm(h) * (1 + scale) + shift)


def check_positive_ints(cfg, names: tuple[str, ...]) -> None:
    """Raise naming the field when any of ``names`` is not a positive int."""
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}.")


def masked_flow_loss(head, x0: jax.Array, z: jax.Array, mask: jax.Array, tau: jax.Array, eps: jax.Array
                     ) -> jax.Array:
    """``Σ_i m_i ‖head(x_τ,i, τ_i, z_i) − (ε_i − x_0,i)‖² / (C Σ_i m_i)`` with ``x_τ = (1 − τ) x_0 + τ ε`` (the
    rectified-flow loss of the tokens ``mask`` selects) for fixed draws: ``x0, eps [B, N, C]``, ``z [B, N, d]``,
    ``mask [B, N]`` bool, ``tau [B, N]``; ``head(x_τ, τ, z) -> [B, N, C]``."""
    t = tau[..., None]
    x_t = (1.0 - t) * x0 + t * eps
    err = jnp.mean(jnp.square(head(x_t, tau, z).astype(jnp.float32) - (eps - x0)), axis=-1)
    m = mask.astype(jnp.float32)
    return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)


def check_sampling(steps: int, guidance: float | None, uncond: Any) -> None:
    """Clear errors for the head's step count and the guidance arguments."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int (Euler steps of the flow head), got {steps!r}.")
    if (guidance is None) != (uncond is None):
        raise ValueError("classifier-free guidance needs both guidance and the unconditional caption (uncond); "
                         "give both or neither.")
    if guidance is not None and not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}.")


def guided_cond(cond: tuple[jax.Array, ...], uncond: tuple[jax.Array, ...] | None) -> tuple[jax.Array, ...]:
    """``[cond; uncond]`` on the batch axis (the caption inputs of one guided transformer call), or ``cond``."""
    if uncond is None:
        return cond
    return tuple(jnp.concatenate([c, u]) for c, u in zip(cond, uncond))


def linear_flops(rows: int, n_in: int, n_out: int) -> int:
    """FLOPs of ``[rows, n_in] @ [n_in, n_out]``: ``2 rows n_in n_out``."""
    return 2 * rows * n_in * n_out


def transformer_flops(*, batch: int, tokens: int, width: int, depth: int, mlp_ratio: int) -> int:
    """FLOPs of ``depth`` ``SelfAttentionBlock``s on ``[batch, tokens, width]``: q, k, v, o (4 d²), the MLP
    (2 r d²) per token, and the dense attention ``q kᵀ`` and ``p v`` (2 N² d each)."""
    per_token = 4 * linear_flops(1, width, width) + 2 * linear_flops(1, width, mlp_ratio * width)
    attention = 2 * 2 * tokens * tokens * width
    return batch * depth * (tokens * per_token + attention)


def text_prefix_flops(*, batch: int, text_len: int, text_dim: int, width: int) -> int:
    """FLOPs of ``TextPrefix`` on ``text_len`` caption states and the pooled vector."""
    return batch * (text_len + 1) * linear_flops(1, text_dim, width)


def head_flops(*, tokens: int, channels: int, cond_width: int, width: int, depth: int) -> int:
    """FLOPs of one ``FlowHead`` evaluation on ``tokens`` tokens (all rows of every matmul)."""
    per_token = (linear_flops(1, channels, width) + linear_flops(1, TIME_CHANNELS, width)
                 + linear_flops(1, width, width) + linear_flops(1, cond_width, width)
                 + depth * (linear_flops(1, width, 3 * width) + 2 * linear_flops(1, width, width))
                 + linear_flops(1, width, 2 * width) + linear_flops(1, width, channels))
    return tokens * per_token
