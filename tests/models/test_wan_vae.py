"""jquant's Wan 2.1 video VAE (``AutoencoderKLWan``): the shared diffusers suite (parity with diffusers' cached,
chunked ``AutoencoderKLWan`` in float32 and float64 on encode mean / logvar and decode, export round trip,
checkpoint round trips float and quantized, load by ``_class_name``, keep_float) plus the family's own checks:
chunked encode / decode with the causal cache equal to the one-pass result, the pipelines' latent
normalisation, refusals, and quantization with RTN and GPTQ.

Reference models are tiny diffusers ``AutoencoderKLWan`` with every tensor perturbed, written by
``save_pretrained``: Wan 2.1's layout at small widths (temporal downsampling in the last two levels), and one
with other channel counts, a separate decoder width and temporal downsampling in the first level only. Videos
are non-square (``4s x 2s`` frames) so a transposed spatial axis shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.models import hf_io, wan_vae
from jquant.quantization import quantize
from jquant.sites import find_sites
from jquant.testing.diffusion_suite import DiffusersSpec, DiffusersSuite
from jquant.testing.hf_reference import relative_error

# case -> diffusers AutoencoderKLWan keyword arguments (lists: diffusers concatenates them with lists).
CASES = {
    "wan2.1": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                   temperal_downsample=[False, True, True], latents_mean=[0.3, -0.2, 0.1, -0.5],
                   latents_std=[1.5, 0.5, 2.0, 0.8]),
    "other-widths": dict(base_dim=4, decoder_base_dim=6, z_dim=3, dim_mult=[1, 2, 2], num_res_blocks=2,
                         temperal_downsample=[True, False], latents_mean=[0.0] * 3, latents_std=[1.0] * 3,
                         in_channels=2, out_channels=1),
}
TINY = wan_vae.WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                            latents_mean=(0.3, -0.2, 0.1, -0.5), latents_std=(1.5, 0.5, 2.0, 0.8))


def build_reference(case: str, folder: Path, seed: int):
    """A tiny diffusers ``AutoencoderKLWan`` of ``case`` with every tensor perturbed, saved to ``folder`` (eval)."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(**CASES[case])
    with torch.no_grad():
        for p in model.parameters():
            spread = 0.1 if p.ndim == 1 else 0.5 * float(p.std())
            p.add_(spread * torch.randn_like(p))
    model.eval().save_pretrained(folder)
    return model


def reload_reference(case: str, folder: Path):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(folder).eval()


def make_inputs(config: wan_vae.WanVAEConfig, seed: int, frames: int = 9) -> dict[str, np.ndarray]:
    """One clip ``[1, frames, 4s, 2s, C_in]`` uniform in ``[-1, 1]``."""
    s = config.spatial_compression
    videos = np.random.default_rng(seed).uniform(-1, 1, (1, frames, 4 * s, 2 * s, config.in_channels))
    return {"videos": videos.astype(np.float32)}


def _torch(array, dtype):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(array), -1, 1))).to(dtype)


def _numpy(tensor) -> np.ndarray:
    return np.moveaxis(tensor.detach().numpy(), 1, -1)


def reference_forward(ref, inputs: dict, dtype: str) -> np.ndarray:
    """diffusers' posterior mean, logvar and ``decode(mean)``, channels last, raveled and concatenated."""
    import torch

    ref.double() if dtype == "float64" else ref.float()
    try:
        with torch.no_grad():
            posterior = ref.encode(_torch(inputs["videos"], getattr(torch, dtype))).latent_dist
            decoded = ref.decode(posterior.mode()).sample
        parts = (posterior.mean, posterior.logvar, decoded)
        return np.concatenate([_numpy(p).astype(np.float64).ravel() for p in parts])
    finally:
        ref.float()


@nnx.jit
def _outputs(model: wan_vae.AutoencoderKLWan, videos: jax.Array):
    mean, logvar = model.encode(videos)
    return mean, logvar, model.decode(mean)


def forward(model: wan_vae.AutoencoderKLWan, inputs: dict):
    """``(mean, logvar, decode(mean))``: the posterior and diffusers' forward, jitted."""
    return _outputs(model, jnp.asarray(inputs["videos"]))


class TestWanVAEFamily(DiffusersSuite):
    spec = DiffusersSpec(
        family=wan_vae.FAMILY,
        tiny_config=TINY,
        cases=tuple(CASES),
        build_reference=build_reference,
        make_inputs=make_inputs,
        reference_forward=reference_forward,
        forward=forward,
        reload_reference=reload_reference,
        float32_tolerance=1e-5,
        # diffusers' WanUpsample rounds to float32 (``x.float()``) before each nearest upsample, so its float64
        # output carries float32 rounding (~5e-8 relative), well below float32 parity's 1e-5.
        float64_tolerance=5e-7,
        save_recipes=("rtn-w8",),  # GPTQ's calibration walk is checked in test_rtn_and_gptq_stay_close_to_float
    )


# ----------------------------------------------------------------------------
# The family's own checks
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan-vae")
    return build_reference("wan2.1", folder, 7), folder


@nnx.jit
def _encode_chunk(model, videos, cache):
    return model.encode_chunk(videos, cache)


@nnx.jit
def _decode_chunk(model, latents, cache):
    return model.decode_chunk(latents, cache)


def test_decode_matches_diffusers_on_unrelated_latents(wan_reference):
    """Decode on its own scale, of latents unrelated to any video (diffusers decodes them one frame at a time);
    most of the output lies inside diffusers' clip to [-1, 1], so the comparison sees the values."""
    import torch

    ref, folder = wan_reference
    model = wan_vae.from_diffusers(folder)
    latents = np.random.default_rng(12).standard_normal((2, 4, 4, 2, model.config.z_dim)).astype(np.float32)
    with torch.no_grad():
        expected = _numpy(ref.decode(_torch(latents, torch.float32)).sample)
    got = np.asarray(_decode_chunk(model, jnp.asarray(latents), None)[0])
    assert got.shape == expected.shape == (2, 13, 32, 16, 3)
    assert np.mean(np.abs(expected) < 1) > 0.9
    assert relative_error(got, expected) < 1e-5


def test_chunked_encode_and_decode_equal_one_pass(wan_reference):
    """A 17-frame clip encoded in chunks (the causal cache passed along, each chunk jitted) equals the one-pass
    posterior, for diffusers' split (the first frame alone, then 4 at a time) and for chunks of 8 (9, then 8); its
    5 latent frames decoded one at a time (diffusers' split) and in chunks of 2 (3, then 2) equal the one-pass
    decode; and the one-pass results match diffusers' own cached loops."""
    import torch

    ref, folder = wan_reference
    model = wan_vae.from_diffusers(folder)
    videos = jnp.asarray(make_inputs(model.config, 21, frames=17)["videos"])
    whole = _encode_chunk(model, videos, None)[0]
    with torch.no_grad():
        posterior = ref.encode(_torch(videos, torch.float32)).latent_dist
        decoded = _numpy(ref.decode(posterior.mode()).sample)
    assert relative_error(whole.mean, _numpy(posterior.mean)) < 1e-5
    for splits in ([(0, 1)] + [(i, i + 4) for i in range(1, 17, 4)], wan_vae._chunks(17, 8, 4)):
        cache, means, logvars = None, [], []
        for start, stop in splits:
            (mean, logvar), cache = _encode_chunk(model, videos[:, start:stop], cache)
            assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(cache))
            means.append(mean)
            logvars.append(logvar)
        assert relative_error(jnp.concatenate(means, 1), whole.mean) < 1e-5, splits
        assert relative_error(jnp.concatenate(logvars, 1), whole.logvar) < 1e-5, splits
    one_pass = _decode_chunk(model, whole.mean, None)[0]
    assert one_pass.shape == (1, 17, 32, 16, 3)
    assert relative_error(one_pass, decoded) < 1e-5
    for splits in ([(i, i + 1) for i in range(5)], wan_vae._chunks(5, 2, 1)):
        cache, parts = None, []
        for start, stop in splits:
            part, cache = _decode_chunk(model, whole.mean[:, start:stop], cache)
            parts.append(part)
        assert relative_error(jnp.concatenate(parts, 1), one_pass) < 1e-5, splits


def test_encode_and_decode_chunk_frames_argument():
    """``encode`` / ``decode`` with ``chunk_frames`` split as documented; a non-multiple of t is refused."""
    model = wan_vae.init_model(TINY, jax.random.key(0))
    videos = jnp.asarray(make_inputs(TINY, 3, frames=9)["videos"])[:, :, :8, :8]
    encode = nnx.jit(lambda m, v: (m.encode(v).mean, m.encode(v, chunk_frames=4).mean))
    decode = nnx.jit(lambda m, z: (m.decode(z), m.decode(z, chunk_frames=1)))
    whole, chunked = encode(model, videos)
    assert relative_error(chunked, whole) < 1e-5
    whole, chunked = decode(model, whole)
    assert whole.shape == (1, 9, 8, 8, 3) and relative_error(chunked, whole) < 1e-5
    with pytest.raises(ValueError, match=r"chunk_frames=6 must be a positive multiple of 4"):
        model.encode(videos, chunk_frames=6)
    with pytest.raises(ValueError, match=r"videos must be .* F = 4 m frames, m >= 1"):
        model.encode_chunk(videos[:, :3], {})


def test_latent_normalisation_follows_the_wan_pipelines(wan_reference):
    """``latents = (z - mean) / std`` (Wan's image-to-video pipeline: ``(z - latents_mean) * (1 / latents_std)``)
    and ``decode(latents / (1 / std) + mean)`` (``WanPipeline``'s last step), per channel."""
    import torch

    ref, folder = wan_reference
    model = wan_vae.from_diffusers(folder)
    assert model.config.latents_mean == tuple(ref.config.latents_mean)
    z_dim = ref.config.z_dim
    mean = torch.tensor(ref.config.latents_mean).view(1, z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, z_dim, 1, 1, 1)
    videos = make_inputs(model.config, 13, frames=5)["videos"]
    latents = np.random.default_rng(14).standard_normal((1, 2, 4, 2, z_dim)).astype(np.float32)
    with torch.no_grad():
        mode = ref.encode(_torch(videos, torch.float32)).latent_dist.mode()
        decoded = ref.decode(_torch(latents, torch.float32) / inv_std + mean).sample
    got = nnx.jit(lambda m, v, z: (m.latents(v), m.decode_latents(z)))(model, jnp.asarray(videos), jnp.asarray(latents))
    assert relative_error(got[0], _numpy((mode - mean) * inv_std)) < 1e-5
    assert relative_error(got[1], _numpy(decoded)) < 1e-5


def test_logvar_is_clipped_like_diffusers():
    model = wan_vae.init_model(TINY, jax.random.key(0))
    bias, z_dim = model.quant_conv.bias, TINY.z_dim
    bias.set_value(bias[...].at[z_dim:].set(jnp.asarray([1e3, -1e3] * (z_dim // 2))))
    videos = jnp.asarray(make_inputs(TINY, 0, frames=1)["videos"])
    logvar = nnx.jit(lambda m, v: m.encode(v).logvar)(model, videos)
    np.testing.assert_array_equal(np.unique(np.asarray(logvar)), [-30.0, 20.0])


def test_every_diffusers_conv_is_a_site(wan_reference):
    ref, folder = wan_reference
    model = wan_vae.from_diffusers(folder)
    kinds = {}
    for site in find_sites(model):
        kinds[site.spec.kind] = kinds.get(site.spec.kind, 0) + 1
    state = ref.state_dict()
    assert kinds == {"conv": sum(n.endswith(".weight") and state[n].ndim in (4, 5) for n in state)}


def test_bfloat16_compute_stays_near_float32():
    """bf16 activations (norms and softmax in float32) on the float32 weights: the posterior mean and the decoded
    frames within bf16's few-percent error (RMS over the output: bf16 rounding accumulates over ~30 layers)."""
    model = wan_vae.init_model(TINY, jax.random.key(3))
    low = nnx.merge(nnx.graphdef(wan_vae.abstract_model(TINY.replace(dtype="bfloat16"))), nnx.state(model))
    videos = jnp.asarray(make_inputs(TINY, 4, frames=5)["videos"])
    run = nnx.jit(lambda m, v: (m.encode(v).mean, m(v)))
    got, expected = run(low, videos), run(model, videos)
    assert got[0].dtype == got[1].dtype == jnp.bfloat16
    for g, e in zip(got, expected):
        assert _rms_error(g.astype(jnp.float32), e) < 8e-2


def test_tiny_preset_feeds_the_tiny_wan_transformer():
    from jquant.models import wan

    cfg = wan_vae.FAMILY.presets["jq-wan-vae-tiny"]
    assert cfg.z_dim == wan.FAMILY.presets["jq-wan-tiny"].in_channels
    assert (cfg.spatial_compression, cfg.temporal_compression) == (8, 4) and cfg.latent_frames(17) == 5


# ----------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------


def _smooth_videos(n: int, config: wan_vae.WanVAEConfig, seed: int) -> np.ndarray:
    """``n`` clips ``[5, 4s, 4s, C_in]``: a coarse random 2 x 2 x 2 grid upsampled, plus noise, in ``[-1, 1]``."""
    s, rng = config.spatial_compression, np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (n, 2, 2, 2, config.in_channels))
    fine = np.repeat(np.repeat(np.repeat(coarse, 3, axis=1)[:, :5], 2 * s, axis=2), 2 * s, axis=3)
    return np.clip(fine + 0.2 * rng.standard_normal(fine.shape), -1, 1).astype(np.float32)


def _rms_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def test_rtn_and_gptq_stay_close_to_float():
    """int8 per-channel weights on every site but the keep_float interface convs; GPTQ, calibrated block by block
    on the clips (encoder) and the posterior means (decoder), lands closer to float than rounding on held-out
    clips, on the posterior means and on the decoded frames. (GPTQ needs enough calibration positions per conv:
    eight 32 x 32 clips; with four 16 x 16 ones its deepest convs overfit and it lands behind rounding.)"""
    model = wan_vae.init_model(TINY, jax.random.key(0))
    calib, held_out = {"videos": _smooth_videos(8, TINY, 1)}, jnp.asarray(_smooth_videos(2, TINY, 2))

    @nnx.jit
    def outputs(m, videos):
        mean = m.encode(videos).mean
        return mean, m.decode(mean)

    expected = outputs(model, held_out)
    errors = {}
    for recipe in ("rtn-w8", "gptq-w8"):
        qmodel = quantize(model, recipe, calib, batch_size=2, progress=False)
        quantized = {path for path, _ in qmodel.quantization.sites}
        assert quantized == {s.path for s in find_sites(model)} - set(wan_vae.FAMILY.keep_float), recipe
        errors[recipe] = max(_rms_error(g, e) for g, e in zip(outputs(qmodel, held_out), expected))
    assert errors["rtn-w8"] < 0.1, errors
    assert errors["gptq-w8"] < errors["rtn-w8"], errors


def test_calibration_data_is_checked():
    model = wan_vae.init_model(TINY, jax.random.key(0))
    videos = _smooth_videos(2, TINY, 3)
    with pytest.raises(ValueError, match=r"calibration must be a dict \{'videos'"):
        quantize(model, "gptq-w8", videos, progress=False)
    with pytest.raises(ValueError, match=r"videos must be \[B, F, H, W, 3\]"):
        quantize(model, "gptq-w8", {"videos": videos[..., :2]}, progress=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(model, "gptq-w8", {"videos": np.full_like(videos, np.nan)}, progress=False)


def test_export_refuses_a_quantized_model(tmp_path):
    qmodel = quantize(wan_vae.init_model(TINY, jax.random.key(0)), "rtn-w8", progress=False)
    with pytest.raises(ValueError, match="holds a quantized weight"):
        wan_vae.to_diffusers(qmodel, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------


def test_bad_videos_and_latents_are_refused():
    model = wan_vae.abstract_model(TINY)
    for shape in ((1, 8, 16, 16, 3), (1, 10, 16, 16, 3), (1, 5, 16, 16, 4), (1, 5, 12, 16, 3), (5, 16, 16, 3)):
        with pytest.raises(ValueError, match=r"videos must be \[B, F, H, W, 3\] \(channels last\) with F = 1 \+ 4 m "
                                             r"frames \(1, 5, 9, \.\.\..* H, W multiples of 8; got shape"):
            model.encode(jnp.zeros(shape))
    for shape in ((1, 2, 4, 4, 3), (2, 4, 4, 4), (1, 0, 4, 4, 4)):
        with pytest.raises(ValueError, match=r"latents must be \[B, f, h, w, 4\]"):
            model.decode(jnp.zeros(shape))


def test_config_is_validated():
    with pytest.raises(ValueError, match=r"temperal_downsample=\(True,\) must hold 3 bools"):
        wan_vae.WanVAEConfig(temperal_downsample=(True,))
    with pytest.raises(ValueError, match="at most two temporal downsamplings"):
        wan_vae.WanVAEConfig(temperal_downsample=(True, True, True))
    with pytest.raises(ValueError, match="latents_mean must hold z_dim=4 finite numbers"):
        wan_vae.WanVAEConfig(z_dim=4)
    with pytest.raises(ValueError, match="WanVAEConfig.base_dim must be a positive int"):
        wan_vae.WanVAEConfig(base_dim=0)
    with pytest.raises(ValueError, match="WanVAEConfig.dtype must be"):
        wan_vae.WanVAEConfig(dtype="int8")


def _write_folder(tmp_path: Path, **config_changes) -> Path:
    """A valid tiny diffusers folder written by jquant, its config.json changed."""
    folder = wan_vae.to_diffusers(wan_vae.init_model(TINY, jax.random.key(0)), tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | config_changes))
    return folder


@pytest.mark.parametrize("changes, message", [
    (dict(is_residual=True), "is_residual=True.*Wan 2.2"),
    (dict(patch_size=2), "patch_size=2.*Wan 2.2"),
    (dict(attn_scales=[0.5]), r"attn_scales=\[0.5\]"),
    (dict(dropout=0.1), "dropout=0.1"),
    (dict(use_tiling=True), r"does not handle: \['use_tiling'\]"),
])
def test_unsupported_config_attributes_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        wan_vae.from_diffusers(_write_folder(tmp_path, **changes))


def test_tensor_mismatches_are_refused(tmp_path):
    folder = _write_folder(tmp_path)
    tensors = hf_io.read_safetensors(folder, weights_name=hf_io.DIFFUSERS_FILE)
    config = wan_vae.config_from_diffusers(json.loads((folder / "config.json").read_text()))
    name = "encoder.mid_block.attentions.0.to_qkv.weight"
    with pytest.raises(ValueError, match=rf"'{name}' is missing"):
        wan_vae.from_tensors(config, {k: v for k, v in tensors.items() if k != name})
    wrong = tensors | {"decoder.conv_in.weight": np.zeros((16, 4, 1, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"'decoder.conv_in.weight' has shape \(16, 4, 1, 3, 3\), but the config "
                                         r"implies \(16, 4, 3, 3, 3\)"):
        wan_vae.from_tensors(config, wrong)
    extra = tensors | {"encoder.down_blocks.1.resample.0.weight": np.zeros((8, 8, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"unexpected tensors.*resample\.0\.weight"):
        wan_vae.from_tensors(config, extra)
