"""SmoothQuant (Xiao et al., 2023) for adaLN-modulated diffusion transformers: the scales fold into the modulation.

A DiT block normalises without affine parameters and modulates with a linear of the timestep embedding ``y``::

    h = LN(x) (1 + scale) + shift,     scale = y W_sc + b_sc,   shift = y W_sh + b_sh     (columns of one linear)

and ``h`` feeds consumer linears ``W_c [in, out]``. SmoothQuant's ``h diag(s)^-1`` is exact inside the
modulation::

    h / s = LN(x) (1 + scale') + shift',   scale' = (1 + scale) / s - 1 = y (W_sc / s) + (b_sc + 1) / s - 1,
                                           shift' = shift / s = y (W_sh / s) + b_sh / s,

while each consumer becomes ``diag(s) W_c`` (rows times ``s``). The per-channel scale is the paper's eq. 4::

    s_j = max|h_j|^α / max_c max_k |W_c[j, k]|^(1 - α)

over the calibration inputs (all timesteps pooled). A family declares its groups with
``modulated_norm_groups() -> [ModulatedNorm]`` and runs a calibration batch with ``calibration_call(batch)``;
this module imports no model family.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.calib.capture import model_input_statistics
from jquant.transforms.equivalence import module_at

MIN_SCALE = 1e-5


@dataclasses.dataclass(frozen=True)
class ModulatedNorm:
    """One adaLN-modulated input: the modulation linear at ``modulation`` whose output columns ``shift``
    ``[a, b)`` and ``scale`` ``[a, b)`` modulate the normalised stream read by the ``consumers`` linears."""

    modulation: str
    shift: tuple[int, int]
    scale: tuple[int, int]
    consumers: tuple[str, ...]


def modulated_groups(model: nnx.Module) -> list[ModulatedNorm]:
    """The model's declared groups; a clear error for a model without adaLN modulation."""
    if not hasattr(model, "modulated_norm_groups") or not hasattr(model, "calibration_call"):
        raise ValueError(f"adaln_smoothquant: {type(model).__name__} declares no adaLN-modulated norms "
                         "(modulated_norm_groups and calibration_call); it applies to diffusion transformers such as "
                         "SD3. Use the smoothquant step for decoder LMs.")
    return list(model.modulated_norm_groups())


def _absmax_rows(kernel) -> np.ndarray:
    return np.abs(np.asarray(kernel, np.float64)).max(axis=1)


def adaln_smoothquant_scales(model: nnx.Module, calib, alpha: float = 0.5, *, batch_size: int = 8
                             ) -> list[np.ndarray]:
    """The per-group scales ``s [d]`` (float64) of the module docstring on calibration inputs ``calib``."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"adaln_smoothquant: alpha (migration strength) must lie in [0, 1], got {alpha}.")
    groups = modulated_groups(model)
    stats = model_input_statistics(model, calib, {g.consumers[0] for g in groups}, batch_size=batch_size)
    scales = []
    for g in groups:
        st = stats[g.consumers[0]]
        absmax = np.asarray(st.pooled().absmax if st.num_groups else st.absmax, np.float64)
        act = np.maximum(absmax, MIN_SCALE)
        w = np.max([_absmax_rows(module_at(model, c).kernel.get_value()) for c in g.consumers], axis=0)
        scales.append(np.maximum(act**alpha / np.maximum(w, MIN_SCALE) ** (1.0 - alpha), MIN_SCALE))
    return scales


def fold_modulation_scales(model: nnx.Module, scales: list[np.ndarray]) -> nnx.Module:
    """A copy of ``model`` with each group's ``h`` divided by ``s`` inside its modulation and the consumers' rows
    multiplied by ``s`` (exact in exact arithmetic)."""
    model = nnx.clone(model)
    groups = modulated_groups(model)
    if len(scales) != len(groups):
        raise ValueError(f"fold_modulation_scales: {len(scales)} scales for {len(groups)} modulated norms.")
    for g, s in zip(groups, scales):
        mod = module_at(model, g.modulation)
        kernel, bias = mod.kernel.get_value(), mod.bias.get_value()
        dtype = kernel.dtype
        k, b = np.asarray(kernel, np.float64).copy(), np.asarray(bias, np.float64).copy()
        (a0, a1), (c0, c1) = g.shift, g.scale
        if a1 - a0 != s.shape[0] or c1 - c0 != s.shape[0]:
            raise ValueError(f"{g.modulation}: shift/scale widths {a1 - a0}/{c1 - c0} do not match {s.shape[0]} scales.")
        k[:, a0:a1] /= s
        b[a0:a1] /= s
        k[:, c0:c1] /= s
        b[c0:c1] = (b[c0:c1] + 1.0) / s - 1.0
        mod.kernel.set_value(jnp.asarray(k, dtype))
        mod.bias.set_value(jnp.asarray(b, dtype))
        for path in g.consumers:
            consumer = module_at(model, path)
            w = consumer.kernel.get_value()
            consumer.kernel.set_value(jnp.asarray(np.asarray(w, np.float64) * s[:, None], w.dtype))
    return model


def adaln_smoothquant(model: nnx.Module, calib, alpha: float = 0.5, *, batch_size: int = 8) -> nnx.Module:
    """A smoothed copy of ``model`` (the same outputs in exact arithmetic), ready for W8A8 quantization."""
    return fold_modulation_scales(model, adaln_smoothquant_scales(model, calib, alpha, batch_size=batch_size))
