"""Wan 2.1's transformer against diffusers' WanTransformer3DModel (perturbed tiny configs), and its contracts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jquant.models import wan
from jquant.recipes import Recipe, Rule
from jquant.testing.diffusion_suite import DiffusersSpec, DiffusersSuite

TINY = wan.WanConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, text_dim=32, freq_dim=16,
                     ffn_dim=48, num_layers=2, rope_max_seq_len=32)
CASES = {
    # Wan 2.1 T2V's layout, tiny: patch (1, 2, 2), cross-attention LayerNorm with affine
    "t2v": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=32),
    # a temporal patch, no cross-attention norm, 3 heads of 12 (RoPE split 4/4/4), more output channels
    "patch-t2-no-cross-norm": dict(patch_size=(2, 2, 2), num_attention_heads=3, attention_head_dim=12, in_channels=4,
                                   out_channels=6, text_dim=20, freq_dim=8, ffn_dim=40, num_layers=1,
                                   cross_attn_norm=False, rope_max_seq_len=16),
}


def build_reference(case: str, folder, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**CASES[case]).eval()
    with torch.no_grad():
        for p in model.parameters():  # norm weights start at 1, biases at 0
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def _frames(cfg: wan.WanConfig) -> int:
    return 3 if cfg.patch_size[0] == 1 else 2 * cfg.patch_size[0]


def make_inputs(cfg: wan.WanConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    b = 2
    return {"latents": rng.standard_normal((b, _frames(cfg), 8, 6, cfg.in_channels)).astype(np.float32),
            "timesteps": rng.uniform(0, 1000, b).astype(np.float32),
            "text": rng.standard_normal((b, 5, cfg.text_dim)).astype(np.float32)}


def reference_forward(ref, inputs: dict, dtype: str) -> np.ndarray:
    tdt = torch.float64 if dtype == "float64" else torch.float32
    model = ref.to(tdt)
    with torch.no_grad():  # [B, F, H, W, C] -> diffusers' [B, C, F, H, W]
        out = model(hidden_states=torch.from_numpy(inputs["latents"].transpose(0, 4, 1, 2, 3)).to(tdt),
                    timestep=torch.from_numpy(inputs["timesteps"]).to(tdt),
                    encoder_hidden_states=torch.from_numpy(inputs["text"]).to(tdt), return_dict=False)[0]
    ref.to(torch.float32)
    return out.numpy().transpose(0, 2, 3, 4, 1)


@nnx.jit
def _jit_forward(model, latents, timesteps, text) -> jax.Array:
    return model(latents, timesteps, text)


def forward(model, inputs: dict):
    return _jit_forward(model, inputs["latents"], inputs["timesteps"], inputs["text"])


def reload_reference(case: str, folder):
    """diffusers' model of the folder's ``config.json`` holding its safetensors (strict: every tensor, no other).
    ``from_pretrained`` itself needs ``accelerate`` for a class with ``_keep_in_fp32_modules``, which the test
    environment does not install."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
    model.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return model.eval()


class TestWanFamily(DiffusersSuite):
    spec = DiffusersSpec(family=wan.FAMILY, tiny_config=TINY, cases=tuple(CASES), build_reference=build_reference,
                         make_inputs=make_inputs, reference_forward=reference_forward, forward=forward,
                         reload_reference=reload_reference, float32_tolerance=1e-5,
                         # diffusers' Wan block and FP32LayerNorm cast to float32 inside a float64 model, and both
                         # sides compute the timestep sinusoid and RoPE tables in float32 (measured ~1e-7)
                         float64_tolerance=1e-6,
                         save_recipes=(Recipe(name="rtn-w4", rules=(Rule(pattern=".*", weight="int4",
                                                                         algorithm="rtn"),)),))


@pytest.mark.parametrize("head_dim, patch, grid, max_len", [
    (16, (1, 2, 2), (3, 4, 3), 32), (12, (2, 2, 2), (5, 2, 7), 8), (22, (1, 1, 1), (16, 1, 2), 16)])
def test_rope_tables_equal_diffusers(head_dim, patch, grid, max_len):
    """``rope_tables`` (through ``jquant.ops.rope``) equals ``WanRotaryPosEmbed``'s cos / sin for the default frame
    positions (up to ``rope_max_seq_len - 1``); given integer ``frame_positions`` pick the same rows of its
    per-axis table."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    cfg = TINY.replace(num_attention_heads=1, attention_head_dim=head_dim, patch_size=patch, rope_max_seq_len=max_len)
    rope = WanRotaryPosEmbed(head_dim, patch, max_len)
    f, h, w = grid
    video = torch.zeros(1, 1, f * patch[0], h * patch[1], w * patch[2])
    ref_cos, ref_sin = (t.numpy()[0, :, 0] for t in rope(video))
    cos, sin = wan.rope_tables(cfg, f, h, w)
    np.testing.assert_allclose(np.asarray(cos), ref_cos, rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), ref_sin, rtol=0, atol=2e-6)
    positions = np.sort(np.random.default_rng(f).choice(max_len, f, replace=False))
    cos, sin = wan.rope_tables(cfg, f, h, w, frame_positions=positions)
    t_dim = cfg.rope_dims[0]
    expected = np.broadcast_to(rope.freqs_cos.numpy()[positions, None, None, :t_dim], (f, h, w, t_dim))
    np.testing.assert_allclose(np.asarray(cos)[:, :t_dim], expected.reshape(-1, t_dim), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(cos)[:, t_dim:], ref_cos[:, t_dim:], rtol=0, atol=2e-6)


@nnx.jit
def _jit_velocity(model, batch: dict, frame_positions=None) -> jax.Array:
    return model.flow_velocity(batch["latents"], batch["sigmas"], batch["text"], frame_positions=frame_positions)


def _velocity(model, batch: dict, frame_positions=None) -> np.ndarray:
    return np.asarray(_jit_velocity(model, batch, frame_positions))


def test_flow_velocity_is_the_pipeline_call_at_the_schedulers_timesteps(tmp_path):
    """The Wan pipeline calls the transformer with its flow-matching scheduler's ``timesteps`` (``1000 σ``) on the
    latents at ``σ``: ``flow_velocity(latents, σ)`` equals that call; default frame positions are ``arange``, and
    other positions change the velocity."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = build_reference("t2v", tmp_path, 0)
    model = wan.from_diffusers(tmp_path)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    inputs = make_inputs(model.config, 2)
    sigmas = scheduler.sigmas.numpy()[[0, 2]].astype(np.float32)
    timesteps = scheduler.timesteps.numpy()[[0, 2]].astype(np.float32)
    expected = reference_forward(ref, {**inputs, "timesteps": timesteps}, "float32")
    batch = {"latents": inputs["latents"], "sigmas": sigmas, "text": inputs["text"]}
    got = _velocity(model, batch)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5
    np.testing.assert_array_equal(_velocity(model, batch, np.arange(3)), got)
    spread = _velocity(model, batch, np.array([0, 2, 4]))
    assert np.abs(spread - got).max() > 1e-3 * np.abs(got).max()


def _calibration(cfg: wan.WanConfig, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((n, 3, 8, 8, cfg.in_channels)).astype(np.float32),
            "sigmas": rng.uniform(0, 1, n).astype(np.float32),
            "text": rng.standard_normal((n, 6, cfg.text_dim)).astype(np.float32)}


def test_gptq_with_timestep_grouped_statistics_and_per_bucket_static_scales(tmp_path):
    """GPTQ (balanced over timestep buckets) beats RTN on held-out velocities; the family's keep_float leaves the
    embedders and proj_out in float; per-bucket static int8 activation scales differ between buckets (self- and
    cross-attention, FFN); both quantized models save and load bit-exactly."""
    from jquant.checkpoint import load, save
    from jquant.quantization import quantize

    model = wan.init_model(TINY, jax.random.key(0))
    calib, held_out = _calibration(TINY, 16, 1), _calibration(TINY, 8, 2)
    reference = _velocity(model, held_out)

    def error(q):
        return float(np.sqrt(np.mean((_velocity(q, held_out) - reference) ** 2) / np.mean(reference ** 2)))

    grouped = Recipe(name="gptq-w4-buckets", rules=(Rule(pattern=".*", weight="int4", algorithm="gptq",
                                                         options=(("group_weighting", "balanced"),)),))
    rtn = Recipe(name="rtn-w4", rules=(Rule(pattern=".*", weight="int4", algorithm="rtn"),))
    gptq_model, rtn_model = quantize(model, grouped, calib, progress=False), quantize(model, rtn, calib, progress=False)
    assert error(gptq_model) < error(rtn_model) < 0.5
    report = gptq_model.quantization
    assert report.site("blocks/1/attn2/to_k") == report.site("blocks/0/ffn/out") != "float"
    for site in ("patch_embedding", "condition_embedder/time_proj", "condition_embedder/text_embedder/linear_1",
                 "proj_out"):
        assert report.site(site) == "float", site
    static = Recipe(name="w8a8-static-buckets", rules=(Rule(pattern=".*", weight="int8", activation="int8-tensor",
                                                            algorithm="rtn", static_activation=True),))
    static_model = quantize(model, static, calib, progress=False)
    assert error(static_model) < 0.1
    block = static_model.blocks[0]
    for site in (block.attn1.to_q, block.attn2.to_k, block.ffn.out):
        scales = np.asarray(site.activation_scale.get_value())
        assert scales.shape == (len(TINY.bucket_edges) + 1,) and len(set(scales.tolist())) > 1
    for name, q in (("gptq", gptq_model), ("static", static_model)):
        save(q, tmp_path / name)
        np.testing.assert_array_equal(_velocity(load(tmp_path / name), held_out), _velocity(q, held_out))


@pytest.mark.parametrize("change, match", [
    (lambda c: {**c, "sigmas": c["sigmas"] + 1.5}, r"timestep buckets"),
    (lambda c: {**c, "text": c["text"][:3]}, r"disagree|leading"),
    (lambda c: {k: v for k, v in c.items() if k != "text"}, r"keys"),
    (lambda c: {**c, "latents": c["latents"][:, :, :7]}, r"multiples of patch_size"),
    (lambda c: {**c, "latents": c["latents"][..., :3]}, r"latents must be \[B, F, H, W, 4\]"),
])
def test_bad_calibration_is_refused_before_any_work(change, match):
    model = wan.init_model(TINY, jax.random.key(0))
    with pytest.raises(ValueError, match=match):
        model.check_calibration(change(_calibration(TINY, 4, 0)))


def test_bad_inputs_name_the_argument():
    model = wan.init_model(TINY, jax.random.key(0))
    b = _calibration(TINY, 2, 0)
    x, s, text = b["latents"], b["sigmas"], b["text"]
    for args, match in (((x[0], s, text), r"latents must be \[B, F, H, W, 4\]"),
                        ((x[:, :, :, :5], s, text), "multiples of patch_size"),
                        ((x, s, text[..., :5]), "text must be"),
                        ((x, s[:1], text), "timesteps must be"),
                        ((np.zeros((2, 3, 66, 2, 4), np.float32), s, text), "rope_max_seq_len")):
        with pytest.raises(ValueError, match=match):
            model.flow_velocity(*args)
    with pytest.raises(ValueError, match=r"frame_positions must be .*\[3\]"):
        model.flow_velocity(x, s, text, frame_positions=np.arange(4))
    wide = wan.init_model(TINY.replace(out_channels=6), jax.random.key(0))
    with pytest.raises(ValueError, match="out_channels=6"):
        wide.flow_velocity(x, s, text)


@pytest.mark.parametrize("config, match", [
    ({"image_dim": 1280, "added_kv_proj_dim": 32}, "image-to-video"),
    ({"use_fused_qkv": True}, "does not handle"),
    ({"qk_norm": "rms_norm"}, "qk_norm"),
    ({"attention_head_dim": 5}, "attention_head_dim"),
    ({"patch_size": [1, 2]}, "patch_size"),
])
def test_bad_diffusers_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        wan.config_from_diffusers({"_class_name": wan.CLASS_NAME, **CASES["t2v"], **config})


def test_preset_builds_with_the_text_encoders_width():
    from jquant.models.registry import preset

    family, cfg = preset("jq-wan-tiny")
    model = family.abstract_model(cfg)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model))
    _, llama = preset("jq-llama-tiny")
    assert family is wan.FAMILY and 5e5 < params < 4e6 and cfg.text_dim == llama.hidden_size


def test_bfloat16_compute_stays_close_to_float32():
    """bf16 compute (float32 parameters; norms, modulation and residual sums in float32, as diffusers keeps them)
    gives the float32 velocity to bf16 precision."""
    batch = _calibration(TINY, 2, 3)
    exact = _velocity(wan.init_model(TINY, jax.random.key(0)), batch)
    low = _velocity(wan.init_model(TINY.replace(dtype="bfloat16"), jax.random.key(0)), batch)
    assert low.dtype == jnp.bfloat16
    error = np.abs(low.astype(np.float64) - exact).max() / np.abs(exact).max()
    assert 0 < error < 3e-2, error
