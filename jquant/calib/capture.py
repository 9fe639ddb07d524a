"""Capturing statistics of the inputs that reach each quantization site.

Site modules call ``record_input(self, x)`` at the top of ``__call__``. When a
site's ``capture_inputs`` flag is on (``set_capture(module, True)``), the call
*sows* statistics as ``nnx.Intermediate`` values; ``capture_statistics(fn)``
wraps a forward function with ``nnx.capture`` so they come back as an output
(a pure function, nothing left in the module). Per site:

  ``hessian``  ``X^T X`` over all tokens, ``[in, in]`` (GPTQ's ``H / 2``)
  ``count``    number of tokens seen
  ``absmax``   per-channel ``max |x|``, ``[in]`` (SmoothQuant-style statistics)
  ``total``    per-channel ``Σ x``, ``[in]`` (with ``hessian``: mean and covariance, for QSUR)
  ``energy``, ``quantization_error``  ``Σ x²`` and ``Σ (x - Q(x))²`` when the site quantizes its
               inputs (``module.activation``, with its static scale if any): the site's activation SNR

Stacked expert sites (``record_expert_input``) keep the same statistics per expert, over the
tokens routed to that expert only: ``hessian [E, in, in]``, ``count [E]``, ``absmax``/``total
[E, in]``, plus MoEQuant's affinity-weighted ``affinity_hessian [E, in, in] = Σ_i c_i x_i x_iᵀ``
and ``affinity [E] = Σ_i c_i`` (``c_i``: the routing weight of the token for that expert).
They are summed on device per calibration batch (float32) and across batches on the host
(float64); ``InputStatistics.expert(e)`` is expert ``e``'s share.

On device, each sequence (index along the input's leading axis) gets its own
float32 ``X_b^T X_b``; ``statistics_from_state`` sums those on the host in
float64, in sequence order, and ``InputStatistics.merge`` adds batches in
order. The result therefore does not depend on how the calibration set is
batched or sharded across devices (a float32 all-reduce would), and large
calibration sets do not lose precision. Memory is one ``[in, in]`` matrix per
sequence of the current batch per site. With the flag off (the default)
nothing is recorded and nothing is traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.sites import find_sites, path_string


def record_input(module: nnx.Module, x: jax.Array, affinity: jax.Array | None = None) -> None:
    """Sow per-sequence statistics of ``x [B, ..., in]`` into ``module`` if its capture flag is set.

    ``affinity [B, ...]`` (one weight per token, e.g. a gated shared expert's gate) adds the weighted
    ``Σ c x xᵀ`` (``input_affinity_hessian``) and ``Σ c`` (``input_affinity``).
    """
    if not getattr(module, "capture_inputs", False):
        return
    if affinity is not None:
        c = affinity.reshape(x.shape[0], -1, 1).astype(jnp.float32)
        xc = x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32) * jnp.sqrt(c)
        weighted = jnp.einsum("bni,bnj->bij", xc, xc, precision=jax.lax.Precision.HIGHEST)
        module.sow(nnx.Intermediate, "input_affinity_hessian", weighted, init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)
        module.sow(nnx.Intermediate, "input_affinity", jnp.sum(c, axis=(1, 2)), init_fn=lambda: 0.0,
                   reduce_fn=lambda a, b: a + b)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)
    xtx = jnp.einsum("bni,bnj->bij", x3, x3, precision=jax.lax.Precision.HIGHEST)
    n = jnp.full((x3.shape[0],), x3.shape[1], jnp.float32)
    absmax = jnp.max(jnp.abs(x3), axis=1)
    total = jnp.sum(x3, axis=1)
    module.sow(nnx.Intermediate, "input_hessian", xtx, init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)
    module.sow(nnx.Intermediate, "input_count", n, init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)
    module.sow(nnx.Intermediate, "input_absmax", absmax, init_fn=lambda: 0.0, reduce_fn=jnp.maximum)
    module.sow(nnx.Intermediate, "input_total", total, init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)
    fmt = getattr(module, "activation", None)
    if fmt is not None:
        from jquant.ops.linear import quantize_activation

        scale = getattr(module, "activation_scale", None)
        scale = None if scale is None else scale.get_value()
        error = (x - quantize_activation(x, fmt, scale)).astype(jnp.float32)
        energy = jnp.sum(jnp.square(x3), axis=(1, 2))
        error = jnp.sum(jnp.square(error.reshape(x3.shape)), axis=(1, 2))
        module.sow(nnx.Intermediate, "input_energy", energy, init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)
        module.sow(nnx.Intermediate, "input_quantization_error", error, init_fn=lambda: 0.0,
                   reduce_fn=lambda a, b: a + b)


def record_expert_input(module: nnx.Module, x: jax.Array, group_sizes: jax.Array, affinity: jax.Array | None) -> None:
    """Sow per-expert statistics of grouped rows ``x [M, in]`` (``group_sizes [E]``, affinities ``[M]``) if capturing."""
    if not getattr(module, "capture_inputs", False):
        return
    from jquant.ops.experts import expert_ids, grouped_gram

    num_experts = group_sizes.shape[0]
    xf = x.astype(jnp.float32)
    eid = expert_ids(group_sizes, x.shape[0])
    c = jnp.ones((x.shape[0],), jnp.float32) if affinity is None else affinity.astype(jnp.float32)
    stats = {
        "input_hessian": grouped_gram(xf, group_sizes),
        "input_affinity_hessian": grouped_gram(xf * jnp.sqrt(c)[:, None], group_sizes),
        "input_count": group_sizes.astype(jnp.float32),
        "input_affinity": jax.ops.segment_sum(c, eid, num_experts),
        "input_total": jax.ops.segment_sum(xf, eid, num_experts),
    }
    for name, value in stats.items():
        module.sow(nnx.Intermediate, name, value[None], init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)
    absmax = jnp.maximum(jax.ops.segment_max(jnp.abs(xf), eid, num_experts), 0.0)
    module.sow(nnx.Intermediate, "input_absmax", absmax[None], init_fn=lambda: 0.0, reduce_fn=jnp.maximum)


def set_capture(module: nnx.Module, enabled: bool) -> None:
    """Turn input capture on or off for every site inside ``module`` (in place; a static flag)."""
    for site in find_sites(module):
        site.module.capture_inputs = enabled


@dataclasses.dataclass(frozen=True)
class InputStatistics:
    """Accumulated statistics of one site's inputs on the host, float64 (see the module docstring)."""

    hessian: np.ndarray
    count: float | np.ndarray
    absmax: np.ndarray
    total: np.ndarray | None = None
    energy: float | None = None
    quantization_error: float | None = None
    affinity_hessian: np.ndarray | None = None
    affinity: np.ndarray | None = None

    def merge(self, other: InputStatistics) -> InputStatistics:
        """Statistics of the union of both token sets."""
        add = lambda a, b: None if a is None or b is None else a + b  # noqa: E731
        return InputStatistics(hessian=self.hessian + other.hessian, count=self.count + other.count,
                               absmax=np.maximum(self.absmax, other.absmax), total=add(self.total, other.total),
                               energy=add(self.energy, other.energy),
                               quantization_error=add(self.quantization_error, other.quantization_error),
                               affinity_hessian=add(self.affinity_hessian, other.affinity_hessian),
                               affinity=add(self.affinity, other.affinity))

    @property
    def num_experts(self) -> int | None:
        """``E`` for the statistics of a stacked expert site (None for an ordinary site)."""
        return None if np.ndim(self.count) == 0 else int(np.shape(self.count)[0])

    def expert(self, e: int) -> InputStatistics:
        """Expert ``e``'s statistics (over the tokens routed to it) of a stacked expert site."""
        if self.num_experts is None:
            raise ValueError("these are the statistics of an ordinary site, not of a stacked expert site.")
        pick = lambda a: None if a is None else a[e]  # noqa: E731
        return InputStatistics(hessian=self.hessian[e], count=float(self.count[e]), absmax=self.absmax[e],
                               total=pick(self.total), affinity_hessian=pick(self.affinity_hessian),
                               affinity=None if self.affinity is None else float(self.affinity[e]))

    @property
    def quantization_snr_db(self) -> float:
        """``10 log10(Σ x² / Σ (x - Q(x))²)`` of the site's own activation quantizer over the tokens seen."""
        if self.energy is None or self.quantization_error is None:
            raise ValueError("these statistics carry no quantization error (the site does not quantize its inputs).")
        return float(10.0 * np.log10(self.energy / max(self.quantization_error, 1e-300)))

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean ``[in]``."""
        if self.total is None:
            raise ValueError("these statistics carry no input sums (built without 'total').")
        return self.total / self.count

    @property
    def covariance(self) -> np.ndarray:
        """Population covariance ``E[x xᵀ] - μ μᵀ``, ``[in, in]``."""
        mu = self.mean
        return self.hessian / self.count - np.outer(mu, mu)


def statistics_from_state(state: nnx.State) -> dict[str, InputStatistics]:
    """Group captured ``nnx.Intermediate`` values by site path (relative to the captured module)."""
    by_site: dict[str, dict] = {}
    for path, var in nnx.to_flat_state(state):
        *site, name = path
        value = var[...] if isinstance(var, nnx.Variable) else var
        by_site.setdefault(path_string(tuple(site)), {})[name] = value[0] if isinstance(value, tuple) else value
    optional = lambda s, name: None if name not in s else _ordered_sum(s[name])  # noqa: E731
    return {
        p: InputStatistics(hessian=_ordered_sum(s["input_hessian"]), count=_count(s["input_count"]),
                           absmax=np.max(np.asarray(s["input_absmax"], np.float64), axis=0),
                           total=_ordered_sum(s["input_total"]),
                           energy=_ordered_total(s.get("input_energy")),
                           quantization_error=_ordered_total(s.get("input_quantization_error")),
                           affinity_hessian=optional(s, "input_affinity_hessian"),
                           affinity=optional(s, "input_affinity"))
        for p, s in by_site.items()
        if "input_hessian" in s
    }


def _count(per_sequence: jax.Array) -> float | np.ndarray:
    """Tokens seen: a float for an ordinary site, ``[E]`` per expert for a stacked expert site."""
    total = np.sum(np.asarray(per_sequence, np.float64), axis=0)
    return float(total) if total.ndim == 0 else total


def _ordered_sum(per_sequence: jax.Array) -> np.ndarray:
    """Sum ``[B, ...]`` over sequences in float64, in index order (host side, deterministic)."""
    total = np.zeros(per_sequence.shape[1:], np.float64)
    for part in np.asarray(per_sequence, np.float64):
        total += part
    return total


def _ordered_total(per_sequence: jax.Array | None) -> float | None:
    return None if per_sequence is None else float(_ordered_sum(per_sequence))


def capture_statistics(fn: Callable) -> Callable:
    """``fn(module, *args) -> out`` becomes ``(module, *args) -> (out, {site path: InputStatistics})``.

    The forward (with capture) is ``nnx.jit``-compiled; the float64 reduction runs on the host.
    """
    captured = nnx.jit(nnx.capture(fn, nnx.Intermediate))

    def wrapped(module, *args):
        out, state = captured(module, *args)
        return out, statistics_from_state(state)

    return wrapped


def model_input_statistics(model: nnx.Module, tokens: np.ndarray, paths: set[str] | None = None, *,
                           batch_size: int = 8) -> dict[str, InputStatistics]:
    """Input statistics of the sites of ``model`` (all, or those in ``paths``) over a full forward of ``tokens [N, T]``.

    Unlike block-by-block calibration this runs the whole model as it is, batch by
    batch (``model(tokens)``); the model is not modified (capture runs on a copy).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be a non-empty [N, T] array, got shape {tokens.shape}.")
    probe = nnx.clone(model)
    sites = [s for s in find_sites(probe) if paths is None or s.path in paths]
    if paths is not None and len(sites) != len(paths):
        missing = sorted(paths - {s.path for s in sites})
        raise ValueError(f"model_input_statistics: no quantization site at {missing}.")
    for site in sites:
        site.module.capture_inputs = True
    forward = capture_statistics(lambda m, t: m(t))
    stats: dict[str, InputStatistics] = {}
    for i in range(0, len(tokens), batch_size):
        _, new = forward(probe, jnp.asarray(tokens[i : i + batch_size]))
        stats = new if not stats else {p: stats[p].merge(s) for p, s in new.items()}
    return stats
