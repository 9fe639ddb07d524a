"""Weight quantization algorithms behind one signature, so the pipeline never special-cases them.

``ALGORITHMS[name](weight, fmt, axis=..., stats=..., options=...) -> QArray``:

- ``rtn``: round to nearest with the format's own scale choice (clip ratio / MSE
  clip search included); needs no calibration.
- ``gptq``: GPTQ (``jquant.algorithms.gptq_core``) on integer formats, per
  channel or per group, driven by the site's input Hessian.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jquant.algorithms.gptq_core import GPTQConfig, gptq
from jquant.calib.capture import InputStatistics
from jquant.formats import Format, IntFormat, QArray, quantize

WeightAlgorithm = Callable[..., QArray]


def rtn(weight: jax.Array, fmt: Format, *, axis: int, stats: InputStatistics | None = None,
        options: Mapping[str, Any] = ()) -> QArray:
    """Round-to-nearest: ``quantize(weight, fmt, axis=axis)``."""
    if dict(options):
        raise ValueError(f"rtn takes no options, got {sorted(dict(options))}.")
    return quantize(weight, fmt, axis=axis)


def gptq_supports(fmt: Format) -> str | None:
    """Why GPTQ cannot use ``fmt`` (None if it can)."""
    if not isinstance(fmt, IntFormat):
        return f"GPTQ needs an integer format, got {fmt.name}; use algorithm 'rtn' for float formats."
    if fmt.granularity == "tensor":
        return f"GPTQ needs per-channel or per-group scales, got per-tensor {fmt.name}."
    if fmt.rounding != "nearest":
        return f"GPTQ rounds to nearest; {fmt.name} asks for {fmt.rounding} rounding."
    return None


@functools.lru_cache(maxsize=None)
def _int_grid(fmt: IntFormat) -> tuple[Callable, Callable]:
    """GPTQ's two grid functions for ``fmt``, cached so jit sees the same functions for every layer."""
    row_fmt = dataclasses.replace(fmt, granularity="channel", group_size=None, clip_search=False)

    def params_fn(rows):
        # rows is one group (or, per channel, all rows): the format's own choice gives scales [1, out]
        q = fmt.encode(rows, 0, None)
        return q.scales, q.zeros

    def qdq_fn(row, scales, zeros):
        return row_fmt.decode(row_fmt.quantize_with_scales(row, scales, zeros, axis=0)).astype(row.dtype)

    return params_fn, qdq_fn


def gptq_weight(weight: jax.Array, fmt: Format, *, axis: int, stats: InputStatistics | None,
                options: Mapping[str, Any] = ()) -> QArray:
    """GPTQ-quantize ``weight [in, out]`` (``axis == 0``) using ``stats.hessian``; options: GPTQConfig fields."""
    reason = gptq_supports(fmt)
    if reason:
        raise ValueError(reason)
    if axis != 0 or weight.ndim != 2:
        raise ValueError(f"gptq handles [in, out] weights quantized along axis 0, got shape {weight.shape}, axis {axis}.")
    if stats is None:
        raise ValueError("gptq needs calibration statistics (the input Hessian); pass calibration data.")
    options = dict(options)
    unknown = set(options) - {f.name for f in dataclasses.fields(GPTQConfig)}
    if unknown:
        raise ValueError(f"unknown gptq options {sorted(unknown)}; allowed: {[f.name for f in dataclasses.fields(GPTQConfig)]}.")
    params_fn, qdq_fn = _int_grid(fmt)
    group = fmt.group_size if fmt.granularity == "group" else None
    result = gptq(weight.astype(jnp.float32), stats.hessian, params_fn, qdq_fn, group_size=group, config=GPTQConfig(**options))
    q = fmt.quantize_with_scales(result.weights, result.scales, result.zeros, axis=0)
    return dataclasses.replace(q, dtype=jnp.dtype(weight.dtype).name)


ALGORITHMS: dict[str, WeightAlgorithm] = {"rtn": rtn, "gptq": gptq_weight}
NEEDS_CALIBRATION = {"rtn": False, "gptq": True}
