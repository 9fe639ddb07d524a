"""ECAR: stage-wise continuous token maps with a multistage flow (the ``ecar`` family, ``jq-ecar-tiny``).

Yuan et al. 2024, "E-CAR: Efficient Continuous Autoregressive Image Generation via Multistage Modeling" (spec
``ecar.md``; the stage bookkeeping, re-noise rule and multistage sampler are ``jquant.ecar``). The ``h x h x C``
latents are generated as token maps ``M_s`` of ``r_s x r_s`` tokens, ``r_1 < … < r_S = h``:

- one transformer (``ar_blocks.SelfAttentionBlock``, the blocks MAR uses) over ``[caption prefix; stage 1; …;
  stage S]`` with the block-causal mask (``jquant.ecar.block_causal_mask``). Stage 1's inputs are learned start
  tokens, stage ``s + 1``'s the projection of ``Up₂(Y_s^end)``; each token adds the 2-D sin-cos position of its
  cell on the final grid and a learned stage embedding. The outputs of stage ``s`` are its conditions ``z_s``;
- a per-token flow head (``ar_blocks.FlowHead``) conditioned on ``z_s`` plus a learned per-stage head embedding
  (one head shared by the stages, told the stage), predicting ``dY/dτ`` inside the stage's noise window.

Training (teacher forcing, every stage in every batch): ``M_s = AreaDown(x, r_s)``, endpoints from
``jquant.ecar.stage_endpoints``, AR inputs ``Up₂(Y_s^end)`` from the same endpoints, and the mean over stages of
the per-token flow loss ``ar_blocks.masked_flow_loss`` (``x_0 = Y^end``, ``ε = Y^start``, all tokens).

Sampling: S transformer forwards (stage ``s`` runs the prefix and stages ``1..s``; no KV cache), each stage's head
integrated over its ``n_s`` Euler steps with constant classifier-free guidance on the velocity, and the up-sample +
re-noise step between stages (``jquant.ecar.multistage_sample``), all in one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.ecar import StageSchedule, area_down, block_causal_mask, multistage_sample, split_steps, stage_endpoints
from jquant.ecar.renoise import upsample2
from jquant.models import ar_blocks
from jquant.models.config_io import check_dtypes_available, dataclass_config_from_json, dataclass_config_to_json
from jquant.models.family import Family
from jquant.models.sd3 import layer_norm, sincos_2d

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ECARConfig:
    """Sizes of an ECAR model: latents ``latent_size² x latent_channels``; stages ``resolutions`` with noise-window
    ``edges`` (``1 = e_0 > … > e_S = 0``) and default Euler ``stage_steps``; the transformer and head sizes as in
    ``MARConfig``."""

    latent_size: int = 8
    latent_channels: int = 4
    resolutions: tuple[int, ...] = (2, 4, 8)
    edges: tuple[float, ...] = (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0)
    stage_steps: tuple[int, ...] = (7, 7, 6)
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    text_dim: int = 192
    head_width: int = 128
    head_depth: int = 3
    head_batch_mul: int = 4
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("resolutions", "edges", "stage_steps"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        ar_blocks.check_positive_ints(self, ("latent_size", "latent_channels", "width", "depth", "heads",
                                             "mlp_ratio", "text_dim", "head_width", "head_depth", "head_batch_mul"))
        if self.width % self.heads:
            raise ValueError(f"ECARConfig.width={self.width} must be a multiple of heads={self.heads}.")
        self.schedule()

    @property
    def num_stages(self) -> int:
        return len(self.resolutions)

    def schedule(self, stage_steps: tuple[int, ...] | None = None) -> StageSchedule:
        """The ``StageSchedule`` of this config with ``stage_steps`` (default: the config's)."""
        steps = self.stage_steps if stage_steps is None else stage_steps
        return StageSchedule(self.latent_size, self.resolutions, self.edges, steps)

    def replace(self, **changes) -> ECARConfig:
        return dataclasses.replace(self, **changes)


class ECARTransformer(nnx.Module):
    """The ECAR model (module docstring)."""

    def __init__(self, config: ECARConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        pd, dt = cfg.param_dtype, jnp.dtype(cfg.param_dtype)
        self.text = ar_blocks.TextPrefix(cfg.text_dim, cfg.width, pd, rngs)
        self.token_proj = ar_blocks.dense(cfg.latent_channels, cfg.width, pd, rngs)
        r1 = cfg.resolutions[0]
        self.start_tokens = nnx.Param(0.02 * jax.random.normal(rngs.params(), (r1 * r1, cfg.width), dt))
        self.stage_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.num_stages, cfg.width), dt))
        self.head_stage_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.num_stages, cfg.width), dt))
        self.blocks = nnx.List([ar_blocks.SelfAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio, pd, rngs)
                                for _ in range(cfg.depth)])
        self.head = ar_blocks.FlowHead(cfg.latent_channels, cfg.width, cfg.head_width, cfg.head_depth, pd, rngs)

    def _check_text(self, states, pooled) -> None:
        cfg = self.config
        if states.ndim != 3 or states.shape[-1] != cfg.text_dim or pooled.shape != (states.shape[0], cfg.text_dim):
            raise ValueError(f"ECARTransformer: caption states must be [B, S, {cfg.text_dim}] and pooled "
                             f"[B, {cfg.text_dim}], got {tuple(states.shape)} and {tuple(pooled.shape)}.")

    def condition(self, inputs: tuple[jax.Array, ...], states: jax.Array, pooled: jax.Array) -> list[jax.Array]:
        """``[z_1, …, z_k]`` (``z_s [B, r_s², d]``) for ``k = len(inputs) + 1`` stages, with ``inputs[j]`` the AR
        input of stage ``j + 2``, ``Up₂(Y^end) [B, r, r, C]`` at that stage's resolution."""
        self._check_text(states, pooled)
        cfg = self.config
        k = len(inputs) + 1
        if k > cfg.num_stages:
            raise ValueError(f"ECARTransformer.condition: {len(inputs)} stage inputs for {cfg.num_stages} stages.")
        dt = jnp.dtype(cfg.dtype)
        b = states.shape[0]
        h = cfg.latent_size
        stage_embed = self.stage_embed.get_value().astype(dt)
        maps = [jnp.broadcast_to(self.start_tokens.get_value().astype(dt), (b, *self.start_tokens.shape))]
        for j, x in enumerate(inputs):
            r = cfg.resolutions[j + 1]
            if x.shape != (b, r, r, cfg.latent_channels):
                raise ValueError(f"ECARTransformer.condition: input of stage {j + 2} must be [{b}, {r}, {r}, "
                                 f"{cfg.latent_channels}], got {tuple(x.shape)}.")
            maps.append(self.token_proj(x.astype(dt).reshape(b, r * r, -1)))
        maps = [m + sincos_2d(cfg.width, r, h).astype(dt) + stage_embed[s]
                for s, (m, r) in enumerate(zip(maps, cfg.resolutions))]
        prefix = self.text(states.astype(dt), pooled.astype(dt))
        counts = tuple(r * r for r in cfg.resolutions[:k])
        mask = block_causal_mask(prefix.shape[1], counts)
        x = jnp.concatenate([prefix, *maps], axis=1)
        for block in self.blocks:
            x = block(x, mask)
        bounds = np.cumsum((prefix.shape[1],) + counts)
        x = layer_norm(x)
        return [x[:, a:e] for a, e in zip(bounds[:-1], bounds[1:])]

    def velocity(self, stage: int, x: jax.Array, tau: jax.Array, z: jax.Array) -> jax.Array:
        """The head's ``dY/dτ`` for stage ``stage`` (0-based): ``x [B, r, r, C]``, ``tau`` ``[B]`` or ``[B, r, r]``,
        ``z [B, r², d]`` -> ``[B, r, r, C]``."""
        b, r = x.shape[0], x.shape[1]
        tau = jnp.asarray(tau).reshape(b, -1)
        z = z + self.head_stage_embed.get_value()[stage].astype(z.dtype)
        return self.head(x.reshape(b, r * r, -1), tau, z).reshape(x.shape)

    def loss(self, latents: jax.Array, states: jax.Array, pooled: jax.Array, key: jax.Array) -> jax.Array:
        """The training loss (module docstring) of ``latents [B, h, h, C]`` and their captions."""
        cfg = self.config
        schedule = cfg.schedule()
        x = latents.astype(jnp.float32)
        b = x.shape[0]
        maps = [area_down(x, r) for r in cfg.resolutions]
        keys = jax.random.split(key, 2 * cfg.num_stages)
        eps = [jax.random.normal(keys[s], m.shape) for s, m in enumerate(maps)]
        starts, ends = stage_endpoints(maps, eps, schedule)
        z = self.condition(tuple(upsample2(e) for e in ends[:-1]), states, pooled)
        rep = cfg.head_batch_mul
        losses = []
        for s, r in enumerate(cfg.resolutions):
            x0, noise = (jnp.concatenate([a.reshape(b, r * r, -1)] * rep) for a in (ends[s], starts[s]))
            zs = jnp.concatenate([z[s]] * rep)
            tau = jax.random.uniform(keys[cfg.num_stages + s], x0.shape[:2])
            head = lambda xt, t, c, s=s, r=r: self.velocity(s, xt.reshape(-1, r, r, xt.shape[-1]), t, c  # noqa: E731
                                                            ).reshape(xt.shape)
            losses.append(ar_blocks.masked_flow_loss(head, x0, zs, jnp.ones(x0.shape[:2], bool), tau, noise))
        return jnp.mean(jnp.stack(losses))

    def sample_latents(self, cond: tuple[jax.Array, jax.Array], uncond: tuple[jax.Array, jax.Array] | None, *,
                       key: jax.Array, shape: tuple[int, ...], steps: int | None, guidance: float | None,
                       stage_steps: tuple[int, ...] | None = None, progress: bool = False) -> jax.Array:
        """Latents ``shape = [B, h, h, C]`` for captions ``cond = (states, pooled)`` (and ``uncond`` with
        ``guidance``). ``stage_steps`` gives each stage's Euler steps; otherwise ``steps`` in all, spread evenly
        (``split_steps``), or the config's ``stage_steps`` when ``steps`` is None. ``progress`` is unused."""
        cfg = self.config
        expected = (cfg.latent_size, cfg.latent_size, cfg.latent_channels)
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            raise ValueError(f"ECARTransformer.sample_latents: shape must be [B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}] (the model's latents), got {tuple(shape)}.")
        if stage_steps is None:
            stage_steps = cfg.stage_steps if steps is None else split_steps(steps, cfg.num_stages)
        schedule = cfg.schedule(tuple(int(n) for n in stage_steps))
        ar_blocks.check_sampling(sum(schedule.steps), guidance, uncond)
        graphdef, state = nnx.split(self)
        g = None if guidance is None else jnp.float32(guidance)
        return _sample(graphdef, state, cond, uncond, key, g, schedule=schedule, batch=int(shape[0]))


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "batch"))
def _sample(graphdef, state, cond, uncond, key, guidance, *, schedule: StageSchedule, batch: int):
    model = nnx.merge(graphdef, state)
    text = ar_blocks.guided_cond(cond, uncond)
    copies = 1 if uncond is None else 2

    def condition(s: int, inputs: tuple[jax.Array, ...]):
        z = model.condition(tuple(jnp.concatenate([x] * copies) for x in inputs), *text)[s]
        return (z, None) if uncond is None else (z[:batch], z[batch:])

    def velocity(s: int):
        return lambda x, t, z: model.velocity(s, x, t, z)

    return multistage_sample(condition, velocity, schedule, key, batch=batch,
                             channels=model.config.latent_channels, guidance=guidance)


def sampling_flops(cfg: ECARConfig, *, text_len: int, stage_steps: tuple[int, ...] | None = None,
                   guidance: bool = True) -> int:
    """Matmul FLOPs of sampling one image (``ar_blocks`` counting): per stage ``s`` the text prefix, the input
    projections of stages ``2..s``, the transformer over the prefix and stages ``1..s``, and ``n_s`` head
    evaluations on ``r_s²`` tokens; doubled by guidance."""
    schedule = cfg.schedule(stage_steps)
    counts = schedule.token_counts()
    copies = 2 if guidance else 1
    total = 0
    for s, steps in enumerate(schedule.steps):
        seq = 1 + text_len + sum(counts[:s + 1])
        total += (ar_blocks.text_prefix_flops(batch=1, text_len=text_len, text_dim=cfg.text_dim, width=cfg.width)
                  + ar_blocks.linear_flops(sum(counts[1:s + 1]), cfg.latent_channels, cfg.width)
                  + ar_blocks.transformer_flops(batch=1, tokens=seq, width=cfg.width, depth=cfg.depth,
                                                mlp_ratio=cfg.mlp_ratio)
                  + steps * ar_blocks.head_flops(tokens=counts[s], channels=cfg.latent_channels,
                                                 cond_width=cfg.width, width=cfg.head_width, depth=cfg.head_depth))
    return copies * total


def init_model(config: ECARConfig, key: jax.Array) -> ECARTransformer:
    """A randomly initialised ECAR model."""
    check_dtypes_available(config)
    return ECARTransformer(config, rngs=nnx.Rngs(params=key))


def abstract_model(config: ECARConfig) -> ECARTransformer:
    return nnx.eval_shape(lambda: ECARTransformer(config, rngs=nnx.Rngs(0)))


FAMILY = Family(
    name="ecar",
    config_class=ECARConfig,
    model_class=ECARTransformer,
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, ECARConfig),
    checkpoint_protocol="the manifest's config holds the ECARConfig fields (config_io.dataclass_config_to_json).",
    presets={
        # jq-vae-tiny latents (8x8x4), three stages 2 -> 4 -> 8 with equal σ windows; the sizes of jq-mar-tiny.
        "jq-ecar-tiny": ECARConfig(latent_size=8, latent_channels=4, resolutions=(2, 4, 8),
                                   edges=(1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0), stage_steps=(7, 7, 6), width=128, depth=4,
                                   heads=4, text_dim=192, head_width=128, head_depth=3),
        # the same model with one (8: a plain flow over the full map, the spec's reference), two (4 -> 8) or four
        # (1 -> 2 -> 4 -> 8) stages: the stage-count comparison
        "jq-ecar-tiny-1stage": ECARConfig(latent_size=8, latent_channels=4, resolutions=(8,), edges=(1.0, 0.0),
                                          stage_steps=(20,), width=128, depth=4, heads=4, text_dim=192,
                                          head_width=128, head_depth=3),
        "jq-ecar-tiny-2stage": ECARConfig(latent_size=8, latent_channels=4, resolutions=(4, 8), edges=(1.0, 0.5, 0.0),
                                          stage_steps=(10, 10), width=128, depth=4, heads=4, text_dim=192,
                                          head_width=128, head_depth=3),
        "jq-ecar-tiny-4stage": ECARConfig(latent_size=8, latent_channels=4, resolutions=(1, 2, 4, 8),
                                          edges=(1.0, 0.75, 0.5, 0.25, 0.0), stage_steps=(5, 5, 5, 5), width=128,
                                          depth=4, heads=4, text_dim=192, head_width=128, head_depth=3),
    },
)
