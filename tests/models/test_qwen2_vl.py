"""Qwen2-VL against transformers' ``Qwen2VLForConditionalGeneration``, through ``save_pretrained`` files.

The shared family suite checks text-only parity (float32 and float64, full sequence and cached decode),
greedy generation, HF export and jquant checkpoints; the image checks here run prompts built as the
processor builds them (``mm_token_type_ids`` included) with one image, and with three images of different
grids over two rows (two in one row). Also: ``images_to_patches`` against the image processor, the flat
config of released checkpoints, and the errors for bad images, grids and placeholders (quantization:
``test_qwen2_vl_quantize.py``).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jquant.models import qwen2_vl  # noqa: E402
from jquant.testing import qwen2_vl_reference as ref  # noqa: E402
from jquant.testing.family_suite import FamilySpec, FamilySuite, torch_greedy_tokens, torch_reference_logits  # noqa: E402
from jquant.testing.hf_reference import relative_error  # noqa: E402

FAMILY = "qwen2_vl"
FLOAT32_TOLERANCE = 1e-5
FLOAT64_TOLERANCE = 2e-6  # transformers keeps RMSNorm, RoPE and the softmax in float32 inside a float64 model


def tiny_config() -> qwen2_vl.Qwen2VLConfig:
    return ref.tiny_config(FAMILY)


def _build(case: str, folder, seed: int):
    return ref.build_qwen2_vl(FAMILY, folder, seed=seed, tie_word_embeddings=case.endswith("tied"))


class TestQwen2VLFamily(FamilySuite):
    spec = FamilySpec(
        family=qwen2_vl.FAMILY,
        tiny_config=tiny_config(),
        vocab_size=ref.IMAGE_TOKEN,  # text-only prompts: no special vision tokens
        first_token=3,
        cases=("qwen2_vl", "qwen2_vl-tied"),
        build_reference=_build,
        reference_logits=torch_reference_logits,
        reload_reference=lambda case, folder: ref.reload(FAMILY, folder),
        reference_generate=torch_greedy_tokens,
        float32_tolerance=FLOAT32_TOLERANCE,
        float64_tolerance=FLOAT64_TOLERANCE,
        save_recipes=("rtn-w8a8",),
    )


# ----------------------------------------------------------------------------------------------------------------
# With images
# ----------------------------------------------------------------------------------------------------------------

ONE_IMAGE = [[(16, 16)]]
THREE_IMAGES = [[(16, 24), (8, 16)], [(32, 16)]]  # grids (1,4,6), (1,2,4) in row 0 and (1,8,4) in row 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_vl_images")
    return ref.build_qwen2_vl(FAMILY, folder, seed=3), folder


def _call(model, prompt):
    return np.asarray(model(prompt["tokens"], prompt["pixel_values"], prompt["image_grid_thw"],
                            mm_token_type_ids=prompt["mm_token_type_ids"]))


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


def test_cached_decode_with_images_matches_the_full_reference_sequence(reference):
    """Prefill with the images, then text one token at a time at ``cache index + rope_deltas``."""
    torch_model, folder = reference
    model = qwen2_vl.from_hf(folder)
    prompt = ref.image_prompt(model.config.vision, THREE_IMAGES, seed=6)
    tokens, n_prompt = prompt["tokens"], prompt["tokens"].shape[1]
    more = np.random.default_rng(7).integers(3, ref.IMAGE_TOKEN, (2, 4)).astype(np.int32)
    full = dict(prompt, tokens=np.concatenate([tokens, more], 1),
                mm_token_type_ids=np.pad(prompt["mm_token_type_ids"], ((0, 0), (0, 4))))
    expected = ref.torch_vl_logits(torch_model, full)
    cache = model.init_cache(2, n_prompt + 4)
    logits, cache, deltas = model.prefill(tokens, cache, prompt["pixel_values"], prompt["image_grid_thw"])
    pieces = [np.asarray(logits)]
    step = nnx.jit(lambda m, t, c: m.step(t, c, rope_deltas=deltas))
    for i in range(4):
        logits, cache = step(model, jnp.asarray(more[:, i:i + 1]), cache)
        pieces.append(np.asarray(logits))
    assert relative_error(np.concatenate(pieces, 1), expected) < FLOAT32_TOLERANCE


def test_greedy_generation_with_images(reference):
    torch_model, folder = reference
    model = qwen2_vl.from_hf(folder)
    prompt = ref.image_prompt(model.config.vision, THREE_IMAGES, seed=8)
    got = qwen2_vl.generate(model, prompt["tokens"], 5, prompt["pixel_values"], prompt["image_grid_thw"])
    np.testing.assert_array_equal(got, ref.torch_vl_generate(torch_model, prompt, 5))


def test_flat_config_of_the_released_checkpoints_reads_the_same(reference, tmp_path):
    """Released Qwen2-VL folders keep the text settings at the top level, with rope_scaling {"type": "mrope"}."""
    import json
    import shutil

    _, folder = reference
    nested = json.loads((folder / "config.json").read_text())
    text = nested.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**{k: v for k, v in text.items() if k != "model_type"}, **nested, "vision_token_id": 94,
            "rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    flat["vision_config"] = {k: v for k, v in flat["vision_config"].items() if k not in ("model_type", "in_channels")}
    flat["vision_config"]["in_chans"] = 3
    shutil.copytree(folder, tmp_path / "flat")
    (tmp_path / "flat" / "config.json").write_text(json.dumps(flat))
    assert qwen2_vl.from_hf(tmp_path / "flat").config == qwen2_vl.from_hf(folder).config


def test_rope_index_matches_transformers(reference):
    torch_model, _ = reference
    prompt = ref.image_prompt(tiny_config().vision, THREE_IMAGES, seed=9)
    positions, deltas = torch_model.model.get_rope_index(
        torch.tensor(prompt["tokens"], dtype=torch.long), torch.tensor(prompt["mm_token_type_ids"]),
        image_grid_thw=torch.tensor(prompt["image_grid_thw"]))
    got = qwen2_vl.rope_index(tiny_config(), prompt["tokens"], prompt["image_grid_thw"])
    np.testing.assert_array_equal(got.positions, np.moveaxis(positions.numpy(), 0, -1))
    np.testing.assert_array_equal(got.rope_deltas, deltas.numpy()[:, 0])
    np.testing.assert_array_equal(got.modality, prompt["mm_token_type_ids"])


def test_images_to_patches_matches_the_image_processor():
    processor = transformers.Qwen2VLImageProcessorPil(do_resize=False, patch_size=4, merge_size=2, temporal_patch_size=2)
    images = np.random.default_rng(10).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    expected = processor(images=list(images), return_tensors="np")
    pixel_values, grid = qwen2_vl.images_to_patches(images / 255.0, tiny_config().vision)
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(grid, expected["image_grid_thw"])


def test_preset_builds():
    fam, cfg = qwen2_vl.FAMILY, qwen2_vl.FAMILY.presets["jq-vl-tiny"]
    model = fam.abstract_model(cfg)
    assert model.config.text.hidden_size == 192 and cfg.vision.out_hidden_size == 192
    assert qwen2_vl.config_from_hf(qwen2_vl.config_to_hf(cfg)) == cfg


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    model = qwen2_vl.init_model(tiny_config(), jax.random.key(1))
    return model, ref.image_prompt(model.config.vision, ONE_IMAGE, seed=12)


def test_bad_images_are_named():
    vision, rng = tiny_config().vision, np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\]"):
        qwen2_vl.images_to_patches(rng.random((1, 16, 16, 4)), vision)
    with pytest.raises(ValueError, match="multiples of patch_size \\* spatial_merge_size = 8 px"):
        qwen2_vl.images_to_patches(rng.random((1, 12, 16, 3)), vision)


def test_bad_pixel_values_and_grids_are_named(small):
    model, p = small
    tokens, pv, grid = p["tokens"], p["pixel_values"], p["image_grid_thw"]
    with pytest.raises(ValueError, match=r"pixel_values must be \[num_patches, 96\]"):
        model(tokens, pv[:, :48], grid)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        model(tokens, pv, np.array([[1, 4, 3]]))
    with pytest.raises(ValueError, match=r"pixel_values has 8 patches but image_grid_thw=\[\[1, 4, 4\]\] describes 16"):
        model(tokens, pv[:8], grid)
    with pytest.raises(ValueError, match="pass pixel_values and image_grid_thw together"):
        model(tokens, pv)


def test_placeholder_mismatches_are_named(small):
    model, p = small
    tokens, pv, grid = p["tokens"], p["pixel_values"], p["image_grid_thw"]
    extra = np.concatenate([tokens, [[ref.VISION_START, ref.IMAGE_TOKEN, ref.VISION_END]]], axis=1).astype(np.int32)
    with pytest.raises(ValueError, match=r"placeholder runs of lengths \[4, 1\]"):
        model(extra, pv, grid)  # more placeholders than images
    fewer = np.where(tokens == ref.IMAGE_TOKEN, 5, tokens)
    fewer[0, np.flatnonzero(tokens[0] == ref.IMAGE_TOKEN)[:3]] = ref.IMAGE_TOKEN
    with pytest.raises(ValueError, match=r"lengths \[3\].*\[4\]"):
        model(fewer, pv, grid)
    with pytest.raises(ValueError, match="tokens hold no image token"):
        model(np.where(tokens == ref.IMAGE_TOKEN, 5, tokens), pv, grid)
    with pytest.raises(ValueError, match="no images were given"):
        model(tokens)
    with pytest.raises(ValueError, match="mm_token_type_ids must be 1 exactly at the image tokens"):
        model(tokens, pv, grid, mm_token_type_ids=np.zeros_like(tokens))


def test_bad_configs_are_named():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="mrope_section"):
        cfg.replace(mrope_section=(2, 2, 2))
    with pytest.raises(ValueError, match="must be a Qwen2 decoder"):
        cfg.replace(text=cfg.text.replace(family="llama", qkv_bias=False))
    with pytest.raises(ValueError, match="out_hidden_size=64 must equal the text hidden_size=32"):
        cfg.replace(vision=qwen2_vl.VisionConfig(depth=1, embed_dim=32, num_heads=2, intermediate_size=64,
                                                 out_hidden_size=64))
