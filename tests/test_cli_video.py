"""`jquant generate` / `eval` / `quantize` on a text-to-video pipeline folder (tiny random parts), and their refusals."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jquant.cli import main
from jquant.data import load_tokenizer
from jquant.models import hunyuan_video, hunyuan_video_vae, llama
from jquant.models.text_encoder import TextEncoder
from jquant.text_to_image import load_pipeline, save_pipeline
from jquant.text_to_video import TextToVideo, VideoSamplingDefaults

HIDDEN = 16


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A 32 px, 5-frame video pipeline of tiny random parts; its text encoder travels inside it (text_encoder/)."""
    tokenizer = load_tokenizer()
    lm = llama.init_model(llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32,
                                            num_layers=1, num_heads=2, num_kv_heads=1), jax.random.key(0))
    dit = hunyuan_video.HunyuanVideoConfig(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1,
                                           text_embed_dim=HIDDEN, pooled_projection_dim=HIDDEN, rope_axes_dim=(4, 6, 6))
    vae = hunyuan_video_vae.HunyuanVideoVAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                                                  norm_num_groups=4, spatial_compression_ratio=4)
    pipe = TextToVideo(text_encoder=TextEncoder(lm, tokenizer), transformer=hunyuan_video.init_model(dit, jax.random.key(1)),
                       vae=hunyuan_video_vae.init_model(vae, jax.random.key(2)), text_encoder_name="tiny-lm",
                       defaults=VideoSamplingDefaults(steps=2, guidance=2.0, max_length=48, frames=5, size=32))
    folder = tmp_path_factory.mktemp("pipes") / "tiny-t2v"
    save_pipeline(pipe, folder)
    return folder


def test_generate_writes_a_gif_of_the_pipelines_clip(pipeline_folder, tmp_path, capsys):
    out = tmp_path / "clip.gif"
    assert main(["generate", "--model", str(pipeline_folder), "--prompt", "a rocket flies up", "--seed", "3",
                 "--num-images", "2", "--frames", "9", "--scale", "1", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["frames"] == 9 and result["seeds"] == [3, 4] and result["steps"] == 2
    from jquant.media import to_uint8

    expected = to_uint8(load_pipeline(pipeline_folder).generate(["a rocket flies up"], seed=4, frames=9))[0]
    with Image.open(out) as gif:
        assert gif.n_frames == 9 and gif.size == (64, 32)  # two 32 px clips side by side
        gif.seek(8)
        last = np.asarray(gif.convert("RGB"))
    # GIF keeps at most 256 colours per frame: the second clip's last frame comes back up to palette rounding
    assert np.mean(np.abs(last[:, 32:].astype(int) - expected[8].astype(int))) < 12


def test_generate_writes_an_mp4(pipeline_folder, tmp_path, capsys):
    iio = pytest.importorskip("imageio.v3")
    pytest.importorskip("imageio_ffmpeg")
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--model", str(pipeline_folder), "--prompt", "a sun", "--scale", "2", "--out",
                 str(out)]) == 0
    frames = iio.imread(out)
    assert frames.shape == (5, 64, 64, 3)


@pytest.mark.parametrize("extra, match", [
    ([], "--out is required"), (["--out", "{tmp}/x.png"], "must end in .gif or .mp4"),
    (["--frames", "6", "--out", "{tmp}/a.gif"], "1 + 4k"), (["--out", "{tmp}/missing/a.gif"], "does not exist"),
])
def test_generate_refusals(pipeline_folder, tmp_path, capsys, extra, match):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert main(["generate", "--model", str(pipeline_folder), "--prompt", "a sun", *extra]) == 2
    assert match in capsys.readouterr().err.replace("\n", " ")
    assert not any(tmp_path.iterdir())  # nothing written on failure


def test_generate_never_replaces_a_file(pipeline_folder, tmp_path, capsys):
    existing = tmp_path / "mine.gif"
    existing.write_bytes(b"user data")
    assert main(["generate", "--model", str(pipeline_folder), "--prompt", "a sun", "--out", str(existing)]) == 2
    assert existing.read_bytes() == b"user data" and "exists" in capsys.readouterr().err


def test_eval_reports_video_metrics(pipeline_folder, capsys):
    from jquant.cli_video import validation_prompts
    from jquant.eval.video import reconstruction_psnr

    assert main(["eval", "--model", str(pipeline_folder), "--reference", str(pipeline_folder), "--clips", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] is None and len(result["prompt_accuracy_per_frame"]) == 5
    assert 0 <= result["prompt_accuracy"] <= 1 and result["temporal_error"] >= 0
    _, _, real = validation_prompts(2, 5)
    vae = load_pipeline(pipeline_folder).vae
    direct = float(np.mean(np.asarray(reconstruction_psnr(jnp.asarray(real), vae, data_range=2.0))))
    assert result["vae_reconstruction_psnr_db"] == pytest.approx(direct, rel=1e-5)


def test_vae_legibility_is_the_judge_on_real_and_reconstructed_clips(pipeline_folder):
    from jquant.checkpoint import load as load_checkpoint
    from jquant.cli_image import JUDGE
    from jquant.cli_video import vae_legibility, validation_prompts
    from jquant.models.loading import resolve

    _, labels, real = validation_prompts(3, 5)
    vae, judge = load_pipeline(pipeline_folder).vae, load_checkpoint(resolve(JUDGE))
    result = vae_legibility(vae, real, labels, batch=2)
    recon = np.clip(np.asarray(vae(jnp.asarray(real))), -1, 1)

    def accuracy(clips):  # frame by frame through the judge's logits
        frames = jnp.asarray(clips.reshape(-1, *clips.shape[2:]))
        return float(np.mean(np.argmax(np.asarray(judge(frames)), -1) == np.repeat(labels, clips.shape[1])))

    assert result["prompt_accuracy_real_clips"] == pytest.approx(accuracy(real))
    assert result["prompt_accuracy_vae_reconstructions"] == pytest.approx(accuracy(recon))


def test_quantize_saves_a_quantized_video_pipeline(pipeline_folder, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(pipeline_folder), "--recipe", "rtn-w8a8", "--calib-samples", "2",
                 "--no-eval", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["calibration_inputs"] == 2 * 2 * 2  # steps x captions x (conditional, unconditional)
    loaded = load_pipeline(out)
    assert isinstance(loaded, TextToVideo) and loaded.transformer.quantization.sites
    float_clip = np.asarray(load_pipeline(pipeline_folder).generate(["a sun"], seed=0))
    quant_clip = np.asarray(loaded.generate(["a sun"], seed=0))
    assert 0 < np.abs(quant_clip - float_clip).max() and np.abs(quant_clip - float_clip).mean() < 0.05


def test_generate_with_dynamic_frame_rate(pipeline_folder, tmp_path, capsys):
    """``--dynamic-frame-rate``: τ = 1 writes the plain clip (nothing merges) and reports every frame kept; a keep
    ratio writes a clip of the full length and reports the plan."""
    from jquant.media import to_uint8

    base = ["generate", "--model", str(pipeline_folder), "--prompt", "a sun", "--seed", "1", "--frames", "17",
            "--scale", "1", "--json", "--dynamic-frame-rate"]
    out = tmp_path / "still.gif"
    assert main([*base, "--threshold", "1.0", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)["dynamic_frame_rate"]
    assert result["kept_frames"] == [17] and result["kept_latent_frames"] == [5] and result["merges"] == [[]]
    expected = to_uint8(load_pipeline(pipeline_folder).generate(["a sun"], seed=1, frames=17))[0]
    with Image.open(out) as gif:
        gif.seek(16)
        assert np.mean(np.abs(np.asarray(gif.convert("RGB")).astype(int) - expected[16].astype(int))) < 12
    out = tmp_path / "merged.gif"
    assert main([*base, "--keep-ratio", "0.8", "--compress-after", "1", "--half-resolution-compression",
                 "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["frames"] == 17 and result["dynamic_frame_rate"]["compress_after"] == 1
    kept = result["dynamic_frame_rate"]["kept_frames"][0]
    assert kept in (13, 17)  # 13: one 2x4 merge, the most a 17-frame clip can take
    with Image.open(out) as gif:
        assert gif.n_frames == 17


@pytest.mark.parametrize("extra, match", [
    (["--dynamic-frame-rate", "--threshold", "1.5"], "--threshold must be in [0, 1]"),
    (["--dynamic-frame-rate", "--keep-ratio", "0.3"], "keep_ratio=0.3 leaves fewer frames"),
    (["--dynamic-frame-rate", "--frames", "9"], "frames=9 is too short"),
    (["--dynamic-frame-rate", "--compress-after", "2"], "--compress-after: compress_after=2 must be below"),
    (["--dynamic-frame-rate", "--keep-ratio", "0.8", "--threshold", "0.5"], "not both"),
    (["--keep-ratio", "0.8"], "--keep-ratio only applies with --dynamic-frame-rate"),
])
def test_dynamic_frame_rate_refusals(pipeline_folder, tmp_path, capsys, extra, match):
    frames = [] if "--frames" in extra else ["--frames", "17"]
    assert main(["generate", "--model", str(pipeline_folder), "--prompt", "a sun", *frames, *extra, "--out",
                 str(tmp_path / "a.gif")]) == 2
    assert match in capsys.readouterr().err.replace("\n", " ")
    assert not any(tmp_path.iterdir())


def test_calibration_captions_fit_the_text_length(pipeline_folder):
    # jq-cogvideox-tiny's 64 tokens are fewer than some scene captions take: quantize keeps the ones that fit
    import dataclasses

    from jquant.cli_video import calibration_captions

    pipe = load_pipeline(pipeline_folder)
    short = dataclasses.replace(pipe.defaults, max_length=24)
    pipe = TextToVideo(text_encoder=pipe.text_encoder, transformer=pipe.transformer, vae=pipe.vae, defaults=short)
    captions = calibration_captions(pipe, 8, seed=0)
    assert len(captions) == 8 and all(pipe.text_encoder.fits(c, 24) for c in captions)
    lengths = [1 + len(pipe.text_encoder.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in captions]
    assert max(lengths) <= 24
    tight = TextToVideo(text_encoder=pipe.text_encoder, transformer=pipe.transformer, vae=pipe.vae,
                        defaults=dataclasses.replace(short, max_length=4))
    with pytest.raises(ValueError, match="training captions fit the pipeline's 4 text tokens; lower --calib-samples"):
        calibration_captions(tight, 8, seed=0)
