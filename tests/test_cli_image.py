"""`jquant generate` / `quantize` on a text-to-image pipeline folder (tiny random parts), and their refusals."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from jquant.cli import main
from jquant.data import load_tokenizer
from jquant.models import llama, sd3, vae
from jquant.models.text_encoder import TextEncoder
from jquant.text_to_image import SamplingDefaults, TextToImage, save_pipeline

HIDDEN = 16


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A pipeline folder whose text encoder is a tiny random Llama saved inside it (text_encoder/)."""
    tokenizer = load_tokenizer()
    lm = llama.init_model(llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32,
                                            num_layers=1, num_heads=2, num_kv_heads=1), jax.random.key(0))
    vae_cfg = vae.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            sample_size=16, use_quant_conv=False, use_post_quant_conv=False)
    dit_cfg = sd3.SD3Config(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                            num_attention_heads=2, joint_attention_dim=HIDDEN, caption_projection_dim=16,
                            pooled_projection_dim=HIDDEN, pos_embed_max_size=4)
    pipe = TextToImage(text_encoder=TextEncoder(lm, tokenizer), transformer=sd3.init_model(dit_cfg, jax.random.key(1)),
                       vae=vae.init_model(vae_cfg, jax.random.key(2)),
                       defaults=SamplingDefaults(steps=2, guidance=2.0, max_length=32), text_encoder_name="tiny-lm")
    folder = tmp_path_factory.mktemp("pipes") / "tiny-t2i"
    save_pipeline(pipe, folder)  # the encoder is not a bundled model: it is written into text_encoder/
    assert (folder / "text_encoder" / "tokenizer.json").is_file()
    return folder


def test_generate_writes_a_png_and_a_grid(pipeline_folder, tmp_path, capsys):
    one, grid = tmp_path / "one.png", tmp_path / "grid.png"
    assert main(["generate", "--model", str(pipeline_folder), "--prompt", "a red apple", "--seed", "3",
                 "--out", str(one), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seeds"] == [3] and result["steps"] == 2 and result["guidance"] == 2.0
    assert np.asarray(Image.open(one)).shape == (16, 16, 3)
    assert main(["generate", "--model", str(pipeline_folder), "--prompt", "a red apple", "--seed", "3",
                 "--num-images", "3", "--steps", "3", "--out", str(grid)]) == 0
    pixels = np.asarray(Image.open(grid))
    assert pixels.shape == (32, 32, 3)  # a 2x2 grid of 16x16 images, one empty cell
    assert (pixels[16:, 16:] == 255).all()


@pytest.mark.parametrize("extra, match", [
    ([], "--out is required"), (["--out", "x.jpg"], "must end in .png"), (["--guidance", "nan", "--out", "{tmp}/a.png"],
                                                                           "--guidance must be a finite"),
    (["--out", "{tmp}/missing/a.png"], "does not exist"),
])
def test_generate_refusals(pipeline_folder, tmp_path, capsys, extra, match):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert main(["generate", "--model", str(pipeline_folder), "--prompt", "a red apple", *extra]) == 2
    assert match in capsys.readouterr().err.replace("\n", " ")
    assert not any(tmp_path.iterdir())  # nothing written on failure


def test_generate_never_replaces_a_file(pipeline_folder, tmp_path, capsys):
    existing = tmp_path / "mine.png"
    existing.write_bytes(b"user data")
    assert main(["generate", "--model", str(pipeline_folder), "--prompt", "a red apple", "--out", str(existing)]) == 2
    assert existing.read_bytes() == b"user data" and "exists" in capsys.readouterr().err


def test_image_options_are_refused_for_language_models(capsys):
    assert main(["generate", "--model", "jq-llama-tiny", "--prompt", "To be", "--steps", "4"]) == 2
    assert "apply to text-to-image and text-to-video models" in capsys.readouterr().err.replace("\n", " ")


def test_quantize_saves_a_quantized_pipeline(pipeline_folder, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(pipeline_folder), "--recipe", "rtn-w8", "--calib-samples", "2",
                 "--no-eval", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["calibration_inputs"] == 2 * 2 * 2 and result["sites"]
    assert (out / "transformer" / "jquant.json").is_file() and (out / "pipeline.json").is_file()
    png = tmp_path / "q.png"
    assert main(["generate", "--model", str(out), "--prompt", "grapes", "--out", str(png)]) == 0
    assert png.is_file()


def test_eval_reports_the_judge_numbers_against_a_reference(pipeline_folder, tmp_path, capsys):
    assert main(["eval", "--model", str(pipeline_folder), "--reference", str(pipeline_folder), "--seeds-per-prompt",
                 "1", "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["images"] == 32 and same["reference"] is None and "psnr_db" not in same
    assert 0.0 <= same["prompt_accuracy"] <= 1.0 and same["chance"] == 1 / 32 and same["fd_emoji"] > 0
    quantized = tmp_path / "q4"
    assert main(["quantize", "--model", str(pipeline_folder), "--recipe", "rtn-w4a16", "--calib-samples", "2",
                 "--no-eval", "--out", str(quantized), "--json"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(quantized), "--reference", str(pipeline_folder), "--seeds-per-prompt", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # int4 weights change the images a little: a finite PSNR (identical images would give inf)
    assert result["reference"] == str(pipeline_folder) and 0 < result["ssim"] <= 1 and np.isfinite(result["psnr_db"])


def test_fastattn_writes_a_pipeline_whose_plan_generate_runs(pipeline_folder, tmp_path, capsys):
    from jquant.ditfastattn import AttentionPlan
    from jquant.text_to_image import load_pipeline

    out = tmp_path / "fast"
    assert main(["fastattn", "--model", str(pipeline_folder), "--budget", "1.0", "--calib-prompts", "2", "--steps",
                 "3", "--no-eval", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    plan = AttentionPlan.load(out)
    assert plan.steps == 3 and result["attention_fraction"] == pytest.approx(plan.attention_fraction())
    pipe = load_pipeline(out)
    assert pipe.attention_plan is not None and pipe.defaults.steps == 3
    png = tmp_path / "fast.png"
    assert main(["generate", "--model", str(out), "--prompt", "grapes", "--seed", "1", "--out", str(png)]) == 0
    from jquant.ditfastattn import sample_with_plan
    cond, uncond = pipe.encode(["grapes"])
    latents = sample_with_plan(pipe.transformer, cond, plan=plan, key=jax.random.key(1), shape=(1, 8, 8, 4), steps=3,
                               guidance=2.0, uncond=uncond)
    from jquant.media import to_uint8
    expected = to_uint8(np.clip(np.asarray(pipe.vae.decode_latents(latents)), -1, 1))[0]
    np.testing.assert_allclose(np.asarray(Image.open(png)).astype(int), expected.astype(int), atol=1)
    assert main(["generate", "--model", str(out), "--prompt", "grapes", "--steps", "4", "--out",
                 str(tmp_path / "other.png")]) == 2
    assert "sample with 3 steps" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [(["--budget", "0"], "--budget must be in"),
                                          (["--budget", "nan"], "--budget must be in"),
                                          (["--budget", "0.2", "--model", "jq-llama-tiny"], "not a text-to-image")])
def test_fastattn_refusals(pipeline_folder, tmp_path, capsys, extra, match):
    args = ["fastattn", "--model", str(pipeline_folder), "--out", str(tmp_path / "x"), *extra]
    assert main(args) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
