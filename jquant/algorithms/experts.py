"""Quantizing a stack of expert weights ``[n, in, out]`` expert by expert, with each expert's own statistics.

Every expert is a separate ``[in, out]`` problem with its own scales. GPTQ uses the Hessian of the tokens
routed to that expert (``InputStatistics.group(e)``), or MoEQuant's affinity-weighted Hessian
``H_e = Σ_i c_i x_i x_iᵀ`` (AGQ, MoEQuant Eq. 19) with ``options["hessian"] = "affinity"``. An expert that
received no calibration token has no Hessian; it is rounded to nearest instead and reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from jquant.algorithms.weights import algorithm as algorithm_spec
from jquant.calib.capture import InputStatistics
from jquant.formats import Format, QArray, quantize, stack_experts


@dataclasses.dataclass(frozen=True)
class ExpertQuantization:
    """The stacked result ``[n, in, out]`` (axis 1) and the experts that fell back to round-to-nearest."""

    weight: QArray
    uncalibrated: tuple[int, ...]


def quantize_experts(weight: jax.Array, fmt: Format, *, algorithm: str, experts: Sequence[int],
                     stats: InputStatistics | None, options: Mapping[str, Any] = ()) -> ExpertQuantization:
    """Quantize ``weight [n, in, out]`` holding experts ``experts`` (their ids in ``stats``) with ``algorithm``.

    ``rtn`` quantizes the stack at once (per-expert scales along axis 1). ``gptq`` runs per expert on the
    statistics of its routed tokens; ``options["hessian"]`` picks ``"plain"`` (``Σ x xᵀ``) or ``"affinity"``
    (``Σ c x xᵀ``), the other options go to GPTQ.
    """
    options = dict(options)
    hessian = options.pop("hessian", "plain")
    if algorithm == "rtn":
        return ExpertQuantization(weight=quantize(weight, fmt, axis=1), uncalibrated=())
    if stats is None or stats.num_groups is None:
        raise ValueError(f"{algorithm} on stacked experts needs per-expert calibration statistics.")
    parts, uncalibrated = [], []
    for i, e in enumerate(experts):
        expert_stats = stats.group(e)
        if expert_stats.count == 0:
            parts.append(quantize(weight[i], fmt, axis=0))
            uncalibrated.append(e)
            continue
        if hessian == "affinity":
            expert_stats = dataclasses.replace(expert_stats, hessian=expert_stats.affinity_hessian)
        parts.append(algorithm_spec(algorithm).quantize(weight[i], fmt, axis=0, stats=expert_stats, options=options))
    return ExpertQuantization(weight=stack_experts(parts), uncalibrated=tuple(uncalibrated))
