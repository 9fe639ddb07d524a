"""Algorithms and transforms are spec objects in one registry each: recipes validate against them, and a spec's
declared options are the ones its function takes, with the same defaults."""

import dataclasses
import inspect

import pytest

from jquant.algorithms.weights import AlgorithmSpec, algorithm, algorithm_names, register_algorithm, rtn, rtn_supports
from jquant.recipes import Rule, TransformStep
from jquant.transforms.block_hadamard import block_hadamard_rotation
from jquant.transforms.mamba_rotation import mambaquant
from jquant.transforms.ostquant import OSTQuantConfig
from jquant.transforms.registry import transform, transform_kinds
from jquant.transforms.rotate import quarot
from jquant.transforms.smoothquant import smoothquant


def _keyword_defaults(fn, skip: int) -> dict:
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty and p.name != "batch_size"}


@pytest.mark.parametrize("kind, fn, skip", [("smoothquant", smoothquant, 2), ("quarot", quarot, 2),
                                            ("mambaquant", mambaquant, 3),
                                            ("block_hadamard", block_hadamard_rotation, 1)])
def test_transform_options_are_the_functions_keywords_with_their_defaults(kind, fn, skip):
    assert dict(transform(kind).options) == _keyword_defaults(fn, skip)


def test_ostquant_options_are_its_config_fields():
    fields = {f.name: f.default for f in dataclasses.fields(OSTQuantConfig) if f.name not in ("activation", "kv", "weight")}
    assert dict(transform("ostquant").options) == fields


def test_recipes_validate_against_the_registries():
    assert set(transform_kinds()) == {"smoothquant", "quarot", "ostquant", "mambaquant", "adaln_smoothquant",
                                      "rms_split", "vision_rotation", "block_hadamard"}
    assert {"rtn", "gptq", "gptvq", "pcdvq", "rwkvquant"} <= set(algorithm_names())
    with pytest.raises(ValueError, match=r"algorithm must be one of .*'gptq'.*got 'gtpq'"):
        Rule(pattern=".*", weight="int4", algorithm="gtpq")
    with pytest.raises(ValueError, match="unknown transform 'spin'"):
        transform("spin")
    with pytest.raises(ValueError, match="quarot has unknown options \\['alpha'\\]"):
        transform("quarot").check_options({"alpha": 1, "seed": 3}, "here")
    assert transform("quarot").check_options({"pad": True, "seed": 3}, "here") == {"pad": True}
    with pytest.raises(ValueError, match="TransformStep.kind must be one of"):
        TransformStep(kind="spin")


def test_a_registered_algorithm_can_be_named_by_a_rule_and_names_are_not_taken_twice():
    spec = register_algorithm(AlgorithmSpec("rtn-copy-for-test", rtn, rtn_supports, needs_calibration=False))
    assert algorithm("rtn-copy-for-test") is spec
    Rule(pattern=".*", weight="int8", algorithm="rtn-copy-for-test")
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm(AlgorithmSpec("rtn", rtn, rtn_supports, needs_calibration=False))
