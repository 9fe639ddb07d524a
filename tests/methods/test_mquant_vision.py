"""MQuant's ViT rotation (``vision_rotation``: writers centred, LayerNorm -> gain-free RMSNorm with γ/β folded into
the readers, random-Hadamard residual rotation, per-head V/O Hadamard, online Hadamard before fc2) is exact in float:
the vision features and the model's logits are unchanged while the tower's weights are not; the ``mquant-w4a8``
recipe (vision rotation, QuaRot, RMS on down_proj and fc2) quantizes, saves and loads to the same logits.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from jquant.methods import mquant
from jquant.models import qwen2_vl
from jquant.models.layers import RMSNorm
from jquant.testing import qwen2_vl_reference as ref
from jquant.testing.hf_reference import relative_error
from jquant.transforms.vision_rotation import vision_rotation

TOLERANCE = 2e-5  # float32 folding


def _model(seed: int):
    """The tiny Qwen2-VL with std-0.2 matrices and random LayerNorm gains (1 ± 0.2) and biases (± 0.2)."""
    model = qwen2_vl.init_model(ref.tiny_config("qwen2_vl"), jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(v.get_value())
        name = "/".join(map(str, path))
        if value.ndim >= 2:
            v.set_value(rng.normal(0, 0.2, value.shape).astype(value.dtype))
        elif name.startswith("visual/") and "norm" in name or "ln_q" in name:
            v.set_value((value + rng.normal(0, 0.2, value.shape)).astype(value.dtype))
    return model


def _features(model, prompt):
    context = model.visual.context(prompt["image_grid_thw"], prompt["pixel_values"].shape[0])
    return np.asarray(model.visual(prompt["pixel_values"], context))


def _call(model, prompt):
    return np.asarray(model(prompt["tokens"], prompt["pixel_values"], prompt["image_grid_thw"]))


def test_vision_rotation_is_exact_in_float():
    model = _model(0)
    prompt = ref.image_prompt(model.config.vision, [[(16, 8), (8, 16)]], seed=2)
    rotated = vision_rotation(model, jax.random.key(3))
    tower = rotated.visual
    assert isinstance(tower.blocks[0].norm1, RMSNorm) and isinstance(tower.merger.ln_q, RMSNorm)
    assert tower.blocks[1].mlp.fc2.input_rotation == model.config.vision.intermediate_size
    assert not np.allclose(tower.blocks[0].mlp.fc1.kernel.get_value(), model.visual.blocks[0].mlp.fc1.kernel.get_value())
    assert relative_error(_features(rotated, prompt), _features(model, prompt)) < TOLERANCE
    assert relative_error(_call(rotated, prompt), _call(model, prompt)) < TOLERANCE
    # negative control: RMSNorm in place of LayerNorm without centring the writers changes the features
    uncentred = nnx.clone(model)
    for block in uncentred.visual.blocks:
        block.norm1 = RMSNorm(model.config.vision.embed_dim, eps=1e-6, param_dtype=np.float32)
    assert relative_error(_features(uncentred, prompt), _features(model, prompt)) > 1e-2
    with pytest.raises(ValueError, match="apply the step once"):
        vision_rotation(rotated, jax.random.key(3))


def test_mquant_recipe_rotates_the_tower_splits_and_round_trips(tmp_path):
    from jquant.checkpoint import load, save
    from jquant.quantization import quantize

    model = _model(1)
    prompts = [ref.image_prompt(model.config.vision, [[(16, 8)]], seed=20 + i) for i in range(2)]
    calib = {"tokens": np.stack([p["tokens"][0] for p in prompts]),
             "pixel_values": np.stack([p["pixel_values"] for p in prompts]),
             "image_grid_thw": np.stack([p["image_grid_thw"] for p in prompts])}
    qmodel = quantize(model, "mquant-w4a8", calib, batch_size=2, progress=False)
    assert set(mquant.split_report(qmodel)) == {"layers/0/mlp/down_proj", "layers/1/mlp/down_proj",
                                               "visual/blocks/0/mlp/fc2", "visual/blocks/1/mlp/fc2"}
    assert isinstance(qmodel.visual.blocks[0].norm2, RMSNorm)
    prompt = ref.image_prompt(model.config.vision, [[(8, 16)]], seed=9)
    logits = _call(qmodel, prompt)
    # static per-modality scales (MSQ) against per-token dynamic ones on the same rotated weights: close in error
    dynamic = quantize(model, "quarot-w4a8-dynamic-vl", calib, batch_size=2, progress=False)
    reference = _call(model, prompt)
    assert relative_error(logits, reference) < 1.25 * relative_error(_call(dynamic, prompt), reference)
    restored = load(save(qmodel, tmp_path / "mquant"))
    assert mquant.split_report(restored) == mquant.split_report(qmodel)
    np.testing.assert_allclose(_call(restored, prompt), logits, rtol=1e-5, atol=1e-5)
