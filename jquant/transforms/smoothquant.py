"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights with per-channel scales.

For each RMSNorm group (the q/k/v inputs, the up/gate inputs) and input channel ``j``
(paper Eq. 4)::

    s_j = max|X_j|^α / max_c max|W_c[j, :]|^(1-α)

over the calibration activations ``X`` and all consumer weights ``W_c [in, out]`` (for an expert
stack ``[E, in, out]`` the max runs over every expert: the scale is shared, as the norm is).
The activations become ``X diag(s)^-1`` (folded into the norm gain) and each weight
``diag(s) W_c``, an exact equivalence (``jquant.transforms.equivalence.fold``).
``α`` (migration strength) is 0.5 by default, the paper's choice for most models.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.calib.capture import model_input_statistics
from jquant.transforms.equivalence import apply_transforms, fold_norms, module_at
from jquant.transforms.layout import layout_of

MIN_SCALE = 1e-5


def _input_channel_absmax(kernel) -> np.ndarray:
    """``max |W[j, :]|`` per input channel ``j`` of ``[in, out]`` kernels or ``[E, in, out]`` expert stacks."""
    k = np.abs(np.asarray(kernel, np.float64))
    return k.max(axis=tuple(i for i in range(k.ndim) if i != k.ndim - 2))


def smoothquant_params(model: nnx.Module, tokens: np.ndarray, alpha: float = 0.5, *, batch_size: int = 8) -> dict:
    """The per-layer ``attn_scale`` / ``mlp_scale`` of SmoothQuant for ``model`` on calibration ``tokens [N, T]``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha (migration strength) must lie in [0, 1], got {alpha}.")
    model = fold_norms(model)  # scales act on the gain-free normalised stream that apply_transforms produces
    layout = layout_of(model)
    groups = [(layer.attn_norm, layer.mlp_norm) for layer in layout.layers]
    stats = model_input_statistics(model, tokens, {g.consumers[0] for pair in groups for g in pair},
                                   batch_size=batch_size)

    def scale(group) -> jnp.ndarray:
        act = np.maximum(stats[group.consumers[0]].absmax, MIN_SCALE)
        w = np.max([_input_channel_absmax(module_at(model, c).kernel.get_value()) for c in group.consumers], axis=0)
        s = act**alpha / np.maximum(w, MIN_SCALE) ** (1.0 - alpha)
        return jnp.asarray(np.maximum(s, MIN_SCALE), jnp.float32)

    return {"layers": [{"attn_scale": scale(a), "mlp_scale": scale(m)} for a, m in groups]}


def smoothquant(model: nnx.Module, tokens: np.ndarray, alpha: float = 0.5, *, batch_size: int = 8) -> nnx.Module:
    """A smoothed copy of ``model`` (same logits in exact arithmetic), ready for W8A8 quantization."""
    return apply_transforms(model, smoothquant_params(model, tokens, alpha, batch_size=batch_size))
