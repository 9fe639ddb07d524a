"""`jquant generate --image` / `jquant eval` on a vision-language folder (a tiny random Qwen2-VL written by
jquant.train.vl.export), against qwen2_vl.generate and jquant.train.vl.score, and the refusals."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from PIL import Image

from jquant.cli import main
from jquant.data import load_tokenizer
from jquant.data.vqa_scenes import QUESTION_KINDS, format_prompt, vqa_scenes
from jquant.models import llama, load
from jquant.models.qwen2_vl import generate, images_to_patches, init_model
from jquant.testing.qwen2_vl_reference import tiny_vqa_config
from jquant.train import vl

RES = 48  # the VQA set's size: 12x12 patches -> 36 image tokens
V = 4096  # the bundled tokenizer's vocabulary; the vision tokens follow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = tiny_vqa_config(V)
    path = tmp_path_factory.mktemp("vl") / "tiny-vl"
    vl.export(init_model(cfg, jax.random.key(0)), vl.extend_tokenizer(load_tokenizer(), cfg), path,
              {"name": "tiny-vl", "image_size": [RES, RES], "text_only_baseline": {"accuracy": 0.1, "per_kind": {}}})
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    s = vqa_scenes("test", 1, RES, seed=4)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(s.images[0]).save(path)
    return path, s.images[0], s.questions[0]


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out if code == 0 else out.err.replace("\n", " ")


def test_generate_answers_greedily_with_the_image(folder, scene, capsys):
    path, image, question = scene
    code, out = _run(capsys, "generate", "--model", str(folder), "--image", str(path), "--prompt", question,
                     "--max-new-tokens", "4", "--json")
    assert code == 0
    got = json.loads(out)
    loaded = load(folder)
    ids = vl.encode_prompt(loaded.tokenizer, loaded.model.config, format_prompt(question, vl.IMAGE_MARK), 1, 36)
    pixels, grid = images_to_patches(image[None] / 255.0, loaded.model.config.vision)
    expected = generate(loaded.model, np.array([ids]), 4, pixels, grid)[0, len(ids):].tolist()
    eos = loaded.tokenizer.eos_token_id
    assert got["tokens"] == (expected[:expected.index(eos)] if eos in expected else expected)


def test_generate_resize_flag_accepts_another_size(folder, scene, tmp_path, capsys):
    small = tmp_path / "small.png"
    Image.fromarray(scene[1]).resize((32, 32)).save(small)
    code, err = _run(capsys, "generate", "--model", str(folder), "--image", str(small), "--prompt", "hi")
    assert code == 2 and "trained on 48x48 images, got 32x32" in err
    code, _ = _run(capsys, "generate", "--model", str(folder), "--image", str(small), "--prompt", "hi", "--resize",
                   "--max-new-tokens", "2")
    assert code == 0


@pytest.mark.parametrize("case, match", [
    ("rgba", "3-channel .*got 4"), ("grey", "got 1 channel"), ("two-marks", "2 <image> placeholders but 1 --image"),
    ("two-images", "no <image> token but 2 images"), ("temperature", "--temperature do not apply"),
    ("missing", "no such file"),
])
def test_generate_refusals(folder, scene, tmp_path, capsys, case, match):
    path, image, _ = scene
    argv = ["generate", "--model", str(folder), "--prompt", "what?", "--image", str(path)]
    if case == "missing":
        argv[-1] = str(tmp_path / "nope.png")
    if case in ("rgba", "grey"):
        other = tmp_path / "other.png"
        Image.fromarray(image).convert("RGBA" if case == "rgba" else "L").save(other)
        argv[-1] = str(other)
    extra = {"two-marks": ["--prompt", "<image> <image> what?"], "two-images": ["--image", str(path)],
             "temperature": ["--temperature", "0.7"]}
    code, err = _run(capsys, *argv, *extra.get(case, []))
    assert code == 2 and re.search(match, err), err


def test_image_on_a_language_model_is_refused(scene, capsys, tmp_path):
    lm = llama.init_model(llama.LlamaConfig(vocab_size=4096, hidden_size=16, intermediate_size=32, num_layers=1,
                                            num_heads=2, num_kv_heads=1), jax.random.key(0))
    llama.to_hf(lm, tmp_path / "lm")
    code, err = _run(capsys, "generate", "--model", str(tmp_path / "lm"), "--image", str(scene[0]), "--prompt", "x")
    assert code == 2 and "--image applies to vision-language models" in err


def test_eval_reports_vqa_accuracy_per_kind_with_and_without_the_image(folder, capsys):
    code, out = _run(capsys, "eval", "--model", str(folder), "--n-items", "18", "--batch-size", "9", "--text-only",
                     "--json")
    assert code == 0
    got = json.loads(out)
    assert list(got["with_image"]["per_kind"]) == list(QUESTION_KINDS) and got["with_image"]["items"] == 18
    loaded = load(folder)
    vqa = vqa_scenes("test", 18, RES, seed=0)
    cfg = loaded.model.config
    length = vl.required_length(vqa, loaded.tokenizer, cfg)
    for key, image in (("with_image", True), ("without_image", False)):
        expected = vl.score(loaded.model, vl.encode_set(vqa, loaded.tokenizer, cfg, length, image=image), batch_size=9)
        assert got[key]["per_kind"] == expected["per_kind"]
        assert abs(got[key]["target_loss"] - expected["target_loss"]) < 1e-5
    assert got["trained_text_only_baseline"]["accuracy"] == 0.1


def test_quantize_calibrates_on_image_prompts_saves_and_compares_vqa(folder, tmp_path, capsys):
    from jquant.cli_vl import calibration_set

    loaded = load(folder)
    calib = calibration_set(loaded.tokenizer, loaded.model.config, RES, 4, seed=3)
    tokens = calib["tokens"]
    assert tokens.shape[0] == 4 and not np.any(tokens == loaded.tokenizer.pad_token_id)  # no padding in the scales
    assert np.all((tokens == loaded.model.config.image_token_id).sum(1) == 36)
    assert calib["pixel_values"].shape[:2] == (4, 144) and np.all(calib["image_grid_thw"] == [1, 12, 12])
    out = tmp_path / "q"
    code, text = _run(capsys, "quantize", "--model", str(folder), "--recipe", "mquant-w4a8", "--calib-samples", "4",
                      "--n-items", "18", "--out", str(out), "--json")
    assert code == 0, text
    result = json.loads(text)
    assert result["calibration_prompts"] == 4 and result["sites"]
    assert set(result["float"]["per_kind"]) == set(result["quantized"]["per_kind"])
    code, again = _run(capsys, "eval", "--model", str(out), "--n-items", "18", "--json")  # the saved model
    assert code == 0 and json.loads(again)["with_image"] == result["quantized"]
