"""The numbers a generated image set is judged by, from arrays (no model family is imported here).

``image_report(images, labels, classifier, real_images=..., reference_images=...)`` gives, for images
``[N, H, W, 3]`` in ``[-1, 1]`` generated for prompts naming one glyph each (``labels [N]``):

- ``prompt_accuracy``: the judge classifier's top-1 agreement with the prompted glyph, next to
  ``random_label_accuracy`` (the same predictions scored against shuffled labels) and ``chance``;
- ``fd_emoji``: the Fréchet distance between the judge's features of the generated images and of
  ``real_images`` (scenes of the same glyphs). It is named after the judge, not Inception: these numbers
  do not compare with published FIDs;
- ``psnr_db`` / ``ssim``: against ``reference_images`` (the float model's images for the same prompts and
  seeds), as acceleration and quantization papers report.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jquant.eval.image import frechet_distance, prompt_accuracy, psnr, ssim
from jquant.module_jit import module_jit

DATA_RANGE = 2.0  # images in [-1, 1]


@module_jit
def _logits(classifier, images):
    return classifier(images)


@module_jit
def _features(classifier, images):
    return classifier.features(images)


def _batched(fn: Callable[[jax.Array], jax.Array], images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(jnp.asarray(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])


def image_report(images: np.ndarray, labels: np.ndarray, classifier, *, real_images: np.ndarray | None = None,
                 reference_images: np.ndarray | None = None, seed: int = 0, batch_size: int = 256) -> dict:
    """The module docstring's numbers. ``classifier`` has ``__call__(images) -> logits`` and ``features(images)``."""
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
        raise ValueError(f"image_report: images must be [N, H, W, 3] with one label each; got images "
                         f"{images.shape} and {labels.shape} labels.")
    shuffled = np.random.default_rng(seed).permutation(labels)
    logits = functools.partial(_logits, classifier)
    report = {"images": len(images),
              "prompt_accuracy": float(prompt_accuracy(logits, images, labels, batch_size=batch_size)),
              "random_label_accuracy": float(prompt_accuracy(logits, images, shuffled, batch_size=batch_size)),
              "chance": 1.0 / float(np.unique(labels).size)}
    if real_images is not None:
        features = functools.partial(_features, classifier)
        generated = _batched(features, images, batch_size)
        real = _batched(features, np.asarray(real_images, np.float32), batch_size)
        report["fd_emoji"] = float(frechet_distance(generated.astype(np.float64), real.astype(np.float64)))
    if reference_images is not None:
        reference = jnp.asarray(np.asarray(reference_images, np.float32))
        if reference.shape != images.shape:
            raise ValueError(f"image_report: reference_images {reference.shape} must match images {images.shape} "
                             "(the same prompts and seeds).")
        report["psnr_db"] = float(psnr(jnp.asarray(images), reference, data_range=DATA_RANGE))
        report["ssim"] = float(ssim(jnp.asarray(images), reference, data_range=DATA_RANGE))
    return report
