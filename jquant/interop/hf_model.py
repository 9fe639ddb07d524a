"""Where a model's quantized linears live in a Hugging Face checkpoint, and building a quantized model from one.

Llama-family (Llama / Mistral / Qwen2 / Qwen3) and MoE (Mixtral / Qwen2-MoE / Qwen3-MoE) models only: their
parameters map to Hugging Face tensor names through the families' own naming (``models.llama`` /
``models.moe``), a stacked expert weight ``[E, in, out]`` to one ``[out, in]`` tensor per expert.

``build_quantized`` turns a checkpoint's float tensors plus one ``LinearCodes`` per quantized linear into a
jquant model whose weights are those codes as QArrays: it writes a recipe with one rule per distinct
(weight, activation) format naming the sites exactly, plans it on the float model (``jquant.quantization.plan``)
and sets each planned site's QArray, so the result saves and loads with ``jquant.save`` / ``jquant.load`` as a
model quantized by ``jquant.quantize`` would.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from flax import nnx

from jquant.formats import ExpertPartition, QArray, dequantize
from jquant.formats.qarray import Format
from jquant.interop.codes import LinearCodes, qarray
from jquant.quantization import QuantizationReport, attach_activation, describe, expert_activations, plan
from jquant.recipes import Recipe, Rule
from jquant.sites import Site, find_sites

FAMILIES = ("llama", "moe")
# A rule names its format by a base name of the format's class and all its fields as options.
_BASE_NAMES = {"IntFormat": "int8", "FP8Format": "fp8-e4m3", "NVFP4Format": "nvfp4"}


def family_module(name: str):
    """``jquant.models.llama`` or ``jquant.models.moe``; other families are refused."""
    if name not in FAMILIES:
        raise ValueError(f"compressed-tensors / GPTQ checkpoints are supported for the llama and moe families "
                         f"(Llama, Mistral, Qwen2/3, Mixtral, Qwen-MoE); this model is {name!r}: save it with "
                         "jquant.save instead.")
    from jquant.models import llama, moe

    return llama if name == "llama" else moe


def hf_name(family: str, cfg, path: tuple) -> tuple[str, bool]:
    """(Hugging Face tensor name, transposed) of parameter ``path``; expert tensors contain ``{e}``."""
    module = family_module(family)
    return module._hf_name(path) if family == "llama" else module._hf_name(path, cfg.family)


def site_names(model: nnx.Module, family: str) -> list[tuple[Site, str]]:
    """Every quantization site with the Hugging Face module name of its weight (``{e}`` in expert names)."""
    out = []
    for site in find_sites(model):
        path = tuple(int(p) if p.isdigit() else p for p in site.path.split("/")) + (site.spec.param,)
        name, _ = hf_name(family, model.config, path)
        out.append((site, name.removesuffix(".weight")))
    return out


def float_tensors(model: nnx.Module, family: str) -> dict[str, np.ndarray]:
    """Hugging Face-named float tensors of ``model``, quantized weights dequantized (``[out, in]`` linears)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "activation_scale":  # a static input scale: the exporter writes it as input_scale
            continue
        value = var.get_value()
        if isinstance(value, ExpertPartition):
            raise ValueError(f"{'/'.join(map(str, path[:-1]))}: its experts are stored in parts of different formats "
                             "(a mixed-precision recipe), which compressed-tensors cannot describe per tensor "
                             "stack here; export a model whose experts share one format.")
        array = np.asarray(dequantize(value) if isinstance(value, QArray) else value)
        name, transposed = hf_name(family, model.config, path)
        if "{e}" in name:
            out.update({name.format(e=e): np.ascontiguousarray(array[e].T) for e in range(array.shape[0])})
        else:
            out[name] = np.ascontiguousarray(array.T if transposed else array)
    return out


def _rule_fields(fmt: Format | None) -> tuple[str | None, dict]:
    if fmt is None:
        return None, {}
    return _BASE_NAMES[type(fmt).__name__], {f.name: getattr(fmt, f.name) for f in dataclasses.fields(fmt)}


def build_quantized(hf_config: dict, tensors: dict[str, np.ndarray], linears: dict[str, LinearCodes],
                    activations: dict[str, tuple[Format, float | None]], *, source: str, recipe_name: str,
                    dtype: str = "float32") -> nnx.Module:
    """A quantized model from a checkpoint: ``tensors`` (float, Hugging Face names, without the quantized
    weights), ``linears`` (module name -> codes) and, per module whose inputs are quantized, its activation
    format with its static per-tensor scale (None: dynamic)."""
    from jquant.models import hf_io
    from jquant.models.registry import family_for_model_type

    try:
        family = family_for_model_type(hf_config.get("model_type"))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    module = family_module(family.name)
    param_dtype = hf_io.stored_dtype(tensors, default=dtype)
    cfg = module.config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
    tensors = dict(tensors)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    for name, codes in linears.items():  # placeholders: from_tensors checks names and shapes; QArrays replace them
        tensors[name + ".weight"] = np.zeros(codes.shape, np.float32)
    model = module.from_tensors(cfg, tensors, source=source)
    weights, scales, by_formats = {}, {}, {}
    for site, name in site_names(model, family.name):
        names = ([name.format(e=e) for e in range(site.weight.get_value().shape[0])] if "{e}" in name else [name])
        found = [n for n in names if n in linears]
        if not found:
            continue
        if len(found) != len(names):
            raise ValueError(f"{source}: only some experts of {name} are quantized ({len(found)} of {len(names)}); "
                             "jquant loads expert stacks whose experts are all quantized or all float.")
        parts = [linears[n] for n in names]
        acts = {activations.get(n) for n in names}
        if len(acts) > 1:
            raise ValueError(f"{source}: the experts of {name} quantize their inputs differently ({acts}).")
        act, scale = acts.pop() or (None, None)
        weights[site.path] = qarray(parts, param_dtype)
        scales[site.path] = scale
        by_formats.setdefault((parts[0].format, act, scale is not None), []).append(site.path)
    if not weights:
        raise ValueError(f"{source}: no quantized linear of the checkpoint matches a layer of the model.")
    rules = []
    for (fmt, act, static), paths in by_formats.items():
        (weight, weight_options), (activation, activation_options) = _rule_fields(fmt), _rule_fields(act)
        rules.append(Rule(pattern="|".join(re.escape(p) for p in paths), weight=weight, weight_options=weight_options,
                          activation=activation, activation_options=activation_options, static_activation=static))
    recipe = Recipe(name=recipe_name, rules=tuple(rules), keep_float=(), description=f"imported from {source}")
    plans = plan(model, recipe)
    for p in plans:
        p.site.weight.set_value(weights[p.site.path])
        if p.site.spec.kind == "experts":
            p.site.module.activation = expert_activations(p.expert_groups())
        attach_activation(p, None if scales[p.site.path] is None else np.float32(scales[p.site.path]))
    model.quantization = QuantizationReport(
        recipe=recipe, sites=tuple((p.site.path, describe(p)) for p in plans),
        unquantized=tuple(s.path for s in find_sites(model) if s.path not in weights), seconds=0.0)
    return model
