"""CogVideoX's transformer against diffusers' CogVideoXTransformer3DModel (perturbed tiny configs) and its
contracts."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jquant.models import cogvideox
from jquant.testing.diffusion_suite import DiffusersSpec, DiffusersSuite

TINY = cogvideox.CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                 time_embed_dim=24, text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8,
                                 sample_frames=9, patch_size=2, max_text_seq_length=6,
                                 use_rotary_positional_embeddings=True)
_COMMON = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, time_embed_dim=24, text_embed_dim=32,
               max_text_seq_length=6)
CASES = {
    # CogVideoX-2B: the 3-D sin-cos table added to the patch tokens (text exactly max_text_seq_length tokens)
    "2b-sincos": dict(_COMMON, out_channels=4, num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
                      patch_size=2),
    # CogVideoX-5B: 3-D RoPE; a base grid of 4 x 6 patches, so the 4 x 4 latent grid's positions are a resized crop
    "5b-rope": dict(_COMMON, out_channels=6, num_layers=2, sample_width=12, sample_height=8, sample_frames=9,
                    patch_size=2, use_rotary_positional_embeddings=True),
    # CogVideoX 1.5: temporal patches (a linear patch embedding), integer RoPE grid, no conv bias, no qkv bias
    "1.5-patch-t": dict(_COMMON, out_channels=4, num_layers=1, sample_width=8, sample_height=8, sample_frames=13,
                        patch_size=2, patch_size_t=2, patch_bias=False, attention_bias=False,
                        use_rotary_positional_embeddings=True),
}


def build_reference(case: str, folder, seed: int):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**CASES[case]).eval()
    with torch.no_grad():
        for p in model.parameters():  # norm weights start at 1, biases at 0
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def make_inputs(cfg: cogvideox.CogVideoXConfig, seed: int) -> dict:
    """Latents of 3 frames x 8 x 8 (4 frames with temporal patches of 2); a shorter text than the maximum with RoPE."""
    rng = np.random.default_rng(seed)
    b, frames = 2, 2 * cfg.patch_size_t if cfg.patch_size_t else 3
    text_len = cfg.max_text_seq_length - (1 if cfg.use_rotary_positional_embeddings else 0)
    return {"latents": rng.standard_normal((b, frames, 8, 8, cfg.in_channels)).astype(np.float32),
            "timesteps": rng.integers(0, 1000, b).astype(np.float32),
            "text": rng.standard_normal((b, text_len, cfg.text_embed_dim)).astype(np.float32)}


def reference_rope(ref, latent_shape: tuple[int, ...]):
    """The RoPE tables as ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` builds them."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = ref.config
    if not cfg.use_rotary_positional_embeddings:
        return None
    p, p_t = cfg.patch_size, cfg.patch_size_t
    frames, grid_h, grid_w = latent_shape[1], latent_shape[2] // p, latent_shape[3] // p
    base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops,
                                       grid_size=(grid_h, grid_w), temporal_size=frames)
    return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
                                   temporal_size=(frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_h, base_w))


def reference_forward(ref, inputs: dict, dtype: str) -> np.ndarray:
    tdt = torch.float64 if dtype == "float64" else torch.float32
    model = ref.to(tdt)
    rope = reference_rope(ref, inputs["latents"].shape)
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(inputs["latents"].transpose(0, 1, 4, 2, 3)).to(tdt),
                    encoder_hidden_states=torch.from_numpy(inputs["text"]).to(tdt),
                    timestep=torch.from_numpy(inputs["timesteps"]).to(tdt),
                    image_rotary_emb=rope, return_dict=False)[0]
    ref.to(torch.float32)
    return out.numpy().transpose(0, 1, 3, 4, 2)


@nnx.jit
def _jit_forward(model, latents, timesteps, text):
    return model(latents, timesteps, text)


def forward(model, inputs: dict):
    """jquant's forward, jitted (one compilation beats running the first call op by op)."""
    return _jit_forward(model, inputs["latents"], inputs["timesteps"], inputs["text"])


def reload_reference(case: str, folder):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(folder).eval()


def _recipes():
    from jquant.recipes import Recipe, Rule

    return (Recipe(name="rtn-w8", rules=(Rule(pattern=".*", weight="int8", algorithm="rtn"),)),)


class TestCogVideoXFamily(DiffusersSuite):
    spec = DiffusersSpec(family=cogvideox.FAMILY, tiny_config=TINY, cases=tuple(CASES),
                         build_reference=build_reference, make_inputs=make_inputs,
                         reference_forward=reference_forward, forward=forward, reload_reference=reload_reference,
                         float32_tolerance=1e-5,
                         # float64 is bounded by the float32 timestep sinusoid and RoPE tables both sides compute
                         float64_tolerance=1e-5, save_recipes=_recipes())


def test_float64_parity_is_exact_but_for_the_float32_timestep_sinusoid(tmp_path, monkeypatch):
    """2B style (no RoPE, whose float32 tables diffusers also applies in float32): with the sinusoid taken from
    diffusers' own ``time_proj``, the float64 forward matches to 1e-10, sin-cos position table included."""
    jax.config.update("jax_enable_x64", True)
    try:
        ref = build_reference("2b-sincos", tmp_path, 0).double()
        model = cogvideox.from_diffusers(tmp_path, dtype="float64")
        inputs = make_inputs(model.config, 3)
        with torch.no_grad():
            proj = ref.time_proj(torch.from_numpy(inputs["timesteps"]).double()).numpy()
        monkeypatch.setattr(cogvideox, "timestep_sinusoid", lambda t, dim: jax.numpy.asarray(proj))
        got = np.asarray(model(inputs["latents"], inputs["timesteps"], inputs["text"]))
        expected = reference_forward(ref, inputs, "float64")
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-10
    finally:
        jax.config.update("jax_enable_x64", False)


def test_attention_hook_sees_the_joint_layout():
    """``attention(layer, q, k, v)`` replaces each block's attention on ``[text; video]`` as ``joint_layout`` says:
    full attention through the hook reproduces the forward, and a hook changing the video rows changes it."""
    from jquant import ops
    from jquant.ops.mask import Full

    model = cogvideox.init_model(TINY, jax.random.key(2))
    batch = _calibration(TINY, 2, 4)
    n_video, n_text, text_start = model.joint_layout(batch["latents"].shape, batch["text"].shape[1])
    layers = []

    def full(layer, q, k, v):
        assert q.shape[1] == n_video + n_text and text_start == 0
        layers.append(layer)
        return ops.attention(q, k, v, Full())

    def drop_video(layer, q, k, v):
        return full(layer, q, k, v).at[:, n_text:].set(0.0)

    plain = np.asarray(model(batch["latents"], batch["timesteps"], batch["text"]))
    hooked = np.asarray(model(batch["latents"], batch["timesteps"], batch["text"], attention=full))
    np.testing.assert_array_equal(hooked, plain)
    assert layers == list(range(model.joint_attention_layers()))
    assert not np.allclose(np.asarray(model(batch["latents"], batch["timesteps"], batch["text"],
                                            attention=drop_video)), plain)


def _calibration(cfg: cogvideox.CogVideoXConfig, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((n, 3, 8, 8, cfg.in_channels)).astype(np.float32),
            "timesteps": rng.uniform(0, 999, n).astype(np.float32),
            "text": rng.standard_normal((n, 5, cfg.text_embed_dim)).astype(np.float32)}


def _output(model, batch: dict) -> np.ndarray:
    return np.asarray(forward(model, batch))


def test_gptq_with_timestep_grouped_statistics_and_per_bucket_static_scales(tmp_path):
    """GPTQ (balanced over timestep buckets) beats RTN on held-out inputs; per-bucket static int8 activation scales
    differ between buckets and stay close to float; both save and load bit-exactly."""
    from jquant.checkpoint import load, save
    from jquant.quantization import quantize
    from jquant.recipes import Recipe, Rule

    model = cogvideox.init_model(TINY, jax.random.key(0))
    calib, held_out = _calibration(TINY, 16, 1), _calibration(TINY, 8, 2)
    reference = _output(model, held_out)

    def error(q):
        return float(np.sqrt(np.mean((_output(q, held_out) - reference) ** 2) / np.mean(reference ** 2)))

    grouped = Recipe(name="gptq-w4-buckets", rules=(Rule(pattern=".*", weight="int4", algorithm="gptq",
                                                         options=(("group_weighting", "balanced"),)),))
    rtn = Recipe(name="rtn-w4", rules=(Rule(pattern=".*", weight="int4", algorithm="rtn"),))
    gptq_model, rtn_model = quantize(model, grouped, calib, progress=False), quantize(model, rtn, calib, progress=False)
    assert error(gptq_model) < error(rtn_model) < 0.5
    static = Recipe(name="w8a8-static-buckets", rules=(Rule(pattern=".*", weight="int8", activation="int8-tensor",
                                                            algorithm="rtn", static_activation=True),))
    static_model = quantize(model, static, calib, progress=False)
    assert error(static_model) < 0.1
    scales = np.asarray(static_model.transformer_blocks[0].attn1.to_q.activation_scale.get_value())
    assert scales.shape == (len(TINY.bucket_edges) + 1,) and len(set(scales.tolist())) > 1
    for name, q in (("gptq", gptq_model), ("static", static_model)):
        save(q, tmp_path / name)
        np.testing.assert_array_equal(_output(load(tmp_path / name), held_out), _output(q, held_out))


def test_blocks_taken_apart_equal_the_forward():
    """``embed`` -> each block -> ``head`` is ``__call__`` (what a per-block delta cache builds on), and moving the
    token frames' positions (a frame-merging sampler's RoPE) changes the output."""
    model = cogvideox.init_model(TINY, jax.random.key(1))
    batch = _calibration(TINY, 2, 3)
    x, c, context = model.embed(batch["latents"], batch["timesteps"], batch["text"])
    for block in model.blocks():
        x, c = block(x, c, *context)
    np.testing.assert_array_equal(np.asarray(model.head(x, context[0], batch["latents"].shape)),
                                  np.asarray(model(batch["latents"], batch["timesteps"], batch["text"])))
    moved = model.embed(batch["latents"], batch["timesteps"], batch["text"], frame_positions=np.array([0., 2., 4.]))
    assert not np.allclose(np.asarray(moved[2][2][0]), np.asarray(context[2][0]))


def test_flow_velocity_is_the_forward_at_1000_sigma_and_routes_reach_each_linear():
    """``flow_velocity(latents, σ, text)`` is ``model(latents, 1000 σ, text)``; the pipelines' calibration contract
    (``sigmas``) becomes timesteps; a block's ``route`` is asked once per routed linear with that linear's input."""
    model = cogvideox.init_model(TINY, jax.random.key(1))
    batch = _calibration(TINY, 2, 3)
    sigmas = batch["timesteps"] / 1000.0
    np.testing.assert_allclose(np.asarray(model.flow_velocity(batch["latents"], sigmas, batch["text"])),
                               np.asarray(model(batch["latents"], 1000.0 * np.float32(sigmas), batch["text"])),
                               rtol=1e-6, atol=1e-6)
    flow = model.check_calibration({"latents": batch["latents"], "sigmas": sigmas, "text": batch["text"]})
    np.testing.assert_allclose(flow["timesteps"], batch["timesteps"], rtol=1e-6)
    seen = {}
    hidden, context = model.flow_embed(batch["latents"], sigmas, batch["text"])
    block = model.blocks()[0]
    plain = block(*hidden, *context)

    def route(name, x):  # records each linear's input shape, keeps the timestep bucket
        seen[name] = x.shape
        return context[1][:, None]

    routed = block(*hidden, *context, route=route)
    assert tuple(seen) == block.ROUTED_LINEARS
    assert seen["ff/out"][-1] == 4 * TINY.inner_dim and seen["attn1/to_q"][-1] == TINY.inner_dim
    for a, b in zip(plain, routed):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("change, match", [
    (lambda c: {**c, "timesteps": c["timesteps"] + 1500}, r"timestep buckets"),
    (lambda c: {**c, "text": c["text"][:3]}, r"disagree|leading"),
    (lambda c: {k: v for k, v in c.items() if k != "text"}, r"keys"),
    (lambda c: {**c, "latents": c["latents"][:, :, :7]}, r"multiples of patch_size"),
])
def test_bad_calibration_is_refused_before_any_work(change, match):
    model = cogvideox.init_model(TINY, jax.random.key(0))
    with pytest.raises(ValueError, match=match):
        model.check_calibration(change(_calibration(TINY, 4, 0)))


def test_bad_inputs_name_the_argument():
    model = cogvideox.init_model(TINY, jax.random.key(0))
    b = _calibration(TINY, 2, 0)
    with pytest.raises(ValueError, match="latents must be"):
        model(b["latents"][:, 0], b["timesteps"], b["text"])
    with pytest.raises(ValueError, match="latents must be"):
        model(b["latents"][..., :3], b["timesteps"], b["text"])
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model(b["latents"][:, :, :7], b["timesteps"], b["text"])
    with pytest.raises(ValueError, match="text must be"):
        model(b["latents"], b["timesteps"], b["text"][..., :5])
    with pytest.raises(ValueError, match="timesteps must be"):
        model(b["latents"], b["timesteps"][:1], b["text"])
    with pytest.raises(ValueError, match="frame_positions"):
        model.embed(b["latents"], b["timesteps"], b["text"], frame_positions=np.arange(2.0))
    sincos = cogvideox.init_model(TINY.replace(use_rotary_positional_embeddings=False), jax.random.key(0))
    with pytest.raises(ValueError, match="max_text_seq_length"):
        sincos(b["latents"], b["timesteps"], b["text"])
    t5 = cogvideox.init_model(TINY.replace(patch_size_t=2), jax.random.key(0))
    with pytest.raises(ValueError, match="patch_size_t=2"):
        t5(b["latents"], b["timesteps"], b["text"])
    with pytest.raises(ValueError, match="ofs_embed_dim"):
        cogvideox.config_from_diffusers({"_class_name": cogvideox.CLASS_NAME, "ofs_embed_dim": 512})
    with pytest.raises(ValueError, match="use_learned_positional_embeddings"):
        cogvideox.config_from_diffusers({"_class_name": cogvideox.CLASS_NAME,
                                         "use_learned_positional_embeddings": True})
    with pytest.raises(ValueError, match="does not handle"):
        cogvideox.config_from_diffusers({"_class_name": cogvideox.CLASS_NAME, "use_fancy_thing": True})
    with pytest.raises(ValueError, match="patch_size_t"):
        cogvideox.CogVideoXConfig(patch_size_t=2)
