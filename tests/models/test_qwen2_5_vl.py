"""Qwen2.5-VL against transformers' ``Qwen2_5_VLForConditionalGeneration``, through ``save_pretrained`` files.

What differs from Qwen2-VL is the vision tower: RMSNorm and biased SwiGLU blocks, an RMSNorm merger and window
attention (16 px windows = 2x2 merged patches here, block 1 attending over the whole frame). The family suite
covers the text path; the image checks use grids that span several windows, and the prompts carry
``mm_token_type_ids`` (without it transformers' Qwen2.5-VL silently uses 1-D positions).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jquant.models import qwen2_vl  # noqa: E402
from jquant.models.qwen2_vl_vision import attention_masks, check_grid  # noqa: E402
from jquant.testing import qwen2_vl_reference as ref  # noqa: E402
from jquant.testing.family_suite import FamilySpec, FamilySuite, torch_greedy_tokens, torch_reference_logits  # noqa: E402
from jquant.testing.hf_reference import relative_error  # noqa: E402

FAMILY = "qwen2_5_vl"
FLOAT32_TOLERANCE = 1e-5
FLOAT64_TOLERANCE = 2e-6
ONE_IMAGE = [[(16, 32)]]
THREE_IMAGES = [[(32, 16), (8, 24)], [(24, 24)]]  # merged grids 4x2, 1x3 and 3x3: 2, 2 and 4 windows


class TestQwen25VLFamily(FamilySuite):
    spec = FamilySpec(
        family=qwen2_vl.FAMILY,
        tiny_config=ref.tiny_config(FAMILY),
        vocab_size=ref.IMAGE_TOKEN,
        first_token=3,
        cases=(FAMILY,),
        build_reference=lambda case, folder, seed: ref.build_qwen2_vl(FAMILY, folder, seed=seed),
        reference_logits=torch_reference_logits,
        reload_reference=lambda case, folder: ref.reload(FAMILY, folder),
        reference_generate=torch_greedy_tokens,
        float32_tolerance=FLOAT32_TOLERANCE,
        float64_tolerance=FLOAT64_TOLERANCE,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_5_vl_images")
    return ref.build_qwen2_vl(FAMILY, folder, seed=4), folder


def _call(model, prompt):
    return np.asarray(model(prompt["tokens"], prompt["pixel_values"], prompt["image_grid_thw"],
                            mm_token_type_ids=prompt["mm_token_type_ids"]))


def test_window_attention_is_exercised(reference):
    """The prompts' windows split every frame, so a model ignoring them would fail the parity below."""
    model = qwen2_vl.from_hf(reference[1])
    assert model.config.vision.variant == FAMILY and model.config.vision.fullatt_block_indexes == (1,)
    for rows in (ONE_IMAGE, THREE_IMAGES):
        grid = ref.image_prompt(model.config.vision, rows, seed=0)["image_grid_thw"]
        _, full, window = attention_masks(model.config.vision, check_grid(model.config.vision, grid))
        assert window.sum() < full.sum()


@pytest.mark.parametrize("rows", [ONE_IMAGE, THREE_IMAGES], ids=["one-image", "three-images"])
def test_image_parity_float32(reference, rows):
    torch_model, folder = reference
    model = qwen2_vl.from_hf(folder)
    prompt = ref.image_prompt(model.config.vision, rows, seed=len(rows))
    assert relative_error(_call(model, prompt), ref.torch_vl_logits(torch_model, prompt)) < FLOAT32_TOLERANCE


def test_image_parity_float64(reference):
    torch_model, folder = reference
    jax.config.update("jax_enable_x64", True)
    try:
        model = qwen2_vl.from_hf(folder, dtype="float64")
        prompt = ref.image_prompt(model.config.vision, THREE_IMAGES, seed=5)
        got = _call(model, prompt)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert relative_error(got, ref.torch_vl_logits(torch_model, prompt, "float64")) < FLOAT64_TOLERANCE


def test_cached_decode_and_greedy_generation_with_images(reference):
    torch_model, folder = reference
    model = qwen2_vl.from_hf(folder)
    prompt = ref.image_prompt(model.config.vision, THREE_IMAGES, seed=6)
    tokens = prompt["tokens"]
    more = np.random.default_rng(7).integers(3, ref.IMAGE_TOKEN, (2, 3)).astype(np.int32)
    full = dict(prompt, tokens=np.concatenate([tokens, more], 1),
                mm_token_type_ids=np.pad(prompt["mm_token_type_ids"], ((0, 0), (0, 3))))
    cache = model.init_cache(2, tokens.shape[1] + 3)
    logits, cache, deltas = model.prefill(tokens, cache, prompt["pixel_values"], prompt["image_grid_thw"])
    pieces = [np.asarray(logits)]
    step = nnx.jit(lambda m, t, c: m.step(t, c, rope_deltas=deltas))
    for i in range(3):
        logits, cache = step(model, jnp.asarray(more[:, i:i + 1]), cache)
        pieces.append(np.asarray(logits))
    assert relative_error(np.concatenate(pieces, 1), ref.torch_vl_logits(torch_model, full)) < FLOAT32_TOLERANCE
    got = qwen2_vl.generate(model, tokens, 5, prompt["pixel_values"], prompt["image_grid_thw"])
    np.testing.assert_array_equal(got, ref.torch_vl_generate(torch_model, prompt, 5))


def test_export_is_read_back_by_transformers_with_images(reference, tmp_path):
    torch_model, folder = reference
    qwen2_vl.to_hf(qwen2_vl.from_hf(folder), tmp_path / "export")
    prompt = ref.image_prompt(ref.tiny_config(FAMILY).vision, THREE_IMAGES, seed=8)
    np.testing.assert_array_equal(ref.torch_vl_logits(ref.reload(FAMILY, tmp_path / "export"), prompt),
                                  ref.torch_vl_logits(torch_model, prompt))
