"""The SD3-style MMDiT against diffusers' SD3Transformer2DModel (perturbed tiny configs), and its contracts."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from jquant.models import sd3
from jquant.testing.diffusion_suite import DiffusersSpec, DiffusersSuite

TINY = sd3.SD3Config(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                     num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                     pooled_projection_dim=10, pos_embed_max_size=6)
CASES = {
    # SD3 medium's layout, tiny; the last block is context_pre_only
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
                pos_embed_max_size=6),
    # SD3.5's RMS qk-norm, non-square crop of a larger position grid, more output channels
    "sd35-qk-norm": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=6, num_layers=3,
                         attention_head_dim=8, num_attention_heads=3, joint_attention_dim=12,
                         caption_projection_dim=24, pooled_projection_dim=10, pos_embed_max_size=8,
                         qk_norm="rms_norm"),
}


def build_reference(case: str, folder, seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**CASES[case]).eval()
    with torch.no_grad():
        for p in model.parameters():  # norm weights start at 1, biases and adaLN-Zero modulations at 0
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def make_inputs(cfg: sd3.SD3Config, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    b = 2
    return {"latents": rng.standard_normal((b, 8, 6 if cfg.pos_embed_max_size > 6 else 8, cfg.in_channels)
                                          ).astype(np.float32),
            "timesteps": rng.uniform(0, 1000, b).astype(np.float32),
            "text": rng.standard_normal((b, 5, cfg.joint_attention_dim)).astype(np.float32),
            "pooled": rng.standard_normal((b, cfg.pooled_projection_dim)).astype(np.float32)}


def reference_forward(ref, inputs: dict, dtype: str) -> np.ndarray:
    tdt = torch.float64 if dtype == "float64" else torch.float32
    model = ref.to(tdt)
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(inputs["latents"].transpose(0, 3, 1, 2)).to(tdt),
                    encoder_hidden_states=torch.from_numpy(inputs["text"]).to(tdt),
                    pooled_projections=torch.from_numpy(inputs["pooled"]).to(tdt),
                    timestep=torch.from_numpy(inputs["timesteps"]).to(tdt), return_dict=False)[0]
    ref.to(torch.float32)
    return out.numpy().transpose(0, 2, 3, 1)


def forward(model, inputs: dict):
    return model(inputs["latents"], inputs["timesteps"], inputs["text"], inputs["pooled"])


def reload_reference(case: str, folder):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(folder).eval()


def test_float64_parity_is_exact_but_for_the_float32_timestep_sinusoid(tmp_path, monkeypatch):
    """With the sinusoid taken from diffusers' own ``time_proj``, the float64 forward matches to 1e-10: every other
    part of the model computes in the model's dtype."""
    jax.config.update("jax_enable_x64", True)
    try:
        ref = build_reference("sd3", tmp_path, 0).double()
        model = sd3.from_diffusers(tmp_path, dtype="float64")
        inputs = make_inputs(model.config, 3)
        with torch.no_grad():
            proj = ref.time_text_embed.time_proj(torch.from_numpy(inputs["timesteps"]).double()).numpy()
        monkeypatch.setattr(sd3, "timestep_sinusoid", lambda t: jax.numpy.asarray(proj))
        got = np.asarray(forward(model, inputs))
        expected = reference_forward(ref, inputs, "float64")
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-10
    finally:
        jax.config.update("jax_enable_x64", False)


class TestSD3Family(DiffusersSuite):
    spec = DiffusersSpec(family=sd3.FAMILY, tiny_config=TINY, cases=tuple(CASES), build_reference=build_reference,
                         make_inputs=make_inputs, reference_forward=reference_forward, forward=forward,
                         reload_reference=reload_reference, float32_tolerance=1e-4,
                         # both dtypes are bounded by the float32 timestep sinusoid: at angles up to 10^3 rad one ulp
                         # of XLA's vs torch's float32 exp moves a phase by ~6e-5; the exact float64 test above checks
                         # the rest
                         float64_tolerance=1e-4)


def _calibration(cfg: sd3.SD3Config, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((n, cfg.sample_size, cfg.sample_size, cfg.in_channels)).astype(np.float32),
            "sigmas": rng.uniform(0, 1, n).astype(np.float32),
            "text": rng.standard_normal((n, 5, cfg.joint_attention_dim)).astype(np.float32),
            "pooled": rng.standard_normal((n, cfg.pooled_projection_dim)).astype(np.float32)}


def _velocity(model, batch: dict) -> np.ndarray:
    return np.asarray(model.flow_velocity(batch["latents"], batch["sigmas"], batch["text"], batch["pooled"]))


def test_gptq_with_timestep_grouped_statistics_and_per_bucket_static_scales(tmp_path):
    """GPTQ (balanced over timestep buckets) beats RTN on held-out trajectories' velocities; per-bucket static int8
    activation scales differ between buckets; both save and load bit-exactly."""
    from jquant.checkpoint import load, save
    from jquant.quantization import quantize
    from jquant.recipes import Recipe, Rule

    model = sd3.init_model(TINY, jax.random.key(0))
    calib, held_out = _calibration(TINY, 32, 1), _calibration(TINY, 16, 2)
    reference = _velocity(model, held_out)

    def error(q):
        return float(np.sqrt(np.mean((_velocity(q, held_out) - reference) ** 2) / np.mean(reference ** 2)))

    grouped = Recipe(name="gptq-w4-buckets", rules=(Rule(pattern=".*", weight="int4", algorithm="gptq",
                                                         options=(("group_weighting", "balanced"),)),))
    rtn = Recipe(name="rtn-w4", rules=(Rule(pattern=".*", weight="int4", algorithm="rtn"),))
    gptq_model, rtn_model = quantize(model, grouped, calib, progress=False), quantize(model, rtn, calib, progress=False)
    assert error(gptq_model) < error(rtn_model) < 0.5
    static = Recipe(name="w8a8-static-buckets", rules=(Rule(pattern=".*", weight="int8", activation="int8-tensor",
                                                            algorithm="rtn", static_activation=True),))
    static_model = quantize(model, static, calib, progress=False)
    assert error(static_model) < 0.1
    scales = np.asarray(static_model.transformer_blocks[0].to_q.activation_scale.get_value())
    assert scales.shape == (len(TINY.bucket_edges) + 1,) and len(set(scales.tolist())) > 1
    for name, q in (("gptq", gptq_model), ("static", static_model)):
        save(q, tmp_path / name)
        np.testing.assert_array_equal(_velocity(load(tmp_path / name), held_out), _velocity(q, held_out))


@pytest.mark.parametrize("change, match", [
    (lambda c: {**c, "sigmas": c["sigmas"] + 1.5}, r"timestep buckets"),
    (lambda c: {**c, "text": c["text"][:3]}, r"disagree|leading"),
    (lambda c: {k: v for k, v in c.items() if k != "pooled"}, r"keys"),
    (lambda c: {**c, "latents": c["latents"][:, :7]}, r"multiples of patch_size"),
])
def test_bad_calibration_is_refused_before_any_work(change, match):
    model = sd3.init_model(TINY, jax.random.key(0))
    with pytest.raises(ValueError, match=match):
        model.check_calibration(change(_calibration(TINY, 4, 0)))


def test_bad_inputs_name_the_argument():
    model = sd3.init_model(TINY, jax.random.key(0))
    batch = _calibration(TINY, 2, 0)
    with pytest.raises(ValueError, match="text must be"):
        model.flow_velocity(batch["latents"], batch["sigmas"], batch["text"][..., :5], batch["pooled"])
    with pytest.raises(ValueError, match="dual_attention_layers"):
        sd3.config_from_diffusers({"_class_name": sd3.CLASS_NAME, "dual_attention_layers": [0]})
    with pytest.raises(ValueError, match="does not handle"):
        sd3.config_from_diffusers({"_class_name": sd3.CLASS_NAME, "use_pos_embed": False})
