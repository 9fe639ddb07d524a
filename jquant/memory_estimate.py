"""How much memory a computation's largest intermediate array needs, found by tracing it (nothing runs).

``largest_intermediate_bytes(fn, *args)`` traces ``fn`` to a jaxpr (``jax.make_jaxpr``; ``args`` may be
``jax.ShapeDtypeStruct``s) and returns the size in bytes of the largest array any equation produces, looking
inside nested jaxprs (jit, scan, cond, custom VJPs). A computation needs at least that much memory at once: for a
diffusion transformer it is typically the attention scores ``[B, heads, S, S]``, for a video VAE a decoder
activation ``[B, F, H, W, C]``. Compilers may fuse some intermediates away, so it is a guide for refusing work that
cannot fit before any of it runs, not an exact peak.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def _aval_bytes(aval: Any) -> int:
    shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    if shape is None or dtype is None or not hasattr(dtype, "itemsize"):
        return 0
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _nested(value: Any):
    """The jaxprs held by an equation parameter (a jaxpr, a closed jaxpr, or a sequence of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _nested(item)


def _largest(jaxpr: Any) -> int:
    best = 0
    for eqn in jaxpr.eqns:
        best = max([best, *(_aval_bytes(v.aval) for v in eqn.outvars)])
        for value in eqn.params.values():
            for inner in _nested(value):
                best = max(best, _largest(inner))
    return best


def largest_intermediate_bytes(fn: Callable[..., Any], *args: Any) -> int:
    """Bytes of the largest array ``fn(*args)`` computes (module docstring); ``args`` may be abstract."""
    return _largest(jax.make_jaxpr(fn)(*args).jaxpr)
