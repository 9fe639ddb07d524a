"""MxMoE end to end: per-linear-block sensitivity, per-layer bit allocation, and the mixed-precision recipe.

MxMoE (Duanmu et al., ICML 2025; ``specs/mxmoe.md``):

1. **Sensitivity** (§3.2). For each MoE layer, expert ``i``, linear block ``j`` (its gate, up and down
   projections) and scheme ``k``: quantize only that block with scheme ``k`` (GPTQ on the expert's own routed
   tokens) and measure ``Δ_{i,j,k} = ‖Ô − O‖_F`` over the calibration tokens, ``O`` being the layer's output.
   Rarely used experts get small Δ by construction; an expert with no token has Δ = 0.
2. **Allocation** (§3.3–3.4). Per layer, pick one scheme per block to minimise ``L^r T^(1-r)`` under a memory
   budget of ``average_bits`` per weight, gate and up sharing a scheme (``allocation.allocate``).
   ``T`` is the analytic kernel-time model of ``jquant.mixed.allocation`` at the traced expert frequencies.
3. **Recipe** (§3.5). The allocation becomes ordinary per-expert rules (``layers/3/mlp/experts/down_proj/5``
   gets ``int3-g128-asym`` by GPTQ), which ``jquant.quantize`` executes like any recipe.

The model is reached only through ``block_inputs``/``blocks``/``calibration_forward`` and its stacked
expert sites (kind ``"experts"`` named ``.../gate_proj``, ``.../up_proj``, ``.../down_proj``); no model family
is imported. Deviation from the paper, documented in the results: no Hadamard rotation before GPTQ, and Δ
is measured with the other layers in floating point (the paper's layer-local Δ).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.algorithms.experts import quantize_experts
from jquant.calib.sequential import BlockVisit, walk_blocks
from jquant.formats import dequantize, get_format, quantize
from jquant.mixed.allocation import (H100_SXM, Allocation, HardwareModel, Scheme, allocate, budget_from_average_bits,
                                     gate_up_ties, layer_costs, layer_sizes, parse_scheme)
from jquant.recipes import Recipe, Rule
from jquant.sites import find_sites

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """One MoE layer: ``prefix`` (``layers/3/mlp/experts``), ``delta [E, 3, S]`` (Δ per expert, projection in
    ``PROJECTIONS`` order and scheme), ``counts [E]`` (calibration tokens routed to each expert) and the
    widths ``d_model`` / ``d_ffn``."""

    prefix: str
    delta: np.ndarray
    counts: np.ndarray
    d_model: int
    d_ffn: int


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    schemes: tuple[str, ...]
    layers: tuple[LayerSensitivity, ...]
    top_k: int


def _expert_groups(block: nnx.Module) -> dict[str, dict[str, object]]:
    """``{experts module path (relative): {projection: site}}`` for the stacked expert sites inside ``block``."""
    groups: dict[str, dict[str, object]] = {}
    for site in find_sites(block):
        if site.spec.kind != "experts":
            continue
        prefix, _, proj = site.path.rpartition("/")
        if proj not in PROJECTIONS:
            raise ValueError(f"MxMoE expects SwiGLU experts named {PROJECTIONS}; found expert site {site.path!r}.")
        groups.setdefault(prefix, {})[proj] = site
    return groups


def expert_sensitivity(model: nnx.Module, tokens: np.ndarray, schemes: Sequence[str | Scheme], *,
                       batch_size: int = 8, gptq_options: dict | None = None,
                       progress: bool = True) -> Sensitivity:
    """Δ of every (layer, expert, projection, scheme) on calibration ``tokens [N, T]`` (see the module docstring).

    Each scheme's GPTQ runs once per projection stack (every expert at once, on its own routed tokens) and is
    cached; then each expert's block is swapped in alone and the layer re-run. The model is not modified.
    """
    schemes = tuple(parse_scheme(s) for s in schemes)
    layers, top_k = [], []

    def visit(v: BlockVisit) -> None:
        groups = _expert_groups(v.block)
        if len(groups) > 1:
            raise ValueError(f"block {v.path!r} holds {len(groups)} expert stacks; expected at most one.")
        if not groups:
            return
        outputs = [v.forward(v.block, h, c) for h, c in v.inputs]
        for prefix, sites in groups.items():
            router = next(n for _, n in nnx.iter_graph(v.block) if hasattr(n, "capture_routing"))
            top_k.append(router.cfg.top_k)
            layers.append(_layer_delta(f"{v.path}/{prefix}", v.block, sites, v.stats, schemes, v.inputs,
                                       outputs, v.forward, prefix, dict(gptq_options or {})))

    walk_blocks(nnx.clone(model), tokens, visit, batch_size=batch_size, description="mxmoe sensitivity",
                progress=progress, final_states=False)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no stacked expert sites; MxMoE applies to MoE models.")
    return Sensitivity(schemes=tuple(s.name for s in schemes), layers=tuple(layers), top_k=top_k[-1])


def _layer_delta(full_prefix, block, sites, stats, schemes, states, outputs, forward, prefix, gptq_options):
    num_experts, d_model, d_ffn = sites["gate_proj"].weight.get_value().shape
    counts = np.asarray(stats[f"{prefix}/gate_proj"].count, np.float64)
    delta = np.zeros((num_experts, len(PROJECTIONS), len(schemes)))
    originals = {proj: site.weight.get_value() for proj, site in sites.items()}
    for k, scheme in enumerate(schemes):
        fmt = get_format(scheme.weight_format)
        for j, proj in enumerate(PROJECTIONS):
            site = sites[proj]
            result = quantize_experts(originals[proj], fmt, algorithm="gptq", experts=range(num_experts),
                                      stats=stats[f"{prefix}/{proj}"], options=gptq_options)
            quantized = dequantize(result.weight, originals[proj].dtype)
            act = get_format(scheme.activation_format) if scheme.activation_format else None
            for i in range(num_experts):
                if counts[i] == 0:
                    continue
                site.weight.set_value(originals[proj].at[i].set(quantized[i]))
                site.module.activation = None if act is None else tuple(act if e == i else None
                                                                         for e in range(num_experts))
                diff = [forward(block, h, c).astype(jnp.float32) - o.astype(jnp.float32)
                        for (h, c), o in zip(states, outputs)]
                delta[i, j, k] = float(np.sqrt(sum(float(jnp.sum(d * d)) for d in diff)))
            site.weight.set_value(originals[proj])
            site.module.activation = None
    return LayerSensitivity(prefix=full_prefix, delta=delta, counts=counts, d_model=d_model, d_ffn=d_ffn)


@dataclasses.dataclass(frozen=True)
class MxMoEPlan:
    """The allocation of every MoE layer (``Allocation.choice`` indexes ``schemes`` per block, expert-major:
    expert 0 gate, up, down, expert 1 ...) and the recipe that executes it."""

    schemes: tuple[str, ...]
    allocations: tuple[tuple[str, Allocation], ...]
    recipe: Recipe

    @property
    def average_bits(self) -> float:
        """Average budget bits per routed-expert weight over all layers (equal-size layers)."""
        return float(np.mean([a.average_bits for _, a in self.allocations]))


def stored_bits(scheme: Scheme, in_features: int, out_features: int) -> float:
    """Bits per weight that ``scheme``'s weight format stores for an ``[in, out]`` matrix: codes plus every
    scale and zero point (per channel: ``(16 + 8) / in`` for fp16 scales and uint8 zeros)."""
    x = jax.random.normal(jax.random.key(0), (in_features, out_features), jnp.float32)
    return 8.0 * quantize(x, get_format(scheme.weight_format), axis=0).nbytes / (in_features * out_features)


def _block_bits(schemes: Sequence[Scheme], d_model: int, d_ffn: int, num_experts: int, accounting: str) -> np.ndarray:
    """Budget bits per weight ``[blocks, schemes]`` (blocks expert-major, ``PROJECTIONS`` order)."""
    if accounting == "paper":
        return np.tile([s.weight_bits for s in schemes], (3 * num_experts, 1))
    if accounting != "stored":
        raise ValueError(f"accounting must be 'stored' or 'paper', got {accounting!r}.")
    shapes = {"gate_proj": (d_model, d_ffn), "up_proj": (d_model, d_ffn), "down_proj": (d_ffn, d_model)}
    per_projection = np.array([[stored_bits(s, *shapes[p]) for s in schemes] for p in PROJECTIONS])
    return np.tile(per_projection, (num_experts, 1))


def allocate_model(sensitivity: Sensitivity, average_bits: float, *, r: float = 1.0, batch: int = 512,
                   hardware: HardwareModel = H100_SXM, extra_rules: Sequence[Rule] = (),
                   name: str | None = None, accounting: str = "stored") -> MxMoEPlan:
    """Solve MxMoE's allocation layer by layer at ``average_bits`` and build the recipe.

    ``r = 1`` optimises accuracy only (the paper's weight-only setting), ``r < 1`` trades it against the modelled
    kernel time at a token batch of ``batch`` on ``hardware``. ``extra_rules`` (e.g. attention) follow the
    expert rules; sites matched by none stay in floating point (the paper keeps attention and routers in FP16).
    ``accounting``: ``"stored"`` charges each block the bits its format really stores (codes, scales, zeros),
    so the quantized experts meet the budget; ``"paper"`` charges the spec table's bits (g128 schemes +0.25,
    per-channel schemes their code bits only), which per-channel choices can exceed once stored.
    """
    schemes = tuple(parse_scheme(s) for s in sensitivity.schemes)
    allocations, rules = [], []
    for layer in sensitivity.layers:
        num_experts = layer.delta.shape[0]
        sizes = layer_sizes(num_experts, layer.d_model, layer.d_ffn)
        bits = _block_bits(schemes, layer.d_model, layer.d_ffn, num_experts, accounting)
        loss = layer.delta.reshape(num_experts * len(PROJECTIONS), len(schemes))
        time = layer_costs(layer.counts, layer.d_model, layer.d_ffn, batch, schemes, top_k=sensitivity.top_k,
                           hw=hardware)
        allocation = allocate(loss, time, sizes, bits, budget_from_average_bits(average_bits, sizes), r=r,
                              tied=gate_up_ties(num_experts))
        allocations.append((layer.prefix, allocation))
        for block, choice in enumerate(allocation.choice):
            expert, proj = divmod(block, len(PROJECTIONS))
            scheme = schemes[int(choice)]
            rules.append(Rule(pattern=re.escape(f"{layer.prefix}/{PROJECTIONS[proj]}/{expert}"),
                              weight=scheme.weight_format, activation=scheme.activation_format, algorithm="gptq"))
    recipe = Recipe(name=name or f"mxmoe-{average_bits:g}bits-r{r:g}", rules=(*rules, *extra_rules),
                    description=f"MxMoE allocation over {', '.join(s.name for s in schemes)} at {average_bits} "
                                f"average bits, r={r}")
    return MxMoEPlan(schemes=tuple(s.name for s in schemes), allocations=tuple(allocations), recipe=recipe)
