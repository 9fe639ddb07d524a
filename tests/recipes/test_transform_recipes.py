"""Recipes with equivalence-transform steps and a KV-cache format: serialisation, validation, and
``jquant.quantize`` -> ``jquant.save`` -> ``jquant.load`` -> ``jquant.generate`` end to end on a tiny Llama.

Each built-in recipe below is quantized once (module fixture) and then checked for its run-time structure (online
Hadamards, KV format, activation formats), the untouched input model, an exact checkpoint round trip (full forward
and the KV-cache path) and greedy generation against a full recompute.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant.formats import QArray, get_format
from jquant.kv import KVCacheConfig
from jquant.models import llama
from jquant.testing.tiny_models import outlier_model
from jquant.recipes import Recipe, Rule, TransformStep, get
from jquant.transforms.equivalence import split_weights
from jquant.transforms.pipeline import check_recipe

VOCAB = 97
CFG = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2)
SEQ = 16


def _tokens(seed, batch, length):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length)).astype(np.int32)


def _state(model):
    return {k: np.asarray(v) for k, v in split_weights(model)[1].items()}


def _run(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def _run_step(graphdef, state, tokens, cache):
    return nnx.merge(graphdef, state).step(tokens, cache)


_forward = jax.jit(_run, static_argnums=0)
_step = jax.jit(_run_step, static_argnums=0)


def _logits(model, tokens):
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(tokens)))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def model():
    return outlier_model(CFG, 0)


@pytest.fixture(scope="module")
def calib():
    return _tokens(1, 4, SEQ)


# ---- 1: serialisation --------------------------------------------------------------------------------------
def _custom_recipe():
    return Recipe(name="mine", description="smooth, rotate, W4A8KV4",
                  rules=(Rule(pattern=r".*", weight="int4", algorithm="gptq", activation="int8-asym",
                              weight_options={"clip_search": True}),),
                  transforms=(TransformStep("smoothquant", {"alpha": 0.6}),
                              TransformStep("ostquant", {"steps": 5, "online": ["down", "qk"], "init": "womi",
                                                         "seed": 3})),
                  kv_cache="int4-asym")


@pytest.mark.parametrize("recipe", [_custom_recipe(), get("ostquant-w4a4kv4", transform_options={"steps": 7}),
                                    get("quarot-w4a16"), get("smoothquant-w8a8")], ids=lambda r: r.name)
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trips(tmp_path, recipe, suffix):
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    path = tmp_path / f"{recipe.name}{suffix}"
    if suffix == ".json":
        path.write_text(recipe.to_json())
    else:
        import yaml

        path.write_text(yaml.safe_dump(json.loads(recipe.to_json())))
    loaded = Recipe.from_file(path)
    assert loaded == recipe
    assert [t.kind for t in loaded.transforms] == [t.kind for t in recipe.transforms]  # order kept
    assert loaded.kv_cache == recipe.kv_cache
    assert loaded.online_rotations == recipe.online_rotations


def test_recipe_properties():
    custom = _custom_recipe()
    assert custom.online_rotations == ("down", "qk") and not custom.pad and custom.kv_cache == "int4-asym"
    assert dict(custom.transforms[1].options)["online"] == ("down", "qk")  # lists are frozen to tuples
    assert get("quarot-w4a16").online_rotations == ("down",)
    assert get("quarot-w4a4kv4").online_rotations == ("down", "qk")
    assert get("smoothquant-w8a8").online_rotations == () and get("smoothquant-w8a8").kv_cache is None
    assert get("gptq-w4a8kv8").transforms == () and get("gptq-w4a8kv8").kv_cache == "int8-asym"
    assert Recipe(name="p", rules=(Rule(pattern=".*", weight="int8"),),
                  transforms=(TransformStep("quarot", {"pad": True}),)).pad
    steps = get("ostquant-w4a4kv4", transform_options={"steps": 3, "batch_size": 2}).transforms
    assert dict(steps[0].options) == {"steps": 3, "batch_size": 2, "online": ("down", "qk"), "init": "womi"}
    assert "steps" not in dict(get("ostquant-w4a4kv4").transforms[0].options)  # the built-in is not modified


# ---- 2: step validation ---------------------------------------------------------------------------------------
def test_transform_step_validation(model, calib):
    with pytest.raises(ValueError, match=r"TransformStep.kind must be one of .*'spinquant'"):
        TransformStep("spinquant")
    with pytest.raises(ValueError, match=r"needs a 'kind'"):
        Recipe.from_dict({"rules": [{"pattern": ".*", "weight": "int8"}], "transforms": [{"alpha": 0.5}]})
    with pytest.raises(ValueError, match=r"at most one rotation step .*quarot.*ostquant"):
        Recipe(name="two", rules=(Rule(pattern=".*", weight="int8"),),
               transforms=(TransformStep("quarot"), TransformStep("ostquant")))
    with pytest.raises(ValueError, match=r"at most one rotation step"):
        Recipe(name="two", rules=(Rule(pattern=".*", weight="int8"),),
               transforms=(TransformStep("quarot"), TransformStep("quarot", {"seed": 1})))
    with pytest.raises(ValueError, match=r"has no transform steps"):
        get("rtn-w8", transform_options={"steps": 3})
    with pytest.raises(ValueError, match=r"recipe has unknown keys \['kv'\]"):
        Recipe.from_dict({"rules": [{"pattern": ".*", "weight": "int8"}], "kv": "int4-asym"})
    # unknown step options surface in quantize, before any work, naming the recipe and the step
    before = _state(model)
    for kind, options in [("smoothquant", {"beta": 0.5}), ("quarot", {"online": ["down"], "hadamard": True}),
                          ("ostquant", {"stepz": 3})]:
        recipe = Recipe(name=f"bad-{kind}", rules=(Rule(pattern=".*", weight="int8"),),
                        transforms=(TransformStep(kind, options),))
        unknown = sorted(set(options) - {"online"})
        with pytest.raises(ValueError, match=rf"recipe 'bad-{kind}': {kind} has unknown options \{unknown}"):
            jq.quantize(model, recipe, calib, progress=False)
    for path, value in _state(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)


# ---- 3: quantize -> save -> load -> generate ---------------------------------------------------------------------
# recipe -> (transform options, down_proj online Hadamard order, q/k rotation, KV format, activation format)
EXPECTED = {
    "smoothquant-w8a8": (None, None, False, None, "int8"),
    "quarot-w4a4kv4": (None, 96, True, "int4-asym", "int4-asym"),
    "ostquant-w4a4kv4": ({"steps": 2, "batch_size": 2}, 96, True, "int4-asym", "int4-asym"),
    "gptq-w4a8kv8": (None, None, False, "int8-asym", "int8-asym"),
}


@pytest.fixture(scope="module", params=list(EXPECTED))
def quantized(request, model, calib, tmp_path_factory):
    name = request.param
    options = EXPECTED[name][0]
    recipe = get(name, transform_options=options) if options else get(name)
    before = _state(model)
    qmodel = jq.quantize(model, recipe, calib, progress=False)
    path = tmp_path_factory.mktemp(name) / "ckpt"
    jq.save(qmodel, path)
    return name, recipe, before, qmodel, jq.load(path)


def _check_structure(m, name, recipe):
    _, rotation, qk, kv, act = EXPECTED[name]
    assert m.quantization.recipe == recipe
    for i, layer in enumerate(m.layers):
        assert layer.mlp.down_proj.input_rotation == rotation, i
        assert layer.self_attn.qk_rotation == qk, i
        assert layer.self_attn.kv_cache == (None if kv is None else KVCacheConfig.of_format(kv)), i
        linears = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                   layer.mlp.up_proj, layer.mlp.gate_proj, layer.mlp.down_proj)
        for linear in linears:
            assert linear.activation == get_format(act), i
            assert isinstance(linear.kernel.get_value(), QArray), i
        expected_rows = rotation or CFG.intermediate_size
        assert layer.mlp.down_proj.kernel.get_value().shape == (expected_rows, CFG.hidden_size)
    assert m.lm_head.activation is None and not isinstance(m.lm_head.kernel.get_value(), QArray)
    assert not isinstance(m.embed_tokens.embedding.get_value(), QArray)


def test_quantized_structure_and_untouched_input(quantized, model):
    name, recipe, before, qmodel, _ = quantized
    _check_structure(qmodel, name, recipe)
    report = qmodel.quantization
    assert report.unquantized == ("embed_tokens", "lm_head")
    assert [log.kind for log in report.transforms] == [t.kind for t in recipe.transforms]
    if name.startswith("ostquant"):
        (log,) = report.transforms
        assert len(log.losses) == 2 and all(np.isfinite(log.losses))
    # the input model: same weights, no run-time structure switched on
    for path, value in _state(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    for layer in model.layers:
        assert layer.mlp.down_proj.input_rotation is None and not layer.self_attn.qk_rotation
        assert layer.self_attn.kv_cache is None and layer.mlp.down_proj.activation is None
    assert getattr(model, "quantization", None) is None
    # the transform really changed the (quantized) weights' float function: the embedding was rotated or not
    rotated = EXPECTED[name][1] is not None
    same_embedding = np.array_equal(np.asarray(qmodel.embed_tokens.embedding.get_value()),
                                    before["embed_tokens/embedding"])
    assert same_embedding != rotated


def test_save_load_round_trip_and_cached_path(quantized):
    name, recipe, _, qmodel, restored = quantized
    _check_structure(restored, name, recipe)
    assert restored.quantization.sites == qmodel.quantization.sites
    assert restored.quantization.unquantized == qmodel.quantization.unquantized
    stored = jax.tree_util.tree_leaves_with_path(nnx.state(qmodel, nnx.Param))
    loaded = dict(jax.tree_util.tree_leaves_with_path(nnx.state(restored, nnx.Param)))
    assert len(stored) == len(loaded)
    for path, value in stored:  # every stored array (QArray codes, scales, zeros; float weights) bit-identical
        np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(value), err_msg=str(path))
    tokens = _tokens(2, 2, SEQ)
    full = _logits(restored, tokens)
    np.testing.assert_array_equal(full, _logits(qmodel, tokens))
    # the KV cache (quantized when the recipe says so) in two chunks equals the full forward
    graphdef, state = nnx.split(restored)
    cache = restored.init_cache(2, SEQ + 4)
    assert all((layer.config is not None) == (EXPECTED[name][3] is not None) for layer in cache.layers)
    first, cache = _step(graphdef, state, jnp.asarray(tokens[:, : SEQ // 2]), cache)  # equal chunks: one compile
    second, cache = _step(graphdef, state, jnp.asarray(tokens[:, SEQ // 2 :]), cache)
    assert int(cache.length) == SEQ
    assert _rel(np.concatenate([first, second], axis=1), full) < 1e-5


def test_generation(quantized):
    name, _, _, _, restored = quantized
    prompt = _tokens(3, 2, SEQ // 2)
    out = jq.generate(restored, prompt, SEQ // 2)
    assert out.shape == (2, SEQ) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, : SEQ // 2], prompt)
    assert out.min() >= 0 and out.max() < VOCAB
    # greedy: each new token is the argmax of the full forward at the previous position (decided ties skipped)
    logits = _logits(restored, out)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    for t in range(SEQ // 2, SEQ):
        decided = top2[:, t - 1, 1] - top2[:, t - 1, 0] > 1e-3
        np.testing.assert_array_equal(out[decided, t], np.argmax(logits[decided, t - 1], axis=-1), err_msg=str(t))


# ---- 4: bad input ------------------------------------------------------------------------------------------------
def test_online_rotation_needs_a_hadamard_width(calib):
    odd = outlier_model(CFG.replace(intermediate_size=88), 4)  # 88 = 11 · 8: no Hadamard construction
    with pytest.raises(ValueError, match=r"layers/0/mlp/down_proj: width 88 has no Hadamard .*pad=True"):
        jq.quantize(odd, "quarot-w4a4kv4", calib, progress=False)
    check_recipe(odd, get("quarot-w4a4kv4", transform_options={"pad": True}))  # padding makes it valid
    check_recipe(odd, get("quarot-w4a4kv4", transform_options={"online": ["qk"]}))  # as does leaving 'down' off


def test_kv_and_activation_formats_must_fit(model, calib):
    kv = Recipe(name="kv12", rules=(Rule(pattern=".*", weight="int8"),), kv_cache="int4-g12-asym")
    with pytest.raises(ValueError, match=r"recipe 'kv12': kv_cache int4-g12-asym cannot quantize layers/0/self_attn "
                                         r"\(head_dim 16\)"):
        jq.quantize(model, kv, progress=False)
    act = Recipe(name="a64", rules=(Rule(pattern=".*", weight="int8", activation="int8-g64"),))
    with pytest.raises(ValueError, match=r"site 'layers/0/mlp/down_proj': activation format int8-g64 cannot "
                                         r"quantize its 96 input features"):
        jq.quantize(model, act, progress=False)


def test_transforms_that_calibrate_need_calib(model):
    for name in ("smoothquant-w8a8", "smoothquant-w4a16"):
        recipe = get(name)
        assert recipe.rules[0].algorithm == "rtn" and not recipe.rules[0].static_activation  # only the step needs data
        with pytest.raises(ValueError, match=r"calib"):
            jq.quantize(model, recipe, progress=False)
    ostquant_rtn = get("ostquant-w4a16", algorithm="rtn", transform_options={"steps": 1})
    with pytest.raises(ValueError, match=r"calib"):
        jq.quantize(model, ostquant_rtn, progress=False)
    # QuaRot alone needs none: RTN weights after a random rotation
    rtn_quarot = Recipe(name="rtn-quarot", rules=(Rule(pattern=".*", weight="int8"),),
                        transforms=(TransformStep("quarot", {"online": ["down"]}),))
    qmodel = jq.quantize(model, rtn_quarot, progress=False)
    assert qmodel.layers[1].mlp.down_proj.input_rotation == 96


def test_kv_formats_per_layer_from_recipe_pairs(tmp_path):
    """``kv_cache`` as (layer pattern, format) pairs: first match wins, None keeps a layer float; saved and loaded."""
    from jquant.checkpoint import load, save
    from jquant.kv.calibrate import attention_layers
    from jquant.models import llama
    from jquant.quantization import quantize
    from jquant.recipes import Recipe, Rule

    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2,
                            num_kv_heads=2)
    model = llama.init_model(cfg, jax.random.key(0))
    recipe = Recipe(name="kv-mixed", rules=(Rule(pattern=".*", weight="int8"),),
                    kv_cache=(("layers/0/.*", "int4-asym"), ("layers/1/.*", None), (".*", "int8-asym")))
    qmodel = quantize(model, recipe, progress=False)
    caches = {p: (None if a.kv_cache is None else a.kv_cache.key.name) for p, a in attention_layers(qmodel).items()}
    assert caches == {"layers/0/self_attn": "int4-asym", "layers/1/self_attn": None, "layers/2/self_attn": "int8-asym"}
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    tokens = np.arange(12).reshape(1, 12) % 64
    save(qmodel, tmp_path / "kv")
    np.testing.assert_array_equal(np.asarray(load(tmp_path / "kv")(tokens)), np.asarray(qmodel(tokens)))
    with pytest.raises(ValueError, match=r"kv_cache patterns \['layer/9'\] match no attention layer"):
        quantize(model, Recipe(name="typo", rules=recipe.rules, kv_cache=(("layer/9", "int4-asym"),)), progress=False)
