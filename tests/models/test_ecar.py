"""The ECAR family (jquant.models.ecar) on a tiny random text-to-image pipeline: block-causal conditions, the
training loss, the sampler's steps and refusals, save / load and `jquant generate`."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jquant.checkpoint import load, save
from jquant.cli import main
from jquant.data import load_tokenizer
from jquant.models import ecar, llama, vae
from jquant.models.text_encoder import TextEncoder
from jquant.text_to_image import SamplingDefaults, TextToImage, load_pipeline, save_pipeline

HIDDEN = 16
CFG = ecar.ECARConfig(latent_size=4, latent_channels=4, resolutions=(1, 2, 4), edges=(1.0, 0.6, 0.3, 0.0),
                      stage_steps=(1, 1, 2), width=16, depth=1, heads=2, mlp_ratio=2, text_dim=HIDDEN, head_width=16,
                      head_depth=1, head_batch_mul=2)


@pytest.fixture(scope="module")
def pipe():
    tokenizer = load_tokenizer()
    lm = llama.init_model(llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32,
                                            num_layers=1, num_heads=2, num_kv_heads=1), jax.random.key(0))
    vae_cfg = vae.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            sample_size=8, use_quant_conv=False, use_post_quant_conv=False)
    return TextToImage(text_encoder=TextEncoder(lm, tokenizer), transformer=ecar.init_model(CFG, jax.random.key(1)),
                       vae=vae.init_model(vae_cfg, jax.random.key(2)),
                       defaults=SamplingDefaults(steps=4, guidance=2.0, max_length=8), text_encoder_name="tiny-lm")


def test_stage_conditions_are_block_causal(pipe):
    model = pipe.transformer
    (states, pooled), _ = pipe.encode(["a red apple"])
    inputs = (jax.random.normal(jax.random.key(3), (1, 2, 2, 4)), jax.random.normal(jax.random.key(4), (1, 4, 4, 4)))
    z = model.condition(inputs, states, pooled)
    assert [a.shape for a in z] == [(1, r * r, CFG.width) for r in CFG.resolutions]
    z2 = model.condition((inputs[0], inputs[1] + 1.0), states, pooled)  # perturb the last stage's inputs
    for s in range(2):
        np.testing.assert_allclose(z2[s], z[s], rtol=1e-5, atol=1e-6)
    assert not np.allclose(z2[2], z[2])
    z1 = model.condition(inputs[:1], states, pooled)  # fewer stages: the same earlier conditions
    for s in range(2):
        np.testing.assert_allclose(z1[s], z[s], rtol=1e-5, atol=1e-6)


def test_loss_is_finite_and_trains(pipe):
    model = nnx.clone(pipe.transformer)
    (states, pooled), _ = pipe.encode(["a red apple", "a cat"])
    latents = jax.random.normal(jax.random.key(5), (2, 4, 4, 4))
    loss_fn = lambda m: m.loss(latents, states, pooled, jax.random.key(6))  # noqa: E731
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_sampler_steps_and_refusals(pipe):
    model = pipe.transformer
    cond, uncond = pipe.encode(["a red apple"])
    key = jax.random.key(0)
    kw = dict(key=key, shape=(1, 4, 4, 4), guidance=2.0)
    by_total = model.sample_latents(cond, uncond, steps=4, **kw)  # 4 steps over 3 stages: (2, 1, 1)
    by_stage = model.sample_latents(cond, uncond, steps=None, stage_steps=(2, 1, 1), **kw)
    np.testing.assert_array_equal(np.asarray(by_total), np.asarray(by_stage))
    with pytest.raises(ValueError, match="must be an int >= the number of stages"):
        model.sample_latents(cond, uncond, steps=2, **kw)
    with pytest.raises(ValueError, match="at least one Euler step"):
        model.sample_latents(cond, uncond, steps=None, stage_steps=(2, 0, 1), **kw)
    with pytest.raises(ValueError, match=r"shape must be \[B, 4, 4, 4\]"):
        model.sample_latents(cond, uncond, steps=4, **{**kw, "shape": (1, 8, 8, 4)})
    with pytest.raises(ValueError, match="must divide the final token map"):
        CFG.replace(resolutions=(1, 3, 4))
    with pytest.raises(ValueError, match=r"must cover \[0, 1\]"):
        CFG.replace(edges=(1.0, 0.6, 0.3, 0.1))


def test_save_load_and_generate(pipe, tmp_path):
    save(pipe.transformer, tmp_path / "ecar")
    restored = load(tmp_path / "ecar")
    assert restored.config == CFG
    want = jax.tree.leaves(nnx.state(pipe.transformer, nnx.Param))
    got = jax.tree.leaves(nnx.state(restored, nnx.Param))
    assert len(want) == len(got)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    folder = tmp_path / "pipe"
    save_pipeline(pipe, folder)
    again = load_pipeline(folder)
    assert isinstance(again.transformer, ecar.ECARTransformer)
    np.testing.assert_array_equal(np.asarray(again.generate_latents(["a red apple"], seed=0)),
                                  np.asarray(pipe.generate_latents(["a red apple"], seed=0)))
    out = tmp_path / "apple.png"
    assert main(["generate", "--model", str(folder), "--prompt", "a red apple", "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (8, 8, 3)
