"""MQuant's rotation magnitude suppression (RMS; Yu et al., ACM MM 2025, §3.4, Eq. 6-9) as a model transform.

A linear with an online deterministic Hadamard computes ``y = (x H)(Hᵀ W)`` (jquant's ``[in, out]`` kernels). The
Hadamard's first column is constant ``1/√d``, so row 0 of the rotated kernel ``W' = Hᵀ W`` is ``√d · mean_j W[j, :]``
(Eq. 7) and input channel 0 of ``x' = x H`` is ``√d · mean_j x[:, j]``: with a same-sign mean both dwarf the other
rows / channels and waste the per-output-channel weight scales and a static per-tensor activation scale.
:func:`rms_split` moves that channel into a float rank-1 side branch, ``y = x'_{:,1:} W'_{1:} + x'_{:,0} W'_0``
(exact in float), on the layers :func:`needs_split` selects (spec §7.1); the rest of the kernel is then quantized
(GPTQ / RTN) with channel 0's row zero and channel 0 excluded from the activations it sees.
"""

from __future__ import annotations

import re

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.formats import QArray

if TYPE_CHECKING:  # the layers are imported on use: importing the transforms imports no model code
    from jquant.models.layers import Linear


def _check_kernel(kernel, where: str) -> np.ndarray:
    kernel = np.asarray(kernel)
    if kernel.ndim != 2 or kernel.shape[0] < 2:
        raise ValueError(f"{where}: kernel must be a rotated [in, out] matrix with in >= 2, got shape {kernel.shape}.")
    return kernel


def needs_split(kernel, tau: float = 1.0) -> bool:
    """Spec §7.1 (the paper's Eq. 9 criterion): split when ``max_o |W'[0, o]| > τ · max_{j>=1, o} |W'[j, o]|`` for
    the rotated kernel ``W' [in, out]`` (input channel 0 is the Hadamard's constant column)."""
    if tau <= 0:
        raise ValueError(f"needs_split: tau must be > 0, got {tau}.")
    k = np.abs(_check_kernel(kernel, "needs_split"))
    return bool(k[0].max() > tau * k[1:].max())


def split_channel(kernel) -> tuple[np.ndarray, np.ndarray]:
    """``W' [in, out]`` -> ``(main [in, out]`` with row 0 zeroed (the quantized GEMM), ``side [out]`` = row 0 (the
    float rank-1 branch)); ``x' W' = m main + x'[:, 0:1] side`` exactly for ``m`` = ``x'`` with channel 0 zeroed
    (``main``'s row 0 is zero, so also ``x' main + x'[:, 0:1] side``)."""
    kernel = _check_kernel(kernel, "split_channel")
    main = kernel.copy()
    main[0] = 0
    return main, kernel[0].copy()


def split_sites(model: nnx.Module, layers: str = ".*") -> list[tuple[str, Linear]]:
    """``(path, linear)`` of every linear with an online input Hadamard whose path matches the regex ``layers``."""
    from jquant.models.layers import Linear

    try:
        pattern = re.compile(layers)
    except re.error as err:
        raise ValueError(f"rms_split: layers={layers!r} is not a regular expression ({err}).") from None
    return [("/".join(map(str, path)), m) for path, m in nnx.iter_graph(model)
            if isinstance(m, Linear) and m.input_rotation is not None
            and pattern.fullmatch("/".join(map(str, path)))]


def _sites_or_error(model: nnx.Module, layers: str) -> list[tuple[str, Linear]]:
    found = split_sites(model, layers)
    if not found:
        raise ValueError(f"rms_split: no linear with an online Hadamard matches layers={layers!r}; RMS splits the "
                         "layers a rotation step switched an online Hadamard on for (quarot with online 'down', "
                         "vision_rotation), so put rms_split after that step.")
    return found


def rms_split(model: nnx.Module, *, tau: float = 1.0, layers: str = ".*") -> nnx.Module:
    """A copy of ``model`` in which every online-Hadamard linear matching ``layers`` carries a ``ChannelSplit``:
    active (row 0 of the kernel moved to the float side branch) where :func:`needs_split` with ``tau`` holds,
    inactive (kernel unchanged, side zero) elsewhere, so every such layer has the same checkpoint structure."""
    from jquant.models.layers import ChannelSplit

    model = nnx.clone(model)
    for path, linear in _sites_or_error(model, layers):
        kernel = linear.kernel.get_value()
        if isinstance(kernel, QArray) or linear.channel_split is not None:
            raise ValueError(f"rms_split: {path} is already quantized or split; split the float rotated model once.")
        active = needs_split(np.asarray(kernel, np.float64), tau)
        main, side = split_channel(kernel) if active else (np.asarray(kernel), np.zeros(kernel.shape[1]))
        linear.kernel.set_value(jnp.asarray(main, kernel.dtype))
        linear.channel_split = ChannelSplit(jnp.asarray(side, kernel.dtype), jnp.asarray(float(active), jnp.float32))
    return model


def add_split_structure(model: nnx.Module, layers: str = ".*") -> None:
    """Give an abstract model (``jquant.load``) the ``ChannelSplit`` of every layer :func:`rms_split` visited (in
    place; their values come from the checkpoint). Online rotations must be switched on first."""
    from jquant.models.layers import ChannelSplit

    for _, linear in _sites_or_error(model, layers):
        kernel = linear.kernel.get_value()
        linear.channel_split = ChannelSplit(jax.ShapeDtypeStruct(kernel.shape[1:], kernel.dtype),
                                            jax.ShapeDtypeStruct((), jnp.float32))


def split_report(model: nnx.Module) -> dict[str, bool]:
    """``{path: active}`` of every linear carrying a ``ChannelSplit``."""
    from jquant.models.layers import Linear

    return {"/".join(map(str, path)): bool(np.asarray(m.channel_split.active.get_value()) > 0)
            for path, m in nnx.iter_graph(model) if isinstance(m, Linear) and m.channel_split is not None}
