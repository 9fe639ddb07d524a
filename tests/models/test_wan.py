"""Wan 2.1's transformer against diffusers' WanTransformer3DModel (perturbed tiny configs), and its contracts."""

from __future__ import annotations

import jax
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


def forward(model, inputs: dict):
    return model(inputs["latents"], inputs["timesteps"], inputs["text"])


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
                         # sides compute the timestep sinusoid and RoPE tables in float32
                         float64_tolerance=1e-5,
                         save_recipes=(Recipe(name="rtn-w4", rules=(Rule(pattern=".*", weight="int4",
                                                                         algorithm="rtn"),)),))
