"""FID (Heusel et al. 2017): the Fréchet distance of Inception-v3 pool3 features, from a local weights file.

FID's network is pytorch-fid's port of TensorFlow's Inception (``jquant.models.inception``); its weights cannot be
downloaded here, so ``load_inception(path)`` reads the file the user has: pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (needs torch to read), or the same tensors as ``.safetensors`` / ``.npz``.

- ``inception_features(images, net)``: images ``[N, H, W, 3]`` in ``[-1, 1]`` (``x / 127.5 - 1`` for uint8
  pixels) -> pool3 features ``[N, 2048]`` (float64), in batches; ``resize_input=True`` resizes to 299 x 299
  first, as pytorch-fid does; ``False`` feeds the images as they are (any side >= 75: for quick checks only,
  the numbers are not FIDs);
- ``fid(images_a, images_b, weights=path_or_net)``: ``frechet_distance`` (float64) of the two sets' features.

Published FIDs use tens of thousands of images; with fewer than 2048 images the covariances are singular and
the value is a biased estimate that only compares with FIDs computed on the same number of images.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jquant.eval.image import frechet_distance
from jquant.eval.weights_file import check_tensors, read_weights
from jquant.models.inception import (
    MIN_SIZE,
    FIDInception,
    abstract_model,
    expected_tensors,
    from_state_dict,
    is_unused_tensor,
    preprocess,
)
from jquant.module_jit import module_jit


def load_inception(path: str | os.PathLike) -> FIDInception:
    """The FID Inception-v3 from a local weights file (module docstring); every tensor is checked first."""
    tensors = read_weights(path, what="FID Inception weights")
    check_tensors(tensors, expected_tensors(abstract_model()), source=str(path), ignored=is_unused_tensor,
                  what="the FID Inception-v3 (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    return from_state_dict(tensors, source=str(path))


_preprocess = jax.jit(preprocess)  # apart from the network: one network compile per batch shape at 299 x 299


@module_jit
def _pool3(net: FIDInception, images):
    return net(images)


def check_images(images, fn: str, min_size: int) -> np.ndarray:
    """``images`` as float32 ``[N, H, W, 3]`` in ``[-1, 1]``, or a ValueError naming ``fn`` and the fix."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0 or min(images.shape[1:3]) < min_size:
        raise ValueError(f"{fn}: images must be [N, H, W, 3] (channels last, N >= 1, H, W >= {min_size}); got shape "
                         f"{images.shape}.")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{fn}: images must be floats in [-1, 1], got dtype {images.dtype} (for uint8 pixels pass "
                         "pixels / 127.5 - 1).")
    images = images.astype(np.float32)
    if not np.all(np.isfinite(images)) or images.min() < -1.001 or images.max() > 1.001:
        raise ValueError(f"{fn}: images must be finite and in [-1, 1], got values in [{images.min()}, "
                         f"{images.max()}] (map [0, 1] images with 2 x - 1).")
    return images


def inception_features(images, net: FIDInception, *, batch_size: int = 32, resize_input: bool = True) -> np.ndarray:
    """Images ``[N, H, W, 3]`` in ``[-1, 1]`` -> pool3 features ``[N, 2048]`` float64 (module docstring)."""
    images = check_images(images, "inception_features", 1 if resize_input else MIN_SIZE)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"inception_features: batch_size must be a positive int, got {batch_size!r}.")
    prepare = _preprocess if resize_input else jnp.asarray
    return np.concatenate([np.asarray(_pool3(net, prepare(images[i:i + batch_size])), np.float64)
                           for i in range(0, len(images), batch_size)])


def fid(images_a, images_b, *, weights: str | os.PathLike | FIDInception, batch_size: int = 32,
        resize_input: bool = True) -> float:
    """FID between two image sets ``[N, H, W, 3]`` / ``[M, H', W', 3]`` in ``[-1, 1]`` (N, M >= 2).

    ``weights``: a weights file for ``load_inception`` or an already loaded network.
    """
    sets = [check_images(x, "fid", 1 if resize_input else MIN_SIZE) for x in (images_a, images_b)]
    if min(len(x) for x in sets) < 2:
        raise ValueError(f"fid: each image set needs at least 2 images for a covariance, got {len(sets[0])} and "
                         f"{len(sets[1])}.")
    net = weights if isinstance(weights, FIDInception) else load_inception(weights)
    features = [inception_features(x, net, batch_size=batch_size, resize_input=resize_input) for x in sets]
    return frechet_distance(*features)
