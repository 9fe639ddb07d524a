"""The Flux transformer against diffusers' FluxTransformer2DModel (perturbed tiny configs), and its contracts."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jquant.models import flux
from jquant.testing.diffusion_suite import DiffusersSpec, DiffusersSuite
from jquant.testing.hf_reference import relative_error

TINY = flux.FluxConfig(in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                       joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
CASES = {
    # FLUX.1-schnell's layout, tiny: no guidance embedding
    "schnell": dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
                    num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=False,
                    axes_dims_rope=(2, 2, 4)),
    # FLUX.1-dev's: guidance embedding; three heads, more output channels than input, uneven rope axes
    "dev": dict(patch_size=1, in_channels=8, out_channels=12, num_layers=1, num_single_layers=3, attention_head_dim=12,
                num_attention_heads=3, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
                axes_dims_rope=(4, 2, 6)),
}


def build_reference(case: str, folder, seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**CASES[case]).eval()
    with torch.no_grad():
        for p in model.parameters():  # qk-norm weights start at 1, biases at 0
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def make_inputs(cfg: flux.FluxConfig, seed: int, *, guidance: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Channels-last latents of a non-square 8x6 grid, σ in [0, 1], text, pooled text, and guidance (a
    guidance-embedding model only). Guidance is scaled by 1000 like σ: the default range keeps both sinusoid
    angles within 1000 rad, where the float32 sinusoid both sides compute agrees to ~1e-6 relative."""
    rng = np.random.default_rng(seed)
    b = 2
    inputs = {"latents": rng.standard_normal((b, 8, 6, cfg.in_channels // 4)).astype(np.float32),
              "sigmas": rng.uniform(0, 1, b).astype(np.float32),
              "text": rng.standard_normal((b, 5, cfg.joint_attention_dim)).astype(np.float32),
              "pooled": rng.standard_normal((b, cfg.pooled_projection_dim)).astype(np.float32)}
    if cfg.guidance_embeds:
        inputs["guidance"] = rng.uniform(*guidance, b).astype(np.float32)
    return inputs


def reference_forward(ref, inputs: dict, dtype: str) -> np.ndarray:
    """diffusers' transformer on the Flux pipeline's packing and ids; output unpacked to ``[B, H, W, C_out]``."""
    from diffusers import FluxPipeline

    tdt = torch.float64 if dtype == "float64" else torch.float32
    latents = torch.from_numpy(inputs["latents"].transpose(0, 3, 1, 2).copy())
    b, c, h, w = latents.shape
    model = ref.to(tdt)
    with torch.no_grad():
        out = model(hidden_states=FluxPipeline._pack_latents(latents, b, c, h, w).to(tdt),
                    encoder_hidden_states=torch.from_numpy(inputs["text"]).to(tdt),
                    pooled_projections=torch.from_numpy(inputs["pooled"]).to(tdt),
                    timestep=torch.from_numpy(inputs["sigmas"]).to(tdt),
                    img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
                    txt_ids=torch.zeros(inputs["text"].shape[1], 3),
                    guidance=torch.from_numpy(inputs["guidance"]).to(tdt) if "guidance" in inputs else None,
                    return_dict=False)[0]
    ref.to(torch.float32)
    # the pipeline's _unpack_latents takes pixel sizes (vae_scale_factor 8); the channel count follows the output
    return FluxPipeline._unpack_latents(out, 8 * h, 8 * w, 8).numpy().transpose(0, 2, 3, 1)


def _forward(model, inputs: dict):
    """Tokens through ``__call__`` with the module's own packing and ids, unpacked (``out_channels`` may differ from
    ``in_channels``, which ``flow_velocity`` refuses)."""
    latents = inputs["latents"]
    _, h, w, _ = latents.shape
    out = model(flux.pack_latents(latents), flux.image_ids(h // 2, w // 2), flux.text_ids(inputs["text"].shape[1]),
                inputs["sigmas"], inputs["text"], inputs["pooled"], inputs.get("guidance"))
    return flux.unpack_latents(out, h, w)


forward = nnx.jit(_forward)  # one compile per model structure and dtype


def reload_reference(case: str, folder):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(folder).eval()


class TestFluxFamily(DiffusersSuite):
    spec = DiffusersSpec(family=flux.FAMILY, tiny_config=TINY, cases=tuple(CASES), build_reference=build_reference,
                         make_inputs=make_inputs, reference_forward=reference_forward, forward=forward,
                         reload_reference=reload_reference, float32_tolerance=1e-4,
                         # both dtypes are bounded by the float32 timestep sinusoid: at angles up to 10^3 rad one ulp
                         # of XLA's vs torch's float32 exp moves a phase by ~6e-5; the ladder test below checks the
                         # rest tightly
                         float64_tolerance=1e-4)


def _diffusers_ladder_sinusoid(t: jax.Array) -> jax.Array:
    """``sd3.timestep_sinusoid`` with the frequency ladder diffusers' ``Timesteps`` computes (torch's float32 ``exp``,
    which differs from XLA's in the last ulp of a few frequencies; at angles of 10³ rad that ulp dominates)."""
    half = 128  # diffusers' get_timestep_embedding: exp(-ln(10⁴) i / half) in float32 torch
    ladder = torch.exp(-math.log(10000.0) * torch.arange(0, half, dtype=torch.float32) / half).numpy()
    phase = jax.numpy.asarray(t, jax.numpy.float32)[:, None] * ladder[None]
    return jax.numpy.concatenate([jax.numpy.cos(phase), jax.numpy.sin(phase)], axis=-1)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 5e-6), ("float64", 3e-7)])
def test_realistic_guidance_with_diffusers_frequency_ladder(tmp_path, monkeypatch, dtype, tolerance):
    """Guidance 1-5 (sinusoid angles up to 5000 rad): with diffusers' float32 frequency ladder the model matches in
    float32 to round-off and in float64 to the float32 RoPE tables and rotation diffusers applies in every dtype;
    every other part computes in the model's dtype."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", dtype == "float64")
    try:
        ref = build_reference("dev", tmp_path, 7)
        model = flux.from_diffusers(tmp_path, dtype=dtype)
        inputs = make_inputs(model.config, 3, guidance=(1.0, 5.0))
        monkeypatch.setattr(flux, "timestep_sinusoid", _diffusers_ladder_sinusoid)
        got = np.asarray(nnx.jit(_forward)(model, inputs), np.float64)  # a fresh jit: traced with the patch
        assert relative_error(got, reference_forward(ref, inputs, dtype)) < tolerance
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_packing_and_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 6, 10, 3)).astype(np.float32)
    torch_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    packed = FluxPipeline._pack_latents(torch_latents, 2, 3, 6, 10).numpy()
    np.testing.assert_array_equal(np.asarray(flux.pack_latents(latents)), packed)
    np.testing.assert_array_equal(np.asarray(flux.unpack_latents(packed, 6, 10)), latents)
    np.testing.assert_array_equal(flux.image_ids(3, 5),
                                  FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32).numpy())


def _calibration(cfg: flux.FluxConfig, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    calib = {"latents": rng.standard_normal((n, 8, 8, cfg.in_channels // 4)).astype(np.float32),
             "sigmas": rng.uniform(0, 1, n).astype(np.float32),
             "text": rng.standard_normal((n, 5, cfg.joint_attention_dim)).astype(np.float32),
             "pooled": rng.standard_normal((n, cfg.pooled_projection_dim)).astype(np.float32)}
    return calib | ({"guidance": rng.uniform(1, 5, n).astype(np.float32)} if cfg.guidance_embeds else {})


@nnx.jit
def _jit_velocity(model, batch: dict) -> jax.Array:
    return model.flow_velocity(batch["latents"], batch["sigmas"], batch["text"], batch["pooled"], batch.get("guidance"))


def _velocity(model, batch: dict) -> np.ndarray:
    return np.asarray(_jit_velocity(model, batch))


def test_gptq_with_timestep_grouped_statistics_and_per_bucket_static_scales(tmp_path):
    """Two calibration stages (double- then single-stream blocks): GPTQ balanced over timestep buckets beats RTN on
    held-out velocities; per-bucket static int8 activation scales differ between buckets, in both kinds of block;
    both quantized models save and load bit-exactly."""
    from jquant.checkpoint import load, save
    from jquant.quantization import quantize
    from jquant.recipes import Recipe, Rule

    model = flux.init_model(TINY, jax.random.key(0))
    calib, held_out = _calibration(TINY, 32, 1), _calibration(TINY, 16, 2)
    reference = _velocity(model, held_out)

    def error(q):
        return float(np.sqrt(np.mean((_velocity(q, held_out) - reference) ** 2) / np.mean(reference ** 2)))

    grouped = Recipe(name="gptq-w4-buckets", rules=(Rule(pattern=".*", weight="int4", algorithm="gptq",
                                                         options=(("group_weighting", "balanced"),)),))
    rtn = Recipe(name="rtn-w4", rules=(Rule(pattern=".*", weight="int4", algorithm="rtn"),))
    gptq_model, rtn_model = quantize(model, grouped, calib, progress=False), quantize(model, rtn, calib, progress=False)
    assert error(gptq_model) < error(rtn_model) < 0.5
    report = gptq_model.quantization
    assert report.site("single_transformer_blocks/1/proj_out") == report.site("transformer_blocks/0/to_q") != "float"
    assert report.site("x_embedder") == "float"  # the family's keep_float
    static = Recipe(name="w8a8-static-buckets", rules=(Rule(pattern=".*", weight="int8", activation="int8-tensor",
                                                            algorithm="rtn", static_activation=True),))
    static_model = quantize(model, static, calib, progress=False)
    assert error(static_model) < 0.1
    for site in (static_model.transformer_blocks[0].to_q, static_model.single_transformer_blocks[1].proj_out):
        scales = np.asarray(site.activation_scale.get_value())
        assert scales.shape == (len(TINY.bucket_edges) + 1,) and len(set(scales.tolist())) > 1
    for name, q in (("gptq", gptq_model), ("static", static_model)):
        save(q, tmp_path / name)
        np.testing.assert_array_equal(_velocity(load(tmp_path / name), held_out), _velocity(q, held_out))


@pytest.mark.parametrize("change, match", [
    (lambda c: {**c, "sigmas": c["sigmas"] + 1.5}, r"timestep buckets"),
    (lambda c: {**c, "text": c["text"][:3]}, r"disagree|leading"),
    (lambda c: {k: v for k, v in c.items() if k != "pooled"}, r"keys"),
    (lambda c: {**c, "latents": c["latents"][:, :7]}, r"even H and W"),
    (lambda c: {**c, "guidance": c["guidance"][:, None]}, r"guidance \[4\]"),
])
def test_bad_calibration_is_refused_before_any_work(change, match):
    model = flux.init_model(TINY, jax.random.key(0))
    with pytest.raises(ValueError, match=match):
        model.check_calibration(change(_calibration(TINY, 4, 0)))


def test_calibration_guidance_only_for_a_guidance_model():
    model = flux.init_model(TINY.replace(guidance_embeds=False), jax.random.key(0))
    calib = _calibration(TINY, 4, 0)
    with pytest.raises(ValueError, match="no 'guidance'"):
        model.check_calibration(calib)
    assert set(model.check_calibration({k: v for k, v in calib.items() if k != "guidance"})) == {
        "latents", "sigmas", "text", "pooled"}


def test_bad_inputs_name_the_argument():
    model = flux.init_model(TINY, jax.random.key(0))
    batch = _calibration(TINY, 2, 0)
    with pytest.raises(ValueError, match="text must be"):
        model.flow_velocity(batch["latents"], batch["sigmas"], batch["text"][..., :5], batch["pooled"])
    with pytest.raises(ValueError, match="even H and W"):
        model.flow_velocity(batch["latents"][:, :7], batch["sigmas"], batch["text"], batch["pooled"])
    tokens, img, txt = flux.pack_latents(batch["latents"]), flux.image_ids(4, 4), flux.text_ids(5)
    with pytest.raises(ValueError, match="pass guidance"):
        model(tokens, img, txt, batch["sigmas"], batch["text"], batch["pooled"])
    with pytest.raises(ValueError, match="img_ids must be"):
        model(tokens, img[None], txt, batch["sigmas"], batch["text"], batch["pooled"], batch["guidance"])
    plain = flux.init_model(TINY.replace(guidance_embeds=False), jax.random.key(0))
    with pytest.raises(ValueError, match="no guidance embedding"):
        plain.flow_velocity(batch["latents"], batch["sigmas"], batch["text"], batch["pooled"], 3.5)


@pytest.mark.parametrize("config, match", [
    ({"patch_size": 2}, "patch_size"),
    ({"axes_dims_rope": [2, 2, 2]}, "axes_dims_rope"),
    ({"use_fused_qkv": True}, "does not handle"),
])
def test_bad_diffusers_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        flux.config_from_diffusers({"_class_name": flux.CLASS_NAME, **CASES["schnell"], **config})


def test_preset_builds_with_the_text_encoders_width():
    from jquant.models.registry import preset

    family, cfg = preset("jq-flux-tiny")
    model = family.abstract_model(cfg)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model))
    assert family is flux.FAMILY and 2e6 < params < 4e6
    _, llama = preset("jq-llama-tiny")
    assert cfg.joint_attention_dim == cfg.pooled_projection_dim == llama.hidden_size


def test_text_to_image_pipeline_samples_calibrates_and_saves_with_a_flux_transformer(tmp_path):
    """Flux takes part in ``TextToImage`` through ``flow_velocity``: its trajectory calibration is this family's
    calibration contract, and a pipeline folder (the transformer as a diffusers folder) loads to the same images."""
    from jquant.data import load_tokenizer
    from jquant.models import llama, vae
    from jquant.models.text_encoder import TextEncoder
    from jquant.text_to_image import SamplingDefaults, TextToImage, load_pipeline, save_pipeline

    tokenizer = load_tokenizer()
    lm = llama.init_model(llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=12, intermediate_size=16,
                                            num_layers=1, num_heads=2, num_kv_heads=1), jax.random.key(0))
    vae_cfg = vae.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=2, norm_num_groups=4,
                            sample_size=16, use_quant_conv=False, use_post_quant_conv=False)
    pipe = TextToImage(text_encoder=TextEncoder(lm, tokenizer),
                       transformer=flux.init_model(TINY.replace(pooled_projection_dim=12), jax.random.key(1)),
                       vae=vae.init_model(vae_cfg, jax.random.key(2)),
                       defaults=SamplingDefaults(steps=2, guidance=2.0, max_length=6), text_encoder_name="tiny-lm")
    prompts = ["a red apple", "a blue cat"]
    images = np.asarray(pipe.generate(prompts, seed=0))
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    calib = pipe.transformer.check_calibration(pipe.trajectory_calibration(prompts, seed=0))
    assert calib["sigmas"].shape == (2 * 2 * 2,)  # steps x prompts x (conditional, unconditional)
    save_pipeline(pipe, tmp_path / "pipe")
    np.testing.assert_array_equal(np.asarray(load_pipeline(tmp_path / "pipe").generate(prompts, seed=0)), images)
