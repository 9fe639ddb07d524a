"""``quantize(model, recipe, calib)``: a pure model -> model transform (``jquant.quantize``).

1. Every quantization site of ``model`` (``jquant.sites``) gets its rule from
   the recipe; everything is validated before any work is done: a rule that
   matches nothing, an unknown format, a shape the format cannot hold (a group
   size that does not divide), a non-finite weight, an algorithm that cannot
   use the format, missing or bad calibration data. Errors name the site path.
2. The model is cloned; the input is never modified, and a failure part-way
   leaves only a discarded clone behind (never a half-quantized model). The
   recipe's equivalence transforms (SmoothQuant, QuaRot, OSTQuant;
   ``jquant.transforms.pipeline``) run on the copy first.
3. If any rule's algorithm needs calibration (GPTQ, GPTVQ, PCDVQ), blocks are processed in
   order on the outputs of the already-quantized blocks (``jquant.calib.sequential.walk_blocks``;
   the calibration set is any pytree of model inputs with a leading sample axis,
   ``jquant.calib.data``); other sites are quantized directly. Sites that receive group ids
   (``jquant.sites.ActivationGroups``: modalities, timestep buckets) get grouped statistics,
   per-group activation formats (rules with ``when=``) and per-group static scales.
4. Each site's weight becomes a ``QArray``; sites with an activation format
   record it so ``jquant.ops.linear`` quantizes their inputs. The returned
   model carries ``model.quantization`` (a ``QuantizationReport``: recipe,
   per-site formats, time), which ``jquant.save`` stores beside the weights.
   A recipe's ``kv_cache`` format is set on every attention layer last, and its ``ssm_matmul`` format on every
   Mamba-1 mixer.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.algorithms.experts import quantize_experts
from jquant.algorithms.weights import AlgorithmSpec, algorithm
from jquant.calib.capture import InputStatistics
from jquant.calib.data import check_calibration
from jquant.calib.sequential import BlockVisit, block_paths, check_capture_budget, walk_blocks
from jquant.formats import ExpertPartition, Format, IntFormat, QArray, get_format
from jquant.models.registry import family_of
from jquant.ops.linear import ActivationFormat
from jquant.progress import progress_bar
from jquant.recipes import Recipe, Rule, get
from jquant.recipes.rules import DEFAULT_KEEP_FLOAT
from jquant.sites import ActivationGroups, Site, activation_groups, find_sites
from jquant.transforms.pipeline import (
    TransformLog,
    check_recipe,
    run_transforms,
    set_kv_cache_format,
    set_ssm_matmul_format,
)
from jquant.transforms.pipeline import needs_calibration as transforms_need_calibration


@dataclasses.dataclass(frozen=True)
class ExpertGroupPlan:
    """The experts of a stacked expert site that share one rule (``rule`` None: they stay in floating point)."""

    experts: tuple[int, ...]
    rule: Rule | None
    weight: Format | None
    activation: Format | None


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """What will happen to one site: its rule, resolved formats and algorithm.

    ``experts`` is set when the experts of a stacked expert site follow different rules (a mixed-precision
    recipe such as MxMoE's); ``rule`` / ``weight`` / ``activation`` then describe its first quantized group.
    ``groups`` names the activation groups of a site that receives group ids, and ``group_rules`` the rule
    each group's inputs take; ``activation`` is then one format for all groups or a tuple, one per group.
    """

    site: Site
    rule: Rule
    weight: Format | None
    activation: ActivationFormat | None
    experts: tuple[ExpertGroupPlan, ...] = ()
    groups: tuple[str, ...] = ()
    group_rules: tuple[Rule | None, ...] = ()

    @property
    def static(self) -> bool:
        """Whether the site's activation scales are calibrated (static) rather than computed per token."""
        rules = [r for r in self.group_rules if r is not None and r.activation is not None] or [self.rule]
        return any(r.static_activation for r in rules)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of the static scale: ``()``, or ``(G,)`` (one per group) at a site that receives group ids."""
        return (len(self.groups),) if self.groups else ()

    def expert_groups(self) -> tuple[ExpertGroupPlan, ...]:
        """The site's expert groups (one group with every expert when they share a rule)."""
        if self.experts:
            return self.experts
        return (ExpertGroupPlan(tuple(range(self.site.weight.get_value().shape[0])), self.rule, self.weight,
                                self.activation),)


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """The recipe, ``sites`` as ``(path, description)`` pairs, sites left in floating point, the time taken and
    the logs of the recipe's transform steps (``TransformLog``: time, OSTQuant losses).

    Immutable and hashable: it is stored as a static attribute of the quantized model, so it is part of every
    jit cache key over the model (and ``nnx.jit`` writes the traced copy back onto the model: equality must
    cover every field, or a model would take another's report). ``jquant.save`` stores all of it, so a loaded
    model equals the saved one and shares its compiled programs.
    """

    recipe: Recipe
    sites: tuple[tuple[str, str], ...]
    unquantized: tuple[str, ...]
    seconds: float
    transforms: tuple[TransformLog, ...] = ()

    def site(self, path: str) -> str:
        """How site ``path`` was quantized (``"float"`` if it was not)."""
        return dict(self.sites).get(path, "float")


def plan(model: nnx.Module, recipe: Recipe | str) -> list[SitePlan]:
    """Resolve and validate the recipe against ``model``'s sites (no work done, nothing modified).

    A recipe with the default ``keep_float`` leaves in floating point what the model's family declares
    (``Family.keep_float``: an LM's embeddings and head, a DiT's patch embedding and final layer ...).
    """
    recipe = family_keep_float(model, get(recipe) if isinstance(recipe, str) else recipe)
    sites = find_sites(model)
    paths = [s.path for s in sites]
    groups = activation_groups(model)
    _check_when(recipe, groups)
    experts = {s.path: s.weight.get_value().shape[0] for s in sites if s.spec.kind == "experts"}
    grouped = {s.path: groups.names for s in sites if groups is not None and _receives_groups(s, groups)}
    unused = recipe.unused_rules(paths, experts, grouped)
    if unused:
        raise ValueError(
            f"recipe {recipe.name!r}: rules matched no quantization site: {[r.pattern for r in unused]}. "
            f"Site paths look like {paths[:3]}; fix the patterns or remove the rules."
        )
    plans = []
    for site in sites:
        if site.spec.kind == "experts":
            plans.extend(_expert_site_plan(site, recipe))
            continue
        rule = recipe.rule_for(site.path)
        group_rules = tuple(recipe.rule_for(site.path, group=g) for g in grouped.get(site.path, ()))
        if rule is not None and rule.weight is None and rule.activation is None:
            rule = None
        if rule is None and not any(r is not None and r.activation is not None for r in group_rules):
            continue
        rule = rule or next(r for r in group_rules if r is not None and r.activation is not None)
        _check_hessian_option(site, rule)
        weight_fmt, act_fmt = _resolve(site, rule, tuple(site.weight.get_value().shape))
        if group_rules:
            act_fmt = _group_activations(site, group_rules, tuple(site.weight.get_value().shape))
        site_groups = grouped.get(site.path, ())
        if site_groups and _shares_one_scale(site, group_rules, act_fmt):
            site_groups, group_rules = (), ()
        plans.append(SitePlan(site=site, rule=rule, weight=weight_fmt, activation=act_fmt,
                              groups=site_groups, group_rules=group_rules))
    return plans


def family_keep_float(model: nnx.Module, recipe: Recipe) -> Recipe:
    """``recipe`` with its family's ``keep_float`` when it keeps the default (models of no registered family
    keep the default, the language models' embeddings and head)."""
    if recipe.keep_float != DEFAULT_KEEP_FLOAT:
        return recipe
    try:
        declared = family_of(model).keep_float
    except TypeError:
        return recipe
    return dataclasses.replace(recipe, keep_float=declared)


def _receives_groups(site: Site, groups: ActivationGroups) -> bool:
    return site.spec.kind == "linear" and groups.covers(site.path)


def _check_when(recipe: Recipe, groups: ActivationGroups | None) -> None:
    """Every ``when=`` of the recipe names groups the model declares."""
    for r in recipe.rules:
        if not r.when:
            continue
        if groups is None:
            raise ValueError(f"recipe {recipe.name!r}: Rule({r.pattern!r}) has when={list(r.when)}, but the model "
                             "declares no activation groups (activation_groups()); remove when= for this model.")
        unknown = [g for g in r.when if g not in groups.names]
        if unknown:
            raise ValueError(f"recipe {recipe.name!r}: Rule({r.pattern!r}) has when={list(r.when)}, but {unknown} "
                             f"match no group of the model; its groups are {list(groups.names)}.")


def _group_activations(site: Site, group_rules: tuple[Rule | None, ...], shape: tuple[int, ...]) -> ActivationFormat | None:
    """The activation format of each group at a site that receives group ids: one format, or one per group."""
    active = [r for r in group_rules if r is not None and r.activation is not None]
    if len({r.static_activation for r in active}) > 1:
        raise ValueError(f"site {site.path!r}: its groups' rules disagree on static_activation; a site's groups are "
                         "all static or all dynamic. Make the rules agree.")
    formats = tuple(None if r is None or r.activation is None else _resolve(site, r, shape)[1] for r in group_rules)
    if not active:
        return None
    return formats[0] if len(set(formats)) == 1 else formats


def _shares_one_scale(site: Site, group_rules: tuple[Rule | None, ...], activation) -> bool:
    """Whether a grouped site calibrates one static scale over all its groups (``static_activation="shared"``)."""
    active = [r for r in group_rules if r is not None and r.activation is not None]
    if not active or active[0].static_activation != "shared":
        return False
    if isinstance(activation, tuple) or len(active) < len(group_rules):
        raise ValueError(f"site {site.path!r}: static_activation='shared' gives every group one scale, so every group "
                         "needs the same activation format; make the groups' rules agree or use "
                         "static_activation=True (one scale per group).")
    return True


def _all_finite(x: jax.Array) -> bool:
    """Whether ``x`` holds no NaN or Inf: on the host for CPU arrays (no program compiled per weight shape), else
    one small program per shape."""
    if all(device.platform == "cpu" for device in x.devices()):
        return bool(np.isfinite(np.asarray(x)).all())
    return bool(_all_finite_on_device(x))


@jax.jit
def _all_finite_on_device(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def _resolve(site: Site, rule: Rule, shape: tuple[int, ...]) -> tuple[Format | None, Format | None]:
    """The weight and activation formats ``rule`` gives ``site`` (weight ``shape``), validated."""
    value = site.weight.get_value()
    if isinstance(value, QArray):
        raise ValueError(f"site {site.path!r} is already quantized ({value.format.name}); quantize a float model.")
    weight_fmt = _format(rule.weight, dict(rule.weight_options), site.path) if rule.weight else None
    act_fmt = _format(rule.activation, dict(rule.activation_options), site.path) if rule.activation else None
    if weight_fmt is not None:
        axis = site.spec.contraction_axis
        try:
            weight_fmt.check_shape(shape, axis)
        except ValueError as err:
            raise ValueError(f"site {site.path!r} (weight shape {shape}, axis {axis}): {err}") from None
        if reason := algorithm(rule.algorithm).supports(weight_fmt):
            raise ValueError(f"site {site.path!r}: {reason}")
        if site.spec.kind == "depthwise" and algorithm(rule.algorithm).needs_calibration:
            raise ValueError(f"site {site.path!r} is a depthwise convolution (each channel has its own taps, so there "
                             f"is no shared input Hessian for {rule.algorithm!r}); quantize it with 'rtn'.")
        if isinstance(value, jax.Array) and not _all_finite(value):
            raise ValueError(f"site {site.path!r}: the weight holds NaN or Inf; fix the model before quantizing.")
    if act_fmt is not None and site.spec.kind not in ("linear", "experts", "conv", "depthwise"):
        raise ValueError(f"site {site.path!r} is a {site.spec.kind} site; activation formats apply to linear, "
                         "expert and convolution sites.")
    if act_fmt is not None:
        features = shape[site.spec.contraction_axis]
        if site.spec.kind == "conv":  # the [K C_in, C_out] matrix view: inputs are quantized over C_in channels
            features //= math.prod(site.module.kernel_size)
        if site.spec.kind == "depthwise":  # [K, C]: each position's C channels are quantized
            features = shape[1]
        try:
            act_fmt.check_shape((1, features), 1)
        except ValueError as err:
            raise ValueError(f"site {site.path!r}: activation format {act_fmt.name} cannot quantize its "
                             f"{features} input features: {err}") from None
    if rule.static_activation and not (
        isinstance(act_fmt, IntFormat) and act_fmt.symmetric and act_fmt.granularity == "tensor"
    ):
        raise ValueError(
            f"site {site.path!r}: static activations need a symmetric per-tensor integer format such as "
            f"'int8-tensor', got {act_fmt.name}."
        )
    return weight_fmt, act_fmt


def _expert_site_plan(site: Site, recipe: Recipe) -> list[SitePlan]:
    """The plan of a stacked expert site ``[E, in, out]``: its experts grouped by the rule each takes."""
    shape = tuple(site.weight.get_value().shape)
    by_rule: dict[int, tuple[Rule | None, list[int]]] = {}
    for e in range(shape[0]):
        rule = recipe.rule_for(site.path, e)
        if rule is not None and rule.weight is None and rule.activation is None:
            rule = None
        by_rule.setdefault(id(rule), (rule, []))[1].append(e)
    groups = []
    for rule, experts in by_rule.values():
        if rule is None:
            groups.append(ExpertGroupPlan(tuple(experts), None, None, None))
            continue
        _check_expert_rule(site, rule)
        weight_fmt, act_fmt = _resolve(site, rule, (len(experts), *shape[1:]))
        if weight_fmt is not None and _keeps_tensor_scale(weight_fmt, (len(experts), *shape[1:])):
            raise ValueError(f"site {site.path!r}: {weight_fmt.name} keeps one scale for the whole tensor, which would "
                             "be shared by all experts; use a per-channel or per-group format for stacked experts.")
        groups.append(ExpertGroupPlan(tuple(experts), rule, weight_fmt, act_fmt))
    quantized = [g for g in groups if g.rule is not None]
    if not quantized:
        return []
    first = quantized[0]
    mixed = tuple(groups) if len(groups) > 1 else ()
    return [SitePlan(site=site, rule=first.rule, weight=first.weight, activation=first.activation, experts=mixed)]


def _check_expert_rule(site: Site, rule: Rule) -> None:
    if rule.algorithm not in ("rtn", "gptq"):
        raise ValueError(f"site {site.path!r} is a stacked expert site; its experts are quantized with 'rtn' or "
                         f"'gptq' (per expert), not {rule.algorithm!r}.")
    if rule.static_activation:
        raise ValueError(f"site {site.path!r}: stacked experts quantize activations dynamically (per token); "
                         "remove static_activation.")
    _check_hessian_option(site, rule)


def _check_hessian_option(site: Site, rule: Rule) -> None:
    hessian = dict(rule.options).get("hessian", "plain")
    if hessian not in ("plain", "affinity"):
        raise ValueError(f"site {site.path!r}: option hessian={hessian!r} must be 'plain' or 'affinity' "
                         "(MoEQuant's affinity-weighted Hessian).")
    if hessian == "affinity" and rule.algorithm != "gptq":
        raise ValueError(f"site {site.path!r}: option hessian='affinity' applies to GPTQ, not {rule.algorithm!r}.")


def _keeps_tensor_scale(fmt: Format, shape: tuple[int, ...]) -> bool:
    children = fmt.expected_children(shape, 1)
    return (children.get("tensor_scale") is not None or children.get("codebooks") is not None
            or getattr(fmt, "granularity", None) == "tensor")


def _format(name: str, overrides: dict, path: str) -> Format:
    try:
        return get_format(name, **overrides)
    except (ValueError, TypeError) as err:
        raise ValueError(f"site {path!r}: {err}") from None


def needs_calibration(model: nnx.Module, recipe: Recipe | str) -> bool:
    """Whether ``quantize(model, recipe, calib)`` uses ``calib``: a rule that matches one of ``model``'s sites
    quantizes its weight with an algorithm that calibrates (GPTQ, GPTVQ, ...) or calibrates static activation
    scales, or a transform step of the recipe calibrates (SmoothQuant, OSTQuant, ...). Without it, ``calib`` may be
    ``None`` and the result does not depend on it."""
    recipe = get(recipe) if isinstance(recipe, str) else recipe
    return transforms_need_calibration(recipe) or any(_needs_calibration(p) for p in plan(model, recipe))


def quantize(
    model: nnx.Module,
    recipe: Recipe | str,
    calib=None,
    *,
    batch_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    capture_budget: int | None = None,
) -> nnx.Module:
    """A quantized copy of ``model`` following ``recipe`` (a ``Recipe`` or a built-in name).

    ``calib`` is needed when a rule uses GPTQ or static activations: a pytree of
    model inputs with a leading sample axis (``jquant.calib.data``): token ids
    ``[N, T]`` for a language model (``jquant.data.random_windows`` draws them
    deterministically from a corpus split for a given key); with a
    ``mesh`` its batches are split over the mesh's ``"data"`` axis (the model
    may be sharded with ``jquant.sharding.shard_model`` beforehand). ``capture_budget`` bounds the bytes of
    per-sequence statistics one calibration capture holds (default ``jquant.calib.sequential.CAPTURE_BUDGET_BYTES``,
    2 GiB): a batch above it is captured in sub-batches with the same statistics, so lowering it trades speed for
    peak memory on wide models. The copy's ``quantization`` attribute reports what was done.
    """
    t0 = time.perf_counter()
    check_capture_budget(capture_budget, "quantize")
    recipe = get(recipe) if isinstance(recipe, str) else recipe
    qmodel = nnx.clone(model)  # all validation and work happen on the copy; on any error it is discarded
    check_recipe(qmodel, recipe)
    by_path = {p.site.path: p for p in plan(qmodel, recipe)}
    needs_calib = any(_needs_calibration(p) for p in by_path.values())
    tokens = check_calibration(qmodel, calib) if needs_calib or transforms_need_calibration(recipe) else None
    transform_logs = ()
    if recipe.transforms:
        qmodel, transform_logs = run_transforms(qmodel, recipe, tokens, progress=progress)
        by_path = {p.site.path: p for p in plan(qmodel, recipe)}
    done: set[str] = set()

    uncalibrated: dict[str, tuple[int, ...]] = {}
    empty_groups: dict[str, tuple[str, ...]] = {}

    def apply(plan_: SitePlan, stats: InputStatistics | None, quantized: QArray | None = None) -> None:
        """Quantize one site (its weight: ``quantized`` when a shared solve already did) and attach its activation
        format."""
        site = plan_.site
        _check_site_statistics(plan_, stats)
        if site.spec.kind == "experts":
            uncalibrated[site.path] = apply_experts(site, plan_.expert_groups(), stats)
        elif plan_.weight is not None:
            if quantized is None:
                spec, options, pooled = _weight_algorithm_inputs(plan_, stats)
                quantized = spec.quantize(site.weight.get_value(), plan_.weight, axis=site.spec.contraction_axis,
                                          stats=pooled, options=options)
            site.weight.set_value(quantized)
        scale = None
        if plan_.static:
            scale, empty_groups[site.path] = static_scales(plan_, stats)
        attach_activation(plan_, scale)
        done.add(site.path)

    if needs_calib:
        blocks = block_paths(qmodel)
        inside = {p for p in by_path if any(p.startswith(b + "/") for b in blocks.values())}
        outside = [p for p in by_path if p not in inside and _needs_calibration(by_path[p])]
        if outside:
            raise ValueError(
                f"calibrated rules (GPTQ, static activations) apply only to sites inside the repeated blocks; "
                f"use 'rtn' and dynamic activations for {outside}."
            )

        def process_block(visit: BlockVisit) -> None:
            items = [(by_path[f"{visit.path}/{rel}"], st) for rel, st in visit.stats.items()
                     if f"{visit.path}/{rel}" in by_path]
            shared = _shared_input_solves(items)
            for plan_, st in items:
                apply(plan_, st, shared.get(plan_.site.path))

        walk_blocks(qmodel, tokens, process_block, batch_size=batch_size, mesh=mesh, progress=progress,
                    capture_budget=capture_budget, final_states=False)
    remaining = [p for p in by_path.values() if p.site.path not in done]
    with progress_bar(total=len(remaining), description="quantize", enabled=progress and bool(remaining)) as bar:
        for p in remaining:
            apply(p, None)
            bar.update(1)
    if recipe.kv_cache is not None:
        set_kv_cache_format(qmodel, recipe)
    if recipe.ssm_matmul is not None:
        set_ssm_matmul_format(qmodel, recipe)
    jax.block_until_ready(nnx.state(qmodel))
    qmodel.quantization = QuantizationReport(
        recipe=recipe,
        sites=tuple((p.site.path, describe(p, uncalibrated.get(p.site.path, ()), empty_groups.get(p.site.path, ())))
                    for p in by_path.values()),
        unquantized=tuple(s.path for s in find_sites(qmodel) if s.path not in by_path),
        seconds=time.perf_counter() - t0,
        transforms=transform_logs,
    )
    return qmodel


def _check_site_statistics(plan_: SitePlan, stats: InputStatistics | None) -> None:
    """Refuse non-finite calibration statistics, and ungrouped ones at a site declared to receive groups."""
    path = plan_.site.path
    if stats is not None and not (np.all(np.isfinite(stats.hessian)) and np.all(np.isfinite(stats.absmax))):
        raise ValueError(f"site {path!r}: its calibration inputs contain NaN or Inf (the model produced non-finite "
                         "activations on the calibration data); check the model and the calibration tokens.")
    if plan_.groups and stats is not None and stats.num_groups is None:
        raise ValueError(f"site {path!r} is declared to receive group ids (the model's activation_groups()), "
                         "but its calls passed none during calibration; pass groups= in the family's forward or "
                         "narrow ActivationGroups.sites.")


def _weight_algorithm_inputs(plan_: SitePlan, stats: InputStatistics | None
                             ) -> tuple[AlgorithmSpec, dict, InputStatistics | None]:
    """The site's weight algorithm, its options (without the pipeline's ``group_weighting`` and ``hessian``) and
    the statistics it sees: groups pooled by ``group_weighting``, or MoEQuant's affinity-weighted Hessian."""
    spec = algorithm(plan_.rule.algorithm)
    options = dict(plan_.rule.options)
    weighting = options.pop("group_weighting", "tokens")
    pooled = None if stats is None else stats.pooled(_group_weights(stats, weighting))
    if options.pop("hessian", "plain") == "affinity":
        pooled = _affinity_statistics(plan_.site, pooled)
    return spec, options, pooled


def _shared_input_solves(items: list[tuple[SitePlan, InputStatistics | None]]) -> dict[str, QArray]:
    """Quantized weights of the sites of one block that read the same inputs, solved together.

    Sites whose algorithm has ``quantize_shared`` (GPTQ), with the same format, options, input size and dtype and
    equal statistics (q/k/v, gate/up: one captured input) are quantized in one call, whose results equal the
    per-site calls' (``AlgorithmSpec.quantize_shared``); ``{site path: QArray}`` for those, nothing for the rest.
    """
    buckets: dict[tuple, list[list]] = {}
    for plan_, stats in items:
        site = plan_.site
        if site.spec.kind == "experts" or plan_.weight is None or stats is None or site.spec.contraction_axis != 0 \
                or algorithm(plan_.rule.algorithm).quantize_shared is None or site.weight.get_value().ndim != 2:
            continue  # solved alone in ``apply``: its statistics are pooled there, once
        _check_site_statistics(plan_, stats)
        spec, options, pooled = _weight_algorithm_inputs(plan_, stats)
        weight = site.weight.get_value()
        key = (spec.name, repr(plan_.weight), repr(sorted(options.items())), weight.shape[0], jnp.dtype(weight.dtype))
        groups = buckets.setdefault(key, [])
        same = next((g for g in groups if g[0][2] is pooled or np.array_equal(g[0][2].hessian, pooled.hessian)
                     and np.array_equal(g[0][2].count, pooled.count)), None)
        if same is None:
            groups.append(same := [])
        same.append((plan_, spec, pooled, options))
    solved: dict[str, QArray] = {}
    for groups in buckets.values():
        for group in (g for g in groups if len(g) > 1):
            plan_, spec, pooled, options = group[0]
            weights = [p.site.weight.get_value() for p, *_ in group]
            quantized = spec.quantize_shared(weights, plan_.weight, axis=0, stats=pooled, options=options)
            solved.update({p.site.path: q for (p, *_), q in zip(group, quantized, strict=True)})
    return solved


def _group_weights(stats: InputStatistics, weighting: str) -> np.ndarray | None:
    """Weights of each group's Hessian in GPTQ's: by token count (None), or ``N / (G n_g)`` ("balanced")."""
    if weighting == "tokens" or stats.num_groups is None:
        return None
    counts = np.asarray(stats.count, np.float64)
    seen = counts > 0
    return np.where(seen, counts.sum() / (seen.sum() * np.maximum(counts, 1.0)), 0.0)


def static_scales(p: SitePlan, stats: InputStatistics | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Calibrated activation scales ``max |x| / qmax``: a scalar, or one per group at a grouped site.

    A group that saw no calibration token takes the scale of all tokens; its name is returned.
    """
    if stats is None:
        raise ValueError(f"site {p.site.path!r}: static activation scales need calibration statistics.")
    tiny = np.finfo(np.float32).tiny
    if not p.groups:
        return np.float32(max(float(stats.pooled().absmax.max()), tiny) / _divisor(p.activation)), ()
    formats = p.activation if isinstance(p.activation, tuple) else (p.activation,) * len(p.groups)
    overall = float(stats.pooled().absmax.max())
    scales, empty = [], []
    for g, fmt in enumerate(formats):
        part = stats.group(g)
        if part.count == 0:
            empty.append(p.groups[g])
        amax = overall if part.count == 0 else float(part.absmax.max())
        scales.append(1.0 if fmt is None else max(amax, tiny) / _divisor(fmt))
    return np.asarray(scales, np.float32), tuple(empty)


def _divisor(fmt) -> float:
    """What an absmax is divided by to give a static scale: an integer format's ``scale_divisor`` (``qmax``, or
    ``qmax + 1/2`` in the full symmetric range), else the format's ``qmax``."""
    return float(getattr(fmt, "scale_divisor", fmt.qmax))


def attach_activation(p: SitePlan, scale) -> None:
    """Give ``p``'s site module its activation format(s) and static scale (an array, or a ``ShapeDtypeStruct``
    when ``jquant.load`` builds the abstract model); the one place both quantize and load set them."""
    if p.site.spec.kind == "experts":
        return
    if p.activation is not None:
        p.site.module.activation = p.activation
    if p.static:
        fmt = p.activation if not isinstance(p.activation, tuple) else next(f for f in p.activation if f is not None)
        dtype = jnp.dtype(fmt.scale_dtype)
        value = jax.ShapeDtypeStruct(scale.shape, dtype) if isinstance(scale, jax.ShapeDtypeStruct) else jnp.asarray(scale, dtype)
        p.site.module.activation_scale = nnx.Param(value)


def _affinity_statistics(site: Site, stats: InputStatistics) -> InputStatistics:
    """``stats`` with MoEQuant's affinity-weighted Hessian ``Σ c x xᵀ`` in place of ``Σ x xᵀ``."""
    if stats.affinity_hessian is None:
        raise ValueError(f"site {site.path!r}: hessian='affinity' needs per-token routing affinities, which only "
                         "expert stacks and gated shared experts record; use the plain Hessian for this site.")
    return dataclasses.replace(stats, hessian=stats.affinity_hessian)


def _needs_calibration(p: SitePlan) -> bool:
    if p.experts:
        return any(g.weight is not None and algorithm(g.rule.algorithm).needs_calibration for g in p.experts)
    return (p.weight is not None and algorithm(p.rule.algorithm).needs_calibration) or p.static


def describe(p: SitePlan, uncalibrated: tuple[int, ...] = (), empty_groups: tuple[str, ...] = ()) -> str:
    """``int4-g64-asym (gptq), activations int8``-style summary of a site plan (per expert group when mixed)."""
    if p.experts:
        parts = [f"experts {_ranges(g.experts)}: " + (_summary(g.rule, g.weight, g.activation) if g.rule else "float")
                 for g in p.experts]
        text = "; ".join(parts)
    else:
        text = _summary(p.rule, p.weight, p.activation, p.static, p.groups)
    if uncalibrated:
        text += f"; experts {_ranges(uncalibrated)} saw no calibration token (round-to-nearest)"
    if empty_groups:
        text += f"; groups {', '.join(empty_groups)} saw no calibration token (scale of all tokens)"
    return text


def _summary(rule: Rule, weight: Format | None, activation: ActivationFormat | None, static: bool | None = None,
             groups: tuple[str, ...] = ()) -> str:
    w = f"{weight.name} ({rule.algorithm})" if weight is not None else "float"
    static = rule.static_activation if static is None else static
    kind = (" static per group" if groups else " static") if static else ""
    if isinstance(activation, tuple):
        names = ", ".join(f"{g}: {f.name if f is not None else 'float'}" for g, f in zip(groups, activation))
        return f"{w}, activations {{{names}}}{kind}"
    return w + (f", activations {activation.name}{kind}" if activation is not None else "")


def _ranges(ids: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    out, ids = [], sorted(ids)
    start = prev = ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def apply_experts(site: Site, groups: tuple[ExpertGroupPlan, ...], stats: InputStatistics | None) -> tuple[int, ...]:
    """Quantize a stacked expert site group by group; returns the experts that saw no calibration token."""
    value = site.weight.get_value()
    parts, uncalibrated = [], []
    for g in groups:
        sub = value[np.asarray(g.experts)]
        if g.weight is None:
            parts.append(sub)
            continue
        result = quantize_experts(sub, g.weight, algorithm=g.rule.algorithm, experts=g.experts, stats=stats,
                                  options=dict(g.rule.options))
        parts.append(result.weight)
        uncalibrated.extend(result.uncalibrated)
    if len(groups) == 1:
        site.weight.set_value(parts[0])
    else:
        site.weight.set_value(ExpertPartition(parts=tuple(parts), experts=tuple(g.experts for g in groups)))
    site.module.activation = expert_activations(groups)
    return tuple(sorted(uncalibrated))


def expert_activations(groups: tuple[ExpertGroupPlan, ...]) -> Format | tuple[Format | None, ...] | None:
    """The ``ExpertLinear.activation`` of a plan's expert groups: one format, or one entry per expert."""
    per_expert = {e: g.activation for g in groups for e in g.experts}
    formats = tuple(per_expert[e] for e in range(len(per_expert)))
    return formats[0] if len(set(formats)) == 1 else formats
