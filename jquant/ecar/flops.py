"""Matmul FLOPs of any JAX function, counted from its jaxpr: the independent check of the models' analytical
counts (``jquant.models.mar.sampling_flops``, ``jquant.models.ecar.sampling_flops``) and the count for models
without one (the text-to-image DiT).

Every ``dot_general`` contributes ``2 · prod(batch dims) · m · n · k``; a ``scan`` counts its body ``length``
times; calls, jits, custom-derivative wrappers, ``cond`` (the largest branch) and ``while`` (once: trip counts are
not static) are entered. Elementwise work, reductions and gathers are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.extend import core as jcore


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
    batch = math.prod(lhs[i] for i in lb)
    contract = math.prod(lhs[i] for i in lc)
    m = math.prod(d for i, d in enumerate(lhs) if i not in lc and i not in lb)
    n = math.prod(d for i, d in enumerate(rhs) if i not in rc and i not in eqn.params["dimension_numbers"][1][1])
    return 2 * batch * m * n * contract


def _sub_jaxprs(value):
    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> int:
    """Matmul FLOPs of a ``Jaxpr`` (module docstring)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += jaxpr_flops(sub)
    return total


def matmul_flops(fn: Callable, *args, **kwargs) -> int:
    """Matmul FLOPs of ``fn(*args, **kwargs)`` as traced (module docstring)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
