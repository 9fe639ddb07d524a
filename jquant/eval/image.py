"""Image quality: PSNR and SSIM against a reference image, a Fréchet distance of features, prompt accuracy.

Images are ``[B, H, W, C]`` (channels last; C = 1 for grey), compared image by image and then averaged over the
batch. ``data_range`` is the span of valid pixel values (1.0 for [0, 1] floats, 255 for uint8, 2 for [-1, 1]).

- PSNR: ``10 log10(data_range^2 / MSE)`` per image (infinite for identical images).
- SSIM (Wang, Bovik, Sheikh, Simoncelli 2004, eq. 13): local statistics under an 11 x 11 Gaussian window of
  sigma 1.5 (population covariances), ``K1 = 0.01``, ``K2 = 0.03``, ``C_i = (K_i data_range)^2``::

      SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))

  averaged over the positions where the window fits inside the image, then over the channels (RGB: the mean
  of the three channels' SSIM). This is ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=..., channel_axis=-1)`` (tested).
- ``frechet_distance``: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between Gaussians fitted to two
  feature sets (the FID formula, Heusel et al. 2017), in float64. With features of the project's own
  classifier this is a Fréchet distance of that classifier, not FID (FID means Inception-v3 features).
- ``prompt_accuracy``: the fraction of images a classifier assigns to the class of their prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Reduction = Literal["mean", "none"]
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls must not drop to TF32/bf16 passes on GPUs


def _check_pair(a, b, data_range: float, fn: str, min_size: int = 1) -> tuple[jax.Array, jax.Array]:
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(f"{fn}: images must be two arrays of the same shape [batch, height, width, channels], got "
                         f"{a.shape} and {b.shape} (add a trailing channel axis of 1 for grey images).")
    if a.shape[1] < min_size or a.shape[2] < min_size:
        raise ValueError(f"{fn}: images of {a.shape[1]}x{a.shape[2]} are smaller than the {min_size}x{min_size} "
                         "window; use larger images or a smaller win_size.")
    if not (isinstance(data_range, (int, float)) and np.isfinite(data_range) and data_range > 0):
        raise ValueError(f"{fn}: data_range must be a finite number > 0 (1.0 for [0, 1] images, 255 for uint8), "
                         f"got {data_range!r}.")
    dtype = jnp.promote_types(jnp.float32, a.dtype if jnp.issubdtype(a.dtype, jnp.floating) else jnp.float32)
    return a.astype(dtype), b.astype(dtype)


def _reduce(values: jax.Array, reduction: Reduction, fn: str) -> jax.Array:
    if reduction == "mean":
        return jnp.mean(values)
    if reduction == "none":
        return values
    raise ValueError(f"{fn}: reduction must be 'mean' or 'none', got {reduction!r}.")


def psnr(a: jax.Array, b: jax.Array, *, data_range: float, reduction: Reduction = "mean") -> jax.Array:
    """Peak signal-to-noise ratio in dB of images ``[B, H, W, C]``: the batch mean, or ``[B]`` with ``"none"``."""
    a, b = _check_pair(a, b, data_range, "psnr")
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    return _reduce(10.0 * jnp.log10(data_range**2 / mse), reduction, "psnr")


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian ``[size]`` (float64) whose outer product is the SSIM window."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(offsets**2) / (2 * sigma**2))
    return w / w.sum()


def _valid_filter_matrix(n: int, window: np.ndarray) -> np.ndarray:
    """``[n - k + 1, n]``: row i holds the window at columns i..i+k-1 (a 'valid' 1-D correlation as a matmul)."""
    k = len(window)
    m = np.zeros((n - k + 1, n))
    for i in range(n - k + 1):
        m[i, i : i + k] = window
    return m


def ssim(a: jax.Array, b: jax.Array, *, data_range: float, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, reduction: Reduction = "mean") -> jax.Array:
    """Structural similarity of images ``[B, H, W, C]`` (module docstring): the batch mean, or ``[B]``."""
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"ssim: win_size must be an odd integer >= 3, got {win_size!r}.")
    a, b = _check_pair(a, b, data_range, "ssim", min_size=win_size)
    a, b = a / data_range, b / data_range  # SSIM is scale-free with C_i = K_i^2 on [0, 1]: better float32 sums
    window = gaussian_window(win_size, sigma)
    rows = jnp.asarray(_valid_filter_matrix(a.shape[1], window), a.dtype)
    cols = jnp.asarray(_valid_filter_matrix(a.shape[2], window), a.dtype)

    def blur(x):
        return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols, precision=_HIGHEST)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = k1**2, k2**2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return _reduce(jnp.mean(index, axis=(1, 2, 3)), reduction, "ssim")


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(s)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to ``features_a [N, D]`` and ``features_b [M, D]`` (float64).

    Means and covariances (``np.cov``, ddof 1) per set; ``tr((S_a S_b)^(1/2))`` is computed as
    ``tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))`` (the same value: the matrices are similar) from symmetric
    eigendecompositions, so no complex round-off appears where ``scipy.linalg.sqrtm(S_a @ S_b)`` gives some. With
    fewer samples than dimensions (``N + M < D``, e.g. a few hundred images' 2048-d Inception features) it is the
    nuclear norm of ``X_a X_bᵀ / sqrt((N - 1)(M - 1))`` (``X`` the centred features; the nonzero eigenvalues of
    ``S_a S_b`` are its squared singular values), which needs no ``D x D`` decomposition.
    Fewer samples than dimensions leave the covariances singular: the value is then a biased estimate.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: features must be two [samples, dim] arrays of the same dim, got "
                         f"{a.shape} and {b.shape}.")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance: each feature set needs at least 2 samples for a covariance, got "
                         f"{len(a)} and {len(b)}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("frechet_distance: the features contain NaN or infinity.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    if len(a) + len(b) < a.shape[1]:  # few samples in many dimensions: the same trace from the samples
        xa, xb = a - mu_a, b - mu_b
        trace_sqrt = np.sum(np.linalg.svd(xa @ xb.T, compute_uv=False)) / np.sqrt((len(a) - 1) * (len(b) - 1))
        traces = np.sum(xa**2) / (len(a) - 1) + np.sum(xb**2) / (len(b) - 1)
        return float(np.sum((mu_a - mu_b) ** 2) + traces - 2.0 * trace_sqrt)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrt_psd(s_a)
    inner = root_a @ s_b @ root_a
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * trace_sqrt)


def prompt_accuracy(classifier_fn: Callable[[jax.Array], jax.Array], images: jax.Array, labels: np.ndarray, *,
                    batch_size: int = 256) -> float:
    """Fraction of ``images [N, H, W, C]`` whose ``argmax classifier_fn(images) [n, K]`` is ``labels [N]``.

    ``classifier_fn`` is any image classifier (e.g. the emoji classifier of ``jquant.models.image_classifier``
    trained on the project's image set), called on batches of at most ``batch_size`` images; ``labels`` are the
    class ids of the prompts the images were generated from.
    """
    labels = np.asarray(labels)
    if np.ndim(images) != 4 or labels.shape != (np.shape(images)[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"prompt_accuracy: images must be [N, H, W, C] and labels N integer class ids, got images "
                         f"{np.shape(images)} and labels {labels.dtype} {labels.shape}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"prompt_accuracy: batch_size must be a positive integer, got {batch_size!r}.")
    predictions = []
    for start in range(0, len(labels), batch_size):
        logits = np.asarray(classifier_fn(images[start : start + batch_size]))
        if logits.ndim != 2 or logits.shape[0] != min(batch_size, len(labels) - start):
            raise ValueError(f"prompt_accuracy: classifier_fn must return logits [batch, classes], got {logits.shape} "
                             f"for {min(batch_size, len(labels) - start)} images.")
        if labels.min() < 0 or labels.max() >= logits.shape[1]:
            raise ValueError(f"prompt_accuracy: labels must be class ids in [0, {logits.shape[1]}), got "
                             f"[{labels.min()}, {labels.max()}].")
        predictions.append(np.argmax(logits, axis=1))
    return float(np.mean(np.concatenate(predictions) == labels))
