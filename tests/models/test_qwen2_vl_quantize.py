"""Quantizing Qwen2-VL: every linear of the vision tower, merger and decoder is a site; calibrated recipes walk
the vision blocks, the merger and the decoder blocks on calibration prompts with images; the decoder's linears
see each token's modality (text / image) as group id, so static activation scales can be per modality.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.models import qwen2_vl
from jquant.quantization import quantize
from jquant.testing import qwen2_vl_reference as ref
from jquant.testing.hf_reference import relative_error

THREE_IMAGES = [[(16, 24), (8, 16)], [(32, 16)]]


def tiny_config() -> qwen2_vl.Qwen2VLConfig:
    return ref.tiny_config("qwen2_vl")


def _call(model, prompt):
    return np.asarray(model(prompt["tokens"], prompt["pixel_values"], prompt["image_grid_thw"],
                            mm_token_type_ids=prompt["mm_token_type_ids"]))


def test_rtn_w8a8_quantizes_every_linear_and_stays_close():
    from jquant.sites import find_sites

    model = qwen2_vl.init_model(tiny_config(), jax.random.key(0))
    prompt = ref.image_prompt(model.config.vision, THREE_IMAGES, seed=11)
    qmodel = quantize(model, "rtn-w8a8", progress=False)
    linears = {s.path for s in find_sites(model) if s.spec.kind == "linear"}
    kept = {"visual/patch_embed/proj", "lm_head"}
    assert {path for path, _ in qmodel.quantization.sites} == linears - kept
    assert any(p.startswith("visual/blocks/1/") for p in linears) and "visual/merger/fc2" in linears
    assert relative_error(_call(qmodel, prompt), _call(model, prompt)) < 0.05


def _calibration(model, n: int = 3) -> dict:
    """``n`` prompts with the same image sizes (so the same patch count) at different places in the text."""
    prompts = [ref.image_prompt(model.config.vision, [[(16, 8), (8, 16)]], seed=20 + i) for i in range(n)]
    return {"tokens": np.stack([p["tokens"][0] for p in prompts]),
            "pixel_values": np.stack([p["pixel_values"] for p in prompts]),
            "image_grid_thw": np.stack([p["image_grid_thw"] for p in prompts])}


@pytest.mark.parametrize("recipe", ["gptq-w8", "rtn-w8a8-static"])
def test_calibrated_recipes_walk_the_vision_blocks_merger_and_decoder(recipe):
    model = qwen2_vl.init_model(tiny_config(), jax.random.key(2))
    calib = _calibration(model)
    checked = model.check_calibration(calib)
    np.testing.assert_array_equal(checked["modality"], calib["tokens"] == ref.IMAGE_TOKEN)
    qmodel = quantize(model, recipe, calib, batch_size=2, progress=False)
    described = dict(qmodel.quantization.sites)
    assert {"visual/blocks/0/attn/qkv", "visual/merger/fc1", "layers/1/mlp/down_proj"} <= set(described)
    prompt = ref.image_prompt(model.config.vision, THREE_IMAGES, seed=13)
    assert relative_error(_call(qmodel, prompt), _call(model, prompt)) < 0.05
    with pytest.raises(ValueError, match="Qwen2-VL calibration must be a dict with keys"):
        quantize(model, recipe, calib["tokens"], progress=False)


def test_per_modality_static_scales_follow_each_modalitys_tokens():
    """The decoder's linears get the modality as group id: one static scale per modality, from its own tokens."""
    from jquant.recipes import Recipe, Rule

    model = qwen2_vl.init_model(tiny_config(), jax.random.key(3))
    calib = _calibration(model)
    recipe = Recipe(name="w8a8-per-modality", rules=(
        Rule(pattern=r"(visual/blocks|visual/merger|layers)/.*", weight="int8", activation="int8-tensor",
             static_activation=True),))
    qmodel = quantize(model, recipe, calib, batch_size=2, progress=False)
    batch = model.check_calibration(calib)
    context = tuple(jnp.asarray(batch[k]) for k in ("cos", "sin", "full", "window"))
    # the walker feeds each block what the already quantized blocks before it produce: the quantized vision tower
    x = qmodel.layers[0].input_layernorm(qmodel.embed(jnp.asarray(batch["tokens"]), batch["pixel_values"], context))
    x = np.abs(np.asarray(x))
    expected = [x[batch["modality"] == g].max() / 127 for g in (qwen2_vl.TEXT, qwen2_vl.IMAGE)]
    scales = np.asarray(qmodel.layers[0].self_attn.q_proj.activation_scale.get_value(), np.float64)
    np.testing.assert_allclose(scales, expected, rtol=1e-3)
    assert np.shape(qmodel.visual.blocks[0].attn.qkv.activation_scale.get_value()) == ()
    prompt = ref.image_prompt(model.config.vision, THREE_IMAGES, seed=14)
    assert relative_error(_call(qmodel, prompt), _call(model, prompt)) < 0.1


def test_kv_formats_are_refused():
    """M-RoPE attention has no quantized KV cache yet: a KV recipe fails with a clear error (equivalence transforms
    are supported: ``test_qwen2_vl_transforms.py``)."""
    model = qwen2_vl.init_model(tiny_config(), jax.random.key(4))
    prompt = ref.image_prompt(model.config.vision, THREE_IMAGES, seed=15)
    with pytest.raises(ValueError, match="does not support KV-cache quantization"):
        _call(quantize(model, "rtn-w4a8kv8", _calibration(model), progress=False), prompt)
