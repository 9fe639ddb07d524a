"""MQuant on Qwen2-VL: RMS (split of the rotated weight's channel 0: exact in float64, lower W4 error on weights with a
same-sign row mean, the §7.1 criterion), MSQ (``mquant-w4a8`` quantizes with one static scale per modality at the
decoder linears, saves and loads to the same logits; ``share_static_scales`` gives the single-scale baseline).
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


def test_mquant_w4a8_per_modality_scales_save_load_and_shared_baseline(tmp_path):
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
    paths = mquant.share_static_scales(qmodel)
    assert "layers/0/mlp/down_proj" in paths
    np.testing.assert_array_equal(np.asarray(qmodel.layers[0].mlp.down_proj.activation_scale.get_value()),
                                  scales.max())
