"""One quantized linear in PyTorch layout, and the bridge to and from jquant's ``QArray``.

A ``LinearCodes`` holds a ``[out, in]`` weight's integer / FP8 / E2M1 codes with their scales as the
PyTorch checkpoint formats lay them out (scales ``[out, in / G]``, ``[out, 1]`` or ``[1, 1]``); jquant keeps
weights ``[in, out]`` (stacked experts ``[E, in, out]``) quantized along ``in``, so the bridge is a transpose
of every child plus jquant's own packing (``jquant.formats.packing``).

Codes: ``IntFormat`` symmetric: signed ints (``x = q s``); asymmetric: unsigned ints with unsigned zero points
(``x = (q - z) s``); ``FP8Format``: float8 values (``x = c s``); ``NVFP4Format``: 4-bit E2M1 bit patterns with
E4M3 block-scale bytes (``x = e2m1(c) e4m3(b) t``, ``t`` the tensor scale).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jquant.formats import FP8Format, IntFormat, NVFP4Format, QArray
from jquant.formats.packing import pack_bits
from jquant.formats.qarray import Format

SUPPORTED = (IntFormat, FP8Format, NVFP4Format)


@dataclasses.dataclass(frozen=True)
class LinearCodes:
    """A quantized ``[out, in]`` weight: ``codes [out, in]``, ``scales [out, in / G]`` (or ``[out, 1]``, ``[1, 1]``),
    ``zeros`` like ``scales`` (asymmetric integers), ``tensor_scale`` float32 (NVFP4 two-level)."""

    format: Format
    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None = None
    tensor_scale: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def check_supported(fmt: Format, where: str) -> None:
    """Refuses formats the PyTorch checkpoint formats cannot hold, naming the site and the alternatives."""
    if not isinstance(fmt, SUPPORTED):
        raise ValueError(f"{where}: weights in {fmt.name} have no compressed-tensors / GPTQ representation; "
                         "export models quantized to int2-int8, fp8-e4m3 or nvfp4 (or save with jquant.save).")
    if isinstance(fmt, FP8Format) and fmt.element != "e4m3":
        raise ValueError(f"{where}: {fmt.name}: compressed-tensors stores FP8 weights as E4M3 only; use fp8-e4m3.")


def linear_codes(q: QArray, expert: int | None = None) -> LinearCodes:
    """The ``LinearCodes`` of a ``[in, out]`` QArray (axis 0), or of one expert of an ``[E, in, out]`` one (axis 1)."""
    fmt = q.format
    codes = np.asarray(fmt.codes_of(q))

    def torch_layout(a):
        if a is None:
            return None
        a = np.asarray(a)
        return np.ascontiguousarray((a[0 if a.shape[0] == 1 else expert] if expert is not None else a).T)

    if isinstance(fmt, NVFP4Format):
        ts = None if q.tensor_scale is None else np.asarray(q.tensor_scale, np.float32).reshape(())
        return LinearCodes(fmt, torch_layout(codes), torch_layout(q.scales), tensor_scale=ts)
    return LinearCodes(fmt, torch_layout(codes), torch_layout(q.scales), torch_layout(q.zeros))


def qarray(parts: list[LinearCodes], dtype: str) -> QArray:
    """The QArray of one linear (``[in, out]``, axis 0) or, from several parts, of an expert stack
    (``[E, in, out]``, axis 1); every part must have the same format and shape."""
    fmt = parts[0].format
    if any(p.format != fmt or p.shape != parts[0].shape for p in parts):
        raise ValueError(f"experts of one layer must share one format and shape, got "
                         f"{sorted({(p.format.name, p.shape) for p in parts})}.")
    stacked = len(parts) > 1

    def logical(name):
        arrays = [getattr(p, name) for p in parts]
        if arrays[0] is None:
            return None
        return np.stack([a.T for a in arrays]) if stacked else arrays[0].T

    axis = 1 if stacked else 0
    codes, scales, zeros = logical("codes"), logical("scales"), logical("zeros")
    shape = tuple(codes.shape)
    children = {}
    if isinstance(fmt, IntFormat):
        if fmt.bits == 8:
            children["codes"] = jnp.asarray(codes.astype(np.int8 if fmt.symmetric else np.uint8))
        else:
            children["codes"] = pack_bits(jnp.asarray(codes.astype(np.int32)), fmt.bits, axis)
        children["scales"] = jnp.asarray(scales.astype(fmt.scale_dtype))
        if zeros is not None:
            children["zeros"] = jnp.asarray(zeros.astype(np.uint8))
    elif isinstance(fmt, FP8Format):
        children["codes"] = jnp.asarray(codes.astype(fmt.el.jnp_dtype))
        children["scales"] = jnp.asarray(scales.astype(fmt.scale_dtype))
    else:
        children["codes"] = pack_bits(jnp.asarray(codes.astype(np.uint8)), 4, axis)
        children["scales"] = jnp.asarray(scales.astype(np.uint8))
        if parts[0].tensor_scale is not None:
            children["tensor_scale"] = jnp.asarray(parts[0].tensor_scale, jnp.float32).reshape((1,) * len(shape))
    return QArray(**children, format=fmt, shape=shape, dtype=dtype, axis=axis).validate()
