"""Text-to-image generation: a text encoder, a diffusion transformer and a VAE, sampled by rectified flow.

``TextToImage`` holds the three parts and the sampling defaults; ``generate(prompts, seed=...)`` is::

    states, pooled = text_encoder.encode(prompts)                     (and the unconditional "" encoding)
    z_1 ~ N(0, I) [B, h, w, L] from the seed;  z_0 = Euler flow of v(z, σ) from σ = 1 to 0 (jquant.sampling)
    v(z, σ) = v_u + g (v_c - v_u),  v_c = transformer.flow_velocity(z, σ, states, pooled)
    images = vae.decode_latents(z_0)                                  [B, H, W, 3] in [-1, 1]

A transformer family takes part by defining ``flow_velocity(latents [B, h, w, L], sigmas [B] in [0, 1],
text [B, S, D], pooled [B, P]) -> [B, h, w, L]`` (it maps σ to its own timestep convention: SD3 feeds
``1000 σ``, Flux ``σ`` plus its position ids and guidance).

A pipeline folder (``save_pipeline`` / ``load_pipeline``; bundled as ``jq-mmdit-tiny``) holds
``pipeline.json`` (the sampling defaults and the text encoder: a bundled model's name, or ``text_encoder/``, a
Hugging Face folder with its tokenizer inside the pipeline), ``transformer/`` and ``vae/``: diffusers folders
when float, ``jquant.checkpoint`` folders when quantized (``jquant.models.load`` reads either), and, for a
pipeline compressed with DiTFastAttn (``jquant fastattn``), ``attention_plan.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.atomic import atomic_folder
from jquant.module_jit import module_jit
from jquant.sampling.flow import generation_key, sample

PIPELINE_FILE = "pipeline.json"
TEXT_ENCODER_FOLDER = "text_encoder"
PIPELINE_VERSION = 1
PIPELINE_KINDS = ("text-to-image", "text-to-video")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingDefaults:
    """What ``generate`` uses unless told otherwise: ``steps`` Euler steps, guidance scale ``guidance``
    (None: no classifier-free guidance), the SD3 schedule ``shift``, the text length ``max_length`` and the image
    side ``image_size`` in pixels (None: the VAE's ``sample_size``)."""

    steps: int = 20
    guidance: float | None = 4.0
    shift: float = 1.0
    max_length: int = 32
    image_size: int | None = None

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SamplingDefaults.steps must be a positive int, got {self.steps!r}.")
        if self.guidance is not None and not math.isfinite(self.guidance):
            raise ValueError(f"SamplingDefaults.guidance must be finite or None, got {self.guidance!r}.")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"SamplingDefaults.shift must be a positive finite number, got {self.shift!r}.")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"SamplingDefaults.max_length must be an int >= 2, got {self.max_length!r}.")
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < 1):
            raise ValueError(f"SamplingDefaults.image_size must be a positive int or None, got {self.image_size!r}.")


class FlowVelocity(nnx.Module):
    """The velocity the sampler integrates: ``transformer.flow_velocity`` on ``cond = (states, pooled)``."""

    def __init__(self, transformer: nnx.Module):
        self.transformer = transformer

    def __call__(self, latents: jax.Array, sigmas: jax.Array, cond: tuple[jax.Array, jax.Array]) -> jax.Array:
        states, pooled = cond
        return self.transformer.flow_velocity(latents, sigmas, states, pooled)


@dataclasses.dataclass
class TextToImage:
    """A text encoder (``jquant.models.text_encoder.TextEncoder``), a transformer with ``flow_velocity`` and a VAE
    (``jquant.models.vae.AutoencoderKL`` with its latent scaling set), plus ``defaults``; ``text_encoder_name``
    is what ``save_pipeline`` records to find the encoder again. With an ``attention_plan``
    (``jquant.ditfastattn.AttentionPlan``) the transformer's joint attention runs as the plan says
    (``attention_mode`` "compute" or "masked", ``jquant.ditfastattn.sample_with_plan``)."""

    text_encoder: object
    transformer: nnx.Module
    vae: nnx.Module
    defaults: SamplingDefaults = dataclasses.field(default_factory=SamplingDefaults)
    text_encoder_name: str = "jq-llama-tiny"
    attention_plan: object | None = None
    attention_mode: str = "compute"

    KIND = "text-to-image"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(h, w, L)`` of one image's latents (``defaults.image_size``, else the VAE's ``sample_size``)."""
        cfg = self.vae.config
        size = self.defaults.image_size or cfg.sample_size
        if size % cfg.downsampling:
            raise ValueError(f"image_size {size} is not a multiple of the VAE's downsampling {cfg.downsampling}.")
        side = size // cfg.downsampling
        return side, side, cfg.latent_channels

    def encode(self, prompts: Sequence[str], max_length: int | None = None) -> tuple[tuple, tuple]:
        """``(cond, uncond)``: ``(states, pooled)`` of ``prompts`` and of the unconditional prompt, batch-sized."""
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}.")
        length = max_length or self.defaults.max_length
        enc = self.text_encoder.encode(list(prompts), length)
        unc = self.text_encoder.unconditional(len(prompts), length)
        return (enc.states, enc.pooled), (unc.states, unc.pooled)

    def generate_latents(self, prompts: Sequence[str], *, seed: int | None = None, key: jax.Array | None = None,
                         steps: int | None = None, guidance: float | None | str = "default",
                         progress: bool = False) -> jax.Array:
        """Latents ``[B, h, w, L]`` for ``prompts`` (one image each) from ``key`` (or ``seed``)."""
        key = generation_key(seed, key)
        steps = self.defaults.steps if steps is None else steps
        guidance = self.defaults.guidance if guidance == "default" else guidance
        cond, uncond = self.encode(prompts)
        if hasattr(self.transformer, "sample_latents"):  # a family with its own sampler (MAR, ECAR)
            return self.transformer.sample_latents(cond, None if guidance is None else uncond, key=key,
                                                   shape=(len(prompts), *self.latent_shape), steps=steps,
                                                   guidance=guidance, progress=progress)
        options = dict(key=key, shape=(len(prompts), *self.latent_shape), steps=steps, guidance=guidance,
                       uncond=None if guidance is None else uncond, shift=self.defaults.shift, progress=progress)
        if self.attention_plan is not None:
            from jquant.ditfastattn.sampling import sample_with_plan

            return sample_with_plan(self.transformer, cond, plan=self.attention_plan, mode=self.attention_mode,
                                    **options)
        return sample(FlowVelocity(self.transformer), cond, **options)

    def generate(self, prompts: Sequence[str], **options) -> jax.Array:
        """Images ``[B, H, W, 3]`` in ``[-1, 1]`` (float32) for ``prompts``; ``options`` as ``generate_latents``."""
        latents = self.generate_latents(prompts, **options)
        return jnp.clip(_decode(self.vae, latents).astype(jnp.float32), -1.0, 1.0)


    def trajectory_calibration(self, prompts: Sequence[str], *, seed: int, steps: int | None = None,
                               guidance: float | None | str = "default") -> dict[str, np.ndarray]:
        """Calibration inputs of the transformer drawn along sampler trajectories (PTQ4DiT / Q-DiT / ViDiT-Q style):
        every velocity call of the guided Euler flow from ``seed`` for ``prompts``, conditional and unconditional,
        as ``{"latents" [N, h, w, L], "sigmas" [N], "text" [N, S, D], "pooled" [N, P]}`` with
        ``N = steps x len(prompts) x (2 with guidance, else 1)`` (the transformer families' calibration contract)."""
        from jquant.sampling.schedule import flow_sigmas

        steps = self.defaults.steps if steps is None else steps
        guidance = self.defaults.guidance if guidance == "default" else guidance
        (states, pooled), (u_states, u_pooled) = self.encode(prompts)
        if guidance is not None:
            states, pooled = jnp.concatenate([states, u_states]), jnp.concatenate([pooled, u_pooled])
        b = len(prompts)
        z = jax.random.normal(generation_key(seed, None), (b, *self.latent_shape), jnp.float32)
        sigmas = flow_sigmas(steps, shift=self.defaults.shift)
        velocity = module_jit(lambda t, x, s, c, p: t.flow_velocity(x, s, c, p))
        rows: dict[str, list] = {"latents": [], "sigmas": [], "text": [], "pooled": []}
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = z if guidance is None else jnp.concatenate([z, z])
            sig = jnp.full((x.shape[0],), s, jnp.float32)
            for name, value in (("latents", x), ("sigmas", sig), ("text", states), ("pooled", pooled)):
                rows[name].append(np.asarray(value, np.float32))
            v = velocity(self.transformer, x, sig, states, pooled)
            if guidance is not None:
                v = v[b:] + guidance * (v[:b] - v[b:])
            z = z + (s_next - s) * v
        return {name: np.concatenate(values) for name, values in rows.items()}


@module_jit
def _decode(vae: nnx.Module, latents: jax.Array) -> jax.Array:
    return vae.decode_latents(latents)


def save_pipeline(pipe, path: str | Path, *, overwrite: bool = False, extra: dict | None = None,
                  extra_files=None) -> Path:
    """Write ``pipe`` (a ``TextToImage`` or a ``jquant.text_to_video.TextToVideo``) as a pipeline folder (module
    docstring; ``pipeline.json`` records its ``kind``), atomically; ``extra`` entries go into pipeline.json and
    ``extra_files(folder)`` may add files before the folder is moved into place."""
    from jquant.checkpoint import save
    from jquant.models.loading import bundled_model
    from jquant.models.registry import family_of

    bundled = bundled_model(pipe.text_encoder_name)
    manifest = {"format_version": PIPELINE_VERSION, "kind": pipe.KIND, "text_encoder": pipe.text_encoder_name if bundled
                else TEXT_ENCODER_FOLDER, "defaults": dataclasses.asdict(pipe.defaults), **(extra or {})}
    with atomic_folder(path, overwrite=overwrite) as tmp:
        if not bundled:  # an encoder that is not a bundled model travels with the pipeline
            lm, tokenizer = pipe.text_encoder.model, pipe.text_encoder.tokenizer
            family_of(lm, purpose="save").to_hf(lm, tmp / TEXT_ENCODER_FOLDER, extra_files=tokenizer.save_pretrained)
        for name, part in (("transformer", pipe.transformer), ("vae", pipe.vae)):
            family = family_of(part, purpose="save")
            if getattr(part, "quantization", None) is None and family.to_diffusers is not None:
                family.to_diffusers(part, tmp / name)
            else:
                save(part, tmp / name)
        (tmp / PIPELINE_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if getattr(pipe, "attention_plan", None) is not None:
            pipe.attention_plan.save(tmp)
        if extra_files is not None:
            extra_files(tmp)
    return Path(path).absolute()


def is_pipeline(path: str | Path) -> bool:
    """Whether ``path`` is a pipeline folder (it holds ``pipeline.json``)."""
    return (Path(path) / PIPELINE_FILE).is_file()


def read_pipeline_kind(path: str | Path) -> str:
    """The ``kind`` a pipeline folder's ``pipeline.json`` records (folders written before kinds: text-to-image)."""
    manifest = json.loads((Path(path) / PIPELINE_FILE).read_text())
    return manifest.get("kind", TextToImage.KIND)


def load_pipeline(path: str | Path, *, dtype: str = "float32"):
    """Read a pipeline folder written by ``save_pipeline`` (its transformer and VAE float or quantized, and its
    attention plan if it has one): a ``TextToImage``, or a ``TextToVideo`` where ``pipeline.json``'s ``kind`` is
    ``"text-to-video"``."""
    from jquant.ditfastattn.plan import AttentionPlan
    from jquant.models.loading import load
    from jquant.models.text_encoder import TextEncoder

    folder = Path(path)
    if not is_pipeline(folder):
        raise ValueError(f"{folder} is not a text-to-image pipeline folder: it has no {PIPELINE_FILE}. Pass a "
                         "bundled pipeline name (jquant list models) or a folder written by save_pipeline.")
    manifest = json.loads((folder / PIPELINE_FILE).read_text())
    if manifest.get("format_version") != PIPELINE_VERSION:
        raise ValueError(f"{folder / PIPELINE_FILE}: format_version {manifest.get('format_version')!r} is not "
                         f"{PIPELINE_VERSION}; re-export the pipeline with this version of jquant.")
    kind = manifest.get("kind", TextToImage.KIND)
    if kind not in PIPELINE_KINDS:
        raise ValueError(f"{folder / PIPELINE_FILE}: unknown pipeline kind {kind!r}; this jquant reads "
                         f"{', '.join(PIPELINE_KINDS)}.")
    name = manifest["text_encoder"]
    encoder_path = folder / name if (folder / name).is_dir() else name
    parts = dict(text_encoder=TextEncoder.load(encoder_path), transformer=load(folder / "transformer", dtype=dtype).model,
                 vae=load(folder / "vae", dtype=dtype).model, text_encoder_name=name)
    if kind == "text-to-video":
        from jquant.text_to_video import TextToVideo, VideoSamplingDefaults

        return TextToVideo(defaults=VideoSamplingDefaults(**manifest["defaults"]), **parts)
    return TextToImage(defaults=SamplingDefaults(**manifest["defaults"]), attention_plan=AttentionPlan.load(folder),
                       **parts)
