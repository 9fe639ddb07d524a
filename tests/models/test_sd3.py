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
                         reload_reference=reload_reference, float32_tolerance=1e-5,
                         # float64 is bounded by the float32 timestep sinusoid both sides compute (sd3.timestep_sinusoid)
                         float64_tolerance=1e-5)
