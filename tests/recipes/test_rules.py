"""Recipe rules: first match wins, float exclusions, unused-rule report, file round trips, bad input."""

import json

import jax
import pytest

from jquant.models import llama
from jquant.recipes.rules import DEFAULT_KEEP_FLOAT, Recipe, Rule
from jquant.sites import find_sites

CFG = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def paths():
    return [s.path for s in find_sites(llama.init_model(CFG, jax.random.key(0)))]


def test_sites_cover_every_linear_and_the_embedding(paths):
    expected = {f"layers/{i}/{m}" for i in range(2) for m in
                ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                 "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")} | {"embed_tokens", "lm_head"}
    assert set(paths) == expected


def test_first_match_wins_and_embeddings_stay_float(paths):
    recipe = Recipe(name="t", rules=(Rule(pattern=r".*/down_proj", weight="int8"), Rule(pattern=r".*", weight="int4-g128")))
    got = recipe.assign(paths)
    assert got["layers/1/mlp/down_proj"].weight == "int8"
    assert got["layers/0/self_attn/q_proj"].weight == "int4-g128"
    assert got["embed_tokens"] is None and got["lm_head"] is None
    everything = Recipe(name="t", rules=recipe.rules, keep_float=())
    assert everything.rule_for("lm_head").weight == "int4-g128"


def test_unused_rules_are_reported(paths):
    typo = Rule(pattern=r".*/qproj", weight="int8")
    shadowed = Rule(pattern=r".*/k_proj", weight="int8")
    recipe = Recipe(name="t", rules=(typo, Rule(pattern=r".*", weight="int8"), shadowed))
    assert recipe.unused_rules(paths) == [typo, shadowed]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_round_trip(tmp_path, suffix):
    recipe = Recipe(name="mine", rules=(Rule(pattern=r".*mlp.*", weight="int4-g128", algorithm="gptq",
                                             weight_options={"symmetric": False}, options={"damp": 0.01}),),
                    keep_float=(r"lm_head",), description="test")
    path = tmp_path / f"mine{suffix}"
    if suffix == ".json":
        path.write_text(recipe.to_json())
    else:
        import yaml

        path.write_text(yaml.safe_dump(json.loads(recipe.to_json())))
    assert Recipe.from_file(path) == recipe


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"Rule.pattern '\(' is not a valid"):
        Rule(pattern="(", weight="int8")
    with pytest.raises(ValueError, match="algorithm"):
        Rule(pattern=".*", weight="int8", algorithm="awq")
    with pytest.raises(ValueError, match="gptq.*needs a weight format"):
        Rule(pattern=".*", algorithm="gptq")
    with pytest.raises(ValueError, match="no rules"):
        Recipe(name="empty", rules=())
    with pytest.raises(ValueError, match=r"rule #0 has unknown keys \['wieght'\]"):
        Recipe.from_dict({"rules": [{"pattern": ".*", "wieght": "int8"}]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Recipe.from_file(tmp_path / "missing.json")
    assert DEFAULT_KEEP_FLOAT
