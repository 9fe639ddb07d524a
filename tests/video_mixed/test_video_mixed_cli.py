"""`jquant quantize --recipe 6bit-diffusion` of a tiny random CogVideoX text-to-video pipeline saves the calibrated
6Bit-Diffusion config beside it, and `jquant generate` of the saved folder samples with it."""

from __future__ import annotations

import json

import jax
import pytest

from jquant.cli import main
from jquant.data import load_tokenizer
from jquant.models import cogvideox, hunyuan_video_vae, llama
from jquant.models.text_encoder import TextEncoder
from jquant.text_to_image import load_pipeline, save_pipeline
from jquant.text_to_video import TextToVideo, VideoSamplingDefaults
from jquant.video_mixed import SixBitConfig
from jquant.video_mixed.pipeline import generate_latents

HIDDEN = 16


def tiny_cogvideox_pipeline() -> TextToVideo:
    """A 32 px, 5-frame pipeline: a 1-layer LM text encoder, a 2-block CogVideoX DiT (3-D RoPE), a tiny causal VAE."""
    tokenizer = load_tokenizer()
    lm = llama.init_model(llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32,
                                            num_layers=1, num_heads=2, num_kv_heads=1), jax.random.key(0))
    dit = cogvideox.CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, time_embed_dim=16,
                                    text_embed_dim=HIDDEN, num_layers=2, use_rotary_positional_embeddings=True)
    vae = hunyuan_video_vae.HunyuanVideoVAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                                                  norm_num_groups=4, spatial_compression_ratio=4)
    return TextToVideo(text_encoder=TextEncoder(lm, tokenizer), transformer=cogvideox.init_model(dit, jax.random.key(1)),
                       vae=hunyuan_video_vae.init_model(vae, jax.random.key(2)), text_encoder_name="tiny-lm",
                       defaults=VideoSamplingDefaults(steps=4, guidance=2.0, max_length=48, frames=5, size=32))


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipes") / "tiny-cogvideox"
    save_pipeline(tiny_cogvideox_pipeline(), folder)
    return folder


def test_quantize_with_the_recipe_then_generate_with_the_saved_config(pipeline_folder, tmp_path, capsys):
    out = tmp_path / "six-bit"
    assert main(["quantize", "--model", str(pipeline_folder), "--recipe", "6bit-diffusion", "--out", str(out),
                 "--calib-samples", "2", "--no-eval", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    saved = SixBitConfig.load(out)
    assert saved.precision.mode == "dynamic" and saved.cache.mode == "tdc"
    assert saved.precision.alpha.shape == (2, 6)
    assert result["six_bit_diffusion"]["tau_q"] == pytest.approx(saved.precision.tau_q)
    pipe = load_pipeline(out)
    kernel = pipe.transformer.blocks()[0].attn1.to_q.kernel.get_value()
    assert kernel.format.name == "nvfp4"

    gif = tmp_path / "clip.gif"
    assert main(["generate", "--model", str(out), "--prompt", "a rocket flies up", "--seed", "3", "--scale", "1",
                 "--out", str(gif), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["six_bit_diffusion"]
    direct = generate_latents(pipe, ["a rocket flies up"], saved, seed=3)
    assert summary["skip_fraction"] == pytest.approx(direct.skip_fraction())
    assert summary["average_activation_bits"] == pytest.approx(direct.average_bits())
    assert gif.is_file()
