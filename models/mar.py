"""MAR-style masked autoregressive image model over continuous VAE tokens (the ``mar`` family, ``jq-mar-tiny``).

Li et al. 2024, "Autoregressive Image Generation without Vector Quantization" (MAR). The ``h x w x C`` latents
of ``jq-vae-tiny`` are ``N = h w`` continuous tokens. A bidirectional transformer sees the caption tokens
(``ar_blocks.TextPrefix``) and the image tokens, where every still-unknown token is replaced by a learned mask
embedding, and gives one condition vector ``z_i`` per token; a per-token flow head (``ar_blocks.FlowHead``) models
``p(x_i | z_i)``.

Training (MAR §3.3–3.4): a mask ratio ``r ~ TruncNormal(1, 0.25; [mask_ratio_min, 1])`` per sample masks
``ceil(r N)`` random tokens; the loss is the head's per-token loss on the masked tokens only (eq. 2 with the
rectified-flow objective, ``head_batch_mul`` timesteps per token as MAR's ``diffusion_batch_mul``)::

    L = Σ_i m_i ‖F(x_τ,i, τ_i, z_i) − (ε_i − x_0,i)‖² / (C Σ_i m_i),   x_τ = (1 − τ) x_0 + τ ε,  τ ~ U[0, 1)

MAR trains its head with DDPM ε-prediction (cosine β, 1000 steps) and samples it with 100 DDPM steps; here the
head is a rectified-flow velocity, integrated by ``jquant.sampling.euler_flow``, so MAR and ECAR share one
sampler and one time convention (a design choice, not the paper's).

Sampling (MAR §3.4, MaskGIT's cosine schedule): a random order of the ``N`` positions; before step ``k`` of ``K``,
``n_k`` tokens are still masked (``mask_schedule``: ``n_{k+1} = max(1, min(⌊N cos(π/2 (k+1)/K)⌋, n_k − 1))``,
``n_K = 0``), and step ``k`` predicts the ``n_k − n_{k+1}`` next positions of the order. The counts are a constant of
``(N, K)``; every mask is an array and the steps are one ``lax.scan`` whose head runs on a fixed ``slot`` of
``max_k (n_k − n_{k+1})`` positions of the order per step (``step_slots``), so the whole sampler is one compiled
program with the same shapes at every step. Classifier-free guidance mixes the head's velocity
``v_u + g (v_c − v_u)`` (constant ``g``; MAR's linear-in-step schedule and temperature are not used).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.models import ar_blocks
from jquant.models.config_io import check_dtypes_available, dataclass_config_from_json, dataclass_config_to_json
from jquant.models.family import Family
from jquant.models.sd3 import layer_norm, sincos_2d
from jquant.sampling.flow import euler_flow
from jquant.sampling.schedule import flow_sigmas

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MARConfig:
    """Sizes of a MAR-style model: latents ``latent_size² x latent_channels``; transformer ``depth`` blocks of
    ``width`` (``heads`` heads, MLP ``mlp_ratio x``); caption states of ``text_dim``; flow head ``head_depth``
    blocks of ``head_width``; training mask ratios in ``[mask_ratio_min, 1]``; ``ar_steps`` the default number of
    sampling steps ``K``."""

    latent_size: int = 8
    latent_channels: int = 4
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    text_dim: int = 192
    head_width: int = 128
    head_depth: int = 3
    head_batch_mul: int = 4
    mask_ratio_min: float = 0.7
    ar_steps: int = 8
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        ar_blocks.check_positive_ints(self, ("latent_size", "latent_channels", "width", "depth", "heads", "mlp_ratio",
                                   "text_dim", "head_width", "head_depth", "head_batch_mul", "ar_steps"))
        if self.width % self.heads:
            raise ValueError(f"MARConfig.width={self.width} must be a multiple of heads={self.heads}.")
        if not 0 < self.mask_ratio_min <= 1:
            raise ValueError(f"MARConfig.mask_ratio_min must be in (0, 1], got {self.mask_ratio_min!r}.")
        if self.ar_steps > self.num_tokens:
            raise ValueError(f"MARConfig.ar_steps={self.ar_steps} exceeds the {self.num_tokens} tokens; each step "
                             "predicts at least one token.")

    @property
    def num_tokens(self) -> int:
        return self.latent_size * self.latent_size

    def replace(self, **changes) -> MARConfig:
        return dataclasses.replace(self, **changes)


def mask_schedule(num_tokens: int, steps: int) -> np.ndarray:
    """``[steps + 1]`` int: how many tokens are still masked before each step (module docstring; ``[0] = N``,
    ``[steps] = 0``, strictly decreasing)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_tokens:
        raise ValueError(f"steps={steps!r} must be an int in [1, {num_tokens}] (one token at least per step).")
    counts = [num_tokens]
    for k in range(steps - 1):
        n = math.floor(num_tokens * math.cos(math.pi / 2 * (k + 1) / steps))
        counts.append(max(1, min(n, counts[-1] - 1)))
    return np.asarray(counts + [0], np.int64)


def random_mask(key: jax.Array, batch: int, num_tokens: int, ratio_min: float) -> jax.Array:
    """``[batch, N]`` bool, True on masked tokens: ``ceil(r N)`` random tokens per sample with
    ``r ~ TruncNormal(1, 0.25)`` on ``[ratio_min, 1]`` (MAR's training mask)."""
    k_ratio, k_order = jax.random.split(key)
    ratio = 1.0 + 0.25 * jax.random.truncated_normal(k_ratio, (ratio_min - 1.0) / 0.25, 0.0, (batch,))
    count = jnp.clip(jnp.ceil(ratio * num_tokens), 1, num_tokens)
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_order, (batch, num_tokens)), axis=1), axis=1)
    return rank < count[:, None]


class MARTransformer(nnx.Module):
    """The MAR-style model (module docstring): ``condition`` gives the per-token conditions, ``head`` the flow
    head, ``sample_latents`` the pipeline's sampler."""

    def __init__(self, config: MARConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        pd = cfg.param_dtype
        self.text = ar_blocks.TextPrefix(cfg.text_dim, cfg.width, pd, rngs)
        self.token_proj = ar_blocks.dense(cfg.latent_channels, cfg.width, pd, rngs)
        self.mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.width,), jnp.dtype(pd)))
        self.blocks = nnx.List([ar_blocks.SelfAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio, pd, rngs)
                                for _ in range(cfg.depth)])
        self.head = ar_blocks.FlowHead(cfg.latent_channels, cfg.width, cfg.head_width, cfg.head_depth, pd, rngs)

    def _check(self, tokens, states, pooled) -> None:
        cfg = self.config
        if tokens.ndim != 3 or tokens.shape[1:] != (cfg.num_tokens, cfg.latent_channels):
            raise ValueError(f"MARTransformer: tokens must be [B, {cfg.num_tokens}, {cfg.latent_channels}], got "
                             f"{tuple(tokens.shape)}.")
        b = tokens.shape[0]
        if states.ndim != 3 or states.shape[0] != b or states.shape[-1] != cfg.text_dim:
            raise ValueError(f"MARTransformer: text states must be [B={b}, S, {cfg.text_dim}], got "
                             f"{tuple(states.shape)}.")
        if pooled.shape != (b, cfg.text_dim):
            raise ValueError(f"MARTransformer: pooled must be [{b}, {cfg.text_dim}], got {tuple(pooled.shape)}.")

    def condition(self, tokens: jax.Array, mask: jax.Array, states: jax.Array, pooled: jax.Array) -> jax.Array:
        """``z [B, N, d]`` for ``tokens [B, N, C]`` with ``mask [B, N]`` (True: unknown, replaced by the mask
        embedding), caption ``states [B, S, D]`` and ``pooled [B, D]``."""
        self._check(tokens, states, pooled)
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        x = self.token_proj(tokens.astype(dt))
        x = jnp.where(mask[..., None], self.mask_token.get_value().astype(dt), x)
        x = x + sincos_2d(cfg.width, cfg.latent_size, cfg.latent_size).astype(dt)
        prefix = self.text(states.astype(dt), pooled.astype(dt))
        h = jnp.concatenate([prefix, x], axis=1)
        for block in self.blocks:
            h = block(h)
        return layer_norm(h[:, prefix.shape[1]:])

    def loss(self, latents: jax.Array, states: jax.Array, pooled: jax.Array, key: jax.Array) -> jax.Array:
        """The training loss (module docstring) of ``latents [B, h, w, C]`` and their captions."""
        cfg = self.config
        b = latents.shape[0]
        x0 = latents.reshape(b, -1, cfg.latent_channels).astype(jnp.float32)
        k_mask, k_tau, k_eps = jax.random.split(key, 3)
        mask = random_mask(k_mask, b, cfg.num_tokens, cfg.mask_ratio_min)
        z = self.condition(x0, mask, states, pooled)
        rep = cfg.head_batch_mul
        x0, z, mask = (jnp.concatenate([a] * rep) for a in (x0, z, mask))
        tau = jax.random.uniform(k_tau, mask.shape)
        eps = jax.random.normal(k_eps, x0.shape)
        return ar_blocks.masked_flow_loss(self.head, x0, z, mask, tau, eps)

    def sample_latents(self, cond: tuple[jax.Array, jax.Array], uncond: tuple[jax.Array, jax.Array] | None, *,
                       key: jax.Array, shape: tuple[int, ...], steps: int, guidance: float | None,
                       ar_steps: int | None = None, progress: bool = False) -> jax.Array:
        """Latents ``shape = [B, h, w, C]`` for captions ``cond = (states, pooled)`` (and ``uncond`` with
        ``guidance``): ``ar_steps`` masked steps (default ``config.ar_steps``), each token's head integrated in
        ``steps`` Euler steps. The pipeline's ``generate`` calls this (``progress`` is accepted and unused)."""
        cfg = self.config
        ar_steps = cfg.ar_steps if ar_steps is None else ar_steps
        expected = (cfg.latent_size, cfg.latent_size, cfg.latent_channels)
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            raise ValueError(f"MARTransformer.sample_latents: shape must be [B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}] (the model's latents), got {tuple(shape)}.")
        ar_blocks.check_sampling(steps, guidance, uncond)
        counts = mask_schedule(cfg.num_tokens, ar_steps)
        graphdef, state = nnx.split(self)
        g = None if guidance is None else jnp.float32(guidance)
        return _sample(graphdef, state, cond, uncond, key, g, counts=tuple(int(c) for c in counts),
                       head_steps=int(steps), batch=int(shape[0]))


def head_sample(head: ar_blocks.FlowHead, z: jax.Array, noise: jax.Array, steps: int, guidance: jax.Array | None
                ) -> jax.Array:
    """Integrate the flow head from ``noise [B, n, C]`` (σ = 1) to σ = 0 in ``steps`` uniform Euler steps with
    conditions ``z`` (``[B, n, d]``, or ``[2B, n, d]`` = ``[cond; uncond]`` with ``guidance``)."""
    b = noise.shape[0]
    velocity = lambda x, t, c: head(x, t[:, None], c)  # noqa: E731 - one τ per sample, broadcast over its tokens
    sigmas = flow_sigmas(steps).astype(np.float32)
    if guidance is None:
        return euler_flow(velocity, noise, sigmas, z)
    return euler_flow(velocity, noise, sigmas, z[:b], uncond=z[b:], guidance=guidance)


def step_slots(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(starts [K], sizes [K], slot)`` of a ``mask_schedule``: step ``k`` draws the ``sizes[k]`` positions
    ``order[starts[k]:starts[k] + sizes[k]]``; ``slot = max(sizes)`` is the static number of tokens the head runs on
    per step (the extra ones are computed and discarded)."""
    n = int(counts[0])
    starts = (n - counts[:-1]).astype(np.int32)
    sizes = (counts[:-1] - counts[1:]).astype(np.int32)
    return starts, sizes, int(sizes.max())


@functools.partial(jax.jit, static_argnames=("graphdef", "counts", "head_steps", "batch"))
def _sample(graphdef, state, cond, uncond, key, guidance, *, counts: tuple[int, ...], head_steps: int, batch: int):
    """One ``lax.scan`` over the ``K`` steps; the step's start, size and noise key are its scanned inputs."""
    model = nnx.merge(graphdef, state)
    cfg = model.config
    n, c = cfg.num_tokens, cfg.latent_channels
    starts, sizes, slot = step_slots(np.asarray(counts))
    k_order, k_noise = jax.random.split(key)
    order = jnp.argsort(jax.random.uniform(k_order, (batch, n)), axis=1)  # positions in the order they are drawn
    rank = jnp.argsort(order, axis=1)
    padded = jnp.concatenate([order, order[:, :slot]], axis=1)  # a slot past the end re-reads drawn positions
    text = ar_blocks.guided_cond(cond, uncond)
    copies = 1 if uncond is None else 2
    rows = jnp.arange(batch)[:, None]

    def step(tokens, inputs):
        start, size, k = inputs
        mask = rank >= start
        z = model.condition(jnp.concatenate([tokens] * copies), jnp.concatenate([mask] * copies), *text)
        where = jax.lax.dynamic_slice_in_dim(padded, start, slot, axis=1)
        z = jnp.take_along_axis(z, jnp.concatenate([where] * copies)[..., None], axis=1)
        noise = jax.random.normal(jax.random.fold_in(k_noise, k), (batch, slot, c), jnp.float32)
        drawn = head_sample(model.head, z, noise, head_steps, guidance)
        keep = (jnp.arange(slot) < size)[None, :, None]
        return tokens.at[rows, where].set(jnp.where(keep, drawn, tokens[rows, where])), None

    tokens = jnp.zeros((batch, n, c), jnp.float32)
    tokens, _ = jax.lax.scan(step, tokens, (jnp.asarray(starts), jnp.asarray(sizes),
                                            jnp.arange(len(starts), dtype=jnp.int32)))
    return tokens.reshape(batch, cfg.latent_size, cfg.latent_size, c)


def sampling_flops(cfg: MARConfig, *, text_len: int, head_steps: int, ar_steps: int | None = None,
                   guidance: bool = True) -> int:
    """Matmul FLOPs of sampling one image (``ar_blocks`` counting): per step the text prefix and the transformer
    over ``1 + text_len + N`` tokens, and ``head_steps`` head evaluations on the step's ``slot`` tokens
    (``step_slots``: the static shape; MAR's dynamic one evaluates the ``N`` new tokens only); doubled by guidance
    (conditional and unconditional rows)."""
    ar_steps = cfg.ar_steps if ar_steps is None else ar_steps
    counts = mask_schedule(cfg.num_tokens, ar_steps)
    copies = 2 if guidance else 1
    seq = 1 + text_len + cfg.num_tokens
    per_step = (ar_blocks.text_prefix_flops(batch=1, text_len=text_len, text_dim=cfg.text_dim, width=cfg.width)
                + ar_blocks.linear_flops(cfg.num_tokens, cfg.latent_channels, cfg.width)
                + ar_blocks.transformer_flops(batch=1, tokens=seq, width=cfg.width, depth=cfg.depth,
                                              mlp_ratio=cfg.mlp_ratio))
    slot = step_slots(counts)[2]
    head = ar_blocks.head_flops(tokens=slot, channels=cfg.latent_channels, cond_width=cfg.width,
                                width=cfg.head_width, depth=cfg.head_depth)
    return copies * ar_steps * (per_step + head_steps * head)


def init_model(config: MARConfig, key: jax.Array) -> MARTransformer:
    """A randomly initialised MAR-style model."""
    check_dtypes_available(config)
    return MARTransformer(config, rngs=nnx.Rngs(params=key))


def abstract_model(config: MARConfig) -> MARTransformer:
    return nnx.eval_shape(lambda: MARTransformer(config, rngs=nnx.Rngs(0)))


FAMILY = Family(
    name="mar",
    config_class=MARConfig,
    model_class=MARTransformer,
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, MARConfig),
    checkpoint_protocol="the manifest's config holds the MARConfig fields (config_io.dataclass_config_to_json).",
    presets={
        # jq-vae-tiny latents (8x8x4) captioned by jq-llama-tiny (192-wide states); ~1 M parameters.
        "jq-mar-tiny": MARConfig(latent_size=8, latent_channels=4, width=128, depth=4, heads=4, text_dim=192,
                                 head_width=128, head_depth=3, ar_steps=8),
    },
)
