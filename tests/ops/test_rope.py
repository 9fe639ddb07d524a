"""jquant.ops.rope against transformers' and diffusers' RoPE code on random positions (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

from jquant import ops
from jquant.models import layers

TOL = dict(rtol=1e-5, atol=1e-5)


def _rotate(x, positions, style, **kw):
    cos, sin = ops.rope_cos_sin(ops.rope_angles(jnp.asarray(positions), **kw), style)
    return np.asarray(ops.apply_rope(jnp.asarray(x), cos, sin, style)), np.asarray(cos), np.asarray(sin)


@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_1d_rotate_half_matches_transformers_llama_and_the_model_layers(rope_type):
    rng = np.random.default_rng(0)
    d, theta = 32, 500000.0
    parameters = {"rope_type": rope_type, "rope_theta": theta}
    if rope_type == "llama3":
        parameters.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256)
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=4 * d, num_attention_heads=4, rope_parameters=parameters))
    positions = rng.integers(0, 4096, (2, 9))
    x = rng.standard_normal((2, 9, 3, d)).astype(np.float32)
    cos_t, sin_t = hf(torch.zeros(1), torch.from_numpy(positions))
    want, _ = qwen2_vl.apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos_t, sin_t, unsqueeze_dim=2)
    rope = layers.RopeConfig(theta=theta, kind=rope_type, factor=8.0 if rope_type == "llama3" else 1.0,
                             original_max_position_embeddings=256)
    inv_freq = layers.rope_inverse_frequencies(d, rope)
    got, cos, sin = _rotate(x, positions[..., None], "half", dims=(d,), inv_freq=(inv_freq,))
    np.testing.assert_allclose(cos, cos_t.numpy(), **TOL)
    np.testing.assert_allclose(got, want.numpy(), **TOL)
    cos_l, sin_l = layers.rope_cos_sin(jnp.asarray(positions), inv_freq, jnp.float32)
    np.testing.assert_array_equal(np.asarray(layers.apply_rope(jnp.asarray(x), cos_l, sin_l)), got)


def test_qwen2_vl_mrope_matches_transformers():
    rng = np.random.default_rng(1)
    section, d = (4, 6, 6), 32
    cfg = Qwen2VLTextConfig(hidden_size=2 * d, num_attention_heads=2, num_key_value_heads=2,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(section)})
    positions = rng.integers(0, 600, (2, 7, 3))  # [B, T, (temporal, height, width)]
    cos_t, sin_t = qwen2_vl.Qwen2VLRotaryEmbedding(cfg)(torch.zeros(1), torch.from_numpy(positions).permute(2, 0, 1))
    x = rng.standard_normal((2, 7, 2, d)).astype(np.float32)
    want, _ = qwen2_vl.apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos_t, sin_t, unsqueeze_dim=2)
    got, cos, sin = _rotate(x, positions, "half", dims=(d,), sections=section)
    np.testing.assert_allclose(cos, cos_t.numpy(), **TOL)
    np.testing.assert_allclose(sin, sin_t.numpy(), **TOL)
    np.testing.assert_allclose(got, want.numpy(), **TOL)
    text = np.repeat(positions[..., :1], 3, axis=-1)  # text tokens: equal components = 1-D RoPE
    np.testing.assert_allclose(_rotate(x, text, "half", dims=(d,), sections=section)[0],
                               _rotate(x, text[..., :1], "half", dims=(d,))[0], **TOL)


@pytest.mark.parametrize("interleaved", [True, False])
def test_1d_matches_diffusers_rotary_embedding(interleaved):
    rng = np.random.default_rng(2)
    # diffusers rounds theta ** x in torch float32, up to 1 ulp from numpy's float32 power: the angles differ by
    # position x ulp, so positions stay below 128 for 1e-5 (Flux computes its ladders in float64)
    d, positions = 24, rng.integers(0, 128, 11)
    cos_t, sin_t = get_1d_rotary_pos_embed(d, torch.from_numpy(positions), theta=10000.0, use_real=True,
                                           repeat_interleave_real=interleaved)
    x = rng.standard_normal((1, 11, 2, d)).astype(np.float32)  # diffusers: [B, H, S, D] or sequence_dim=1
    want = apply_rotary_emb(torch.from_numpy(x), (cos_t, sin_t), use_real_unbind_dim=-1 if interleaved else -2,
                            sequence_dim=1)
    style = "interleaved" if interleaved else "half"
    got, cos, _ = _rotate(x, positions[None, :, None], style, dims=(d,))
    np.testing.assert_allclose(cos[0], cos_t.numpy(), **TOL)
    np.testing.assert_allclose(got, want.numpy(), **TOL)


def test_flux_ids_match_flux_pos_embed():
    rng = np.random.default_rng(3)
    axes_dim = (8, 28, 28)
    ids = np.concatenate([np.zeros((5, 3), np.int64),  # text ids, then image ids (0, row, column)
                          np.stack([np.zeros(20, np.int64), rng.integers(0, 64, 20), rng.integers(0, 64, 20)], -1)])
    cos_t, sin_t = FluxPosEmbed(theta=10000, axes_dim=list(axes_dim))(torch.from_numpy(ids))
    x = rng.standard_normal((2, 25, 3, 64)).astype(np.float32)
    want = apply_rotary_emb(torch.from_numpy(x), (cos_t, sin_t), use_real_unbind_dim=-1, sequence_dim=1)
    got, cos, sin = _rotate(x, ids, "interleaved", dims=axes_dim, freq_dtype=np.float64)
    np.testing.assert_allclose(cos, cos_t.numpy(), **TOL)
    np.testing.assert_allclose(sin, sin_t.numpy(), **TOL)
    np.testing.assert_allclose(got, want.numpy(), **TOL)


def test_3d_video_rope_matches_hunyuan_video():
    rng = np.random.default_rng(4)
    rope_dim, (frames, height, width) = (8, 12, 12), (3, 4, 5)
    cos_t, sin_t = HunyuanVideoRotaryPosEmbed(1, 1, list(rope_dim), theta=256.0)(torch.zeros(1, 1, frames, height, width))
    grid = np.stack(np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij"), -1)
    positions = grid.reshape(-1, 3)  # tokens in (frame, row, column) order
    x = rng.standard_normal((1, 2, frames * height * width, 32)).astype(np.float32)  # [B, H, S, D]
    want = apply_rotary_emb(torch.from_numpy(x), (cos_t, sin_t), use_real_unbind_dim=-1)
    got, cos, _ = _rotate(np.swapaxes(x, 1, 2), positions, "interleaved", dims=rope_dim, theta=256.0)
    np.testing.assert_allclose(cos, cos_t.numpy(), **TOL)
    np.testing.assert_allclose(np.swapaxes(got, 1, 2), want.numpy(), **TOL)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.rope_angles(jnp.zeros((4, 2)), dims=(8,)), r"dims=\(8,\) gives 1 components but positions has P=2"),
    (lambda: ops.rope_angles(jnp.zeros((4,)), dims=(8,)), r"positions\[..., None\]"),
    (lambda: ops.rope_angles(jnp.zeros((4, 3)), dims=(32,), sections=(4, 6, 4)), r"sum\(sections\) = D / 2"),
    (lambda: ops.rope_angles(jnp.zeros((4, 1)), dims=(8,), inv_freq=(np.ones(3),)), "inv_freq must hold"),
    (lambda: ops.inverse_frequencies(7, 10000.0), "dim=7 must be a positive even int"),
    (lambda: ops.rope_cos_sin(jnp.zeros((4, 4)), "neox"), "style='neox'"),
    (lambda: ops.apply_rope(jnp.zeros((4, 2, 8)), jnp.zeros((4, 6)), jnp.zeros((4, 6)), "half"),
     "x has 8 features but cos/sin have 6"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
