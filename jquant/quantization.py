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
   order on the outputs of the already-quantized blocks
   (``jquant.calib.sequential``); other sites are quantized directly.
4. Each site's weight becomes a ``QArray``; sites with an activation format
   record it so ``jquant.ops.linear`` quantizes their inputs. The returned
   model carries ``model.quantization`` (a ``QuantizationReport``: recipe,
   per-site formats, time), which ``jquant.save`` stores beside the weights.
   A recipe's ``kv_cache`` format is set on every attention layer last.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.algorithms.experts import quantize_experts
from jquant.algorithms.weights import ALGORITHMS, NEEDS_CALIBRATION, supports
from jquant.calib.capture import InputStatistics
from jquant.calib.sequential import block_paths, run_sequential
from jquant.formats import ExpertPartition, Format, IntFormat, QArray, get_format
from jquant.progress import progress_bar
from jquant.recipes import Recipe, Rule, get
from jquant.sites import Site, find_sites
from jquant.transforms.pipeline import TransformLog, check_recipe, run_transforms, set_kv_cache_format
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
    """

    site: Site
    rule: Rule
    weight: Format | None
    activation: Format | None
    experts: tuple[ExpertGroupPlan, ...] = ()

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

    Immutable and hashable: it is stored as a static attribute of the quantized model.
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
    """Resolve and validate the recipe against ``model``'s sites (no work done, nothing modified)."""
    recipe = get(recipe) if isinstance(recipe, str) else recipe
    sites = find_sites(model)
    paths = [s.path for s in sites]
    experts = {s.path: s.weight.get_value().shape[0] for s in sites if s.spec.kind == "experts"}
    unused = recipe.unused_rules(paths, experts)
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
        if rule is None or rule.weight is None and rule.activation is None:
            continue
        _check_hessian_option(site, rule)
        weight_fmt, act_fmt = _resolve(site, rule, tuple(site.weight.get_value().shape))
        plans.append(SitePlan(site=site, rule=rule, weight=weight_fmt, activation=act_fmt))
    return plans


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
        if reason := supports(rule.algorithm, weight_fmt):
            raise ValueError(f"site {site.path!r}: {reason}")
        if isinstance(value, jax.Array) and not bool(jnp.all(jnp.isfinite(value))):
            raise ValueError(f"site {site.path!r}: the weight holds NaN or Inf; fix the model before quantizing.")
    if act_fmt is not None and site.spec.kind not in ("linear", "experts"):
        raise ValueError(f"site {site.path!r} is a {site.spec.kind} site; activation formats apply to linear sites.")
    if act_fmt is not None:
        features = shape[site.spec.contraction_axis]
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


def _check_calibration(calib, vocab_size: int | None) -> np.ndarray:
    if calib is None:
        raise ValueError(
            "this recipe uses GPTQ, static activations or a calibrated transform (SmoothQuant, OSTQuant), which need "
            "calibration data: pass calib=tokens [N, T], e.g. "
            "jquant.data.random_windows(jquant.data.load_split('train'), tokenizer, n=128, seq_len=512, key=key)."
        )
    tokens = np.asarray(calib)
    if tokens.ndim != 2 or tokens.size == 0:
        raise ValueError(f"calibration data must be a non-empty [N, T] token array, got shape {tokens.shape}.")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"calibration data must hold integer token ids, got dtype {tokens.dtype}.")
    if vocab_size is not None and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"calibration token ids must lie in [0, {vocab_size}), got range [{tokens.min()}, {tokens.max()}].")
    return tokens.astype(np.int32)


def quantize(
    model: nnx.Module,
    recipe: Recipe | str,
    calib: np.ndarray | None = None,
    *,
    batch_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> nnx.Module:
    """A quantized copy of ``model`` following ``recipe`` (a ``Recipe`` or a built-in name).

    ``calib`` (token ids ``[N, T]``) is needed when a rule uses GPTQ or static
    activations (``jquant.data.random_windows`` draws it deterministically from
    a corpus split for a given key); with a
    ``mesh`` its batches are split over the mesh's ``"data"`` axis (the model
    may be sharded with ``jquant.sharding.shard_model`` beforehand). The copy's
    ``quantization`` attribute reports what was done.
    """
    t0 = time.perf_counter()
    recipe = get(recipe) if isinstance(recipe, str) else recipe
    qmodel = nnx.clone(model)  # all validation and work happen on the copy; on any error it is discarded
    check_recipe(qmodel, recipe)
    by_path = {p.site.path: p for p in plan(qmodel, recipe)}
    needs_calib = any(_needs_calibration(p) for p in by_path.values())
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    tokens = _check_calibration(calib, vocab) if needs_calib or transforms_need_calibration(recipe) else None
    transform_logs = ()
    if recipe.transforms:
        qmodel, transform_logs = run_transforms(qmodel, recipe, tokens, progress=progress)
        by_path = {p.site.path: p for p in plan(qmodel, recipe)}
    done: set[str] = set()

    uncalibrated: dict[str, tuple[int, ...]] = {}

    def apply(plan_: SitePlan, stats: InputStatistics | None) -> None:
        site = plan_.site
        if stats is not None and not (np.all(np.isfinite(stats.hessian)) and np.all(np.isfinite(stats.absmax))):
            raise ValueError(f"site {site.path!r}: its calibration inputs contain NaN or Inf (the model produced non-finite "
                             "activations on the calibration data); check the model and the calibration tokens.")
        if site.spec.kind == "experts":
            uncalibrated[site.path] = apply_experts(site, plan_.expert_groups(), stats)
        elif plan_.weight is not None:
            algorithm = ALGORITHMS[plan_.rule.algorithm]
            options = dict(plan_.rule.options)
            if options.pop("hessian", "plain") == "affinity":
                stats = _affinity_statistics(site, stats)
            q = algorithm(site.weight.get_value(), plan_.weight, axis=site.spec.contraction_axis, stats=stats,
                          options=options)
            site.weight.set_value(q)
        if plan_.activation is not None and site.spec.kind != "experts":
            site.module.activation = plan_.activation
        if plan_.rule.static_activation:
            fmt = plan_.activation
            scale = np.float32(max(float(stats.absmax.max()), np.finfo(np.float32).tiny) / fmt.qmax)
            site.module.activation_scale = nnx.Param(jnp.asarray(scale, jnp.dtype(fmt.scale_dtype)))
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

        def process_block(block_path: str, block: nnx.Module, stats: dict[str, InputStatistics]) -> None:
            for rel, st in stats.items():
                full = f"{block_path}/{rel}"
                if full in by_path:
                    apply(by_path[full], st)

        run_sequential(qmodel, tokens, process_block, batch_size=batch_size, mesh=mesh, progress=progress)
    remaining = [p for p in by_path.values() if p.site.path not in done]
    with progress_bar(total=len(remaining), description="quantize", enabled=progress and bool(remaining)) as bar:
        for p in remaining:
            apply(p, None)
            bar.update(1)
    if recipe.kv_cache is not None:
        set_kv_cache_format(qmodel, recipe.kv_cache)
    jax.block_until_ready(nnx.state(qmodel))
    qmodel.quantization = QuantizationReport(
        recipe=recipe,
        sites=tuple((p.site.path, describe(p, uncalibrated.get(p.site.path, ()))) for p in by_path.values()),
        unquantized=tuple(s.path for s in find_sites(qmodel) if s.path not in by_path),
        seconds=time.perf_counter() - t0,
        transforms=transform_logs,
    )
    return qmodel


def _affinity_statistics(site: Site, stats: InputStatistics) -> InputStatistics:
    """``stats`` with MoEQuant's affinity-weighted Hessian ``Σ c x xᵀ`` in place of ``Σ x xᵀ``."""
    if stats.affinity_hessian is None:
        raise ValueError(f"site {site.path!r}: hessian='affinity' needs per-token routing affinities, which only "
                         "expert stacks and gated shared experts record; use the plain Hessian for this site.")
    return dataclasses.replace(stats, hessian=stats.affinity_hessian)


def _needs_calibration(p: SitePlan) -> bool:
    if p.experts:
        return any(g.weight is not None and NEEDS_CALIBRATION[g.rule.algorithm] for g in p.experts)
    return (p.weight is not None and NEEDS_CALIBRATION[p.rule.algorithm]) or p.rule.static_activation


def describe(p: SitePlan, uncalibrated: tuple[int, ...] = ()) -> str:
    """``int4-g64-asym (gptq), activations int8``-style summary of a site plan (per expert group when mixed)."""
    if p.experts:
        parts = [f"experts {_ranges(g.experts)}: " + (_summary(g.rule, g.weight, g.activation) if g.rule else "float")
                 for g in p.experts]
        text = "; ".join(parts)
    else:
        text = _summary(p.rule, p.weight, p.activation)
    if uncalibrated:
        text += f"; experts {_ranges(uncalibrated)} saw no calibration token (round-to-nearest)"
    return text


def _summary(rule: Rule, weight: Format | None, activation: Format | None) -> str:
    w = f"{weight.name} ({rule.algorithm})" if weight is not None else "float"
    static = " static" if rule.static_activation else ""
    return w + (f", activations {activation.name}{static}" if activation is not None else "")


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
