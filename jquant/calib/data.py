"""The calibration contract: a calibration set is any pytree of model inputs with a leading sample axis.

Token language models take token ids ``[N, T]``; a multimodal LLM takes tokens and pixel patches
(``{"tokens": [N, T], "patches": [N, P, D]}``); a diffusion transformer takes latents, timesteps
and text states drawn along sampler trajectories (``{"latents": [N, L, C], "timesteps": [N],
"text": [N, S, D]}``). Every leaf's first axis indexes the same ``N`` samples, so batches are cut
with one tree map (``batches``). The model family validates the rest: a model with a
``check_calibration(calib) -> calib`` method checks (and may convert) its own inputs; a model
without one is a token language model, whose calibration must be integer ids below
``config.vocab_size`` (``check_token_ids``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from jquant.sites import ActivationGroups

Calibration = Any
"""A pytree of arrays with a common leading sample axis."""

MISSING_MESSAGE = (
    "this recipe uses GPTQ, static activations or a calibrated transform (SmoothQuant, OSTQuant), which need "
    "calibration data: pass calib= a pytree of model inputs with a leading sample axis; for a language model, "
    "tokens [N, T], e.g. jquant.data.random_windows(jquant.data.load_split('train'), tokenizer, n=128, "
    "seq_len=512, key=key)."
)


def num_samples(calib: Calibration) -> int:
    """``N``, the leading-axis size every leaf of ``calib`` shares; a clear error when they disagree."""
    leaves = jax.tree_util.tree_leaves_with_path(calib)
    if not leaves:
        raise ValueError("calibration data is an empty pytree; pass arrays with a leading sample axis.")
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(f"calibration leaf {jax.tree_util.keystr(path) or '(root)'} is a scalar; every leaf needs "
                             "a leading sample axis (give one value per sample, e.g. timesteps of shape [N]).")
        sizes[jax.tree_util.keystr(path) or "(root)"] = shape[0]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"calibration leaves disagree on the number of samples N (leading axis): {listed}; "
                         "give every input one entry per sample.")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError("calibration data holds no sample (leading axis of size 0).")
    return n


def batches(calib: Calibration, batch_size: int) -> list[Calibration]:
    """``calib`` cut along the sample axis into consecutive batches of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of samples, got {batch_size}.")
    n = num_samples(calib)
    return [jax.tree.map(lambda a, i=i: a[i : i + batch_size], calib) for i in range(0, n, batch_size)]


def check_token_ids(calib: Calibration, vocab_size: int | None) -> np.ndarray:
    """Token-LM calibration: a non-empty integer ``[N, T]`` array with ids in ``[0, vocab_size)``, as int32."""
    tokens = np.asarray(calib)
    if tokens.dtype == object or tokens.ndim != 2 or tokens.size == 0:
        raise ValueError(f"calibration data of a token language model must be a non-empty [N, T] token array, "
                         f"got shape {tokens.shape}.")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"calibration data must hold integer token ids, got dtype {tokens.dtype}.")
    if vocab_size is not None and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"calibration token ids must lie in [0, {vocab_size}), got range [{tokens.min()}, {tokens.max()}].")
    return tokens.astype(np.int32)


def check_calibration(model: nnx.Module, calib: Calibration | None) -> Calibration:
    """Validate ``calib`` for ``model`` before any work (see the module docstring); returns what to calibrate on."""
    if calib is None:
        raise ValueError(MISSING_MESSAGE)
    own = getattr(model, "check_calibration", None)
    if own is None:
        return check_token_ids(calib, getattr(getattr(model, "config", None), "vocab_size", None))
    num_samples(calib)
    return own(calib)


def check_group_ids(ids: np.ndarray, groups: ActivationGroups, where: str) -> None:
    """Raise unless every id in ``ids`` names one of ``groups`` (``where`` names the input in the error)."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{where}: group ids must be integers, got dtype {ids.dtype}.")
    bad = ids[(ids < 0) | (ids >= len(groups.names))]
    if bad.size:
        raise ValueError(f"{where}: group id {int(bad[0])} is out of range; the model's groups are "
                         f"{dict(enumerate(groups.names))}. Fix the ids or the model's group names.")

