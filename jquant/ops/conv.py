"""1-D, 2-D and 3-D convolution over channels-last inputs, with the weight stored as a matrix.

Shapes: ``x [B, *spatial, C_in]`` (``n = 1, 2, 3`` spatial axes), kernel size ``k = (k_1 .. k_n)``,
``K = prod(k)``, ``G`` feature groups. The weight is the **matrix view** ``W [K C_in / G, C_out]``:
row ``r = (o_1, .., o_n, c)`` flattened in C order (kernel offsets first, the input channel last), so
for ``G = 1`` the convolution is a matmul of im2col patches,

    ``y[b, p, :] = patches[b, p, :] @ W + bias``,  ``patches[b, p, (o, c)] = x_pad[b, p * s + o * d, c]``

(``s`` stride, ``d`` dilation, per axis). This is PyTorch's ``weight [C_out, C_in / G, *k]`` permuted to
``[*k, C_in / G, C_out]`` and flattened, and is the layout quantization sees: a ``QArray`` weight is
quantized along axis 0 like a linear's ``[in, out]`` kernel, and GPTQ's Hessian is ``Σ patchesᵀ patches``
(``conv_patches``). With ``G`` groups, output channels ``[g C_out / G, (g + 1) C_out / G)`` read input
channels ``[g C_in / G, (g + 1) C_in / G)`` through the same row order.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from jquant.formats import QArray
from jquant.ops.dispatch import select_conv
from jquant.ops.linear import ActivationFormat, as_array, quantize_activation

IntOrTuple = int | Sequence[int]
PaddingSpec = int | Sequence[int | tuple[int, int]] | Literal["valid", "same", "causal"]
PaddingMode = Literal["zeros", "replicate"]

_DIMENSION_NUMBERS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """A convolution's static geometry after padding: per spatial axis kernel size, stride and dilation; ``groups``."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1

    @property
    def taps(self) -> int:
        """``K = prod(kernel_size)``, the kernel offsets per input channel."""
        return math.prod(self.kernel_size)

    def out_spatial(self, padded: Sequence[int]) -> tuple[int, ...]:
        """Output spatial sizes for padded input sizes: ``(n - d (k - 1) - 1) // s + 1`` per axis."""
        return tuple((n - d * (k - 1) - 1) // s + 1
                     for n, k, s, d in zip(padded, self.kernel_size, self.stride, self.dilation))


def _per_axis(value: IntOrTuple, rank: int, name: str) -> tuple[int, ...]:
    values = (value,) * rank if isinstance(value, int) else tuple(value)
    if len(values) != rank or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(f"conv: {name}={value!r} must be a positive int or {rank} positive ints (one per spatial axis "
                         f"of a {rank}-D convolution).")
    return values


def _geometry(x: jax.Array, kernel_size: IntOrTuple, stride: IntOrTuple, dilation: IntOrTuple,
              groups: int) -> ConvGeometry:
    rank = x.ndim - 2
    if rank not in _DIMENSION_NUMBERS:
        raise ValueError(f"conv: x must be [B, *spatial, C_in] with 1 to 3 spatial axes, got shape {x.shape}.")
    if not isinstance(groups, int) or groups < 1 or x.shape[-1] % groups:
        raise ValueError(f"conv: groups={groups!r} must be a positive int dividing the {x.shape[-1]} input channels.")
    return ConvGeometry(_per_axis(kernel_size, rank, "kernel_size"), _per_axis(stride, rank, "stride"),
                        _per_axis(dilation, rank, "dilation"), groups)


def _pads(padding: PaddingSpec, geometry: ConvGeometry) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` per spatial axis. ``"same"`` splits ``d (k - 1)`` with the smaller half first (PyTorch);
    ``"causal"`` pads the first spatial axis (time) only before, by ``d (k - 1)``, and the others as ``"same"``."""
    rank = len(geometry.kernel_size)
    total = [d * (k - 1) for k, d in zip(geometry.kernel_size, geometry.dilation)]
    split = tuple((t // 2, t - t // 2) for t in total)
    if padding == "valid":
        return ((0, 0),) * rank
    if padding == "same":
        if any(s != 1 for s in geometry.stride):
            raise ValueError(f"conv: padding='same' needs stride 1, got stride={geometry.stride}; give the padding "
                             "explicitly for a strided convolution.")
        return split
    if padding == "causal":
        return ((total[0], 0),) + split[1:]
    if isinstance(padding, str):
        raise ValueError(f"conv: padding={padding!r}; use an int, one int or (before, after) pair per spatial axis, "
                         "'valid', 'same' or 'causal'.")
    entries = (padding,) * rank if isinstance(padding, int) else tuple(padding)
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in entries)
    if len(pads) != rank or not all(len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p) for p in pads):
        raise ValueError(f"conv: padding={padding!r} must be a non-negative int or {rank} entries (an int or a "
                         "(before, after) pair per spatial axis).")
    return pads


def _pad(x: jax.Array, pads: tuple[tuple[int, int], ...], padding_mode: PaddingMode) -> jax.Array:
    if padding_mode not in ("zeros", "replicate"):
        raise ValueError(f"conv: padding_mode={padding_mode!r}; use 'zeros' or 'replicate'.")
    widths = ((0, 0), *pads, (0, 0))
    if all(p == (0, 0) for p in pads):
        return x
    return jnp.pad(x, widths, mode="constant" if padding_mode == "zeros" else "edge")


def _padded_input(x: jax.Array, kernel_size: IntOrTuple, stride: IntOrTuple, padding: PaddingSpec,
                  dilation: IntOrTuple, groups: int,
                  padding_mode: PaddingMode) -> tuple[jax.Array, ConvGeometry, tuple[int, ...]]:
    """``x`` padded, the geometry, and the output spatial sizes (checked to be at least 1)."""
    geometry = _geometry(x, kernel_size, stride, dilation, groups)
    xp = _pad(x, _pads(padding, geometry), padding_mode)
    out = geometry.out_spatial(xp.shape[1:-1])
    if min(out) < 1:
        raise ValueError(f"conv: the padded input {xp.shape[1:-1]} is smaller than the dilated kernel "
                         f"(kernel_size={geometry.kernel_size}, dilation={geometry.dilation}); pad more or use a "
                         "smaller kernel.")
    return xp, geometry, out


def conv_patches(
    x: jax.Array,
    *,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: PaddingSpec = 0,
    dilation: IntOrTuple = 1,
    padding_mode: PaddingMode = "zeros",
) -> jax.Array:
    """im2col: ``x [B, *spatial, C_in]`` -> ``patches [B, *out_spatial, K C_in]``, rows in the matrix view's order.

    ``patches[b, p, (o, c)] = x_pad[b, p * stride + o * dilation, c]``, so a 1-group ``conv(x, W) == patches @ W``.
    Calibration captures ``Σ patchesᵀ patches``: the Hessian GPTQ needs for the ``[K C_in, C_out]`` weight.
    """
    xp, geometry, out = _padded_input(x, kernel_size, stride, padding, dilation, 1, padding_mode)
    taps = []
    for offsets in itertools.product(*(range(k) for k in geometry.kernel_size)):
        start = [0, *(o * d for o, d in zip(offsets, geometry.dilation)), 0]
        limit = [xp.shape[0], *(s0 + (n - 1) * s + 1 for s0, n, s in zip(start[1:-1], out, geometry.stride)),
                 xp.shape[-1]]
        taps.append(jax.lax.slice(xp, start, limit, (1, *geometry.stride, 1)))
    patches = jnp.stack(taps, axis=-2)  # [B, *out, K, C_in]
    return patches.reshape(*patches.shape[:-2], geometry.taps * x.shape[-1])


def conv(
    x: jax.Array,
    w: jax.Array | QArray,
    b: jax.Array | None = None,
    *,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: PaddingSpec = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: PaddingMode = "zeros",
    activation: ActivationFormat | None = None,
    activation_scale: jax.Array | None = None,
) -> jax.Array:
    """``y = conv(Q_a(x), W) + b`` over 1 to 3 spatial axes, channels last.

    Args:
      x: ``[B, *spatial, C_in]``.
      w: the matrix view ``[K C_in / groups, C_out]`` (module docstring), an array or a ``QArray``
        quantized along axis 0 (dequantized on the XLA path).
      b: optional bias ``[C_out]``.
      kernel_size, stride, dilation: an int or one per spatial axis.
      padding: an int, one int or ``(before, after)`` pair per spatial axis, ``"valid"``, ``"same"``
        (stride 1) or ``"causal"`` (the first spatial axis padded only before, as causal 1-D and
        video-VAE 3-D convolutions do; the other axes as ``"same"``).
      groups: feature groups (``C_in`` and ``C_out`` both divisible by it).
      padding_mode: ``"zeros"`` or ``"replicate"`` (edge values, as causal video VAEs pad time).
      activation, activation_scale: an optional activation format (and a static scale) quantizing ``x``
        along its channels, per position, as ``linear`` does per token.

    Returns:
      ``[B, *out_spatial, C_out]`` in ``x.dtype``; ``out = (padded - dilation (k - 1) - 1) // stride + 1``.
    """
    if activation is not None:  # per position along the channels; padding after keeps padded values exact
        x = quantize_activation(x, activation, activation_scale)
    xp, geometry, _ = _padded_input(x, kernel_size, stride, padding, dilation, groups, padding_mode)
    c_in = x.shape[-1]
    rows = geometry.taps * c_in // groups
    if len(w.shape) != 2 or w.shape[0] != rows or w.shape[1] % groups:
        raise ValueError(f"conv: weight shape {tuple(w.shape)} is not the matrix view [K C_in / groups, C_out] = "
                         f"[{geometry.taps} * {c_in} / {groups} = {rows}, C_out] with C_out divisible by groups "
                         f"(kernel_size={geometry.kernel_size}); reshape a PyTorch [C_out, C_in / groups, *k] weight "
                         "with jquant.ops.conv_weight_matrix.")
    kernel = select_conv(xp, w, geometry)
    if kernel is not None:
        return kernel.apply(xp, w, b, geometry)
    kernel_array = as_array(w, x.dtype).astype(x.dtype).reshape(*geometry.kernel_size, c_in // groups, w.shape[1])
    y = jax.lax.conv_general_dilated(
        xp, kernel_array, window_strides=geometry.stride, padding="VALID", rhs_dilation=geometry.dilation,
        dimension_numbers=_DIMENSION_NUMBERS[len(geometry.kernel_size)], feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=x.dtype)
    return y if b is None else y + b.astype(y.dtype)


def conv_weight_matrix(weight: jax.Array) -> jax.Array:
    """A PyTorch-layout kernel ``[C_out, C_in / G, *k]`` -> the matrix view ``[K C_in / G, C_out]``."""
    if weight.ndim not in (3, 4, 5):
        raise ValueError(f"conv_weight_matrix: weight must be [C_out, C_in / groups, *kernel] with 1 to 3 kernel "
                         f"axes, got shape {weight.shape}.")
    moved = jnp.moveaxis(jnp.asarray(weight), (0, 1), (-1, -2))  # [*k, C_in / G, C_out]
    return moved.reshape(-1, weight.shape[0])
