"""A recipe's equivalence-transform steps and KV-cache format, applied to (or restored on) a model.

``jquant.quantize`` calls :func:`run_transforms` on its private copy before the
rules quantize weights, and :func:`set_kv_cache_format` after; ``jquant.load``
calls :func:`restore_structure` on the abstract model so a saved transformed model
gets back its run-time structure (online Hadamards, padded down_proj, KV format)
before its weights are restored.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
from flax import nnx

from jquant.formats import get_format
from jquant.kv.cache import KVCacheConfig
from jquant.kv.calibrate import set_kv_cache
from jquant.recipes import Recipe, TransformStep
from jquant.transforms.adaln_smoothing import modulated_groups
from jquant.transforms.block_hadamard import add_block_hadamard_structure, rotated_linears
from jquant.transforms.channel_split import add_split_structure
from jquant.transforms.equivalence import OnlineRotations, module_at, online_size, set_online_rotations
from jquant.transforms.layout import DecoderLayout, layout_of
from jquant.transforms.mamba_rotation import add_runtime_structure
from jquant.transforms.registry import transform
from jquant.transforms.ssm_layout import ssm_layout_of
from jquant.transforms.vision_rotation import add_vision_structure

ONLINE_STEPS = ("quarot", "ostquant", "vision_rotation")
"""Transform kinds that switch on online Hadamards (the layers ``rms_split`` can split)."""


def needs_calibration(recipe: Recipe) -> bool:
    return any(transform(t.kind).needs_calibration for t in recipe.transforms)


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
    _mambaquant_options(step, recipe)
    try:
        layout = ssm_layout_of(model)
    except ValueError as err:
        raise ValueError(f"recipe {recipe.name!r}: {err}") from None
    if _mambaquant_options(step, recipe)["online"]:
        for b in layout.blocks:
            online_size(b.inner, False, b.out_proj)


def _mambaquant_options(step: TransformStep, recipe: Recipe) -> dict:
    return transform("mambaquant").resolved_options(dict(step.options), f"recipe {recipe.name!r}")


def _adaln_step(recipe: Recipe) -> TransformStep | None:
    return next((t for t in recipe.transforms if t.kind == "adaln_smoothquant"), None)


def _check_adaln(model: nnx.Module, recipe: Recipe, step: TransformStep) -> None:
    if len(recipe.transforms) != 1 or recipe.kv_cache is not None:
        raise ValueError(f"recipe {recipe.name!r}: an adaln_smoothquant step must be the only transform and the recipe "
                         "cannot quantize a KV cache (diffusion transformers keep none).")
    transform("adaln_smoothquant").check_options(dict(step.options), f"recipe {recipe.name!r}")
    try:
        modulated_groups(model)
    except ValueError as err:
        raise ValueError(f"recipe {recipe.name!r}: {err}") from None


def _block_hadamard_options(model: nnx.Module, recipe: Recipe) -> dict | None:
    """The options of a recipe's block_hadamard step (validated against ``model``), or None without one."""
    step = next((t for t in recipe.transforms if t.kind == "block_hadamard"), None)
    if step is None:
        return None
    if len(recipe.transforms) != 1 or recipe.kv_cache is not None:
        raise ValueError(f"recipe {recipe.name!r}: a block_hadamard step must be the only transform and the recipe "
                         "cannot quantize a KV cache.")
    options = transform("block_hadamard").resolved_options(dict(step.options), f"recipe {recipe.name!r}")
    try:
        rotated_linears(model, options["layers"], options["block"])
    except ValueError as err:
        raise ValueError(f"recipe {recipe.name!r}: {err}") from None
    return options


def _ssm_matmul_mixers(model: nnx.Module, recipe: Recipe) -> list[nnx.Module]:
    """The Mamba-1 mixers whose SSM matmul the recipe's ``ssm_matmul`` quantizes (errors name the recipe)."""
    try:
        blocks = [b for b in ssm_layout_of(model).blocks if b.kind == "mamba1"]
    except ValueError:
        blocks = []
    if not blocks:
        raise ValueError(f"recipe {recipe.name!r}: ssm_matmul quantizes the SSM matmul of Mamba-1 mixers, and this "
                         f"{type(model).__name__} has none; drop ssm_matmul.")
    return [module_at(model, b.path) for b in blocks]


def set_ssm_matmul_format(model: nnx.Module, recipe: Recipe) -> None:
    """Quantize every Mamba-1 SSM matmul's operands with the recipe's ``ssm_matmul`` format (in place)."""
    fmt = get_format(recipe.ssm_matmul)
    for mixer in _ssm_matmul_mixers(model, recipe):
        mixer.ssm_matmul = fmt


def check_recipe(model: nnx.Module, recipe: Recipe) -> None:
    """Validate the transform steps and KV format against ``model`` before any work (errors name the layer)."""
    if recipe.ssm_matmul is not None:
        _ssm_matmul_mixers(model, recipe)
        get_format(recipe.ssm_matmul)
    if not recipe.transforms and recipe.kv_cache is None:
        return
    if (step := _adaln_step(recipe)) is not None:
        _check_adaln(model, recipe, step)
        return
    if _block_hadamard_options(model, recipe) is not None:
        return
    if (step := _mambaquant_step(recipe)) is not None:
        _check_mambaquant(model, recipe, step)
        return
    layout = _layout(model, recipe)
    for i, step in enumerate(recipe.transforms):
        spec = transform(step.kind)
        if spec.only_step:
            raise ValueError(f"recipe {recipe.name!r}: a {step.kind} step must be the recipe's only transform.")
        spec.check_options(dict(step.options), f"recipe {recipe.name!r}")
        if step.kind == "rms_split" and not any(t.kind in ONLINE_STEPS for t in recipe.transforms[:i]):
            raise ValueError(f"recipe {recipe.name!r}: rms_split splits the layers an online Hadamard rotates; put it "
                             f"after a rotation step ({', '.join(ONLINE_STEPS)}).")
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
        paths = [layer.attention.path for layer in layout.layers]
        if not isinstance(recipe.kv_cache, str):
            unused = [p for p, _ in recipe.kv_cache if not any(re.fullmatch(p, path) for path in paths)]
            if unused:
                raise ValueError(f"recipe {recipe.name!r}: kv_cache patterns {unused} match no attention layer; "
                                 f"layers look like {paths[:2]}.")
        for layer in layout.layers:
            a = layer.attention
            if recipe.kv_format_for(a.path) is None:
                continue
            fmt = get_format(recipe.kv_format_for(a.path))
            try:
                fmt.check_shape((1, 1, a.num_kv_heads, a.head_dim), 3)
            except ValueError as err:
                raise ValueError(f"recipe {recipe.name!r}: kv_cache {fmt.name} cannot quantize {a.path} "
                                 f"(head_dim {a.head_dim}): {err}") from None


@dataclasses.dataclass(frozen=True)
class TransformLog:
    """What one transform step did: its ``kind``, wall ``seconds`` and (OSTQuant) the per-step training ``losses``."""

    kind: str
    seconds: float
    losses: tuple[float, ...] = ()


def run_transforms(model: nnx.Module, recipe: Recipe, calib, *,
                   progress: bool = True) -> tuple[nnx.Module, tuple[TransformLog, ...]]:
    """``model`` after the recipe's transform steps, in order (each step returns a new model), and their logs.

    ``calib`` is the recipe's calibration pytree (``jquant.calib.data``; None when no step needs one).
    """
    logs = []
    for step in recipe.transforms:
        t0 = time.perf_counter()
        spec = transform(step.kind)
        options = spec.check_options(dict(step.options), f"recipe {recipe.name!r}")
        key = jax.random.key(int(dict(step.options).get("seed", 0)))
        model, losses = spec.run(model, calib, key, options, recipe, progress)
        logs.append(TransformLog(step.kind, time.perf_counter() - t0, losses))
    return model, tuple(logs)


def set_kv_cache_format(model: nnx.Module, recipe: Recipe) -> None:
    """Quantize keys and values of each attention layer with the recipe's format for it (in place; through
    ``jquant.kv.set_kv_cache``, the one place KV configurations are attached)."""
    formats = {layer.attention.path: recipe.kv_format_for(layer.attention.path) for layer in layout_of(model).layers}
    set_kv_cache(model, {path: None if fmt is None else KVCacheConfig.of_format(fmt) for path, fmt in formats.items()})


def restore_structure(model: nnx.Module, recipe: Recipe) -> None:
    """Give an abstract model the run-time structure a transformed model was saved with (in place).

    Online rotations are switched on (a zero-padded down_proj gets its padded input
    rows; block Hadamards on the linears a block_hadamard step rotated), a rotated ViT gets its RMSNorms, RMS
    channel splits are added and the KV and SSM-matmul formats are set; the weights themselves come from the
    checkpoint.
    """
    if recipe.ssm_matmul is not None:
        set_ssm_matmul_format(model, recipe)
    if (not recipe.transforms and recipe.kv_cache is None) or _adaln_step(recipe) is not None:
        return  # adaLN smoothing changes weights only: the checkpoint holds them
    if (options := _block_hadamard_options(model, recipe)) is not None:
        add_block_hadamard_structure(model, **options)
        return
    if (step := _mambaquant_step(recipe)) is not None:  # the saved config is already untied
        options = _mambaquant_options(step, recipe)
        add_runtime_structure(model, gate_scale=options["smooth"], online=options["online"],
                              rotate_state=options["rotate_state"])
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
    for step in recipe.transforms:
        options = transform(step.kind).resolved_options(dict(step.options), recipe.name)
        if step.kind == "vision_rotation":
            add_vision_structure(model, online=options["online"])
        elif step.kind == "rms_split":
            add_split_structure(model, options["layers"])
    if recipe.kv_cache is not None:
        set_kv_cache_format(model, recipe)
