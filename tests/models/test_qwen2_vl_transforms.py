"""Equivalence transforms and AIFS on Qwen2-VL, in float: QuaRot (the merger's output rotated as an input writer of
the residual stream) and SmoothQuant give the original logits with images; an AIFS prefill (image tokens first,
original M-RoPE positions, mask ``[π(j) <= π(i)]``) gives the original logits and the same greedy decode, while a
plain causal mask on the permuted order does not (negative control).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.models import qwen2_vl
from jquant.models.qwen2_vl_model import aifs_permutation, permute_rows
from jquant.testing import qwen2_vl_reference as ref
from jquant.testing.hf_reference import relative_error
from jquant.transforms.equivalence import fold_norms
from jquant.transforms.rotate import quarot
from jquant.transforms.smoothquant import smoothquant

TWO_IMAGES = [[(16, 8), (8, 16)]]
ONE_IMAGE = [[(16, 16)]]
TOLERANCE = 2e-5  # float32 folding of rotations


def _model(seed: int):
    model = qwen2_vl.init_model(ref.tiny_config("qwen2_vl"), jax.random.key(seed))
    return _spread(model, seed)


def _spread(model, seed: int):
    """Larger random weights (std 0.2) so the logits are far from uniform and a wrong transform shows."""
    from flax import nnx

    rng = np.random.default_rng(seed)
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(v.get_value())
        if value.ndim >= 2:
            v.set_value(jnp.asarray(rng.normal(0, 0.2, value.shape), value.dtype))
    return model


def _call(model, prompt):
    return np.asarray(model(prompt["tokens"], prompt["pixel_values"], prompt["image_grid_thw"]))


def _calibration(model, n: int = 2) -> dict:
    prompts = [ref.image_prompt(model.config.vision, TWO_IMAGES, seed=40 + i) for i in range(n)]
    return {"tokens": np.stack([p["tokens"][0] for p in prompts]),
            "pixel_values": np.stack([p["pixel_values"] for p in prompts]),
            "image_grid_thw": np.stack([p["image_grid_thw"] for p in prompts])}


def test_layout_names_the_merger_as_an_input_writer():
    layout = _model(0).equivalence_layout()
    assert layout.input_writers == ("visual/merger/fc2",)
    assert layout.embedding == "embed_tokens" and len(layout.layers) == 2


@pytest.mark.parametrize("online", [(), ("down", "qk")])
def test_quarot_with_images_is_exact(online):
    model = _model(1)
    prompt = ref.image_prompt(model.config.vision, [[(16, 8), (8, 16)], [(16, 16)]], seed=3)
    rotated = quarot(model, jax.random.key(5), online=online)
    assert relative_error(_call(rotated, prompt), _call(model, prompt)) < TOLERANCE
    # the merger's output is rotated with the stream: its kernel changed, the vision blocks did not
    assert not np.allclose(rotated.visual.merger.fc2.kernel.get_value(), model.visual.merger.fc2.kernel.get_value())
    np.testing.assert_array_equal(rotated.visual.blocks[0].mlp.fc1.kernel.get_value(),
                                  model.visual.blocks[0].mlp.fc1.kernel.get_value())
    # negative control: the same rotation with the merger left out changes the image tokens' logits
    unrotated_merger = quarot(model, jax.random.key(5), online=online)
    unrotated_merger.visual.merger.fc2.kernel.set_value(model.visual.merger.fc2.kernel.get_value())
    unrotated_merger.visual.merger.fc2.bias.set_value(model.visual.merger.fc2.bias.get_value())
    assert relative_error(_call(unrotated_merger, prompt), _call(model, prompt)) > 1e-2


def test_smoothquant_with_images_is_exact():
    model = _model(2)
    prompt = ref.image_prompt(model.config.vision, TWO_IMAGES, seed=4)
    smoothed = smoothquant(model, model.check_calibration(_calibration(model)), alpha=0.5, batch_size=2)
    assert relative_error(_call(smoothed, prompt), _call(model, prompt)) < TOLERANCE
    gains = np.asarray(smoothed.layers[0].input_layernorm.weight.get_value())
    assert not np.allclose(gains, np.asarray(fold_norms(model).layers[0].input_layernorm.weight.get_value()))


def test_aifs_permutation_puts_image_tokens_first_in_order():
    rng = np.random.default_rng(0)
    modality = (rng.random((3, 17)) < 0.4).astype(np.int32)
    perm = aifs_permutation(modality)
    for row, p in zip(modality, perm):
        n = int(row.sum())
        np.testing.assert_array_equal(p[:n], np.flatnonzero(row == 1))
        np.testing.assert_array_equal(p[n:], np.flatnonzero(row == 0))
    assert np.all(np.diff(permute_rows(modality, perm), axis=1) <= 0)  # one image block, then one text block


@pytest.mark.parametrize("rows", [ONE_IMAGE, TWO_IMAGES], ids=["one-image", "two-images"])
def test_aifs_prefill_and_decode_equal_the_original(rows):
    model = _model(3)
    prompt = ref.image_prompt(model.config.vision, rows, seed=5)
    args = (prompt["tokens"], model.init_cache(1, prompt["tokens"].shape[1] + 4), prompt["pixel_values"],
            prompt["image_grid_thw"])
    plain, _, _ = model.prefill(*args)
    permuted, cache, deltas = model.prefill(*args, aifs=True)
    assert relative_error(np.asarray(permuted), np.asarray(plain)) < 1e-5
    expected = qwen2_vl.generate(model, prompt["tokens"], 4, prompt["pixel_values"], prompt["image_grid_thw"])
    got = qwen2_vl.generate(model, prompt["tokens"], 4, prompt["pixel_values"], prompt["image_grid_thw"], aifs=True)
    np.testing.assert_array_equal(got, expected)
    # the permuted cache decodes the next token as the plain one does
    _, plain_cache, _ = model.prefill(*args)
    step = jnp.asarray(expected[:, -4:-3])
    a, _ = model.step(step, cache, rope_deltas=deltas)
    b, _ = model.step(step, plain_cache, rope_deltas=deltas)
    assert relative_error(np.asarray(a), np.asarray(b)) < 1e-5


def test_aifs_needs_the_permuted_mask():
    """Negative control: the permuted prompt under a plain causal mask (its own order) gives other logits."""
    model = _model(4)
    prompt = ref.image_prompt(model.config.vision, TWO_IMAGES, seed=6)
    inputs = model.prepare_inputs(prompt["tokens"], prompt["image_grid_thw"])
    perm = aifs_permutation(inputs.modality)
    context = model.visual.context(prompt["image_grid_thw"], prompt["pixel_values"].shape[0])
    tokens, positions = permute_rows(inputs.tokens, perm), permute_rows(inputs.positions, perm)
    pixels = jnp.asarray(prompt["pixel_values"])
    right = model.forward(jnp.asarray(tokens), jnp.asarray(positions), pixels, context, order=jnp.asarray(perm))[0]
    wrong = model.forward(jnp.asarray(tokens), jnp.asarray(positions), pixels, context)[0]
    original = _call(model, prompt)
    assert relative_error(np.asarray(permute_rows(right, np.argsort(perm, 1))), original) < 1e-5
    assert relative_error(np.asarray(permute_rows(wrong, np.argsort(perm, 1))), original) > 1e-2
