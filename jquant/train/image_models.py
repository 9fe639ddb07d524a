"""Training jquant's image reference models on the emoji scenes: the judge classifier, the VAE, the MMDiT.

Every trainer runs ``jquant.train.loop.fit`` (AdamW, warm-up + cosine, optional EMA, resumable orbax
checkpoints in ``workdir``) over arrays held in memory; a step's batch is the rows
``default_rng([seed, step]).integers(0, N, batch_size)``, so a resumed run sees the batches an
uninterrupted one would.

- ``train_classifier``: cross-entropy on single-glyph scenes (labels = vocabulary positions); the
  model is the judge of prompt accuracy and the feature extractor of FD-emoji.
- ``train_vae``: ``L = mean |x - D(z)| + mean (x - D(z))^2 + β KL(q(z|x) || N(0, I)) / (H W C)`` with
  ``z ~ q(z|x)`` (the reconstruction terms of the SD VAE without its perceptual and adversarial ones,
  which need pretrained networks); ``with_latent_scaling`` then sets ``shift_factor`` and
  ``scaling_factor`` to the mean and ``1 / std`` of the training latents, as SD3 / Flux do.
- ``train_text_to_image``: rectified-flow matching (``jquant.sampling.flow_matching_loss``) of an image or
  video transformer on VAE latents conditioned on ``jquant.models.text_encoder`` outputs, the text dropped
  to the unconditional encoding with probability ``p_uncond`` (classifier-free guidance training).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jquant.module_jit import module_jit
from jquant.train.loop import LoopConfig, TrainResult, fit


def images_to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> float32 in ``[-1, 1]`` (what the VAE and the classifier take)."""
    return images.astype(np.float32) / 127.5 - 1.0


def unit_range_to_images(x: np.ndarray | jax.Array) -> np.ndarray:
    """float ``[-1, 1]`` -> uint8 ``[N, H, W, 3]`` (rounded, clipped)."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def batch_rows(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The rows of step ``step``'s batch (a deterministic function of ``seed`` and ``step``)."""
    return np.random.default_rng([seed, step]).integers(0, n, size=batch_size)


@module_jit
def _forward(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model(x)


@module_jit
def _posterior_mean(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model.encode(x).mode()


def _batched(fn: Callable[[jax.Array], jax.Array], x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(jnp.asarray(x[i:i + batch_size]))) for i in range(0, len(x), batch_size)])


# ---------------------------------------------------------------------------------------------------------------
# the judge classifier
# ---------------------------------------------------------------------------------------------------------------

def classifier_accuracy(model: nnx.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on float images ``[N, H, W, 3]`` in ``[-1, 1]`` with int labels ``[N]``."""
    logits = _batched(lambda x: _forward(model, x), images, batch_size)
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def train_classifier(model: nnx.Module, images: np.ndarray, labels: np.ndarray, val_images: np.ndarray,
                     val_labels: np.ndarray, cfg: LoopConfig, workdir: str | Path, *, batch_size: int = 128,
                     augment_shift: int = 2, progress: bool = True) -> TrainResult:
    """Cross-entropy training on ``images [N, H, W, 3]`` in ``[-1, 1]`` with labels ``[N]``; validation loss is
    ``1 - accuracy`` on the validation set. Batches are shifted by up to ``augment_shift`` pixels (edge padding)
    so the judge does not key on exact positions."""
    n, size = len(images), images.shape[1]

    def sample_batch(step: int) -> dict:
        rows = batch_rows(n, batch_size, cfg.seed, step)
        x = images[rows]
        if augment_shift:
            rng = np.random.default_rng([cfg.seed, step, 1])
            dy, dx = rng.integers(-augment_shift, augment_shift + 1, size=2)
            pad = np.pad(x, ((0, 0), (augment_shift,) * 2, (augment_shift,) * 2, (0, 0)), mode="edge")
            x = pad[:, augment_shift + dy:augment_shift + dy + size, augment_shift + dx:augment_shift + dx + size]
        return {"images": jnp.asarray(x), "labels": jnp.asarray(labels[rows])}

    def loss(m, batch, key):
        del key
        return optax.softmax_cross_entropy_with_integer_labels(m(batch["images"]), batch["labels"]).mean()

    return fit(model, cfg, workdir, loss=loss, sample_batch=sample_batch, progress=progress, description="classifier",
               validation=lambda m: 1.0 - classifier_accuracy(m, val_images, val_labels))


# ---------------------------------------------------------------------------------------------------------------
# the VAE
# ---------------------------------------------------------------------------------------------------------------

def vae_loss(model: nnx.Module, images: jax.Array, key: jax.Array, kl_weight: float) -> jax.Array:
    """The module docstring's VAE loss for one batch of images ``[B, H, W, 3]`` in ``[-1, 1]``."""
    posterior = model.encode(images)
    recon = model.decode(posterior.sample(key))
    err = recon.astype(jnp.float32) - images
    return jnp.mean(jnp.abs(err)) + jnp.mean(err ** 2) + kl_weight * jnp.mean(posterior.kl()) / images[0].size


def reconstruction_psnr(model: nnx.Module, images: np.ndarray, batch_size: int = 128) -> float:
    """PSNR (dB, data range 2) of ``decode(mode(encode(x)))`` against ``x``, over ``images [N, H, W, C]`` (or clips
    ``[N, F, H, W, C]``, each frame an image) in ``[-1, 1]``: the mean of the per-image PSNRs."""
    from jquant.eval.image import psnr

    recon = _batched(lambda x: _forward(model, x), images, batch_size)
    frames = (-1, *images.shape[-3:])
    return float(psnr(jnp.asarray(np.clip(recon, -1, 1).reshape(frames)), jnp.asarray(images.reshape(frames)),
                      data_range=2.0))


def train_vae(model: nnx.Module, images: np.ndarray, val_images: np.ndarray, cfg: LoopConfig, workdir: str | Path,
              *, batch_size: int = 64, kl_weight: float = 1e-3, progress: bool = True) -> TrainResult:
    """Train the VAE (module docstring); validation loss is ``-PSNR`` of the reconstructions (dB)."""
    n = len(images)

    def sample_batch(step: int) -> jax.Array:
        return jnp.asarray(images[batch_rows(n, batch_size, cfg.seed, step)])

    return fit(model, cfg, workdir, loss=lambda m, x, key: vae_loss(m, x, key, kl_weight), sample_batch=sample_batch,
               validation=lambda m: -reconstruction_psnr(m, val_images), progress=progress, description="vae")


def with_latent_scaling(model: nnx.Module, images: np.ndarray, batch_size: int = 256) -> nnx.Module:
    """A copy of the VAE whose config has ``scaling_factor = 1 / std(z)`` over the posterior means of ``images`` (or
    clips) and, where the config has one, ``shift_factor = mean(z)`` (SD3 / Flux's convention: diffusion latents of
    unit variance; HunyuanVideo's VAE scales without a shift)."""
    z = _batched(lambda x: _posterior_mean(model, x), images, batch_size).astype(np.float64)
    changes = {"scaling_factor": float(1.0 / z.std())}
    if hasattr(model.config, "shift_factor"):
        changes["shift_factor"] = float(z.mean())
    scaled = nnx.clone(model)
    scaled.config = dataclasses.replace(model.config, **changes)
    return scaled


# ---------------------------------------------------------------------------------------------------------------
# the text-to-image transformer
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TextConditionedData:
    """Training arrays of a text-conditioned diffusion model: ``latents [N, ...]`` (scaled; ``[N, h, w, L]`` images,
    ``[N, f, h, w, L]`` clips), caption indices ``[N]`` into ``cond`` (name -> ``[U, ...]``, one encoding per distinct
    caption, e.g. ``states [U, S, D]``, ``mask [U, S]``, ``pooled [U, P]``) and the unconditional encoding ``uncond``
    (the same names, without the caption axis). The velocity receives the conditioning in ``cond``'s order."""

    latents: np.ndarray
    caption_index: np.ndarray
    cond: dict[str, np.ndarray]
    uncond: dict[str, np.ndarray]

    def __post_init__(self):
        if list(self.cond) != list(self.uncond):
            raise ValueError(f"TextConditionedData: cond {list(self.cond)} and uncond {list(self.uncond)} must name the "
                             "same arrays in the same order.")
        for name, values in self.cond.items():
            if values.shape[1:] != self.uncond[name].shape:
                raise ValueError(f"TextConditionedData: cond[{name!r}] rows {values.shape[1:]} differ from "
                                 f"uncond[{name!r}] {self.uncond[name].shape}.")


def train_text_to_image(model: nnx.Module, data: TextConditionedData, velocity: Callable[..., jax.Array],
                        cfg: LoopConfig, workdir: str | Path, *, batch_size: int = 64, p_uncond: float = 0.1,
                        validation: Callable[[nnx.Module], float], progress: bool = True,
                        description: str = "text-to-image") -> TrainResult:
    """Flow-matching training (module docstring) of an image or video transformer. ``velocity(model, latents, sigmas,
    *cond)`` is the model's velocity prediction with the conditioning arrays in ``data.cond``'s order."""
    from jquant.sampling.training import flow_matching_loss

    n = len(data.latents)

    def sample_batch(step: int) -> dict:
        rows = batch_rows(n, batch_size, cfg.seed, step)
        drop = np.random.default_rng([cfg.seed, step, 2]).random(batch_size) < p_uncond
        idx = data.caption_index[rows]
        cond = []
        for name, values in data.cond.items():
            dropped = drop.reshape((batch_size,) + (1,) * (values.ndim - 1))
            cond.append(jnp.asarray(np.where(dropped, data.uncond[name][None], values[idx])))
        return {"latents": jnp.asarray(data.latents[rows]), "cond": tuple(cond)}

    def loss(m, batch, key):
        return flow_matching_loss(lambda x, s, c: velocity(m, x, s, *c), batch["latents"], batch["cond"], key)

    return fit(model, cfg, workdir, loss=loss, sample_batch=sample_batch, validation=validation, progress=progress,
               description=description)
