"""SmoothQuant folded into adaLN modulation (jquant.transforms.adaln_smoothing) on a tiny SD3 transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant.calib.capture import model_input_statistics
from jquant.models import llama, sd3
from jquant.recipes import Recipe, Rule, TransformStep
from jquant.transforms.adaln_smoothing import adaln_smoothquant_scales, fold_modulation_scales

ARGS = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=4)


def _model(dtype: str = "float32", seed: int = 0, outliers: bool = True):
    model = sd3.init_model(sd3.SD3Config(**ARGS, dtype=dtype, param_dtype=dtype), jax.random.key(seed))
    nnx.update(model, jax.tree.map(lambda p: p * 5.0, nnx.state(model, nnx.Param)))
    if outliers:  # a few channels of every modulated stream carry large shifts: the outliers SmoothQuant migrates
        d = model.config.inner_dim
        for block in model.transformer_blocks:
            for mod in (block.norm1, block.norm1_context):
                b = np.asarray(mod.bias.get_value()).copy()
                b[[1, 5]] += 100.0
                if mod.bias.get_value().shape[0] == 6 * d:
                    b[3 * d + 2] += 100.0
                mod.bias.set_value(jnp.asarray(b, mod.bias.get_value().dtype))
    return model


def _batch(n: int, seed: int, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {"latents": rng.normal(size=(n, 8, 8, 4)).astype(dtype), "sigmas": rng.uniform(0, 1, n).astype(dtype),
            "text": rng.normal(size=(n, 5, 12)).astype(dtype), "pooled": rng.normal(size=(n, 10)).astype(dtype)}


def _velocity(model, batch) -> np.ndarray:
    return np.asarray(model.calibration_call({k: jnp.asarray(v) for k, v in batch.items()}))


def test_folding_is_exact_in_float64():
    with jax.enable_x64(True):
        model = _model("float64")
        scales = adaln_smoothquant_scales(model, _batch(6, 1, np.float64), alpha=0.5)
        assert all(s.min() > 0 for s in scales) and any(np.ptp(s) > 1 for s in scales)
        smoothed = fold_modulation_scales(model, scales)
        held_out = _batch(4, 2, np.float64)
        reference = _velocity(model, held_out)
        assert np.abs(_velocity(smoothed, held_out) - reference).max() <= 1e-12 * np.abs(reference).max()
        assert not np.allclose(np.asarray(smoothed.transformer_blocks[0].to_q.kernel.get_value()),
                               np.asarray(model.transformer_blocks[0].to_q.kernel.get_value()))


def test_consumer_inputs_are_divided_by_the_scales():
    model = _model()
    calib = _batch(8, 3)
    scales = adaln_smoothquant_scales(model, calib, alpha=0.5)
    smoothed = fold_modulation_scales(model, scales)
    groups = model.modulated_norm_groups()
    paths = {g.consumers[0] for g in groups}
    before = model_input_statistics(model, calib, paths)
    after = model_input_statistics(smoothed, calib, paths)
    for g, s in zip(groups, scales):
        b, a = before[g.consumers[0]].pooled(), after[g.consumers[0]].pooled()
        np.testing.assert_allclose(a.absmax, b.absmax / s, rtol=1e-4, atol=1e-6)


# every linear, dynamic per-token int8 activations (the recipe of issue 25), and static per-tensor int8 on only the
# linears that read a modulated stream (the others stay float, so the comparison isolates them)
W8A8_RULES = {
    "dynamic": Rule(pattern=".*", weight="int8", activation="int8", algorithm="rtn"),
    "static": Rule(pattern=r".*/(to_[qkv]|add_[qkv]_proj|ff/proj|ff_context/proj)", weight="int8",
                   activation="int8-tensor", static_activation=True, algorithm="rtn"),
}


@pytest.mark.parametrize("kind", sorted(W8A8_RULES))
def test_w8a8_recipe_with_smoothing_beats_plain_w8a8_and_round_trips(tmp_path, kind):
    model = _model()
    calib, held_out = _batch(16, 4), _batch(8, 5)
    rule = W8A8_RULES[kind]
    plain = Recipe(name=f"w8a8-{kind}", rules=(rule,))
    smooth = Recipe(name=f"smoothquant-w8a8-{kind}", rules=(rule,),
                    transforms=(TransformStep(kind="adaln_smoothquant", options=(("alpha", 0.5),)),))
    reference = _velocity(model, held_out)
    errors = {}
    quantized = {}
    for recipe in (plain, smooth):
        quantized[recipe.name] = jq.quantize(model, recipe, calib, progress=False)
        errors[recipe.name] = float(np.square(_velocity(quantized[recipe.name], held_out) - reference).mean())
    assert errors[smooth.name] < 0.85 * errors[plain.name], errors
    jq.save(quantized[smooth.name], tmp_path / "q")
    loaded = jq.load(tmp_path / "q")
    np.testing.assert_array_equal(_velocity(loaded, held_out), _velocity(quantized[smooth.name], held_out))


def test_bad_recipes_and_models_are_refused():
    step = TransformStep(kind="adaln_smoothquant")
    lm = llama.init_model(llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                                            num_heads=2, num_kv_heads=1), jax.random.key(0))
    recipe = Recipe(name="s", rules=(Rule(pattern=".*", weight="int8"),), transforms=(step,))
    with pytest.raises(ValueError, match="declares no adaLN-modulated norms"):
        jq.quantize(lm, recipe, np.zeros((2, 8), np.int32), progress=False)
    with pytest.raises(ValueError, match=r"alpha.*\[0, 1\]"):
        adaln_smoothquant_scales(_model(), _batch(2, 0), alpha=1.5)
    two = Recipe(name="s2", rules=(Rule(pattern=".*", weight="int8"),),
                 transforms=(step, TransformStep(kind="smoothquant")))
    with pytest.raises(ValueError, match="only transform"):
        jq.quantize(_model(), two, _batch(2, 0), progress=False)
