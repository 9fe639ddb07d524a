"""Two tiny families that are not token language models, to test the core contracts on.

``TinyMLLM``: a patch tower feeding a small causal LLM. Calibration inputs are
``{"tokens": [N, T] int, "patches": [N, P, patch_dim]}``; the sequence the LLM sees is ``P``
projected image tokens followed by ``T`` text tokens. It calibrates in two stages (tower blocks on
patches, then LLM blocks on the merged sequence) and declares modality groups ``("text", "image")``
for the LLM's linears, which receive the modality id of every token.

``TinyDiT``: a DiT-like stack. Inputs are ``{"latents": [N, L, C], "timesteps": [N] in [0, 1],
"text": [N, S, D]}``; text and latent tokens are concatenated and every block is modulated by the
timestep embedding (adaLN). Its groups are timestep buckets (``"t0"``, ``"t1"``, ...), one id per
sample, for every linear inside the blocks.

Both register as jquant families (``FAMILIES``), so they quantize, save and load like any other.
Their maths is deliberately plain (pre-norm attention + MLP through ``jquant.models.layers`` and
``jquant.ops``); they are fixtures, not reproductions of a published architecture.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import ops
from jquant.calib.data import check_group_ids, num_samples
from jquant.calib.sequential import Stage
from jquant.models.family import Family
from jquant.models.layers import Embed, Linear, RMSNorm
from jquant.sites import ActivationGroups

_SHARDING = (None, None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyMLLMConfig:
    """Sizes of a ``TinyMLLM``; ``dtype``/``param_dtype`` are compute and storage dtype names."""

    vocab_size: int = 32
    patch_dim: int = 12
    hidden_size: int = 32
    num_heads: int = 2
    mlp_size: int = 64
    vision_layers: int = 2
    text_layers: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"

    def replace(self, **changes) -> TinyMLLMConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyDiTConfig:
    """Sizes of a ``TinyDiT``; ``bucket_edges`` split timesteps ``[0, 1]`` into ``len + 1`` buckets."""

    latent_channels: int = 8
    text_dim: int = 16
    hidden_size: int = 32
    num_heads: int = 2
    mlp_size: int = 64
    num_layers: int = 2
    time_dim: int = 16
    bucket_edges: tuple[float, ...] = (1 / 3, 2 / 3)
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "bucket_edges", tuple(self.bucket_edges))

    def replace(self, **changes) -> TinyDiTConfig:
        return dataclasses.replace(self, **changes)


def _linear(n_in: int, n_out: int, cfg, rngs: nnx.Rngs) -> Linear:
    return Linear(n_in, n_out, use_bias=True, sharding=_SHARDING, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
                  init_std=1 / math.sqrt(n_in))


class Block(nnx.Module):
    """Pre-norm block ``x + Attn(norm(x) · m) ; x + MLP(norm(x) · m)`` with optional adaLN modulation ``m``.

    ``x [B, N, d]``; ``groups`` (ids broadcastable to ``[B, N]``) go to every linear; ``shift_scale``
    ``[B, 2, d]`` (from a timestep embedding) modulates both norms as ``norm(x) (1 + scale) + shift``.
    """

    def __init__(self, cfg, *, causal: bool, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.norm1 = RMSNorm(d, eps=1e-6, param_dtype=jnp.dtype(cfg.param_dtype))
        self.norm2 = RMSNorm(d, eps=1e-6, param_dtype=jnp.dtype(cfg.param_dtype))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (_linear(d, d, cfg, rngs) for _ in range(4))
        self.up_proj = _linear(d, cfg.mlp_size, cfg, rngs)
        self.down_proj = _linear(cfg.mlp_size, d, cfg, rngs)
        self.num_heads = cfg.num_heads
        self.causal = causal

    def __call__(self, x: jax.Array, groups: jax.Array | None = None, shift_scale: jax.Array | None = None) -> jax.Array:
        b, n, d = x.shape
        heads = lambda y: y.reshape(b, n, self.num_heads, d // self.num_heads)  # noqa: E731
        h = self._modulate(self.norm1(x), shift_scale)
        q, k, v = (heads(proj(h, groups=groups)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        allowed = jnp.tril(jnp.ones((n, n), bool)) if self.causal else jnp.ones((n, n), bool)
        attn = ops.attention(q, k, v, jnp.broadcast_to(allowed, (b, n, n))).reshape(b, n, d)
        x = x + self.o_proj(attn, groups=groups)
        h = self._modulate(self.norm2(x), shift_scale)
        return x + self.down_proj(jax.nn.gelu(self.up_proj(h, groups=groups)), groups=groups)

    @staticmethod
    def _modulate(h: jax.Array, shift_scale: jax.Array | None) -> jax.Array:
        if shift_scale is None:
            return h
        return h * (1 + shift_scale[:, 1:2]) + shift_scale[:, 0:1]


class VisionBlock(Block):
    """A tower block: bidirectional attention, no groups; calibration context is None."""

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        return self(x)


class TextBlock(Block):
    """An LLM block: causal attention; calibration context is the modality id of every token ``[B, N]``."""

    def calibration_forward(self, x: jax.Array, modality: jax.Array) -> jax.Array:
        return self(x, groups=modality)


class TinyMLLM(nnx.Module):
    """Patch tower -> projector -> causal LLM over ``[image tokens, text tokens]`` (see the module docstring)."""

    def __init__(self, config: TinyMLLMConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        self.patch_embed = _linear(config.patch_dim, d, config, rngs)
        self.vision = nnx.List([VisionBlock(config, causal=False, rngs=rngs) for _ in range(config.vision_layers)])
        self.projector = _linear(d, d, config, rngs)
        self.embed_tokens = Embed(config.vocab_size, d, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.layers = nnx.List([TextBlock(config, causal=True, rngs=rngs) for _ in range(config.text_layers)])
        self.norm = RMSNorm(d, eps=1e-6, param_dtype=jnp.dtype(config.param_dtype))
        self.lm_head = _linear(d, config.vocab_size, config, rngs)

    def __call__(self, batch: dict) -> jax.Array:
        """``{"tokens" [B, T], "patches" [B, P, patch_dim]}`` -> logits ``[B, P + T, vocab]``."""
        x = self.patch_embed(jnp.asarray(batch["patches"], self.config.dtype))
        for block in self.vision:
            x = block(x)
        x, modality = self.merge(x, batch["tokens"])
        for block in self.layers:
            x = block(x, groups=modality)
        return self.lm_head(self.norm(x))

    def merge(self, vision: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The LLM's input ``[B, P + T, d]`` and modality ids ``[B, P + T]`` (1 = image, 0 = text)."""
        image = self.projector(vision)
        text = self.embed_tokens(tokens, jnp.dtype(self.config.dtype))
        modality = jnp.concatenate([jnp.ones(image.shape[:2], jnp.int32), jnp.zeros(text.shape[:2], jnp.int32)], 1)
        return jnp.concatenate([image, text], axis=1), modality

    def activation_groups(self) -> ActivationGroups:
        return ActivationGroups(names=("text", "image"), sites=r"layers/.*")

    def calibration_stages(self) -> list[Stage]:
        return [Stage(blocks=list(self.vision), enter=_enter_vision), Stage(blocks=list(self.layers), enter=_enter_text)]

    def check_calibration(self, calib) -> dict:
        """``{"tokens": int [N, T] < vocab, "patches": float [N, P, patch_dim]}``, as numpy arrays."""
        if not isinstance(calib, dict) or set(calib) != {"tokens", "patches"}:
            raise ValueError("TinyMLLM calibration must be a dict with keys 'tokens' [N, T] and 'patches' "
                             f"[N, P, {self.config.patch_dim}], got {type(calib).__name__} "
                             f"{sorted(calib) if isinstance(calib, dict) else ''}.")
        tokens, patches = np.asarray(calib["tokens"]), np.asarray(calib["patches"], np.float32)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"calib['tokens'] must be integer ids [N, T], got {tokens.dtype} {tokens.shape}.")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"calib['tokens'] ids must lie in [0, {self.config.vocab_size}).")
        if patches.ndim != 3 or patches.shape[-1] != self.config.patch_dim:
            raise ValueError(f"calib['patches'] must be [N, P, {self.config.patch_dim}], got {patches.shape}.")
        return {"tokens": tokens.astype(np.int32), "patches": patches}


def _enter_vision(m: TinyMLLM, batch: dict, previous) -> tuple[jax.Array, None]:
    """``calibration_stages``' entries (module level, so each compiles once per model structure)."""
    return m.patch_embed(jnp.asarray(batch["patches"], m.config.dtype)), None


def _enter_text(m: TinyMLLM, batch: dict, previous) -> tuple[jax.Array, jax.Array]:
    return m.merge(previous[0], batch["tokens"])


class DiTBlock(Block):
    """A DiT block: bidirectional attention, adaLN from the timestep embedding, one bucket id per sample."""

    def __init__(self, cfg: TinyDiTConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, causal=False, rngs=rngs)
        self.modulation = _linear(cfg.hidden_size, 2 * cfg.hidden_size, cfg, rngs)

    def calibration_forward(self, x: jax.Array, context: tuple[jax.Array, jax.Array]) -> jax.Array:
        temb, bucket = context
        return self.forward(x, temb, bucket)

    def forward(self, x: jax.Array, temb: jax.Array, bucket: jax.Array) -> jax.Array:
        """``x [B, N, d]``, ``temb [B, d]``, ``bucket [B]`` int -> ``[B, N, d]``."""
        shift_scale = self.modulation(jax.nn.silu(temb), groups=bucket).reshape(x.shape[0], 2, -1)
        return self(x, groups=bucket[:, None], shift_scale=shift_scale)


class TinyDiT(nnx.Module):
    """Text + latent tokens through adaLN blocks -> a prediction for every latent token ``[B, L, C]``."""

    def __init__(self, config: TinyDiTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        self.latent_in = _linear(config.latent_channels, d, config, rngs)
        self.text_in = _linear(config.text_dim, d, config, rngs)
        self.time_in = _linear(config.time_dim, d, config, rngs)
        self.blocks_ = nnx.List([DiTBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(d, eps=1e-6, param_dtype=jnp.dtype(config.param_dtype))
        self.out = _linear(d, config.latent_channels, config, rngs)

    def __call__(self, batch: dict) -> jax.Array:
        x, (temb, bucket) = self.block_inputs(batch)
        for block in self.blocks_:
            x = block.forward(x, temb, bucket)
        return self.out(self.norm(x[:, batch["text"].shape[1]:]))

    def bucket(self, timesteps: jax.Array) -> jax.Array:
        """Timestep bucket ids ``[B]``: how many of ``bucket_edges`` each timestep reaches."""
        return jnp.sum(timesteps[:, None] >= jnp.asarray(self.config.bucket_edges), axis=1).astype(jnp.int32)

    def block_inputs(self, batch: dict) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """``(tokens [B, S + L, d], (timestep embedding [B, d], bucket [B]))``."""
        dtype = self.config.dtype
        t = jnp.asarray(batch["timesteps"], jnp.float32)
        half = self.config.time_dim // 2
        freqs = jnp.exp(-math.log(1000.0) * jnp.arange(half) / half)
        angles = 1000.0 * t[:, None] * freqs
        temb = self.time_in(jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], -1).astype(dtype))
        x = jnp.concatenate([self.text_in(jnp.asarray(batch["text"], dtype)),
                             self.latent_in(jnp.asarray(batch["latents"], dtype))], axis=1)
        return x, (temb, self.bucket(t))

    def blocks(self) -> list[DiTBlock]:
        return list(self.blocks_)

    def activation_groups(self) -> ActivationGroups:
        return ActivationGroups(names=tuple(f"t{i}" for i in range(len(self.config.bucket_edges) + 1)),
                                sites=r"blocks_/.*")

    def check_calibration(self, calib) -> dict:
        """``{"latents" [N, L, C], "timesteps" [N] in [0, 1], "text" [N, S, D]}`` as float32 numpy arrays."""
        keys = {"latents", "timesteps", "text"}
        if not isinstance(calib, dict) or set(calib) != keys:
            raise ValueError(f"TinyDiT calibration must be a dict with keys {sorted(keys)}.")
        num_samples(calib)
        out = {k: np.asarray(v, np.float32) for k, v in calib.items()}
        t = out["timesteps"]
        if t.ndim != 1 or not np.all(np.isfinite(t)):
            raise ValueError(f"calib['timesteps'] must be finite, one per sample [N], got shape {t.shape}.")
        edges = np.asarray(self.config.bucket_edges)
        buckets = np.where(t < 0, -1, np.where(t > 1, len(edges) + 1, np.sum(t[:, None] >= edges, axis=1)))
        check_group_ids(buckets, self.activation_groups(), "calib['timesteps'] (as timestep buckets; timesteps must "
                        "lie in [0, 1])")
        return out


def _json(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("dtype", "param_dtype")}


def _from_json(config_class):
    return lambda data, *, dtype, param_dtype: config_class(**data, dtype=dtype, param_dtype=param_dtype)


def _init(model_class):
    return lambda cfg, key: model_class(cfg, rngs=nnx.Rngs(params=key))


def _abstract(model_class):
    return lambda cfg: nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(params=0)))


FAMILIES = (
    Family(name="tiny_mllm", config_class=TinyMLLMConfig, model_class=TinyMLLM, init_model=_init(TinyMLLM),
           abstract_model=_abstract(TinyMLLM), config_to_json=_json, config_from_json=_from_json(TinyMLLMConfig),
           checkpoint_protocol="the TinyMLLMConfig fields", keep_float=("patch_embed", "projector", "embed_tokens",
                                                                         "lm_head")),
    Family(name="tiny_dit", config_class=TinyDiTConfig, model_class=TinyDiT, init_model=_init(TinyDiT),
           abstract_model=_abstract(TinyDiT), config_to_json=_json, config_from_json=_from_json(TinyDiTConfig),
           checkpoint_protocol="the TinyDiTConfig fields", keep_float=("latent_in", "text_in", "time_in", "out")),
)
