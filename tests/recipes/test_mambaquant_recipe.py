"""The ``mambaquant`` recipe step: it runs MambaQuant inside ``jquant.quantize``, its SmoothQuant and
ablation variants are exact before quantization, and a quantized model saves and loads with its
run-time structure (untied head, S-SiLU gate scales, online out_proj Hadamards) restored.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq
from jquant.models import llama, mamba
from jquant.recipes import Recipe, Rule, TransformStep, get
from jquant.testing.tiny_models import fast_logits
from jquant.transforms.equivalence import merge_weights, split_weights
from jquant.transforms.mamba_rotation import apply_mamba_transforms, mambaquant, mambaquant_params

VOCAB = 53


def _model(dtype="float32", seed=0):
    cfg = mamba.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, state_size=8, time_step_rank=4,
                            dtype=dtype, param_dtype=dtype)
    model = mamba.init_model(cfg, jax.random.key(seed))
    graphdef, w, rest = split_weights(model)
    rng = np.random.default_rng(seed)
    new = {}
    for path, v in w.items():  # non-unit gains and an outlier embedding column, so the transforms do something
        a = np.asarray(v)
        if path.endswith("norm/weight") or path.endswith("norm_f/weight"):
            a = np.exp(0.3 * rng.standard_normal(a.shape))
        elif path.endswith("embedding"):
            a = rng.standard_normal(a.shape)
            a[:, 5] *= 20.0
        new[path] = jnp.asarray(a, v.dtype)
    return merge_weights(graphdef, new, rest, model)


def _tokens(seed, batch=4, length=16):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def _step_only(**options) -> Recipe:
    return Recipe(name="mq-float", rules=(Rule(pattern=".*"),), transforms=(TransformStep("mambaquant", options),))


def _max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("options", [{}, {"klt": False, "smooth": False, "online": False},
                                     {"rotate": False, "online": False}, {"smooth": False, "seed": 3}])
def test_recipe_step_equals_the_transform_and_is_exact_in_float64(options):
    with jax.enable_x64(True):
        model = _model("float64")
        calib, tokens = _tokens(1), jnp.asarray(_tokens(2))
        stepped = jq.quantize(model, _step_only(**options), calib, progress=False)
        opts = {"seed": 0, **options}
        direct = mambaquant(model, calib, jax.random.key(opts.pop("seed")), **opts)
        np.testing.assert_array_equal(np.asarray(fast_logits(stepped, tokens)), np.asarray(fast_logits(direct, tokens)))
        assert _max_rel(fast_logits(stepped, tokens), fast_logits(model, tokens)) < 1e-10


def test_smoothquant_variant_smooths_every_linear_input_and_rotates_nothing():
    with jax.enable_x64(True):
        params = mambaquant_params(_model("float64"), _tokens(1), jax.random.key(0), rotate=False)
    assert "residual" not in params
    for block in params["blocks"]:
        assert set(block) == {"input_scale", "gate_scale", "dt_scale"}
        assert all(np.all(v >= 1e-2) for v in block.values())


def test_input_scale_with_a_residual_rotation_is_refused():
    model = _model()
    with jax.enable_x64(True):
        params = mambaquant_params(model, _tokens(1), jax.random.key(0), rotate=False)
    params["residual"] = np.eye(32)
    with pytest.raises(ValueError, match="input_scale.*residual rotation"):
        apply_mamba_transforms(model, params)


@pytest.mark.parametrize("recipe", [get("mambaquant-w4a8"), _step_only(smooth=False, online=False)])
def test_quantized_mambaquant_model_saves_and_loads_exactly(recipe, tmp_path):
    model = _model()
    quantized = jq.quantize(model, recipe, _tokens(1), progress=False)
    jq.save(quantized, tmp_path / "ck")
    loaded = jq.load(tmp_path / "ck")
    tokens = jnp.asarray(_tokens(3))
    np.testing.assert_array_equal(np.asarray(fast_logits(loaded, tokens)), np.asarray(fast_logits(quantized, tokens)))
    smooth = dict(recipe.transforms[0].options).get("smooth", True)
    assert (loaded.layers[0].mixer.gate_scale is not None) == smooth


def test_bad_mambaquant_recipes_are_refused_clearly():
    model = _model()
    with pytest.raises(ValueError, match="unknown options \\['beta'\\]"):
        jq.quantize(model, _step_only(beta=1.0), _tokens(1), progress=False)
    with pytest.raises(ValueError, match="KV cache"):
        jq.quantize(model, Recipe(name="x", rules=(Rule(pattern=".*"),), transforms=(TransformStep("mambaquant"),),
                                  kv_cache="int8"), _tokens(1), progress=False)
    tiny_llama = llama.init_model(llama.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                                                    num_heads=2, num_kv_heads=1, max_position_embeddings=32),
                                  jax.random.key(0))
    with pytest.raises(ValueError, match="MambaQuant's transforms need a Mamba-family model"):
        jq.quantize(tiny_llama, "mambaquant-w8a8", _tokens(1), progress=False)


def test_widths_without_a_hadamard_construction_are_refused_before_any_work():
    cfg = mamba.MambaConfig(vocab_size=VOCAB, hidden_size=22, num_layers=1, state_size=4, time_step_rank=2)
    model = mamba.init_model(cfg, jax.random.key(0))  # d = 22 and Di = 44 = 11 * 4 have no construction
    with pytest.raises(ValueError, match="layers/0/mixer/out_proj: width 44 has no Hadamard construction"):
        jq.quantize(model, "mambaquant-w8a8", _tokens(1), progress=False)
    with pytest.raises(ValueError, match="residual stream.*22"):
        jq.quantize(model, get("mambaquant-w8a8", transform_options={"online": False}), _tokens(1), progress=False)
