"""Built-in named recipes (``get(name)``, ``list_recipes()``).

All keep embeddings and the output head in floating point (``DEFAULT_KEEP_FLOAT``).
``w4``/``w3``/``w2`` integer weights are asymmetric (min-max with a zero
point, as in GPTQ), ``w8`` symmetric; activations are quantized dynamically
per token.
"""

from __future__ import annotations

import dataclasses

from jquant.recipes.rules import Recipe, Rule

ALL = r".*"


def _recipe(name: str, description: str, **rule) -> Recipe:
    return Recipe(name=name, description=description, rules=(Rule(pattern=ALL, **rule),))


BUILTIN: dict[str, Recipe] = {
    r.name: r
    for r in (
        _recipe("rtn-w8a8", "int8 per-channel weights, int8 per-token dynamic activations, round to nearest",
                weight="int8", activation="int8"),
        _recipe("rtn-w8a8-static", "int8 per-channel weights, int8 activations with one calibrated scale per layer",
                weight="int8", activation="int8-tensor", static_activation=True),
        _recipe("rtn-w8", "int8 per-channel weights, round to nearest", weight="int8"),
        _recipe("rtn-w4g128", "int4 asymmetric weights in groups of 128, round to nearest", weight="int4-g128-asym"),
        _recipe("rtn-w4g64", "int4 asymmetric weights in groups of 64, round to nearest", weight="int4-g64-asym"),
        _recipe("rtn-w3g128", "int3 asymmetric weights in groups of 128, round to nearest", weight="int3-g128-asym"),
        _recipe("rtn-w2g64", "int2 asymmetric weights in groups of 64, round to nearest", weight="int2-g64-asym"),
        _recipe("gptq-w8", "int8 per-channel weights, GPTQ", weight="int8", algorithm="gptq"),
        _recipe("gptq-w4g128", "int4 asymmetric weights in groups of 128, GPTQ", weight="int4-g128-asym", algorithm="gptq"),
        _recipe("gptq-w4g64", "int4 asymmetric weights in groups of 64, GPTQ", weight="int4-g64-asym", algorithm="gptq"),
        _recipe("gptq-w3g128", "int3 asymmetric weights in groups of 128, GPTQ", weight="int3-g128-asym", algorithm="gptq"),
        _recipe("gptq-w2g64", "int2 asymmetric weights in groups of 64, GPTQ", weight="int2-g64-asym", algorithm="gptq"),
        _recipe("fp8-w8a8", "fp8 e4m3 per-channel weights, fp8 e4m3 per-token dynamic activations",
                weight="fp8-e4m3", activation="fp8-e4m3"),
        _recipe("fp8-w8a16", "fp8 e4m3 per-channel weights only", weight="fp8-e4m3"),
        _recipe("nvfp4-w4a16", "NVFP4 weights (E2M1, 16-blocks, E4M3 block scales, fp32 tensor scale)", weight="nvfp4"),
        _recipe("mxfp4-w4a16", "MXFP4 weights (E2M1, 32-blocks, E8M0 scales)", weight="mxfp4"),
    )
}


def list_recipes() -> list[Recipe]:
    return list(BUILTIN.values())


def get(name: str, **rule_overrides) -> Recipe:
    """A built-in recipe by name; ``rule_overrides`` replace fields of its rule (e.g. ``options={"damp": 0.1}``)."""
    if name not in BUILTIN:
        raise ValueError(f"unknown recipe {name!r}; built-in recipes: {', '.join(BUILTIN)}. "
                         "Custom recipes: Recipe(...) or Recipe.from_file(path).")
    recipe = BUILTIN[name]
    if not rule_overrides:
        return recipe
    rules = tuple(dataclasses.replace(r, **rule_overrides) for r in recipe.rules)
    return dataclasses.replace(recipe, rules=rules)
