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
  ``clipped_square``  per-channel ``Σ min(x², τ²)``, ``[in]``, when the site asks for it (``clip_percentile``;
               RWKVQuant's element-wise mixes): ``τ`` is that percentile of ``|x|`` over each sequence's elements

Stacked expert sites (``record_expert_input``) keep the same statistics per expert, over the
tokens routed to that expert only: ``hessian [E, in, in]``, ``count [E]``, ``absmax``/``total
[E, in]``, plus MoEQuant's affinity-weighted ``affinity_hessian [E, in, in] = Σ_i c_i x_i x_iᵀ``
and ``affinity [E] = Σ_i c_i`` (``c_i``: the routing weight of the token for that expert).
They are summed on device per calibration batch (float32) and across batches on the host
(float64); ``InputStatistics.group(e)`` is expert ``e``'s share.

**Groups.** Experts are one kind of group; modalities (an MLLM's text and image tokens) and timestep
buckets (a diffusion transformer's sampling phases) are others, and all share one layout: a leading
group axis ``G`` on every statistic (``hessian [G, in, in]``, ``count [G]``, ``absmax [G, in]``, ...).
A site records grouped statistics when its ``capture_groups`` is set (``set_capture(..., num_groups=G)``)
and its call passes ``groups`` (int ids broadcastable to the tokens, e.g. ``[B, T]`` modality ids or a
``[B, 1]`` timestep bucket); ``group(g)`` is group ``g``'s share and ``pooled()`` the sum over groups.

On device, each sequence (index along the input's leading axis) gets its own
float32 ``X_b^T X_b``; ``statistics_from_state`` sums those on the host in
float64, in sequence order, and later batches continue those sums
(``running=``, in place). The result therefore does not depend on how the
calibration set is batched or sharded across devices (a float32 all-reduce
would), and large calibration sets do not lose precision. Memory is one ``[in, in]`` matrix per
sequence of the current batch per site; ``statistics_from_state(..., running=)``
continues the running float64 sums of earlier sequences, so one batch may be
captured in sub-batches with the same result bit for bit (``capture_layout``
tells per-sequence statistics from per-call ones, the expert sites', which are
float32 sums over all the rows of one call and so need the whole batch in one
call). With the flag off (the default) nothing is recorded and nothing is traced.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Collection

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.calib.data import batches
from jquant.module_jit import module_jit
from jquant.sites import find_sites, path_string

CLIPPED_SQUARE_PERCENTILE = 99.9
"""RWKVQuant's clipping of the activations before ``E[x²]`` (spec §3.5): the percentile of ``|x|`` per sequence."""


def record_input(module: nnx.Module, x: jax.Array, affinity: jax.Array | None = None,
                 groups: jax.Array | None = None, clip_percentile: float | None = None) -> None:
    """Sow per-sequence statistics of ``x [B, ..., in]`` into ``module`` if its capture flag is set.

    ``affinity [B, ...]`` (one weight per token, e.g. a gated shared expert's gate) adds the weighted
    ``Σ c x xᵀ`` (``input_affinity_hessian``) and ``Σ c`` (``input_affinity``). ``groups`` (int ids
    broadcastable to ``x.shape[:-1]``) splits every statistic by group when the module's
    ``capture_groups`` (the number of groups ``G``) is set: per sequence ``X_gᵀ X_g`` is
    ``Σ_n 1[g_n = g] x_n x_nᵀ``. ``clip_percentile`` adds ``input_clipped_square``: per channel ``Σ_n min(x², τ²)``
    with ``τ`` the ``clip_percentile``-th percentile of ``|x|`` over the sequence's elements (the ``k``-th largest,
    ``k = ceil((1 - p/100) N in)``).
    """
    if not getattr(module, "capture_inputs", False):
        return
    b, features = x.shape[0], x.shape[-1]
    x3 = x.reshape(b, -1, features).astype(jnp.float32)
    num_groups = getattr(module, "capture_groups", None)
    grouped = groups is not None and num_groups is not None
    # [B, N, G]: token n's group; ungrouped statistics keep the plain formulas
    onehot = (jax.nn.one_hot(jnp.broadcast_to(groups, x.shape[:-1]).reshape(b, -1), num_groups, dtype=jnp.float32)
              if grouped else None)

    def gram(rows: jax.Array) -> jax.Array:
        if grouped:
            return jnp.einsum("bng,bni,bnj->bgij", onehot, rows, rows, precision=jax.lax.Precision.HIGHEST)
        return jnp.einsum("bni,bnj->bij", rows, rows, precision=jax.lax.Precision.HIGHEST)

    def per_token(name: str, values: jax.Array) -> None:  # Σ over each group's tokens of a [B, N] value
        add(name, jnp.einsum("bng,bn->bg", onehot, values) if grouped else _sequence_sums(values))

    def add(name: str, value: jax.Array, reduce=lambda a, b: a + b) -> None:
        module.sow(nnx.Intermediate, name, value, init_fn=lambda: 0.0, reduce_fn=reduce)

    if affinity is not None:
        c = affinity.reshape(b, -1).astype(jnp.float32)
        add("input_affinity_hessian", gram(x3 * jnp.sqrt(c)[..., None]))
        per_token("input_affinity", c)
    add("input_hessian", gram(x3))
    per_token("input_count", jnp.ones(x3.shape[:2], jnp.float32))
    absmax = jnp.max(jnp.abs(x3)[:, :, None, :] * onehot[..., None], axis=1) if grouped else jnp.max(jnp.abs(x3), axis=1)
    add("input_absmax", absmax, jnp.maximum)
    add("input_total", jnp.einsum("bng,bni->bgi", onehot, x3) if grouped else _sequence_sums(x3))
    if clip_percentile is not None:
        flat = jnp.abs(x3).reshape(b, -1)
        k = max(1, math.ceil((1.0 - clip_percentile / 100.0) * flat.shape[1]))
        tau = jax.lax.top_k(flat, k)[0][:, -1]  # [B]: each sequence's own threshold
        clipped = jnp.minimum(jnp.square(x3), jnp.square(tau)[:, None, None])
        add("input_clipped_square", jnp.einsum("bng,bni->bgi", onehot, clipped) if grouped else _sequence_sums(clipped))
    fmt = getattr(module, "activation", None)
    if fmt is not None:
        from jquant.ops.linear import quantize_activation

        scale = getattr(module, "activation_scale", None)
        scale = None if scale is None else scale.get_value()
        error = (x - quantize_activation(x, fmt, scale, groups)).astype(jnp.float32).reshape(x3.shape)
        per_token("input_energy", jnp.sum(jnp.square(x3), axis=-1))
        per_token("input_quantization_error", jnp.sum(jnp.square(error), axis=-1))


def _sequence_sums(values: jax.Array) -> jax.Array:
    """``values [B, N, ...]`` summed over tokens (axis 1) -> ``[B, ...]``, as a product with ones per sequence.

    XLA:CPU rounds a reduction over a middle axis differently for different ``B``; a batched product does
    not, so a sequence's sums do not depend on the batch it is captured in (``walk_blocks``' sub-batches).
    """
    ones = jnp.ones(values.shape[:2], jnp.float32)
    return jnp.einsum("bn,bn...->b...", ones, values, precision=jax.lax.Precision.HIGHEST)


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


def set_capture(module: nnx.Module, enabled: bool, *, num_groups: int | None = None,
                only: Collection[str] | None = None) -> None:
    """Turn input capture on or off for every site inside ``module`` (in place; static flags).

    ``num_groups`` makes sites whose calls pass ``groups`` record statistics per group. ``only`` (site paths
    relative to ``module``) turns capture on for those sites and off for the others.
    """
    for site in find_sites(module):
        on = enabled and (only is None or site.path in only)
        site.module.capture_inputs = on
        site.module.capture_groups = num_groups if on else None


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
    clipped_square: np.ndarray | None = None

    def merge(self, other: InputStatistics) -> InputStatistics:
        """Statistics of the union of both token sets."""
        add = lambda a, b: None if a is None or b is None else a + b  # noqa: E731
        return InputStatistics(hessian=self.hessian + other.hessian, count=self.count + other.count,
                               absmax=np.maximum(self.absmax, other.absmax), total=add(self.total, other.total),
                               energy=add(self.energy, other.energy),
                               quantization_error=add(self.quantization_error, other.quantization_error),
                               affinity_hessian=add(self.affinity_hessian, other.affinity_hessian),
                               affinity=add(self.affinity, other.affinity),
                               clipped_square=add(self.clipped_square, other.clipped_square))

    @property
    def num_groups(self) -> int | None:
        """``G`` for grouped statistics (experts of a stacked expert site, modalities, timestep buckets);
        None for statistics over all tokens."""
        return None if np.ndim(self.count) == 0 else int(np.shape(self.count)[0])

    def group(self, g: int) -> InputStatistics:
        """Group ``g``'s statistics (over its tokens: those routed to expert ``g``, of modality ``g``, ...)."""
        if self.num_groups is None:
            raise ValueError("these statistics are over all tokens, not grouped; capture them with "
                             "set_capture(..., num_groups=G) on a site whose calls pass groups.")
        if not 0 <= g < self.num_groups:
            raise ValueError(f"group {g} is out of range for statistics of {self.num_groups} groups.")
        pick = lambda a: None if a is None else a[g]  # noqa: E731
        scalar = lambda a: None if a is None else float(a[g])  # noqa: E731
        return InputStatistics(hessian=self.hessian[g], count=float(self.count[g]), absmax=self.absmax[g],
                               total=pick(self.total), energy=scalar(self.energy),
                               quantization_error=scalar(self.quantization_error),
                               affinity_hessian=pick(self.affinity_hessian), affinity=scalar(self.affinity),
                               clipped_square=pick(self.clipped_square))

    def pooled(self, weights: np.ndarray | None = None) -> InputStatistics:
        """All groups as one token set: ``H = Σ_g w_g H_g`` (``w_g = 1`` by default: the plain sum over tokens).

        ``weights [G]`` re-weights groups, e.g. ``N / (G n_g)`` so each group counts as much as the others
        (GPTQ's ``group_weighting="balanced"``). Statistics that are not grouped are returned unchanged.
        """
        if self.num_groups is None:
            return self
        w = np.ones(self.num_groups) if weights is None else np.asarray(weights, np.float64)
        if w.shape != (self.num_groups,):
            raise ValueError(f"pooled: weights must have shape ({self.num_groups},), got {w.shape}.")
        total = lambda a: None if a is None else np.tensordot(w, a, axes=1)  # noqa: E731
        scalar = lambda a: None if a is None else float(np.dot(w, a))  # noqa: E731
        return InputStatistics(hessian=total(self.hessian), count=scalar(self.count),
                               absmax=np.max(self.absmax, axis=0),
                               total=total(self.total), energy=scalar(self.energy),
                               quantization_error=scalar(self.quantization_error),
                               affinity_hessian=total(self.affinity_hessian), affinity=scalar(self.affinity),
                               clipped_square=total(self.clipped_square))

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


def _by_site(state: nnx.State | dict[str, dict]) -> dict[str, dict]:
    """``{site path: {statistic name: value}}`` of captured ``nnx.Intermediate`` values (arrays or shapes);
    an already grouped plain dict (``StatisticsCapture``'s output) is returned as it is."""
    if not isinstance(state, nnx.State):
        return state
    by_site: dict[str, dict] = {}
    for path, var in nnx.to_flat_state(state):
        *site, name = path
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        by_site.setdefault(path_string(tuple(site)), {})[name] = value[0] if isinstance(value, tuple) else value
    return {p: s for p, s in by_site.items() if "input_hessian" in s}


def statistics_from_state(state: nnx.State | dict[str, dict], running: dict[str, InputStatistics] | None = None
                          ) -> dict[str, InputStatistics]:
    """Group captured ``nnx.Intermediate`` values by site path (relative to the captured module).

    ``running``: statistics of the sequences captured just before these (a superset of these sites), whose
    float64 sums are continued sequence by sequence: a batch captured in consecutive sub-batches gives the
    statistics of one call on the whole batch, bit for bit. Their arrays are continued in place (no second
    copy of a large Gram), so ``running``'s entries for these sites are consumed: use the returned ones.
    Sites that captured equal values (they read one input: q/k/v, gate/up) share one ``InputStatistics``.
    """
    by_site = _by_site(state)
    befores = {p: None if running is None else running[p] for p in by_site}
    twins = _twin_sites(by_site, befores)
    stats = {}
    for p, s in by_site.items():
        if p in twins:
            stats[p] = stats[twins[p]]
            continue
        before = befores[p]

        def total(name: str, key: str, s=s, before=before) -> float | np.ndarray | None:
            return _ordered_total(s.get(key), None if before is None else getattr(before, name))

        absmax = np.max(np.asarray(s["input_absmax"], np.float64), axis=0)
        stats[p] = InputStatistics(hessian=total("hessian", "input_hessian"),
                                   count=_count(s["input_count"], None if before is None else before.count),
                                   absmax=absmax if before is None else np.maximum(before.absmax, absmax),
                                   total=total("total", "input_total"), energy=total("energy", "input_energy"),
                                   quantization_error=total("quantization_error", "input_quantization_error"),
                                   affinity_hessian=total("affinity_hessian", "input_affinity_hessian"),
                                   affinity=total("affinity", "input_affinity"),
                                   clipped_square=total("clipped_square", "input_clipped_square"))
    return stats


def _twin_sites(by_site: dict[str, dict], befores: dict[str, InputStatistics | None]) -> dict[str, str]:
    """``{site: earlier site}`` for sites whose captured values equal an earlier site's and whose running
    statistics are the same object (or both absent): sites that read the same input (q/k/v, gate/up) share one
    ``InputStatistics`` instead of each holding float64 copies of one Gram. A site that shared running statistics
    with another but now differs gets its own copy of them in ``befores`` (they are continued in place)."""
    twins: dict[str, str] = {}
    firsts: list[str] = []
    for p, values in by_site.items():
        twin = next((q for q in firsts if befores[q] is befores[p] and _equal_values(by_site[q], values)), None)
        if twin is not None:
            twins[p] = twin
            continue
        if befores[p] is not None and any(befores[q] is befores[p] for q in firsts):
            befores[p] = copy.deepcopy(befores[p])
        firsts.append(p)
    return twins


def _equal_values(a: dict, b: dict) -> bool:
    """Whether two sites captured the same statistics, bit for bit (cheap ones compared first)."""
    if a.keys() != b.keys() or any(np.shape(a[k]) != np.shape(b[k]) for k in a):
        return False
    order = sorted(a, key=lambda k: np.size(a[k]))
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in order)


def _count(per_sequence: jax.Array, start: float | np.ndarray | None = None) -> float | np.ndarray:
    """Tokens seen: a float for an ordinary site, ``[E]`` per expert for a stacked expert site."""
    total = np.sum(np.asarray(per_sequence, np.float64), axis=0)
    if start is not None:
        total = start + total  # whole numbers: exact in float64
    return float(total) if np.ndim(total) == 0 else total


def _ordered_sum(per_sequence: jax.Array, start: float | np.ndarray | None = None) -> np.ndarray:
    """Sum ``[B, ...]`` over sequences in float64, in index order, continuing from ``start`` (host side,
    deterministic). A float64 array ``start`` of the sum's shape is continued in place and returned."""
    if isinstance(start, np.ndarray) and start.dtype == np.float64 and start.shape == per_sequence.shape[1:]:
        total = start  # continued in place: no second float64 copy of a running Gram
    else:
        total = np.zeros(per_sequence.shape[1:], np.float64)
        if start is not None:
            total += start
    for part in np.asarray(per_sequence):  # one sequence at a time in float64, not a float64 copy of the batch
        total += part
    return total


def _ordered_total(per_sequence: jax.Array | None, start: float | np.ndarray | None = None
                   ) -> float | np.ndarray | None:
    """``_ordered_sum`` as a float when scalar (an array for a Gram, ``[G]`` per group, ...); None when not
    recorded."""
    if per_sequence is None:
        return None
    total = _ordered_sum(per_sequence, start)
    return float(total) if total.ndim == 0 else total


@dataclasses.dataclass(frozen=True)
class CaptureLayout:
    """What one capture call on a batch of ``B`` sequences records, from its shapes (nothing run).

    ``bytes_per_sequence``: for each site whose statistics are per sequence (leading axis ``B``), their bytes
    for one sequence (``in² x 4`` for a Gram, ``G in² x 4`` grouped). ``per_call``: sites whose statistics are
    one sum over the call (leading axis 1 when ``B > 1``): stacked expert sites, whose Gram of the rows routed
    to an expert is one float32 product over the whole call, so splitting the call would change it.
    ``order``: every site in the order one call on the whole batch returns them.
    """

    bytes_per_sequence: dict[str, int]
    per_call: tuple[str, ...]
    order: tuple[str, ...]

    def sequences_within(self, budget: int) -> int | float:
        """How many sequences one call may hold with at most ``budget`` bytes of per-sequence statistics
        (at least 1; ``inf`` when nothing is per sequence)."""
        per_sequence = sum(self.bytes_per_sequence.values())
        return max(1, budget // per_sequence) if per_sequence else math.inf


def capture_layout(state: nnx.State | dict[str, dict], batch: int) -> CaptureLayout:
    """The ``CaptureLayout`` of a capture call on ``batch`` sequences, from its (abstract) captured ``state``."""
    per_sequence, per_call = {}, []
    sites = _by_site(state)
    for p, s in sites.items():
        if batch > 1 and s["input_hessian"].shape[0] == 1:
            per_call.append(p)
        else:
            per_sequence[p] = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in s.values()) // batch
    return CaptureLayout(bytes_per_sequence=per_sequence, per_call=tuple(per_call), order=tuple(sites))


class StatisticsCapture:
    """``fn(module, *args) -> out`` as ``(module, *args) -> (out, {site path: InputStatistics})``.

    The forward (with capture) is ``nnx.jit``-compiled; the float64 reduction runs on the host.
    ``running=`` continues earlier sequences' sums (``statistics_from_state``); ``layout(module, *args)``
    is the call's ``CaptureLayout`` from an abstract evaluation, which shares the jit's trace.
    """

    def __init__(self, fn: Callable):
        captured = nnx.capture(fn, nnx.Intermediate)

        def plain(module: nnx.Module, *args):
            # Plain arrays out: returned nnx.Intermediate objects sit in reference cycles, so the Grams they hold
            # would stay resident until Python's cyclic garbage collector runs (GBs for a 4096-wide block).
            out, state = captured(module, *args)
            return out, _by_site(state)

        self._captured = module_jit(plain)

    def __call__(self, module: nnx.Module, *args, running: dict[str, InputStatistics] | None = None):
        out, state = self._captured(module, *args)
        return out, statistics_from_state(state, running)

    def layout(self, module: nnx.Module, *args) -> CaptureLayout:
        """The layout of ``self(module, *args)``; the batch size is the leading axis of ``args[0]``'s first leaf."""
        _, state = self._captured.eval_shape(module, *args)
        return capture_layout(state, jax.tree.leaves(args[0])[0].shape[0])


def capture_statistics(fn: Callable) -> StatisticsCapture:
    """``fn(module, *args) -> out`` becomes ``(module, *args) -> (out, {site path: InputStatistics})``."""
    return StatisticsCapture(fn)


def model_input_statistics(model: nnx.Module, tokens, paths: set[str] | None = None, *,
                           batch_size: int = 8) -> dict[str, InputStatistics]:
    """Input statistics of the sites of ``model`` (all, or those in ``paths``) over a full forward of ``tokens``
    (the model's inputs with a leading sample axis, ``jquant.calib.data``: ids ``[N, T]`` for an LM).

    Unlike block-by-block calibration this runs the whole model as it is, batch by
    batch (``model.calibration_call(batch)`` when the family defines it, e.g. a diffusion transformer whose
    calibration batch is a dict, else ``model(batch)``); the model is not modified (capture runs on a copy).
    """
    chunks = batches(tokens, batch_size)
    probe = nnx.clone(model)
    sites = [s for s in find_sites(probe) if paths is None or s.path in paths]
    if paths is not None and len(sites) != len(paths):
        missing = sorted(paths - {s.path for s in sites})
        raise ValueError(f"model_input_statistics: no quantization site at {missing}.")
    for site in sites:
        site.module.capture_inputs = True
    forward = capture_statistics(lambda m, t: m.calibration_call(t) if hasattr(m, "calibration_call") else m(t))
    stats: dict[str, InputStatistics] | None = None
    for chunk in chunks:  # batches continue the running sums: the statistics do not depend on the batching
        _, stats = forward(probe, jax.tree.map(jnp.asarray, chunk), running=stats)
    return stats
