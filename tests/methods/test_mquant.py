"""MQuant on Qwen2-VL: RMS (split of the rotated weight's channel 0: exact in float64, lower W4 error on weights with a
same-sign row mean, the §7.1 criterion), MSQ (``mquant-w4a8`` quantizes with one static scale per modality at the
decoder linears, saves and loads to the same logits; ``quarot-w4a8-static-vl`` calibrates one scale over both).
"""

import jax
import numpy as np
import pytest

from jquant.methods import mquant
from jquant.numerics.hadamard import hadamard_numpy


def _w4_error(kernel: np.ndarray) -> float:
    """Mean squared error of symmetric per-output-channel int4 round to nearest (float64 reference)."""
    scale = np.abs(kernel).max(axis=0, keepdims=True) / 7
    return float(np.mean((np.clip(np.round(kernel / scale), -8, 7) * scale - kernel) ** 2))


def test_rms_split_is_exact_and_lowers_the_w4_error_of_a_same_sign_mean():
    rng = np.random.default_rng(0)
    d, out = 64, 48
    weight = rng.normal(0, 1, (d, out)) + 1.0  # rows of the [out, in] weight have a same-sign mean (spec §5)
    hadamard = hadamard_numpy(d)
    rotated = hadamard.T @ weight  # jquant's W' = Hᵀ W for x' = x H
    np.testing.assert_allclose(rotated[0], np.sqrt(d) * weight.mean(axis=0), rtol=1e-12)  # Eq. 7
    x = rng.normal(0, 1, (5, d)) @ hadamard
    main, side = mquant.split_channel(rotated)
    np.testing.assert_allclose(mquant.rms_apply(x, main, side), x @ rotated, rtol=1e-12, atol=1e-12)
    assert mquant.needs_split(rotated)
    assert _w4_error(main) * 4 < _w4_error(rotated)  # channel 0 wasted the levels of every output channel
    centred = hadamard.T @ (weight - weight.mean(axis=0, keepdims=True))
    assert not mquant.needs_split(centred)


def test_rms_refuses_bad_kernels():
    with pytest.raises(ValueError, match="kernel must be a rotated"):
        mquant.split_channel(np.ones(4))
    with pytest.raises(ValueError, match="tau must be > 0"):
        mquant.needs_split(np.ones((4, 4)), tau=0)


def test_mquant_w4a8_per_modality_scales_save_and_load(tmp_path):
    from jquant.checkpoint import load, save
    from jquant.models import qwen2_vl
    from jquant.quantization import quantize
    from jquant.testing import qwen2_vl_reference as ref
    from jquant.testing.hf_reference import relative_error

    model = qwen2_vl.init_model(ref.tiny_config("qwen2_vl"), jax.random.key(0))
    prompts = [ref.image_prompt(model.config.vision, [[(16, 8)]], seed=i) for i in range(2)]
    calib = {"tokens": np.stack([p["tokens"][0] for p in prompts]),
             "pixel_values": np.stack([p["pixel_values"] for p in prompts]),
             "image_grid_thw": np.stack([p["image_grid_thw"] for p in prompts])}
    qmodel = quantize(model, "mquant-w4a8", calib, batch_size=2, progress=False)
    scales = np.asarray(qmodel.layers[0].mlp.down_proj.activation_scale.get_value())
    assert scales.shape == (2,) and scales[0] != scales[1]  # text, image
    assert qmodel.layers[0].mlp.down_proj.input_rotation == model.config.intermediate_size
    prompt = ref.image_prompt(model.config.vision, [[(8, 16)]], seed=9)
    call = lambda m: np.asarray(m(prompt["tokens"], prompt["pixel_values"], prompt["image_grid_thw"]))  # noqa: E731
    logits = call(qmodel)
    assert relative_error(logits, call(model)) < 0.2
    restored = load(save(qmodel, tmp_path / "mquant"))
    np.testing.assert_allclose(call(restored), logits, rtol=1e-5, atol=1e-5)


def test_shared_static_baseline_is_the_largest_per_modality_scale(tmp_path):
    """``static_activation="shared"``: the same weights as one scale per modality, and at each linear of the first
    decoder block the one scale is the larger modality scale (both from the same calibration inputs' absmax)."""
    import dataclasses

    from jquant.checkpoint import load, save
    from jquant.models import qwen2_vl
    from jquant.quantization import quantize
    from jquant.recipes import get
    from jquant.testing import qwen2_vl_reference as ref

    model = qwen2_vl.init_model(ref.tiny_config("qwen2_vl"), jax.random.key(1))
    prompts = [ref.image_prompt(model.config.vision, [[(16, 8)]], seed=i) for i in range(2)]
    calib = {"tokens": np.stack([p["tokens"][0] for p in prompts]),
             "pixel_values": np.stack([p["pixel_values"] for p in prompts]),
             "image_grid_thw": np.stack([p["image_grid_thw"] for p in prompts])}
    shared_recipe = get("quarot-w4a8-static-vl")
    per_group_recipe = dataclasses.replace(shared_recipe, name="per-modality", rules=tuple(
        dataclasses.replace(r, static_activation=True) for r in shared_recipe.rules))
    shared = quantize(model, shared_recipe, calib, batch_size=2, progress=False)
    per_group = quantize(model, per_group_recipe, calib, batch_size=2, progress=False)
    # block 0 is calibrated on the same inputs by both (blocks are calibrated in turn on the quantized earlier ones)
    for name in ("self_attn/q_proj", "self_attn/o_proj", "mlp/up_proj", "mlp/down_proj"):
        one, two = shared.layers[0], per_group.layers[0]
        for attr in name.split("/"):
            one, two = getattr(one, attr), getattr(two, attr)
        table = np.asarray(two.activation_scale.get_value())
        assert table.shape == (2,) and np.shape(one.activation_scale.get_value()) == ()
        assert float(one.activation_scale.get_value()) == float(table.max()), name
    np.testing.assert_array_equal(np.asarray(shared.layers[0].self_attn.q_proj.kernel.get_value().codes),
                                  np.asarray(per_group.layers[0].self_attn.q_proj.kernel.get_value().codes))
    assert "static" in shared.quantization.site("layers/0/mlp/down_proj")
    prompt = ref.image_prompt(model.config.vision, [[(8, 16)]], seed=9)
    call = lambda m: np.asarray(m(prompt["tokens"], prompt["pixel_values"], prompt["image_grid_thw"]))  # noqa: E731
    restored = load(save(shared, tmp_path / "shared"))
    np.testing.assert_allclose(call(restored), call(shared), rtol=1e-5, atol=1e-5)


def test_shared_static_scale_needs_one_format_for_every_group():
    from jquant.models import qwen2_vl
    from jquant.quantization import plan
    from jquant.recipes import Recipe, Rule
    from jquant.testing import qwen2_vl_reference as ref

    model = qwen2_vl.init_model(ref.tiny_config("qwen2_vl"), jax.random.key(2))
    recipe = Recipe(name="mixed-shared", rules=(
        Rule(pattern=r"layers/.*", activation="int8-tensor", static_activation="shared", when=("image",)),
        Rule(pattern=r"layers/.*", weight="int8"),))
    with pytest.raises(ValueError, match="static_activation='shared' gives every group one scale"):
        plan(model, recipe)
    with pytest.raises(ValueError, match="static_activation must be False, True"):
        Rule(pattern=".*", activation="int8-tensor", static_activation="per-token")
