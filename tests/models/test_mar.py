"""The MAR-style family (jquant.models.mar): mask schedule and training mask vs numpy references, the masked flow
loss vs a float64 reference, and, on a tiny random text-to-image pipeline, the static-shape sampler (one program,
classifier-free guidance at scale 1 = conditional), save / load and `jquant generate`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jquant.checkpoint import load, save
from jquant.cli import main
from jquant.data import load_tokenizer
from jquant.models import ar_blocks, llama, mar, vae
from jquant.models.text_encoder import TextEncoder
from jquant.text_to_image import SamplingDefaults, TextToImage, load_pipeline, save_pipeline

HIDDEN = 16
CFG = mar.MARConfig(latent_size=4, latent_channels=4, width=16, depth=1, heads=2, mlp_ratio=2, text_dim=HIDDEN,
                    head_width=16, head_depth=1, head_batch_mul=2, ar_steps=3)


def _mask_schedule_reference(n: int, k: int) -> list[int]:
    """MAR's sample_tokens loop (models/mar.py in LTH14/mar), counting masked tokens after each step."""
    masked, out = n, [n]
    for step in range(k):
        mask_len = np.floor(n * np.cos(math.pi / 2.0 * (step + 1) / k))
        mask_len = max(1.0, min(masked - 1.0, mask_len))
        masked = 0 if step >= k - 1 else int(mask_len)
        out.append(masked)
    return out


@pytest.mark.parametrize("n, k", [(64, 8), (64, 64), (16, 3), (5, 1), (256, 64)])
def test_mask_schedule_matches_mar(n, k):
    assert mar.mask_schedule(n, k).tolist() == _mask_schedule_reference(n, k)


def test_mask_schedule_refuses_more_steps_than_tokens():
    with pytest.raises(ValueError, match=r"steps=17 must be an int in \[1, 16\]"):
        mar.mask_schedule(16, 17)
    with pytest.raises(ValueError, match="ar_steps=17 exceeds the 16 tokens"):
        CFG.replace(ar_steps=17)


def test_training_mask_counts():
    mask = np.asarray(mar.random_mask(jax.random.key(0), 512, 64, 0.7))
    counts = mask.sum(axis=1)
    assert counts.min() >= math.ceil(0.7 * 64) and counts.max() <= 64
    assert 0.7 * 64 < counts.mean() < 64  # a truncated normal below 1, not a constant


def test_masked_flow_loss_against_float64():
    rng = np.random.default_rng(0)
    b, n, c, d = 2, 5, 3, 4
    x0, eps = rng.normal(size=(b, n, c)), rng.normal(size=(b, n, c))
    z, tau = rng.normal(size=(b, n, d)), rng.uniform(size=(b, n))
    mask = rng.uniform(size=(b, n)) < 0.5
    w, v, bias = rng.normal(size=(c, c)), rng.normal(size=(d, c)), rng.normal(size=c)

    def head(x, t, zz):
        return x @ w + zz @ v + t[..., None] * bias

    x_t = (1 - tau[..., None]) * x0 + tau[..., None] * eps
    err = ((head(x_t, tau, z) - (eps - x0)) ** 2).mean(-1)
    want = (err * mask).sum() / mask.sum()
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = ar_blocks.masked_flow_loss(lambda x, t, zz: x @ f32(w) + zz @ f32(v) + t[..., None] * f32(bias),
                                     f32(x0), f32(z), jnp.asarray(mask), f32(tau), f32(eps))
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def pipe():
    tokenizer = load_tokenizer()
    lm = llama.init_model(llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32,
                                            num_layers=1, num_heads=2, num_kv_heads=1), jax.random.key(0))
    vae_cfg = vae.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            sample_size=8, use_quant_conv=False, use_post_quant_conv=False)
    return TextToImage(text_encoder=TextEncoder(lm, tokenizer), transformer=mar.init_model(CFG, jax.random.key(1)),
                       vae=vae.init_model(vae_cfg, jax.random.key(2)),
                       defaults=SamplingDefaults(steps=2, guidance=2.0, max_length=8), text_encoder_name="tiny-lm")


def test_condition_and_loss_shapes(pipe):
    model = pipe.transformer
    (states, pooled), _ = pipe.encode(["a red apple", "a cat"])
    tokens = jax.random.normal(jax.random.key(3), (2, 16, 4))
    mask = jnp.arange(16)[None].repeat(2, 0) < 9
    assert model.condition(tokens, mask, states, pooled).shape == (2, 16, CFG.width)
    loss = model.loss(tokens.reshape(2, 4, 4, 4), states, pooled, jax.random.key(4))
    assert loss.shape == () and np.isfinite(float(loss))
    with pytest.raises(ValueError, match=r"tokens must be \[B, 16, 4\]"):
        model.condition(tokens[:, :5], mask[:, :5], states, pooled)


def test_sampler_is_one_program_and_guidance_one_is_conditional(pipe):
    guided = np.asarray(pipe.generate_latents(["a red apple"], seed=0, guidance=1.0))
    compiled = mar._sample._cache_size()
    other = np.asarray(pipe.generate_latents(["a blue cat"], seed=1, guidance=3.0))
    assert mar._sample._cache_size() == compiled  # new prompt, seed and scale: the same program
    assert guided.shape == other.shape == (1, 4, 4, 4) and not np.allclose(guided, other)
    plain = np.asarray(pipe.generate_latents(["a red apple"], seed=0, guidance=None))
    np.testing.assert_allclose(guided, plain, rtol=1e-5, atol=1e-5)


def test_save_load_and_generate(pipe, tmp_path, capsys):
    save(pipe.transformer, tmp_path / "mar")
    restored = load(tmp_path / "mar")
    assert restored.config == CFG
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, _params(pipe.transformer))),
                                 jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, _params(restored)))):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    folder = tmp_path / "pipe"
    save_pipeline(pipe, folder)
    again = load_pipeline(folder)
    assert isinstance(again.transformer, mar.MARTransformer)
    np.testing.assert_array_equal(np.asarray(again.generate_latents(["a red apple"], seed=0, guidance=1.0)),
                                  np.asarray(pipe.generate_latents(["a red apple"], seed=0, guidance=1.0)))
    out = tmp_path / "apple.png"
    assert main(["generate", "--model", str(folder), "--prompt", "a red apple", "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (8, 8, 3)


def _params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)
