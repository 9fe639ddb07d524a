"""Text-to-video generation: a text encoder, a video diffusion transformer and a causal video VAE.

``TextToVideo`` is ``TextToImage`` (``jquant.text_to_image``) for clips; ``generate(prompts, seed=...)`` is::

    states, mask, pooled = text_encoder.encode(prompts)                (and the unconditional "" encoding)
    z_1 ~ N(0, I) [B, f, h, w, L] from the seed;  z_0 = Euler flow of v(z, σ) from σ = 1 to 0 (jquant.sampling)
    v(z, σ) = v_u + g (v_c - v_u),  v_c = transformer.flow_velocity(z, σ, <its text arguments>)
    videos = vae.decode_latents(z_0)                                   [B, F, H, W, 3] in [-1, 1]

A transformer family takes part by defining ``flow_velocity(latents [B, f, h, w, L], sigmas [B], ...)`` whose
further positional parameters are named from ``text`` (states ``[B, S, D]``), ``text_mask`` (``[B, S]``, True on
real tokens) and ``pooled`` (``[B, D]``): HunyuanVideo takes all three, Wan only ``text``. A VAE family takes
part with ``latent_shape(frames, height, width) -> (f, h, w, L)`` (which refuses frame counts its temporal
compression cannot take) and ``decode_latents``. Pipeline folders are written and read by
``jquant.text_to_image.save_pipeline`` / ``load_pipeline`` (``pipeline.json`` says ``"kind": "text-to-video"``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.module_jit import module_jit
from jquant.sampling.flow import generation_key, sample

TEXT_ARGUMENTS = ("text", "text_mask", "pooled")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VideoSamplingDefaults:
    """What ``generate`` uses unless told otherwise: ``steps`` Euler steps, guidance scale ``guidance`` (None: no
    classifier-free guidance), the SD3-style schedule ``shift``, the text length ``max_length``, the clip length
    ``frames``, the frame side ``size`` in pixels, and ``memory_limit_gb``, the most memory one array of a generation
    may take (``TextToVideo.check_memory``)."""

    steps: int = 20
    guidance: float | None = 4.0
    shift: float = 1.0
    max_length: int = 32
    frames: int = 17
    size: int = 32
    memory_limit_gb: float = 8.0

    def __post_init__(self):
        for name, low in (("steps", 1), ("max_length", 2), ("frames", 1), ("size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"VideoSamplingDefaults.{name} must be an int >= {low}, got {value!r}.")
        if self.guidance is not None and not math.isfinite(self.guidance):
            raise ValueError(f"VideoSamplingDefaults.guidance must be finite or None, got {self.guidance!r}.")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"VideoSamplingDefaults.shift must be a positive finite number, got {self.shift!r}.")
        if not (math.isfinite(self.memory_limit_gb) and self.memory_limit_gb > 0):
            raise ValueError(f"VideoSamplingDefaults.memory_limit_gb must be a positive finite number, got "
                             f"{self.memory_limit_gb!r}.")


def text_arguments(transformer: nnx.Module) -> tuple[str, ...]:
    """The text inputs ``transformer.flow_velocity`` takes after ``(latents, sigmas)``, in order (module docstring)."""
    if not callable(getattr(transformer, "flow_velocity", None)):
        raise TypeError(f"{type(transformer).__name__} has no flow_velocity(latents, sigmas, ...): it cannot run in a "
                        "text-to-video pipeline.")
    params = list(inspect.signature(transformer.flow_velocity).parameters.values())[2:]
    names = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty)
    unknown = [n for n in names if n not in TEXT_ARGUMENTS]
    if unknown or not names:
        raise TypeError(f"{type(transformer).__name__}.flow_velocity takes {names} after (latents, sigmas); a "
                        f"text-to-video transformer takes some of {TEXT_ARGUMENTS}.")
    return names


class VideoVelocity(nnx.Module):
    """The velocity the sampler integrates: ``transformer.flow_velocity`` on ``cond`` (its text arguments in order)."""

    def __init__(self, transformer: nnx.Module):
        self.transformer = transformer

    def __call__(self, latents: jax.Array, sigmas: jax.Array, cond: tuple[jax.Array, ...]) -> jax.Array:
        return self.transformer.flow_velocity(latents, sigmas, *cond)


@dataclasses.dataclass
class TextToVideo:
    """A text encoder (``jquant.models.text_encoder.TextEncoder``), a video transformer with ``flow_velocity`` and a
    causal video VAE (its latent scaling set), plus ``defaults``; ``text_encoder_name`` is what ``save_pipeline``
    records to find the encoder again."""

    text_encoder: object
    transformer: nnx.Module
    vae: nnx.Module
    defaults: VideoSamplingDefaults = dataclasses.field(default_factory=VideoSamplingDefaults)
    text_encoder_name: str = "jq-llama-tiny"
    _memory_checked: set = dataclasses.field(default_factory=set, init=False, repr=False, compare=False)

    KIND = "text-to-video"

    def latent_shape(self, frames: int | None = None) -> tuple[int, int, int, int]:
        """``(f, h, w, L)`` of one clip of ``frames`` frames (``defaults.frames``) at ``defaults.size`` pixels."""
        frames = self.defaults.frames if frames is None else frames
        return tuple(self.vae.latent_shape(frames, self.defaults.size, self.defaults.size))

    def check_memory(self, batch: int, frames: int | None = None, guided: bool = True) -> None:
        """Refuse, before anything runs, a generation of ``batch`` clips of ``frames`` frames whose largest array (of
        the transformer's call on the guided batch, or of the VAE's decode; found by tracing, see
        ``jquant.memory_estimate``) needs more than ``defaults.memory_limit_gb``."""
        from jquant.memory_estimate import largest_intermediate_bytes

        shape = self.latent_shape(frames)
        if (batch, shape, guided) in self._memory_checked:
            return
        rows, length, width = (2 if guided else 1) * batch, self.defaults.max_length, self.text_encoder.hidden_size
        text = {"text": ((rows, length, width), jnp.float32), "text_mask": ((rows, length), jnp.bool_),
                "pooled": ((rows, width), jnp.float32)}
        cond = [jax.ShapeDtypeStruct(*text[name]) for name in text_arguments(self.transformer)]
        needs = {
            "the transformer's attention and activations": largest_intermediate_bytes(
                lambda x, s, *c: self.transformer.flow_velocity(x, s, *c),
                jax.ShapeDtypeStruct((rows, *shape), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.float32), *cond),
            "the VAE decoder's activations": largest_intermediate_bytes(
                self.vae.decode_latents, jax.ShapeDtypeStruct((batch, *shape), jnp.float32)),
        }
        what, need = max(needs.items(), key=lambda item: item[1])
        if need > self.defaults.memory_limit_gb * 2**30:
            raise ValueError(f"{batch} clip(s) of {frames or self.defaults.frames} frames need one array of "
                             f"{need / 2**30:.1f} GiB for {what}, over memory_limit_gb="
                             f"{self.defaults.memory_limit_gb}; generate fewer frames or clips at once, or raise "
                             "the pipeline's memory_limit_gb if the machine has the memory.")
        self._memory_checked.add((batch, shape, guided))

    def encode(self, prompts: Sequence[str], max_length: int | None = None) -> tuple[tuple, tuple]:
        """``(cond, uncond)``: the transformer's text arguments for ``prompts`` and for the unconditional prompt."""
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}.")
        length = max_length or self.defaults.max_length
        names = text_arguments(self.transformer)
        fields = {"text": "states", "text_mask": "mask", "pooled": "pooled"}
        enc = self.text_encoder.encode(list(prompts), length)
        unc = self.text_encoder.unconditional(len(prompts), length)
        return tuple(getattr(enc, fields[n]) for n in names), tuple(getattr(unc, fields[n]) for n in names)

    def generate_latents(self, prompts: Sequence[str], *, seed: int | None = None, key: jax.Array | None = None,
                         steps: int | None = None, guidance: float | None | str = "default", frames: int | None = None,
                         progress: bool = False) -> jax.Array:
        """Latents ``[B, f, h, w, L]`` for ``prompts`` (one clip each) from ``key`` (or ``seed``)."""
        key = generation_key(seed, key)
        steps = self.defaults.steps if steps is None else steps
        guidance = self.defaults.guidance if guidance == "default" else guidance
        cond, uncond = self.encode(prompts)  # checks the prompts first
        shape = (len(prompts), *self.latent_shape(frames))
        self.check_memory(len(prompts), frames, guided=guidance is not None)
        return sample(VideoVelocity(self.transformer), cond, key=key, shape=shape,
                      steps=steps, guidance=guidance, uncond=None if guidance is None else uncond,
                      shift=self.defaults.shift, progress=progress)

    def generate(self, prompts: Sequence[str], *, decode_chunk_frames: int | None = None, **options) -> jax.Array:
        """Videos ``[B, F, H, W, 3]`` in ``[-1, 1]`` (float32) for ``prompts``; ``options`` as ``generate_latents``;
        ``decode_chunk_frames``: decode ``decode_chunk_frames`` latent frames at a time with the VAE's causal cache
        (the same clip; less memory for long clips, more passes for VAEs whose norms span the clip). VGDFR's
        dynamic latent frame rate is ``jquant.frame_rate.sample_dynamic_frame_rate(pipe, prompts, config)``."""
        latents = self.generate_latents(prompts, **options)
        if decode_chunk_frames is None:
            videos = _decode(self.vae, latents)
        else:
            videos = self.vae.decode_latents(latents, chunk_frames=decode_chunk_frames)
        return jnp.clip(videos.astype(jnp.float32), -1.0, 1.0)

    def trajectory_calibration(self, prompts: Sequence[str], *, seed: int, steps: int | None = None,
                               guidance: float | None | str = "default") -> dict[str, np.ndarray]:
        """The transformer's inputs at every velocity call of the guided Euler flow from ``seed`` for ``prompts``
        (conditional and unconditional): ``{"latents" [N, f, h, w, L], "sigmas" [N], <text arguments>}`` with
        ``N = steps x len(prompts) x (2 with guidance, else 1)``, the video families' calibration contract."""
        from jquant.sampling.schedule import flow_sigmas

        steps = self.defaults.steps if steps is None else steps
        guidance = self.defaults.guidance if guidance == "default" else guidance
        names = text_arguments(self.transformer)
        cond, uncond = self.encode(prompts)
        if guidance is not None:
            cond = tuple(jnp.concatenate([c, u]) for c, u in zip(cond, uncond))
        b = len(prompts)
        z = jax.random.normal(generation_key(seed, None), (b, *self.latent_shape()), jnp.float32)
        velocity = module_jit(lambda t, x, s, c: t.flow_velocity(x, s, *c))
        rows: dict[str, list] = {name: [] for name in ("latents", "sigmas", *names)}
        sigmas = flow_sigmas(steps, shift=self.defaults.shift)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = z if guidance is None else jnp.concatenate([z, z])
            sig = jnp.full((x.shape[0],), s, jnp.float32)
            for name, value in (("latents", x), ("sigmas", sig), *zip(names, cond)):
                rows[name].append(np.asarray(value))
            v = velocity(self.transformer, x, sig, cond)
            if guidance is not None:
                v = v[b:] + guidance * (v[:b] - v[b:])
            z = z + (s_next - s) * v
        return {name: np.concatenate(values) for name, values in rows.items()}


@module_jit
def _decode(vae: nnx.Module, latents: jax.Array) -> jax.Array:
    return vae.decode_latents(latents)
