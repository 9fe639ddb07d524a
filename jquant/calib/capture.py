"""Capturing statistics of the inputs that reach each quantization site.

Site modules call ``record_input(self, x)`` at the top of ``__call__``. When a
site's ``capture_inputs`` flag is on (``set_capture(module, True)``), the call
*sows* statistics as ``nnx.Intermediate`` values; ``capture_statistics(fn)``
wraps a forward function with ``nnx.capture`` so they come back as an output
(a pure function, nothing left in the module). Per site:

  ``input_hessian``  ``X^T X`` over all tokens, ``[in, in]`` float32 (GPTQ's ``H / 2``)
  ``input_count``    number of tokens seen (scalar float32)
  ``input_absmax``   per-channel ``max |x|``, ``[in]`` (SmoothQuant-style statistics)

so memory is one ``[in, in]`` matrix per site, independent of the number of
calibration tokens; ``InputStatistics.merge`` accumulates them over batches.
With the flag off (the default) nothing is recorded and nothing is traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jquant.sites import find_sites, path_string


def record_input(module: nnx.Module, x: jax.Array) -> None:
    """Sow the statistics of ``x [..., in]`` into ``module`` if its capture flag is set."""
    if not getattr(module, "capture_inputs", False):
        return
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    xtx = jnp.einsum("ni,nj->ij", x2, x2, precision=jax.lax.Precision.HIGHEST)
    n = jnp.asarray(x2.shape[0], jnp.float32)
    absmax = jnp.max(jnp.abs(x2), axis=0)
    module.sow(nnx.Intermediate, "input_hessian", xtx, init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)
    module.sow(nnx.Intermediate, "input_count", n, init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)
    module.sow(nnx.Intermediate, "input_absmax", absmax, init_fn=lambda: 0.0, reduce_fn=jnp.maximum)


def set_capture(module: nnx.Module, enabled: bool) -> None:
    """Turn input capture on or off for every site inside ``module`` (in place; a static flag)."""
    for site in find_sites(module):
        site.module.capture_inputs = enabled


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InputStatistics:
    """Accumulated statistics of one site's inputs (see the module docstring)."""

    hessian: jax.Array
    count: jax.Array
    absmax: jax.Array

    def merge(self, other: InputStatistics) -> InputStatistics:
        """Statistics of the union of both token sets."""
        return InputStatistics(hessian=self.hessian + other.hessian, count=self.count + other.count,
                               absmax=jnp.maximum(self.absmax, other.absmax))


def statistics_from_state(state: nnx.State) -> dict[str, InputStatistics]:
    """Group captured ``nnx.Intermediate`` values by site path (relative to the captured module)."""
    by_site: dict[str, dict] = {}
    for path, var in nnx.to_flat_state(state):
        *site, name = path
        value = var[...] if isinstance(var, nnx.Variable) else var
        by_site.setdefault(path_string(tuple(site)), {})[name] = value[0] if isinstance(value, tuple) else value
    return {
        p: InputStatistics(hessian=s["input_hessian"], count=s["input_count"], absmax=s["input_absmax"])
        for p, s in by_site.items()
        if "input_hessian" in s
    }


def capture_statistics(fn: Callable) -> Callable:
    """``fn(module, *args) -> out`` becomes ``(module, *args) -> (out, {site path: InputStatistics})``."""
    captured = nnx.capture(fn, nnx.Intermediate)

    def wrapped(module, *args):
        out, state = captured(module, *args)
        return out, statistics_from_state(state)

    return wrapped
