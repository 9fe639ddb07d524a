"""The equivalence transforms a recipe can name, as spec objects in one registry.

A ``TransformSpec`` holds the step's function, whether it needs calibration data, and its typed
options (names with defaults; ``seed`` is common to all and becomes the step's PRNG key).
``Recipe`` validates step kinds against ``transform_kinds()``; ``jquant.transforms.pipeline``
checks options and runs steps through ``transform(kind)``; ``register_transform`` adds one.
This module imports no recipe type (recipes import it), so a step's ``run`` reads the recipe by
its attributes.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from jquant.formats import get_format
from jquant.named_registry import NamedRegistry
from jquant.transforms.adaln_smoothing import adaln_smoothquant
from jquant.transforms.block_hadamard import DEFAULT_BLOCK, block_hadamard_rotation
from jquant.transforms.channel_split import rms_split
from jquant.transforms.layout import layout_of
from jquant.transforms.mamba_rotation import mambaquant
from jquant.transforms.ostquant import OSTQuantConfig, ostquant
from jquant.transforms.rotate import quarot
from jquant.transforms.smoothquant import smoothquant
from jquant.transforms.vision_rotation import vision_rotation

StepRun = Callable[[nnx.Module, Any, jax.Array, dict, Any, bool], tuple[nnx.Module, tuple[float, ...]]]
"""``run(model, calib, key, options, recipe, progress) -> (model, training losses)``; ``options`` exclude ``seed``."""


@dataclasses.dataclass(frozen=True)
class TransformSpec:
    """One transform step kind: ``run`` (``StepRun``; it receives the options a recipe gives), ``needs_calibration``,
    ``options`` (accepted names -> the defaults ``run``'s function applies), and ``only_step`` for a transform that
    must be a recipe's only step (its model family has its own layout)."""

    kind: str
    run: StepRun
    needs_calibration: bool
    options: Mapping[str, Any]
    only_step: bool = False

    def __post_init__(self):
        object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))

    def check_options(self, given: Mapping[str, Any], where: str) -> dict:
        """``given`` without ``seed`` (what ``run`` receives); an unknown name is an error naming ``where``."""
        unknown = set(given) - set(self.options) - {"seed"}
        if unknown:
            raise ValueError(f"{where}: {self.kind} has unknown options {sorted(unknown)}; known: "
                             f"{sorted({*self.options, 'seed'})}.")
        return {k: v for k, v in given.items() if k != "seed"}

    def resolved_options(self, given: Mapping[str, Any], where: str) -> dict:
        """Every option's value: ``given`` over the defaults."""
        return {**self.options, **self.check_options(given, where)}


_REGISTRY: NamedRegistry[TransformSpec] = NamedRegistry("transform")


def register_transform(spec: TransformSpec) -> TransformSpec:
    """Add a transform recipes can name; a second spec under a taken kind is refused."""
    return _REGISTRY.register(spec.kind, spec)


def transform(kind: str) -> TransformSpec:
    """The registered transform ``kind``; the error lists the known ones."""
    return _REGISTRY.get(kind)


def transform_kinds() -> tuple[str, ...]:
    return _REGISTRY.names()


def _ostquant_config(options: Mapping[str, Any], recipe, model: nnx.Module) -> OSTQuantConfig:
    """OSTQuant's options plus training quantizers that follow the recipe's formats (spec §3.6)."""
    rule = recipe.rule_for(layout_of(model).block_linears[0])
    activation = rule.activation if rule is not None else None
    weight = None
    if rule is not None and rule.weight is not None and activation is None:  # weight-only: train with fake-quant weights
        weight = get_format(rule.weight, **dict(rule.weight_options))
    if recipe.kv_cache is not None and not isinstance(recipe.kv_cache, str):
        raise ValueError(f"recipe {recipe.name!r}: OSTQuant trains with one KV format for every layer; give kv_cache "
                         "as one format name.")
    return OSTQuantConfig(**{"activation": activation, "kv": recipe.kv_cache, "weight": weight, **options})


def _run_ostquant(model, calib, key, options, recipe, progress):
    model, result = ostquant(model, calib, key, _ostquant_config(options, recipe, model), progress=progress)
    return model, tuple(result.losses)


_OSTQUANT_OPTIONS = {f.name: f.default for f in dataclasses.fields(OSTQuantConfig)
                     if f.name not in ("activation", "kv", "weight") and f.default is not dataclasses.MISSING}

for _spec in (
    TransformSpec("smoothquant", lambda m, c, k, o, r, p: (smoothquant(m, c, **o), ()), needs_calibration=True,
                  options={"alpha": 0.5}),
    TransformSpec("quarot", lambda m, c, k, o, r, p: (quarot(m, k, **o), ()), needs_calibration=False,
                  options={"online": ("down", "qk"), "rotation": "hadamard", "pad": False}),
    TransformSpec("ostquant", _run_ostquant, needs_calibration=True, options=_OSTQUANT_OPTIONS),
    TransformSpec("vision_rotation", lambda m, c, k, o, r, p: (vision_rotation(m, k, **o), ()),
                  needs_calibration=False, options={"online": True, "ov": True}),
    TransformSpec("rms_split", lambda m, c, k, o, r, p: (rms_split(m, **o), ()), needs_calibration=False,
                  options={"tau": 1.0, "layers": ".*"}),
    TransformSpec("adaln_smoothquant", lambda m, c, k, o, r, p: (adaln_smoothquant(m, c, **o), ()),
                  needs_calibration=True, options={"alpha": 0.5}, only_step=True),
    TransformSpec("block_hadamard", lambda m, c, k, o, r, p: (block_hadamard_rotation(m, **o), ()),
                  needs_calibration=False, options={"layers": ".*", "block": DEFAULT_BLOCK}, only_step=True),
    TransformSpec("mambaquant", lambda m, c, k, o, r, p: (mambaquant(m, c, k, **o), ()), needs_calibration=True,
                  options={"alpha": 0.5, "klt": True, "smooth": True, "rotate": True, "online": True,
                           "smooth_conv": False, "smooth_state": False, "state_rule": "code",
                           "rotate_state": False}, only_step=True),
):
    register_transform(_spec)
