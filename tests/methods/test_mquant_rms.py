"""MQuant's RMS inside the model (``rms_split`` after QuaRot's online down_proj Hadamard): the split model gives the
unsplit model's logits in float (and dropping the side branch does not: negative control); on a model whose
down_proj rows have a same-sign mean the split lowers the W4 error of the selected layers; a quantized split model
saves and loads to the same logits with the same split selection.
"""

import dataclasses

import jax
import numpy as np
import pytest

from jquant.methods import mquant
from jquant.models import qwen2_vl
from jquant.recipes import get
from jquant.testing import qwen2_vl_reference as ref
from jquant.testing.hf_reference import relative_error
from jquant.transforms.rotate import quarot

TOLERANCE = 2e-5  # float32 folding of the rotation


def _model(seed: int, mean: float):
    """The tiny Qwen2-VL with std-0.2 weights; every down_proj output column shifted by ``mean`` (a same-sign mean
    over its input rows: MQuant's Eq. 7 then makes the rotated row 0 ``√d`` times the mean)."""
    from flax import nnx

    model = qwen2_vl.init_model(ref.tiny_config("qwen2_vl"), jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(v.get_value())
        if value.ndim >= 2:
            v.set_value(rng.normal(0, 0.2, value.shape).astype(value.dtype))
    for layer in model.layers:
        kernel = layer.mlp.down_proj.kernel
        kernel.set_value(kernel.get_value() + mean * rng.choice([-1.0, 1.0], kernel.get_value().shape[1]))
    return model


def _call(model, prompt):
    return np.asarray(model(prompt["tokens"], prompt["pixel_values"], prompt["image_grid_thw"]))


def _calibration(cfg, n: int = 2, seed: int = 20) -> dict:
    prompts = [ref.image_prompt(cfg.vision, [[(16, 8)]], seed=seed + i) for i in range(n)]
    return {"tokens": np.stack([p["tokens"][0] for p in prompts]),
            "pixel_values": np.stack([p["pixel_values"] for p in prompts]),
            "image_grid_thw": np.stack([p["image_grid_thw"] for p in prompts])}


def test_split_model_is_exact_in_float_and_the_side_branch_matters():
    model = _model(0, mean=0.3)
    prompt = ref.image_prompt(model.config.vision, [[(16, 8), (8, 16)]], seed=3)
    rotated = quarot(model, jax.random.key(1), online=("down",))
    split = mquant.rms_split(rotated, layers=r"layers/\d+/mlp/down_proj")
    assert mquant.split_report(split) == {f"layers/{i}/mlp/down_proj": True for i in range(2)}
    down = split.layers[0].mlp.down_proj
    np.testing.assert_array_equal(np.asarray(down.kernel.get_value())[0], 0)
    assert relative_error(_call(split, prompt), _call(rotated, prompt)) < TOLERANCE
    assert relative_error(_call(split, prompt), _call(model, prompt)) < TOLERANCE
    down.channel_split.side.set_value(0 * down.channel_split.side.get_value())  # negative control
    assert relative_error(_call(split, prompt), _call(rotated, prompt)) > 1e-2


def test_criterion_leaves_zero_mean_layers_unsplit_and_refuses_misuse():
    model = _model(1, mean=0.0)
    rotated = quarot(model, jax.random.key(1), online=("down",))
    split = mquant.rms_split(rotated, tau=1.0)
    assert set(mquant.split_report(split).values()) == {False}  # std-0.2 Gaussian rows: no dominant channel 0
    prompt = ref.image_prompt(model.config.vision, [[(16, 8)]], seed=4)
    assert relative_error(_call(split, prompt), _call(rotated, prompt)) < TOLERANCE  # inactive: the unsplit layer
    with pytest.raises(ValueError, match="no linear with an online Hadamard"):
        mquant.rms_split(model)  # not rotated
    with pytest.raises(ValueError, match="already quantized or split"):
        mquant.rms_split(split)
    with pytest.raises(ValueError, match="after a rotation step"):
        from jquant.quantization import quantize

        recipe = get("mquant-w4a8")
        quantize(model, dataclasses.replace(recipe, transforms=recipe.transforms[::-1]), _calibration(model.config))


def _weight_error(qmodel, rotated) -> list[float]:
    """Per down_proj: ‖W_eff - W'‖² / ‖W'‖² with ``W_eff`` the dequantized kernel plus the float side row 0."""
    from jquant.formats import dequantize

    out = []
    for qlayer, layer in zip(qmodel.layers, rotated.layers):
        effective = np.asarray(dequantize(qlayer.mlp.down_proj.kernel.get_value(), np.float32), np.float64)
        split = qlayer.mlp.down_proj.channel_split
        if split is not None:
            effective[0] += np.asarray(split.side.get_value(), np.float64)
        target = np.asarray(layer.mlp.down_proj.kernel.get_value(), np.float64)
        out.append(float(np.sum((effective - target) ** 2) / np.sum(target ** 2)))
    return out


def test_split_lowers_the_w4_error_of_the_selected_layers():
    from jquant.quantization import quantize

    model = _model(2, mean=0.3)
    calib = _calibration(model.config)
    recipe = get("mquant-w4a8", algorithm="rtn")
    unsplit = dataclasses.replace(recipe, transforms=recipe.transforms[:1])
    rotated = quarot(model, jax.random.key(0), online=("down",))  # the recipe's rotation (seed 0)
    with_rms = quantize(model, recipe, calib, batch_size=2, progress=False)
    without = quantize(model, unsplit, calib, batch_size=2, progress=False)
    assert all(v for k, v in mquant.split_report(with_rms).items() if k.startswith("layers/"))
    split_error, plain_error = _weight_error(with_rms, rotated), _weight_error(without, rotated)
    assert all(4 * s < p for s, p in zip(split_error, plain_error)), (split_error, plain_error)
    held = ref.image_prompt(model.config.vision, [[(16, 8)]], seed=30)
    reference = _call(model, held)
    assert relative_error(_call(with_rms, held), reference) < relative_error(_call(without, held), reference)


def test_split_quantized_model_saves_and_loads(tmp_path):
    from jquant.checkpoint import load, save
    from jquant.quantization import quantize

    model = _model(3, mean=0.3)
    layer = model.layers[1].mlp.down_proj  # layer 1 keeps a zero mean: its split is inactive
    layer.kernel.set_value(layer.kernel.get_value() - layer.kernel.get_value().mean(axis=0))
    qmodel = quantize(model, "mquant-w4a8", _calibration(model.config), batch_size=2, progress=False)
    report = mquant.split_report(qmodel)  # the recipe also visits the vision fc2 layers
    assert {k: v for k, v in report.items() if k.startswith("layers/")} == {"layers/0/mlp/down_proj": True,
                                                                           "layers/1/mlp/down_proj": False}
    restored = load(save(qmodel, tmp_path / "rms"))
    assert mquant.split_report(restored) == mquant.split_report(qmodel)
    prompt = ref.image_prompt(model.config.vision, [[(8, 16)]], seed=9)
    np.testing.assert_allclose(_call(restored, prompt), _call(qmodel, prompt), rtol=1e-5, atol=1e-5)
