"""The image VAE of latent diffusion (diffusers' ``AutoencoderKL``, as SD, SD3 and Flux use it), channels last.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (§3.1, App. G): an
encoder ``E`` maps images ``x [B, H, W, C_in]`` in ``[-1, 1]`` to the diagonal Gaussian posterior
``q(z | x) = N(μ, diag(exp(logvar)))`` over latents ``z [B, H / f, W / f, L]`` (``f = 2^(n - 1)`` for
``n = len(block_out_channels)``), and a decoder ``D`` maps latents back to images. With ``φ`` = SiLU::

    E:  h = conv_in(x); h = down_blocks(h); h = mid_block(h); m = conv_out(φ(GN(h)))   [B, h, w, 2L]
        (μ, logvar) = split(quant_conv(m)),  logvar clipped to [-30, 20]
    D:  h = conv_in(post_quant_conv(z)); h = mid_block(h); h = up_blocks(h); x̂ = conv_out(φ(GN(h)))

(``quant_conv`` / ``post_quant_conv``: 1x1 convs, absent in SD3 / Flux VAEs; the blocks are in
``models.image_layers``). ``model(images)`` is diffusers' forward, ``decode(encode(images).mode())``.
A diffusion model works on ``latents = (z - shift_factor) * scaling_factor`` (``model.latents``; the
SD3 / Flux pipelines' convention, shift 0 for SD) and decodes ``latents / scaling_factor + shift_factor``
(``model.decode_latents``).

Quantization: every conv is a ``conv`` site and the mid-block attention projections are ``linear`` sites.
Calibration data is ``{"images": [N, H, W, C_in]}``; GPTQ walks two stages (``calibration_stages``): the
encoder's down blocks and mid block on the images, then the decoder's mid and up blocks on the decoded
posterior means. The six convs outside those blocks (encoder and decoder ``conv_in`` / ``conv_out``,
``quant_conv``, ``post_quant_conv``: the pixel and latent interfaces, a small share of the weights) are the
family's ``keep_float``.

diffusers import / export: ``from_diffusers`` reads ``config.json`` + ``diffusion_pytorch_model.safetensors``
(tensor names are the parameter paths joined with dots, ``kernel`` -> ``weight``; conv weights
``[C_out, C_in, k, k]`` <-> the ``[k k C_in, C_out]`` matrix view, linear weights transposed);
``to_diffusers`` writes a folder ``AutoencoderKL.from_pretrained`` reads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.calib.sequential import Stage
from jquant.models.config_io import check_dtypes_available, dataclass_config_from_json, dataclass_config_to_json
from jquant.models.family import Family
from jquant.models.image_layers import DownEncoderBlock2D, GroupNorm, UNetMidBlock2D, UpDecoderBlock2D, conv2d
from jquant.models.tensor_io import export_torch_tensors, import_torch_tensors, torch_layouts

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
CLASS_NAME = "AutoencoderKL"
_EPS = 1e-6  # every GroupNorm of diffusers' Encoder / Decoder
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this range


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """Sizes and latent conventions of an ``AutoencoderKL`` (diffusers' config fields and defaults).

    ``block_out_channels[i]``: channels of encoder down block ``i`` (decoder up blocks in reverse); every one
    must be divisible by ``norm_num_groups``. Each down block has ``layers_per_block`` resnets, each up block
    one more. ``scaling_factor`` / ``shift_factor`` (None: 0) set the diffusion latents (module docstring);
    ``sample_size`` and ``force_upcast`` are pipeline hints kept for export. ``dtype`` / ``param_dtype``:
    compute and storage dtype names.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: DTypeName = "float32"
    param_dtype: DTypeName = "float32"

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            _check_positive_int(getattr(self, name), f"VAEConfig.{name}")
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels must name at least one block's channels, e.g. (128, 256).")
        for c in self.block_out_channels:
            _check_positive_int(c, "VAEConfig.block_out_channels entries")
            if c % self.norm_num_groups:
                raise ValueError(f"VAEConfig: block_out_channels {self.block_out_channels} must all be divisible by "
                                 f"norm_num_groups={self.norm_num_groups} (GroupNorm splits them into groups).")
        sizes = self.sample_size if isinstance(self.sample_size, tuple) else (self.sample_size,)
        for s in sizes:
            _check_positive_int(s, "VAEConfig.sample_size")
        if not (isinstance(self.scaling_factor, (int, float)) and math.isfinite(self.scaling_factor)
                and self.scaling_factor > 0):
            raise ValueError(f"VAEConfig.scaling_factor must be a finite positive number, got {self.scaling_factor!r}.")
        if self.shift_factor is not None and not (isinstance(self.shift_factor, (int, float))
                                                  and math.isfinite(self.shift_factor)):
            raise ValueError(f"VAEConfig.shift_factor must be a finite number or None, got {self.shift_factor!r}.")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16", "float64"):
                raise ValueError(f"VAEConfig.{name} must be float32, bfloat16, float16 or float64, "
                                 f"got {getattr(self, name)!r}.")

    @property
    def downsampling(self) -> int:
        """``f``: image height (and width) over latent height (and width)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def replace(self, **changes) -> VAEConfig:
        return dataclasses.replace(self, **changes)


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


class Posterior(NamedTuple):
    """The diagonal Gaussian ``N(mean, diag(exp(logvar)))`` over latents ``[B, h, w, L]`` (or video latents ``[B, f,
    h, w, L]``; diffusers' ``DiagonalGaussianDistribution``); unpacks as ``mean, logvar``."""

    mean: jax.Array
    logvar: jax.Array

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + exp(logvar / 2) * ε``, ``ε ~ N(0, I)`` drawn from ``key``."""
        return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def kl(self) -> jax.Array:
        """``KL(q || N(0, I)) = ½ Σ (mean² + exp(logvar) - 1 - logvar)`` over every axis but the batch: ``[B]``."""
        terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


class Encoder(nnx.Module):
    """``x [B, H, W, C_in]`` -> moments ``[B, H / f, W / f, 2L]`` (before ``quant_conv``)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        pd, widths, groups = jnp.dtype(cfg.param_dtype), cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv2d(cfg.in_channels, widths[0], 3, padding=1, param_dtype=pd, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(widths[max(i - 1, 0)], c, num_layers=cfg.layers_per_block,
                               downsample=i < len(widths) - 1, groups=groups, eps=_EPS, param_dtype=pd, rngs=rngs)
            for i, c in enumerate(widths)])
        self.mid_block = UNetMidBlock2D(widths[-1], add_attention=cfg.mid_block_add_attention, groups=groups,
                                        eps=_EPS, param_dtype=pd, rngs=rngs)
        self.conv_norm_out = GroupNorm(widths[-1], groups, eps=_EPS, param_dtype=pd)
        self.conv_out = conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1, param_dtype=pd, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.tail(self.mid_block(h))

    def tail(self, h: jax.Array) -> jax.Array:
        """The mid block's output -> moments: ``conv_out(φ(GN(h)))``."""
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """``z [B, h, w, L]`` (after ``post_quant_conv``) -> images ``[B, f h, f w, C_out]``."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        pd, groups = jnp.dtype(cfg.param_dtype), cfg.norm_num_groups
        widths = cfg.block_out_channels[::-1]
        self.conv_in = conv2d(cfg.latent_channels, widths[0], 3, padding=1, param_dtype=pd, rngs=rngs)
        self.mid_block = UNetMidBlock2D(widths[0], add_attention=cfg.mid_block_add_attention, groups=groups,
                                        eps=_EPS, param_dtype=pd, rngs=rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(widths[max(i - 1, 0)], c, num_layers=cfg.layers_per_block + 1,
                             upsample=i < len(widths) - 1, groups=groups, eps=_EPS, param_dtype=pd, rngs=rngs)
            for i, c in enumerate(widths)])
        self.conv_norm_out = GroupNorm(widths[-1], groups, eps=_EPS, param_dtype=pd)
        self.conv_out = conv2d(widths[-1], cfg.out_channels, 3, padding=1, param_dtype=pd, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
    """The VAE (module docstring). Images ``[B, H, W, C_in]`` in ``[-1, 1]``, ``H`` and ``W`` multiples of ``f``."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        pd, latent = jnp.dtype(config.param_dtype), config.latent_channels
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.quant_conv = (conv2d(2 * latent, 2 * latent, 1, param_dtype=pd, rngs=rngs)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (conv2d(latent, latent, 1, param_dtype=pd, rngs=rngs)
                                if config.use_post_quant_conv else None)

    def encode(self, images: jax.Array) -> Posterior:
        """``images [B, H, W, C_in]`` -> the posterior ``(mean, logvar)``, each ``[B, H / f, W / f, L]``."""
        return self._posterior(self.encoder(self._images(images)))

    def decode(self, latents: jax.Array) -> jax.Array:
        """``latents [B, h, w, L]`` (unscaled ``z``) -> images ``[B, f h, f w, C_out]``."""
        return self.decoder(self._post_quant(self._latents(latents)))

    def __call__(self, images: jax.Array) -> jax.Array:
        """diffusers' forward: ``decode(encode(images).mode())``, ``[B, H, W, C_in]`` -> ``[B, H, W, C_out]``."""
        return self.decode(self.encode(images).mode())

    def latents(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Diffusion latents ``(z - shift_factor) * scaling_factor``: ``z`` the posterior mode, or a sample drawn
        with ``key`` (what SD3 / Flux training scripts use)."""
        posterior = self.encode(images)
        z = posterior.mode() if key is None else posterior.sample(key)
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Images from diffusion latents: ``decode(latents / scaling_factor + shift_factor)`` (the pipelines' step)."""
        z = self._latents(latents) / self.config.scaling_factor + (self.config.shift_factor or 0.0)
        return self.decode(z)

    def _posterior(self, moments: jax.Array) -> Posterior:
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, *_LOGVAR_RANGE))

    def _post_quant(self, z: jax.Array) -> jax.Array:
        return z if self.post_quant_conv is None else self.post_quant_conv(z)

    def _images(self, images: jax.Array) -> jax.Array:
        self._check_image_shape(tuple(images.shape))
        return images.astype(self.config.dtype)

    def _check_image_shape(self, shape: tuple[int, ...]) -> None:
        cfg = self.config
        f = cfg.downsampling
        if len(shape) != 4 or shape[-1] != cfg.in_channels or shape[1] % f or shape[2] % f:
            raise ValueError(f"AutoencoderKL: images must be [B, H, W, {cfg.in_channels}] (channels last) with H and W "
                             f"multiples of {cfg.downsampling}; got shape {shape}. Transpose NCHW images with "
                             "x.transpose(0, 2, 3, 1) and pad or resize odd sizes.")

    def _latents(self, latents: jax.Array) -> jax.Array:
        shape, channels = tuple(latents.shape), self.config.latent_channels
        if len(shape) != 4 or shape[-1] != channels:
            raise ValueError(f"AutoencoderKL: latents must be [B, h, w, {channels}] (channels last); got shape "
                             f"{shape}.")
        return latents.astype(self.config.dtype)

    def check_calibration(self, calib) -> dict:
        """Calibration data ``{"images": [N, H, W, C_in]}`` (finite; ``H``, ``W`` multiples of ``f``), as float32
        numpy."""
        cfg = self.config
        if not isinstance(calib, dict) or set(calib) != {"images"}:
            found = sorted(calib) if isinstance(calib, dict) else type(calib).__name__
            raise ValueError(f"AutoencoderKL calibration must be a dict {{'images': [N, H, W, {cfg.in_channels}]}} "
                             f"(channels last, values in [-1, 1]), got {found}.")
        images = np.asarray(calib["images"], np.float32)
        self._check_image_shape(images.shape)
        if not np.all(np.isfinite(images)):
            raise ValueError("calib['images'] holds NaN or Inf; pass finite images in [-1, 1].")
        return {"images": images}

    def calibration_stages(self) -> list[Stage]:
        """Encoder blocks on the images, then decoder blocks on the decoded posterior means (module docstring)."""
        encoder, decoder = self.encoder, self.decoder
        return [Stage(blocks=[*encoder.down_blocks, encoder.mid_block], enter=_enter_encoder),
                Stage(blocks=[decoder.mid_block, *decoder.up_blocks], enter=_enter_decoder)]


def init_model(config: VAEConfig, key: jax.Array) -> AutoencoderKL:
    """A randomly initialised VAE (weights ~ N(0, 1 / fan_in), norms 1, biases 0)."""
    check_dtypes_available(config)
    return AutoencoderKL(config, rngs=nnx.Rngs(params=key))


def _enter_encoder(m: AutoencoderKL, batch: dict, previous) -> tuple[jax.Array, None]:
    """``calibration_stages``' entries (module level, so each compiles once per model structure)."""
    return m.encoder.conv_in(m._images(batch["images"])), None


def _enter_decoder(m: AutoencoderKL, batch: dict, previous) -> tuple[jax.Array, None]:
    mean = m._posterior(m.encoder.tail(previous[0])).mean
    return m.decoder.conv_in(m._post_quant(mean)), None


def abstract_model(config: VAEConfig) -> AutoencoderKL:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------
# diffusers import / export
# ----------------------------------------------------------------------------

_DOWN_BLOCK, _UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
# diffusers config keys this converter computes (keys starting with "_" are bookkeeping).
_DIFFUSERS_KEYS = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "latents_mean",
    "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
}


def config_from_diffusers(config: dict, *, dtype: DTypeName = "float32",
                          param_dtype: DTypeName | None = None) -> VAEConfig:
    """A ``VAEConfig`` from an ``AutoencoderKL`` ``config.json`` dict (diffusers' defaults for absent keys).

    Refuses what this implementation does not compute: other block types or activations, per-channel latent
    statistics (``latents_mean`` / ``latents_std``), unknown keys.
    """
    unknown = sorted(k for k in config if k not in _DIFFUSERS_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"AutoencoderKL config.json has attributes the converter does not handle: {unknown}.")
    widths = tuple(config.get("block_out_channels", (64,)))
    for key, block in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
        types = tuple(config.get(key, (block,)))
        if types != (block,) * len(widths):
            raise ValueError(f"AutoencoderKL config.json {key}={list(types)}: only {len(widths)} x {block!r} (one per "
                             f"block_out_channels entry) is supported.")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"AutoencoderKL config.json act_fn={config['act_fn']!r}: only 'silu' is supported.")
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise ValueError(f"AutoencoderKL config.json sets {key}: per-channel latent statistics are not supported "
                             "(only scaling_factor and shift_factor).")
    defaults = VAEConfig()
    fields = ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "sample_size",
              "scaling_factor", "shift_factor", "force_upcast", "use_quant_conv", "use_post_quant_conv",
              "mid_block_add_attention")
    values = {name: config.get(name, getattr(defaults, name)) for name in fields}
    return VAEConfig(block_out_channels=widths, **values, dtype=dtype, param_dtype=param_dtype or dtype)


def config_to_diffusers(cfg: VAEConfig) -> dict:
    """The ``config.json`` dict of an ``AutoencoderKL`` with ``cfg``'s architecture."""
    n = len(cfg.block_out_channels)
    return {
        "_class_name": CLASS_NAME, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": [_DOWN_BLOCK] * n, "up_block_types": [_UP_BLOCK] * n,
        "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block, "act_fn": "silu",
        "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_num_groups,
        "sample_size": list(cfg.sample_size) if isinstance(cfg.sample_size, tuple) else cfg.sample_size,
        "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor, "latents_mean": None,
        "latents_std": None, "force_upcast": cfg.force_upcast, "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv, "mid_block_add_attention": cfg.mid_block_add_attention,
    }


def from_tensors(cfg: VAEConfig, tensors: dict[str, np.ndarray], *, source: str = "tensors") -> AutoencoderKL:
    """Build an ``AutoencoderKL`` from diffusers-named arrays (PyTorch layouts), validating every one first."""
    check_dtypes_available(cfg)
    abstract = abstract_model(cfg)
    return import_torch_tensors(abstract, tensors, torch_layouts(abstract), param_dtype=cfg.param_dtype,
                                source=source, what="AutoencoderKL")


def from_diffusers(path: str | os.PathLike, *, dtype: DTypeName = "float32",
                   param_dtype: DTypeName | None = None) -> AutoencoderKL:
    """Load a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    ``dtype`` is the compute dtype; ``param_dtype`` defaults to the dtype the tensors are stored in. A folder
    of another ``_class_name`` is refused with a ValueError naming it; missing, misshapen or unexpected
    tensors are refused before any model is built.
    """
    from jquant.models import hf_io

    config = hf_io.read_diffusers_config(path, (CLASS_NAME,))
    tensors = hf_io.read_safetensors(path, weights_name=hf_io.DIFFUSERS_FILE)
    cfg = config_from_diffusers(config, dtype=dtype,
                                param_dtype=param_dtype or hf_io.stored_dtype(tensors, default=dtype))
    return from_tensors(cfg, tensors, source=str(path))


def to_tensors(model: AutoencoderKL) -> dict[str, np.ndarray]:
    """diffusers-named numpy arrays of a float ``model`` (PyTorch layouts); quantized sites are refused."""
    return export_torch_tensors(model, torch_layouts(model))


def to_diffusers(model: AutoencoderKL, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a diffusers ``AutoencoderKL`` folder, atomically (``hf_io.write_checkpoint``);
    ``overwrite=True`` replaces a folder jquant wrote earlier."""
    from jquant.models import hf_io

    return hf_io.write_checkpoint(path, config_to_diffusers(model.config), to_tensors(model), overwrite=overwrite,
                                  weights_name=hf_io.DIFFUSERS_FILE)


FAMILY = Family(
    name="vae",
    config_class=VAEConfig,
    model_class=AutoencoderKL,
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, VAEConfig),
    checkpoint_protocol="the manifest's config holds the VAEConfig fields (config_io.dataclass_config_to_json).",
    diffusers_class_names=(CLASS_NAME,),
    from_diffusers=from_diffusers,
    to_diffusers=to_diffusers,
    presets={
        # 0.95M parameters: 32x32 RGB -> 8x8x4 latents (f = 4, 12x fewer numbers), SD3 / Flux style (no quant
        # convs). One training step (encode, sample, decode, Adam) on 32 images takes ~1.8 s on the shared 2-core
        # CPU, so ~30 minutes is ~1,000 steps (32k images). Scale and shift are set after training from the
        # latents' statistics: config.replace(scaling_factor=1 / std, shift_factor=mean).
        "jq-vae-tiny": VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
                                 norm_num_groups=16, sample_size=32, scaling_factor=1.0, shift_factor=0.0,
                                 use_quant_conv=False, use_post_quant_conv=False),
    },
    keep_float=("encoder/conv_in", "encoder/conv_out", "quant_conv", "post_quant_conv", "decoder/conv_in",
                "decoder/conv_out"),
)
