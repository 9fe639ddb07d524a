"""A recipe's equivalence-transform steps and KV-cache format, applied to (or restored on) a model.

``jquant.quantize`` calls :func:`run_transforms` on its private copy before the
rules quantize weights, and :func:`set_kv_cache_format` after; ``jquant.load``
calls :func:`restore_structure` on the abstract model so a saved transformed model
gets back its run-time structure (online Hadamards, padded down_proj, KV format)
before its weights are restored.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from jquant.formats import Format, get_format
from jquant.kv.cache import KVCacheConfig
from jquant.recipes import Recipe, TransformStep
from jquant.transforms.equivalence import OnlineRotations, module_at, online_size, set_online_rotations
from jquant.transforms.layout import DecoderLayout, layout_of
from jquant.transforms.mamba_rotation import add_runtime_structure, mambaquant
from jquant.transforms.ssm_layout import ssm_layout_of
from jquant.transforms.ostquant import OSTQuantConfig, ostquant
from jquant.transforms.rotate import quarot
from jquant.transforms.smoothquant import smoothquant

NEEDS_CALIBRATION = {"smoothquant": True, "quarot": False, "ostquant": True, "mambaquant": True}
QUAROT_OPTIONS = {"online", "rotation", "pad", "seed"}
MAMBAQUANT_OPTIONS = {"alpha": 0.5, "klt": True, "smooth": True, "rotate": True, "online": True, "seed": 0}


def needs_calibration(recipe: Recipe) -> bool:
    return any(NEEDS_CALIBRATION[t.kind] for t in recipe.transforms)


def _layout(model: nnx.Module, recipe: Recipe) -> DecoderLayout:
    try:
        return layout_of(model)
    except ValueError as err:
        raise ValueError(f"recipe {recipe.name!r} needs equivalence transforms or KV quantization: {err}") from None


def _mambaquant_step(recipe: Recipe) -> TransformStep | None:
    return next((t for t in recipe.transforms if t.kind == "mambaquant"), None)


def _check_mambaquant(model: nnx.Module, recipe: Recipe, step: TransformStep) -> None:
    if len(recipe.transforms) != 1 or recipe.kv_cache is not None:
        raise ValueError(f"recipe {recipe.name!r}: a mambaquant step must be the only transform and the recipe cannot "
                         "quantize a KV cache (Mamba models have none).")
    unknown = set(dict(step.options)) - set(MAMBAQUANT_OPTIONS)
    if unknown:
        raise ValueError(f"recipe {recipe.name!r}: mambaquant has unknown options {sorted(unknown)}; "
                         f"known: {sorted(MAMBAQUANT_OPTIONS)}.")
    try:
        layout = ssm_layout_of(model)
    except ValueError as err:
        raise ValueError(f"recipe {recipe.name!r}: {err}") from None
    if _mambaquant_options(step)["online"]:
        for b in layout.blocks:
            online_size(b.inner, False, b.out_proj)


def _mambaquant_options(step: TransformStep) -> dict:
    return {**MAMBAQUANT_OPTIONS, **dict(step.options)}


def check_recipe(model: nnx.Module, recipe: Recipe) -> None:
    """Validate the transform steps and KV format against ``model`` before any work (errors name the layer)."""
    if not recipe.transforms and recipe.kv_cache is None:
        return
    if (step := _mambaquant_step(recipe)) is not None:
        _check_mambaquant(model, recipe, step)
        return
    layout = _layout(model, recipe)
    for step in recipe.transforms:
        options = dict(step.options)
        if step.kind == "smoothquant":
            unknown = set(options) - {"alpha"}
        elif step.kind == "quarot":
            unknown = set(options) - QUAROT_OPTIONS
        else:
            unknown = set(options) - {f.name for f in dataclasses.fields(OSTQuantConfig)} - {"seed"}
        if unknown:
            raise ValueError(f"recipe {recipe.name!r}: {step.kind} has unknown options {sorted(unknown)}.")
    online = OnlineRotations.parse(recipe.online_rotations, pad=recipe.pad)
    for layer in layout.layers:
        if online.down:
            if layer.dense_mlp is None:
                raise ValueError(f"recipe {recipe.name!r} asks for an online rotation before down_proj, but "
                                 f"{layer.mlp.path} is a mixture of experts; use online_rotations ('qk',) or ().")
            down = module_at(model, layer.mlp.down)
            if not hasattr(down, "input_rotation"):
                raise ValueError(f"recipe {recipe.name!r} asks for an online rotation before {layer.mlp.down}, which has "
                                 "no online-rotation site.")
            online_size(layer.mlp.hidden, online.pad, layer.mlp.down)
        if online.qk and not hasattr(module_at(model, layer.attention.path), "qk_rotation"):
            raise ValueError(f"recipe {recipe.name!r} asks for an online q/k rotation in {layer.attention.path}, which "
                             "has no such site.")
    if recipe.kv_cache is not None:
        fmt = get_format(recipe.kv_cache)
        for layer in layout.layers:
            a = layer.attention
            try:
                fmt.check_shape((1, 1, a.num_kv_heads, a.head_dim), 3)
            except ValueError as err:
                raise ValueError(f"recipe {recipe.name!r}: kv_cache {fmt.name} cannot quantize {a.path} "
                                 f"(head_dim {a.head_dim}): {err}") from None


def _ostquant_config(step: TransformStep, recipe: Recipe, layout: DecoderLayout) -> OSTQuantConfig:
    """The step's options plus training quantizers that follow the recipe's formats (spec §3.6)."""
    options = {k: v for k, v in step.options if k != "seed"}
    rule = recipe.rule_for(layout.block_linears[0])
    activation = rule.activation if rule is not None else None
    weight = None
    if rule is not None and rule.weight is not None and activation is None:  # weight-only settings train with fake-quant weights
        weight = get_format(rule.weight, **dict(rule.weight_options))
    return OSTQuantConfig(**{"activation": activation, "kv": recipe.kv_cache, "weight": weight, **options})


@dataclasses.dataclass(frozen=True)
class TransformLog:
    """What one transform step did: its ``kind``, wall ``seconds`` and (OSTQuant) the per-step training ``losses``."""

    kind: str
    seconds: float
    losses: tuple[float, ...] = ()


def run_transforms(model: nnx.Module, recipe: Recipe, tokens: np.ndarray | None, *,
                   progress: bool = True) -> tuple[nnx.Module, tuple[TransformLog, ...]]:
    """``model`` after the recipe's transform steps, in order (each step returns a new model), and their logs."""
    logs = []
    for step in recipe.transforms:
        t0 = time.perf_counter()
        options = dict(step.options)
        key = jax.random.key(int(options.pop("seed", 0)))
        losses: tuple[float, ...] = ()
        if step.kind == "smoothquant":
            model = smoothquant(model, tokens, **options)
        elif step.kind == "quarot":
            model = quarot(model, key, **options)
        elif step.kind == "mambaquant":
            model = mambaquant(model, tokens, key, **options)
        else:
            model, result = ostquant(model, tokens, key, _ostquant_config(step, recipe, layout_of(model)),
                                     progress=progress)
            losses = result.losses
        logs.append(TransformLog(step.kind, time.perf_counter() - t0, losses))
    return model, tuple(logs)


def set_kv_cache_format(model: nnx.Module, fmt: Format | str | None) -> None:
    """Quantize keys and values of every attention layer with ``fmt`` (in place; None: float)."""
    config = None if fmt is None else KVCacheConfig.of_format(fmt)
    for layer in layout_of(model).layers:
        module_at(model, layer.attention.path).kv_cache = config


def restore_structure(model: nnx.Module, recipe: Recipe) -> None:
    """Give an abstract model the run-time structure a transformed model was saved with (in place).

    Online rotations are switched on (a zero-padded down_proj gets its padded input
    rows) and the KV format is set; the weights themselves come from the checkpoint.
    """
    if not recipe.transforms and recipe.kv_cache is None:
        return
    if (step := _mambaquant_step(recipe)) is not None:  # the saved config is already untied
        options = _mambaquant_options(step)
        add_runtime_structure(model, gate_scale=options["smooth"], online=options["online"])
        return
    layout = _layout(model, recipe)
    online = OnlineRotations.parse(recipe.online_rotations, pad=recipe.pad)
    set_online_rotations(model, layout, online)
    if online.down:
        for layer in layout.layers:
            down = module_at(model, layer.mlp.down)
            kernel = down.kernel.get_value()
            if down.input_rotation != kernel.shape[0]:
                down.kernel.set_value(jax.ShapeDtypeStruct((down.input_rotation, *kernel.shape[1:]), kernel.dtype))
    if recipe.kv_cache is not None:
        set_kv_cache_format(model, recipe.kv_cache)
