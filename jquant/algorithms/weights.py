"""Weight quantization algorithms behind one signature, so the pipeline never special-cases them.

``algorithm(name).quantize(weight, fmt, axis=..., stats=..., options=...) -> QArray``; each algorithm is an
``AlgorithmSpec`` (function, format support check, needs-calibration, typed options) in one registry, which
recipes validate against and ``register_algorithm`` extends:

- ``rtn``: round to nearest with the format's own scale choice (clip ratio / MSE
  clip search included); needs no calibration.
- ``gptq``: GPTQ (``jquant.algorithms.gptq_core``) on integer formats, per
  channel or per group, driven by the site's input Hessian.
- ``gptvq``: GPTVQ-style vector quantization (``jquant.algorithms.gptvq``) on codebook
  formats (``vq-d2-k4-cb256x16``): k-means codebooks, error feedback, codebook tuning.
- ``pcdvq``: PCDVQ (``jquant.algorithms.pcdvq``) on polar formats (``pcdvq-d8-a14-b2``):
  random Hadamard transform, direction/magnitude codebooks, BlockLDLQ error feedback.
  (``rtn`` on a polar format is PCDVQ with nearest rounding.)
- ``rwkvquant``: RWKVQuant's per-site branches (``jquant.methods.rwkvquant.rwkvquant(model, calib, config)``
  picks each site's format with the proxy; ``jquant.algorithms.rwkvquant`` fits the codebooks): GPTQ on integer
  formats, GPTVQ on codebook formats of matrices, activation-weighted k-means codebooks on
  codebook formats of element-wise vectors.

``algorithm(name).supports(fmt)`` says why an algorithm cannot use a format (None if it can).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jquant.algorithms.gptq_core import GPTQConfig, gptq_columns
from jquant.algorithms.gptvq import GPTVQConfig, gptvq_quantize, gptvq_supports
from jquant.algorithms.pcdvq import PCDVQConfig, pcdvq_quantize
from jquant.algorithms.rwkvquant import mix_codebook_weight
from jquant.calib.capture import InputStatistics
from jquant.formats import CodebookFormat, Format, IntFormat, PolarVQFormat, QArray, quantize
from jquant.named_registry import NamedRegistry

WeightAlgorithm = Callable[..., QArray]


def rtn(weight: jax.Array, fmt: Format, *, axis: int, stats: InputStatistics | None = None,
        options: Mapping[str, Any] = ()) -> QArray:
    """Round-to-nearest: ``quantize(weight, fmt, axis=axis)``."""
    if dict(options):
        raise ValueError(f"rtn takes no options, got {sorted(dict(options))}.")
    return quantize(weight, fmt, axis=axis)


def rtn_supports(fmt: Format) -> str | None:
    """Why round-to-nearest cannot use ``fmt`` (None if it can)."""
    if isinstance(fmt, CodebookFormat):
        return f"{fmt.name} needs learned codebooks; use algorithm 'gptvq'."
    return None


def pcdvq_supports(fmt: Format) -> str | None:
    """Why PCDVQ cannot use ``fmt`` (None if it can)."""
    if not isinstance(fmt, PolarVQFormat):
        return f"pcdvq needs a polar format such as 'pcdvq-d8-a14-b2', got {fmt.name}."
    return None


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


@functools.lru_cache(maxsize=None)
def _int_encode(fmt: IntFormat) -> Callable[[jax.Array, jax.Array, jax.Array | None], QArray]:
    """``fmt.quantize_with_scales(w, scales, zeros, axis=0)``, one function per format: a static argument of GPTQ's
    sweep (``gptq_columns``' ``finish``, run on each column chunk), so every layer of an input size shares it."""
    def gptq_encode(w, scales, zeros):
        return fmt.quantize_with_scales(w, scales, zeros, axis=0)

    return gptq_encode


def gptq_weight(weight: jax.Array, fmt: Format, *, axis: int, stats: InputStatistics | None,
                options: Mapping[str, Any] = ()) -> QArray:
    """GPTQ-quantize ``weight [in, out]`` (``axis == 0``) using ``stats.hessian``; options: GPTQConfig fields."""
    return gptq_shared_input([weight], fmt, axis=axis, stats=stats, options=options)[0]


def gptq_shared_input(weights: Sequence[jax.Array], fmt: Format, *, axis: int, stats: InputStatistics | None,
                      options: Mapping[str, Any] = ()) -> list[QArray]:
    """``gptq_weight`` of each ``weights[i] [in, out_i]`` for linears that read the same inputs (one ``stats``),
    as one solve (``gptq_core.gptq_columns``: one Hessian factor, one sweep over the concatenated columns, which are
    independent given the Hessian), so each result equals ``gptq_weight(weights[i], ...)`` bit for bit (q/k/v,
    gate/up)."""
    reason = gptq_supports(fmt)
    if reason:
        raise ValueError(reason)
    shapes = [tuple(w.shape) for w in weights]
    if axis != 0 or any(len(s) != 2 for s in shapes) or len({s[0] for s in shapes}) != 1 \
            or len({jnp.dtype(w.dtype) for w in weights}) != 1:
        raise ValueError(f"gptq handles [in, out] weights quantized along axis 0 (several at once: one input size and "
                         f"dtype), got shapes {shapes}, dtypes {sorted({jnp.dtype(w.dtype).name for w in weights})}, "
                         f"axis {axis}.")
    if stats is None:
        raise ValueError("gptq needs calibration statistics (the input Hessian); pass calibration data.")
    params_fn, qdq_fn = _int_grid(fmt)
    group = fmt.group_size if fmt.granularity == "group" else None
    config = _config(GPTQConfig, options, "gptq")
    quantized, _ = gptq_columns(weights, stats.hessian, params_fn, qdq_fn, group_size=group, config=config,
                                finish=_int_encode(fmt))
    return [dataclasses.replace(q, shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name).validate()
            for q, w in zip(quantized, weights, strict=True)]


def _config(cls, options: Mapping[str, Any], name: str):
    """``cls(**options)``, naming the algorithm and the allowed fields on an unknown option."""
    options = dict(options)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"unknown {name} options {sorted(unknown)}; allowed: {allowed}.")
    return cls(**options)


def _need_stats(stats: InputStatistics | None, name: str) -> InputStatistics:
    if stats is None:
        raise ValueError(f"{name} needs calibration statistics (the input Hessian); pass calibration data.")
    return stats


def gptvq_weight(weight: jax.Array, fmt: Format, *, axis: int, stats: InputStatistics | None,
                 options: Mapping[str, Any] = ()) -> QArray:
    """GPTVQ-quantize ``weight [in, out]`` (``axis == 0``) with ``stats.hessian``; options: GPTVQConfig fields."""
    if reason := gptvq_supports(fmt):
        raise ValueError(reason)
    config = _config(GPTVQConfig, options, "gptvq")
    return gptvq_quantize(weight, _need_stats(stats, "gptvq").hessian, fmt, axis=axis, config=config)


def pcdvq_weight(weight: jax.Array, fmt: Format, *, axis: int, stats: InputStatistics | None,
                 options: Mapping[str, Any] = ()) -> QArray:
    """PCDVQ-quantize ``weight [in, out]`` (``axis == 0``) with ``stats.hessian``; options: PCDVQConfig fields."""
    if reason := pcdvq_supports(fmt):
        raise ValueError(reason)
    config = _config(PCDVQConfig, options, "pcdvq")
    return pcdvq_quantize(weight, _need_stats(stats, "pcdvq").hessian, fmt, axis=axis, config=config)


def rwkvquant_supports(fmt: Format) -> str | None:
    """Why RWKVQuant's branches cannot use ``fmt`` (None if it can)."""
    if isinstance(fmt, IntFormat):
        return gptq_supports(fmt)
    if isinstance(fmt, CodebookFormat):
        return gptvq_supports(fmt)
    return f"rwkvquant needs an integer (GPTQ) or codebook (VQ) format, got {fmt.name}."


def rwkvquant_weight(weight: jax.Array, fmt: Format, *, axis: int, stats: InputStatistics | None,
                     options: Mapping[str, Any] = ()) -> QArray:
    """RWKVQuant on one site: ``gptq_weight`` (integer ``fmt``), ``gptvq_weight`` (codebook ``fmt``, matrix
    ``weight``) or ``mix_codebook_weight`` (codebook ``fmt``, vector ``weight``); options go to that branch."""
    if reason := rwkvquant_supports(fmt):
        raise ValueError(reason)
    if isinstance(fmt, IntFormat):
        return gptq_weight(weight, fmt, axis=axis, stats=stats, options=options)
    branch = mix_codebook_weight if jnp.ndim(weight) == 1 else gptvq_weight
    return branch(weight, fmt, axis=axis, stats=stats, options=options)


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """A weight algorithm as recipes name it: its function, what formats it takes, whether it needs calibration.

    ``quantize(weight, fmt, *, axis, stats, options) -> QArray``; ``supports(fmt)`` says why it cannot use
    ``fmt`` (None if it can); ``options`` is the dataclass its ``Rule.options`` are the fields of (None: takes
    none, or they go to a branch chosen by format). ``quantize_shared(weights, fmt, *, axis, stats, options) ->
    [QArray]`` (optional) quantizes sites that read the same inputs in one call, each result equal to
    ``quantize``'s; ``jquant.quantize`` uses it for sites of one block with equal statistics, format and options.
    """

    name: str
    quantize: WeightAlgorithm
    supports: Callable[[Format], str | None]
    needs_calibration: bool
    options: type | None = None
    quantize_shared: Callable[..., list[QArray]] | None = None


_REGISTRY: NamedRegistry[AlgorithmSpec] = NamedRegistry("weight algorithm")


def register_algorithm(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Add a weight algorithm recipes can name; a second spec under a taken name is refused."""
    return _REGISTRY.register(spec.name, spec)


# Algorithms defined by a method's own module, registered when it is imported; importing them on first use lets a
# checkpoint that names one load in a fresh process.
_REGISTERED_ON_IMPORT = {"rwkvquant-codebook": "jquant.methods.rwkvquant_vq"}


def algorithm(name: str) -> AlgorithmSpec:
    """The registered algorithm ``name``; the error lists the known ones."""
    if name in _REGISTERED_ON_IMPORT and name not in _REGISTRY.names():
        import importlib

        importlib.import_module(_REGISTERED_ON_IMPORT[name])
    return _REGISTRY.get(name)


def algorithm_names() -> tuple[str, ...]:
    return tuple(sorted(set(_REGISTRY.names()) | set(_REGISTERED_ON_IMPORT)))


for _spec in (
    AlgorithmSpec("rtn", rtn, rtn_supports, needs_calibration=False),
    AlgorithmSpec("gptq", gptq_weight, gptq_supports, needs_calibration=True, options=GPTQConfig,
                  quantize_shared=gptq_shared_input),
    AlgorithmSpec("gptvq", gptvq_weight, gptvq_supports, needs_calibration=True, options=GPTVQConfig),
    AlgorithmSpec("pcdvq", pcdvq_weight, pcdvq_supports, needs_calibration=True, options=PCDVQConfig),
    AlgorithmSpec("rwkvquant", rwkvquant_weight, rwkvquant_supports, needs_calibration=True),
):
    register_algorithm(_spec)
