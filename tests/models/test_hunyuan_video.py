"""HunyuanVideo's transformer against diffusers' HunyuanVideoTransformer3DModel (perturbed tiny configs), and its
contracts: RoPE tables and frame positions, padding, flow units, quantization, bad input, the tiny preset."""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jquant.models import hunyuan_video as hv
from jquant.testing.diffusion_suite import DiffusersSpec, DiffusersSuite
from jquant.testing.hf_reference import relative_error

TINY = hv.HunyuanVideoConfig(in_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                             num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                             text_embed_dim=12, pooled_projection_dim=10, rope_axes_dim=(4, 6, 6), guidance_embeds=True)
CASES = {
    # HunyuanVideo-T2V's layout, tiny: guidance embedding, two refiner blocks, 2x2 spatial patches, 1 temporal
    "t2v": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                num_single_layers=1, num_refiner_layers=2, patch_size=2, patch_size_t=1, guidance_embeds=True,
                text_embed_dim=12, pooled_projection_dim=10, rope_axes_dim=(4, 6, 6)),
    # I2V's latent concatenation, no guidance embedding; 2-frame temporal patches, three heads, uneven RoPE axes,
    # a narrower MLP, more double blocks, fewer output channels than input
    "i2v-concat-pt2": dict(in_channels=6, out_channels=3, num_attention_heads=3, attention_head_dim=8, num_layers=2,
                           num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=2,
                           guidance_embeds=False, text_embed_dim=12, pooled_projection_dim=10, rope_axes_dim=(2, 2, 4),
                           image_condition_type="latent_concat"),
}


def build_reference(case: str, folder, seed: int):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**CASES[case]).eval()
    with torch.no_grad():
        for p in model.parameters():  # norm weights start at 1, biases at 0
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def make_inputs(cfg: hv.HunyuanVideoConfig, seed: int, *, batch: int = 2, text_len: int = 6) -> dict:
    """Channels-last latents of a non-square 8x6 grid, σ in [0, 1], text states right-padded to random lengths
    (the first sample full), pooled text and guidance in [0, 1] (a guidance-embedding model only; fed as 1000 g,
    the sinusoid range in which both sides' float32 sinusoids agree to ~1e-6)."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[text_len], rng.integers(1, text_len, batch - 1)])
    inputs = {"latents": rng.standard_normal((batch, 3 * cfg.patch_size_t, 8, 6, cfg.in_channels)).astype(np.float32),
              "sigmas": rng.uniform(0, 1, batch).astype(np.float32),
              "text": rng.standard_normal((batch, text_len, cfg.text_embed_dim)).astype(np.float32),
              "text_mask": (np.arange(text_len)[None] < lengths[:, None]).astype(np.int32),
              "pooled": rng.standard_normal((batch, cfg.pooled_projection_dim)).astype(np.float32)}
    if cfg.guidance_embeds:
        inputs["guidance"] = rng.uniform(0, 1, batch).astype(np.float32)
    return inputs


def reference_forward(ref, inputs: dict, dtype: str) -> np.ndarray:
    """diffusers' transformer as the pipeline calls it (``t = 1000 σ``, guidance ``1000 g``), ``[B, C, F, H, W]``
    in, output back to ``[B, F, H, W, C_out]``."""
    tdt = torch.float64 if dtype == "float64" else torch.float32
    model = ref.to(tdt)

    def tensor(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(tdt)

    with torch.no_grad():
        out = model(hidden_states=tensor(inputs["latents"].transpose(0, 4, 1, 2, 3)),
                    timestep=tensor(np.float32(1000) * inputs["sigmas"]),
                    encoder_hidden_states=tensor(inputs["text"]),
                    encoder_attention_mask=torch.from_numpy(inputs["text_mask"].astype(np.int64)),
                    pooled_projections=tensor(inputs["pooled"]),
                    guidance=tensor(np.float32(1000) * inputs["guidance"]) if "guidance" in inputs else None,
                    return_dict=False)[0]
    ref.to(torch.float32)
    return out.numpy().transpose(0, 2, 3, 4, 1)


def _forward(model, inputs: dict):
    """``__call__`` in diffusers' units (``out_channels`` may differ from ``in_channels``, which ``flow_velocity``
    refuses)."""
    guidance = inputs.get("guidance")
    return model(inputs["latents"], np.float32(1000) * inputs["sigmas"], inputs["text"], inputs["text_mask"],
                 inputs["pooled"], None if guidance is None else np.float32(1000) * guidance)


forward = nnx.jit(_forward)  # one compile per model structure and dtype


def reload_reference(case: str, folder):
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel.from_pretrained(folder).eval()


class TestHunyuanVideoFamily(DiffusersSuite):
    spec = DiffusersSpec(family=hv.FAMILY, tiny_config=TINY, cases=tuple(CASES), build_reference=build_reference,
                         make_inputs=make_inputs, reference_forward=reference_forward, forward=forward,
                         reload_reference=reload_reference, float32_tolerance=1e-4,
                         # both dtypes are bounded by the float32 timestep sinusoid: at angles up to 10^3 rad one ulp
                         # of XLA's vs torch's float32 exp moves a phase by ~6e-5; the ladder test below checks the
                         # rest tightly
                         float64_tolerance=1e-4, save_recipes=("gptq-w8",))  # RTN int8 saves the same QArrays


def _diffusers_ladder_sinusoid(t: jax.Array, dim: int = 256) -> jax.Array:
    """``sd3.timestep_sinusoid`` with the frequency ladder diffusers' ``Timesteps`` computes (torch's float32 ``exp``
    differs from XLA's in the last ulp of a few frequencies; at angles of 10³ rad that ulp dominates parity)."""
    half = dim // 2
    ladder = torch.exp(-math.log(10000.0) * torch.arange(0, half, dtype=torch.float32) / half).numpy()
    phase = jax.numpy.asarray(t, jax.numpy.float32)[:, None] * ladder[None]
    return jax.numpy.concatenate([jax.numpy.cos(phase), jax.numpy.sin(phase)], axis=-1)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 3e-6), ("float64", 3e-7)])
def test_parity_with_diffusers_frequency_ladder(tmp_path, monkeypatch, dtype, tolerance):
    """With diffusers' float32 sinusoid ladder substituted, the rest of the model matches diffusers to float32
    round-off, and in float64 to the float32 RoPE rotation diffusers applies in every dtype."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", dtype == "float64")
    try:
        ref = build_reference("t2v", tmp_path, 7)
        model = hv.from_diffusers(tmp_path, dtype=dtype)
        inputs = make_inputs(model.config, 3)
        monkeypatch.setattr(hv, "timestep_sinusoid", _diffusers_ladder_sinusoid)
        got = np.asarray(nnx.jit(_forward)(model, inputs), np.float64)  # a fresh jit: traced with the patch
        assert relative_error(got, reference_forward(ref, inputs, dtype)) < tolerance
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_default_rope_is_diffusers_and_frame_positions_select_frames():
    """The default tables equal diffusers' ``HunyuanVideoRotaryPosEmbed``; explicit frame positions ``(0, 2, 5)`` on a
    3-frame grid give the rows of those frames in a 6-frame grid (merged frames keep their original positions)."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed

    cfg = TINY.replace(rope_axes_dim=(6, 4, 6), patch_size_t=2)
    model = hv.abstract_model(cfg)
    rope = HunyuanVideoRotaryPosEmbed(cfg.patch_size, cfg.patch_size_t, list(cfg.rope_axes_dim), cfg.rope_theta)
    cos_ref, sin_ref = (t.numpy() for t in rope(torch.zeros(1, cfg.in_channels, 12, 6, 10)))
    cos, sin = model.rope_tables((6, 3, 5))
    np.testing.assert_allclose(np.asarray(cos), cos_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_ref, rtol=0, atol=1e-6)
    explicit = model.rope_tables((6, 3, 5), np.arange(6, dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(explicit[0]), np.asarray(cos))
    cos3, sin3 = model.rope_tables((3, 3, 5), np.array([0.0, 2.0, 5.0], np.float32))
    rows = (np.array([0, 2, 5])[:, None] * 15 + np.arange(15)[None]).ravel()
    np.testing.assert_allclose(np.asarray(cos3), cos_ref[rows], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin3), sin_ref[rows], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
    """``(diffusers module, jquant model)`` of the perturbed "t2v" case (weights large enough that attention and
    RoPE move the output visibly, unlike a fresh N(0, 0.02) initialisation)."""
    folder = tmp_path_factory.mktemp("hunyuan_video_t2v")
    ref = build_reference("t2v", folder, 3)
    return ref, hv.from_diffusers(folder)


def test_frame_positions_reach_the_video_attention(perturbed):
    """Frame positions change the output (RoPE is applied), and the default equals passing ``0, 1, ..``."""
    _, model = perturbed
    b = make_inputs(model.config, 0)
    frames = b["latents"].shape[1]

    @nnx.jit
    def run(model, b, positions):
        return model.flow_velocity(b["latents"], b["sigmas"], b["text"], b["text_mask"], b["pooled"],
                                   guidance=b["guidance"], frame_positions=positions)

    def velocity(positions):
        return np.asarray(run(model, b, positions))

    default = velocity(None)
    np.testing.assert_array_equal(velocity(np.arange(frames, dtype=np.float32)), default)
    assert relative_error(velocity(np.array([0.0, 2.0, 7.0])), default) > 1e-2


def test_dyrope_gives_the_chosen_blocks_global_positions(perturbed):
    """DyRoPE (VGDFR §3.2(g)): no global blocks = the local computation, all blocks = ``frame_positions`` set to the
    global ones, block 1 alone (the single block: double blocks are numbered first) = the blocks run by hand with
    that block's tables at the global positions; the global tables at ``0 .. F - 1`` are the local ones."""
    _, model = perturbed
    b = make_inputs(model.config, 3)
    positions = np.array([0.0, 2.0, 7.0], np.float32)

    @functools.partial(nnx.jit, static_argnames=("global_blocks",))
    def run(model, b, frame_positions=None, global_frame_positions=None, global_blocks=()):
        return model.flow_velocity(b["latents"], b["sigmas"], b["text"], b["text_mask"], b["pooled"],
                                   guidance=b["guidance"], frame_positions=frame_positions,
                                   global_frame_positions=global_frame_positions, global_blocks=global_blocks)

    local = np.asarray(run(model, b))
    glob = np.asarray(run(model, b, frame_positions=positions))
    np.testing.assert_array_equal(np.asarray(run(model, b, global_frame_positions=positions, global_blocks=())), local)
    np.testing.assert_array_equal(np.asarray(run(model, b, global_frame_positions=positions, global_blocks=(0, 1))),
                                  glob)
    mixed = np.asarray(run(model, b, global_frame_positions=positions, global_blocks=(1,)))
    grid = model.grid(b["latents"].shape)
    x, c, context = model.embed(b["latents"], 1000 * b["sigmas"], b["text"], b["text_mask"], b["pooled"],
                                1000 * b["guidance"], sigmas=b["sigmas"])
    cos, sin = model.rope_tables(grid, positions)
    x, c = model.transformer_blocks[0](x, c, *context)
    h = model.single_transformer_blocks[0](np.concatenate([x, c], axis=1), *context[:2], cos, sin, context[4])
    by_hand = np.asarray(model.head(h[:, :x.shape[1]], context[0], grid))
    np.testing.assert_allclose(mixed, by_hand, rtol=1e-5, atol=1e-5)
    assert relative_error(mixed, local) > 1e-3 and relative_error(mixed, glob) > 1e-3
    same = [np.asarray(t) for t in model.rope_tables(grid, np.arange(grid[0], dtype=np.float32))]
    for ours, default in zip(same, model.rope_tables(grid)):
        np.testing.assert_array_equal(ours, np.asarray(default))
    with pytest.raises(ValueError, match="global_frame_positions"):
        model.flow_velocity(b["latents"], b["sigmas"], b["text"], b["text_mask"], b["pooled"],
                            guidance=b["guidance"], global_blocks=(0,))
    with pytest.raises(ValueError, match="global_blocks must be block indices in \\[0, 2\\)"):
        model.flow_velocity(b["latents"], b["sigmas"], b["text"], b["text_mask"], b["pooled"],
                            guidance=b["guidance"], global_frame_positions=positions, global_blocks=(2,))


def test_flow_velocity_feeds_the_pipelines_units(perturbed):
    """``flow_velocity(σ, g)`` is ``__call__(1000 σ, 1000 g)``, the HunyuanVideo pipeline's timestep and guidance;
    the default guidance is the config's."""
    _, model = perturbed
    b = make_inputs(model.config, 1)
    velocity = nnx.jit(lambda m, b, g: m.flow_velocity(b["latents"], b["sigmas"], b["text"], b["text_mask"],
                                                       b["pooled"], guidance=g))
    np.testing.assert_array_equal(np.asarray(velocity(model, b, b["guidance"])), np.asarray(forward(model, b)))
    np.testing.assert_array_equal(np.asarray(velocity(model, b, None)),
                                  np.asarray(velocity(model, b, np.full(2, model.config.guidance, np.float32))))


def test_padded_text_is_invisible_and_the_mask_matters(perturbed):
    """Changing padded text states leaves the video output unchanged (diffusers' too); changing the mask changes it."""
    ref, model = perturbed
    b = make_inputs(model.config, 2)
    assert b["text_mask"][1].sum() < b["text_mask"].shape[1]
    padded = dict(b, text=b["text"].copy())
    padded["text"][1, b["text_mask"][1].sum():] += 3.0
    np.testing.assert_array_equal(np.asarray(forward(model, padded))[1], np.asarray(forward(model, b))[1])
    np.testing.assert_array_equal(reference_forward(ref, padded, "float32")[1], reference_forward(ref, b, "float32")[1])
    full = dict(b, text_mask=np.ones_like(b["text_mask"]))
    assert relative_error(np.asarray(forward(model, full))[1], np.asarray(forward(model, b))[1]) > 1e-3


def _calibration(cfg: hv.HunyuanVideoConfig, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 6, n)
    calib = {"latents": rng.standard_normal((n, 2, 4, 4, cfg.in_channels)).astype(np.float32),
             "sigmas": rng.uniform(0, 1, n).astype(np.float32),
             "text": rng.standard_normal((n, 5, cfg.text_embed_dim)).astype(np.float32),
             "text_mask": (np.arange(5)[None] < lengths[:, None]).astype(np.int32),
             "pooled": rng.standard_normal((n, cfg.pooled_projection_dim)).astype(np.float32)}
    return calib | ({"guidance": rng.uniform(1, 6, n).astype(np.float32)} if cfg.guidance_embeds else {})


@nnx.jit
def _jit_velocity(model, batch: dict) -> jax.Array:
    return model.calibration_call(batch)


def _velocity(model, batch: dict) -> np.ndarray:
    return np.asarray(_jit_velocity(model, batch))


def test_gptq_with_timestep_grouped_statistics_and_per_bucket_static_scales(tmp_path):
    """Two calibration stages (double- then single-stream blocks): GPTQ balanced over timestep buckets beats RTN on
    held-out velocities; per-bucket static int8 activation scales differ between buckets in both kinds of block;
    the embedders and the token refiner stay float; the static model saves and loads bit-exactly."""
    from jquant.checkpoint import load, save
    from jquant.quantization import quantize
    from jquant.recipes import Recipe, Rule

    cfg = TINY
    model = hv.init_model(cfg, jax.random.key(0))
    calib, held_out = _calibration(cfg, 16, 1), _calibration(cfg, 8, 2)
    reference = _velocity(model, held_out)

    def error(q):
        return float(np.sqrt(np.mean((_velocity(q, held_out) - reference) ** 2) / np.mean(reference ** 2)))

    grouped = Recipe(name="gptq-w4-buckets", rules=(Rule(pattern=".*", weight="int4", algorithm="gptq",
                                                         options=(("group_weighting", "balanced"),)),))
    rtn = Recipe(name="rtn-w4", rules=(Rule(pattern=".*", weight="int4", algorithm="rtn"),))
    gptq_model, rtn_model = quantize(model, grouped, calib, progress=False), quantize(model, rtn, calib, progress=False)
    assert error(gptq_model) < error(rtn_model) < 0.5
    report = gptq_model.quantization
    assert report.site("single_transformer_blocks/0/proj_out") == report.site("transformer_blocks/0/to_q") != "float"
    for kept in ("x_embedder", "context_embedder/refiner_blocks/0/to_q", "proj_out", "timestep_embedder/linear_1"):
        assert report.site(kept) == "float", kept
    static = Recipe(name="w8a8-static-buckets", rules=(Rule(pattern=".*", weight="int8", activation="int8-tensor",
                                                            algorithm="rtn", static_activation=True),))
    static_model = quantize(model, static, calib, progress=False)
    assert error(static_model) < 0.1
    for site in (static_model.transformer_blocks[0].to_q, static_model.single_transformer_blocks[0].proj_out):
        scales = np.asarray(site.activation_scale.get_value())
        assert scales.shape == (len(cfg.bucket_edges) + 1,) and len(set(scales.tolist())) > 1
    save(static_model, tmp_path / "static")  # (GPTQ checkpoints: the suite's test_checkpoint_round_trip)
    np.testing.assert_array_equal(_velocity(load(tmp_path / "static"), held_out), _velocity(static_model, held_out))


def test_adaln_smoothing_folds_exactly_in_float64():
    """The declared modulated norms are right: SmoothQuant scales folded into every block's adaLN modulation leave
    the float64 velocity unchanged (to round-off) while changing the consumers' weights."""
    from jquant.transforms.adaln_smoothing import adaln_smoothquant_scales, fold_modulation_scales

    with jax.enable_x64(True):
        cfg = TINY.replace(dtype="float64", param_dtype="float64")
        model = hv.init_model(cfg, jax.random.key(0))
        nnx.update(model, jax.tree.map(lambda p: p * 5.0, nnx.state(model, nnx.Param)))
        calib = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in _calibration(cfg, 4, 1).items()}
        scales = adaln_smoothquant_scales(model, calib, alpha=0.5)
        assert len(scales) == 5 and any(np.ptp(s) > 0.5 for s in scales)
        smoothed = fold_modulation_scales(model, scales)
        held_out = _calibration(cfg, 3, 2)
        reference = np.asarray(_jit_velocity(model, held_out))
        assert relative_error(np.asarray(_jit_velocity(smoothed, held_out)), reference) < 1e-12
        for block in ("transformer_blocks", "single_transformer_blocks"):
            before, after = (getattr(m, block)[0].to_q.kernel.get_value() for m in (model, smoothed))
            assert not np.allclose(np.asarray(before), np.asarray(after)), block


@pytest.mark.parametrize("change, match", [
    (lambda c: {**c, "sigmas": c["sigmas"] + 1.5}, r"timestep buckets"),
    (lambda c: {**c, "text": c["text"][:3]}, r"disagree|leading"),
    (lambda c: {k: v for k, v in c.items() if k != "text_mask"}, r"keys"),
    (lambda c: {**c, "text_mask": 2 * c["text_mask"]}, r"text_mask"),
    (lambda c: {**c, "text_mask": 0 * c["text_mask"]}, r"at least one real token"),
    (lambda c: {**c, "latents": c["latents"][:, :, :3]}, r"height H=3"),
    (lambda c: {**c, "guidance": c["guidance"][:, None]}, r"guidance \[4\]"),
])
def test_bad_calibration_is_refused_before_any_work(change, match):
    model = hv.init_model(TINY, jax.random.key(0))
    with pytest.raises(ValueError, match=match):
        model.check_calibration(change(_calibration(TINY, 4, 0)))


def test_bad_inputs_name_the_argument():
    model = hv.init_model(TINY.replace(patch_size_t=2), jax.random.key(0))
    b = _calibration(TINY, 2, 0)
    args = (b["latents"], b["sigmas"], b["text"], b["text_mask"], b["pooled"])

    def call(*changed, **kw):
        return model.flow_velocity(*changed, **kw)

    with pytest.raises(ValueError, match=r"latents must be \[B, F, H, W, 4\]"):
        call(b["latents"][0], *args[1:])
    with pytest.raises(ValueError, match=r"latents must be \[B, F, H, W, 4\]"):
        call(b["latents"][..., :3], *args[1:])
    with pytest.raises(ValueError, match="frames F=3 is not a multiple"):
        call(np.concatenate([b["latents"], b["latents"][:, :1]], axis=1), *args[1:])
    with pytest.raises(ValueError, match="width W=3 is not a multiple"):
        call(b["latents"][:, :, :, :3], *args[1:])
    with pytest.raises(ValueError, match="text must be"):
        call(*args[:2], b["text"][..., :5], *args[3:])
    with pytest.raises(ValueError, match="text_mask must be"):
        call(*args[:3], b["text_mask"][:, :4], b["pooled"])
    with pytest.raises(ValueError, match="pooled must be"):
        call(*args[:4], b["pooled"][:, :3])
    with pytest.raises(ValueError, match="frame_positions must be"):
        call(*args, frame_positions=np.arange(2.0))
    plain = hv.init_model(TINY.replace(guidance_embeds=False), jax.random.key(0))
    with pytest.raises(ValueError, match="no guidance embedding"):
        plain.flow_velocity(*args, guidance=3.5)
    with pytest.raises(ValueError, match="pass guidance"):
        hv.init_model(TINY, jax.random.key(0))(*args)
    with pytest.raises(ValueError, match="a velocity has the latents' channels"):
        hv.init_model(TINY.replace(out_channels=3), jax.random.key(0)).flow_velocity(*args, guidance=1.0)


@pytest.mark.parametrize("config, match", [
    ({"rope_axes_dim": [4, 6, 4]}, "rope_axes_dim"),
    ({"image_condition_type": "token_replace"}, "token_replace"),
    ({"qk_norm": "layer_norm"}, "qk_norm"),
    ({"use_fused_qkv": True}, "does not handle"),
])
def test_bad_diffusers_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        hv.config_from_diffusers({"_class_name": hv.CLASS_NAME, **CASES["t2v"], **config})


def test_preset_builds_with_the_text_encoders_width():
    from jquant.models.registry import preset

    family, cfg = preset("jq-video-tiny")
    model = family.abstract_model(cfg)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model))
    assert family is hv.FAMILY and 1e6 < params < 4e6, params
    _, llama = preset("jq-llama-tiny")
    assert cfg.text_embed_dim == cfg.pooled_projection_dim == llama.hidden_size
    assert cfg.in_channels == 16 and not cfg.guidance_embeds and model.grid((1, 5, 8, 8, 16)) == (5, 4, 4)
