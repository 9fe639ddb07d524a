"""HunyuanVideo's causal 3-D VAE (``AutoencoderKLHunyuanVideo``): the shared diffusers suite (parity with diffusers'
module on encode mean / logvar and ``decode(mean)`` in float32 and float64, export round trip, checkpoint round
trips float and quantized, load by ``_class_name``, keep_float) plus the family's own checks: encode and decode
on their own scales, the pipeline's latent scaling, chunked encode / decode equal to one shot, the posterior's
KL, quantization with RTN and GPTQ, the preset's shapes, refusals.

Reference models are tiny diffusers ``AutoencoderKLHunyuanVideo`` with every tensor perturbed, written by
``save_pretrained``: four blocks (16, 32, 32, 32) with spatial compression 8 (the first block halves only height
and width, the next two also the frames, the last nothing), and three blocks without mid-block attention, with
two resnets per block, spatial compression 4 and other channel counts. Videos have 9 frames (3 latent frames)
and non-square frames (``4 c_s x 2 c_s``) so a transposed spatial axis shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.models import hf_io
from jquant.models import hunyuan_video_vae as hv
from jquant.models.hunyuan_video_vae_blocks import next_pass
from jquant.quantization import quantize
from jquant.sites import find_sites
from jquant.testing.diffusion_suite import DiffusersSpec, DiffusersSuite
from jquant.testing.hf_reference import relative_error

# case -> diffusers AutoencoderKLHunyuanVideo keyword arguments (besides the block types).
CASES = {
    "four-blocks": {"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "latent_channels": 4,
                    "norm_num_groups": 8, "scaling_factor": 0.476986},
    "no-attention": {"in_channels": 2, "out_channels": 1, "block_out_channels": (8, 16, 16), "layers_per_block": 2,
                     "latent_channels": 3, "norm_num_groups": 4, "spatial_compression_ratio": 4,
                     "mid_block_add_attention": False},
}
# Three blocks of one width: the quantizable weights come in few shapes, so GPTQ compiles few programs.
TINY = hv.HunyuanVideoVAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                                norm_num_groups=4, spatial_compression_ratio=4)


def build_reference(case: str, folder: Path, seed: int):
    """A tiny diffusers ``AutoencoderKLHunyuanVideo`` of ``case``, every tensor perturbed, saved to ``folder``."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo

    kwargs = CASES[case]
    n = len(kwargs["block_out_channels"])
    torch.manual_seed(seed)
    model = AutoencoderKLHunyuanVideo(down_block_types=("HunyuanVideoDownBlock3D",) * n,
                                      up_block_types=("HunyuanVideoUpBlock3D",) * n, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            spread = 0.1 if p.ndim == 1 else 0.5 * float(p.std())
            p.add_(spread * torch.randn_like(p))
    model.eval().save_pretrained(folder)
    return model


def reload_reference(case: str, folder: Path):
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo.from_pretrained(folder).eval()


def make_inputs(config: hv.HunyuanVideoVAEConfig, seed: int) -> dict[str, np.ndarray]:
    """One video ``[1, 9, 4 c_s, 2 c_s, C_in]`` uniform in ``[-1, 1]``."""
    s = config.spatial_compression_ratio
    videos = np.random.default_rng(seed).uniform(-1, 1, (1, 9, 4 * s, 2 * s, config.in_channels))
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
        return np.concatenate([_numpy(p).astype(np.float64).ravel()
                               for p in (posterior.mean, posterior.logvar, decoded)])
    finally:
        ref.float()


@nnx.jit
def _outputs(model: hv.AutoencoderKLHunyuanVideo, videos: jax.Array):
    mean, logvar = model.encode(videos)
    return mean, logvar, model.decode(mean)


def forward(model: hv.AutoencoderKLHunyuanVideo, inputs: dict):
    """``(mean, logvar, decode(mean))``: the posterior and diffusers' forward (``model(videos)``), jitted."""
    return _outputs(model, jnp.asarray(inputs["videos"]))


class TestHunyuanVideoVAEFamily(DiffusersSuite):
    # float32: encode -> decode through ~40 causal convs; each side's own float32 result is 4e-6 to 8e-6 (relative)
    # from the float64 one on these models, so the two differ by up to their sum. Encode and decode on their own
    # are held to 1e-5 below.
    spec = DiffusersSpec(
        family=hv.FAMILY,
        tiny_config=TINY,
        cases=tuple(CASES),
        build_reference=build_reference,
        make_inputs=make_inputs,
        reference_forward=reference_forward,
        forward=forward,
        reload_reference=reload_reference,
        float32_tolerance=2e-5,
        float64_tolerance=1e-10,
        save_recipes=("rtn-w8",),
    )


# ----------------------------------------------------------------------------
# The family's own checks
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hunyuan-video-vae")
    return build_reference("four-blocks", folder, 7), folder


def test_encode_decode_and_latent_scaling_match_diffusers(four_blocks):
    """The posterior, decode of latents unrelated to any video, and the pipeline's ``decode(latents / scale)``."""
    import torch

    ref, folder = four_blocks
    model = hv.from_diffusers(folder)
    videos = make_inputs(model.config, 11)["videos"]
    latents = np.random.default_rng(12).standard_normal((1, 3, 4, 2, model.config.latent_channels)).astype(np.float32)
    scale = ref.config.scaling_factor
    with torch.no_grad():
        posterior = ref.encode(_torch(videos, torch.float32)).latent_dist
        decoded = ref.decode(_torch(latents, torch.float32) / scale).sample
    run = nnx.jit(lambda m, x, z: (m.encode(x), m.latents(x), m.decode_latents(z)))
    (mean, logvar), scaled, got = run(model, jnp.asarray(videos), jnp.asarray(latents))
    assert relative_error(mean, _numpy(posterior.mean)) < 1e-5
    assert relative_error(logvar, _numpy(posterior.logvar)) < 1e-5
    assert relative_error(scaled, _numpy(posterior.mode() * scale)) < 1e-5
    assert relative_error(got, _numpy(decoded)) < 1e-5


def test_chunked_encode_and_decode_equal_one_shot(x64):
    """A 13-frame clip encoded in chunks of 8 frames (9, then the 4 left) and its 4 latent frames decoded in
    chunks of 2 (3, then 1) equal the one-shot encode and decode: causal convs read the cached frames, the attention the
    cached keys and values, and every GroupNorm ends with the clip's statistics. In float64, so any mistake
    shows above the rounding (1e-12); float32 differs by rounding only (the statistics are summed per chunk)."""
    config = TINY.replace(dtype="float64", param_dtype="float64")
    model = hv.init_model(config, jax.random.key(0))
    _perturb_norms(model, jax.random.key(1))
    s = config.spatial_compression_ratio
    videos = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 13, 2 * s, 3 * s, 3)))
    one_shot = nnx.jit(lambda m, x: m.encode(x))(model, videos)
    chunked = model.encode(videos, chunk_frames=8)
    assert chunked.mean.shape == one_shot.mean.shape == (1, 4, 2, 3, 4)
    for got, expected in zip(chunked, one_shot):
        assert relative_error(got, expected) < 1e-12
    decoded = nnx.jit(lambda m, z: m.decode(z))(model, one_shot.mean)
    decoded_chunked = model.decode(one_shot.mean, chunk_frames=2)
    assert decoded_chunked.shape == decoded.shape == videos.shape
    assert relative_error(decoded_chunked, decoded) < 1e-12


def _perturb_norms(model: hv.AutoencoderKLHunyuanVideo, key: jax.Array) -> None:
    """GroupNorm scales and shifts and biases away from 1 and 0, so no statistic hides behind a trivial affine."""
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if len(var.shape) == 1:
            key, sub = jax.random.split(key)
            var.set_value(var[...] + 0.2 * jax.random.normal(sub, var.shape, var.dtype))


def test_one_pass_with_local_statistics_differs_from_one_shot():
    """The chunked path's extra passes are needed: normalizing each chunk by its own statistics (what
    frame-batched decoders do) is not the one-shot result; ``next_pass`` keeps the statistics accumulated over the
    clip and clears the convs' past frames."""
    model = hv.init_model(TINY, jax.random.key(3))
    videos = jnp.asarray(make_inputs(TINY, 4)["videos"])
    expected = forward(model, {"videos": videos})[0]  # the suite's compiled program
    step = nnx.jit(lambda m, x, cache: m.encode_chunk(x, cache))
    first, cache = step(model, videos[:, :5], None)
    second, _ = step(model, videos[:, 5:], cache)
    assert relative_error(jnp.concatenate([first.mean, second.mean], axis=1), expected) > 1e-3
    restarted = next_pass(cache)
    assert restarted["conv_in"]["past"] is None and restarted["conv_norm_out"]["stats"] is not None


def test_posterior_kl_matches_diffusers():
    """KL summed over frames, height, width and channels: diffusers' ``DiagonalGaussianDistribution.kl`` sums
    axes 1-3 only (``[B, C, F, H, W]`` -> ``[B, W]``), so its result is summed over the width as well."""
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(3)
    mean, logvar = rng.standard_normal((2, 3, 4, 5, 4)), rng.standard_normal((2, 3, 4, 5, 4))
    reference = DiagonalGaussianDistribution(_torch(np.concatenate([mean, logvar], -1), torch.float64)).kl().sum(-1)
    posterior = hv.Posterior(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
    assert relative_error(posterior.kl(), reference.numpy()) < 1e-6


def test_every_diffusers_conv_and_linear_is_a_site(four_blocks):
    ref, folder = four_blocks
    kinds = {}
    for site in find_sites(hv.from_diffusers(folder)):
        kinds[site.spec.kind] = kinds.get(site.spec.kind, 0) + 1
    state = ref.state_dict()
    weights = [n for n in state if n.endswith(".weight") and state[n].ndim in (2, 5)]
    assert kinds == {"conv": sum(state[n].ndim == 5 for n in weights),
                     "linear": sum(state[n].ndim == 2 for n in weights)}


def test_block_strides_follow_diffusers(four_blocks):
    """Per-block temporal / spatial strides: diffusers' downsampler and upsampler geometry."""
    ref, folder = four_blocks
    model = hv.from_diffusers(folder)
    for ours, theirs in zip(model.encoder.down_blocks, ref.encoder.down_blocks):
        stride = (1, 1, 1) if theirs.downsamplers is None else tuple(theirs.downsamplers[0].conv.conv.stride)
        assert (ours.temporal_stride, ours.spatial_stride, ours.spatial_stride) == stride
    for ours, theirs in zip(model.decoder.up_blocks, ref.decoder.up_blocks):
        factor = (1, 1, 1) if theirs.upsamplers is None else tuple(theirs.upsamplers[0].upsample_factor)
        assert (ours.temporal_stride, ours.spatial_stride, ours.spatial_stride) == factor


def test_preset_maps_32px_clips_to_8px_latents():
    """``jq-video-vae-tiny``: 1 + 4k frames of 32x32 RGB -> 1 + k latent frames of 8x8x16, and back."""
    from jquant.models.registry import preset

    family, config = preset("jq-video-vae-tiny")
    assert family is hv.FAMILY
    model = hv.abstract_model(config)
    posterior = nnx.eval_shape(lambda m, x: m.encode(x), model, jax.ShapeDtypeStruct((2, 17, 32, 32, 3), jnp.float32))
    assert posterior.mean.shape == (2, 5, 8, 8, 16) == (2, *model.latent_shape(17, 32, 32))
    decoded = nnx.eval_shape(lambda m, z: m.decode(z), model, posterior.mean)
    assert decoded.shape == (2, 17, 32, 32, 3)


# ----------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------


def _smooth_videos(n: int, config: hv.HunyuanVideoVAEConfig, seed: int, zoom: int = 1) -> np.ndarray:
    """``n`` clips of ``make_inputs``' size (``zoom`` times higher and wider): a coarse random 3 x 4 x 2 grid
    upsampled, plus noise, in ``[-1, 1]``."""
    s, rng = zoom * config.spatial_compression_ratio, np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (n, 3, 4, 2, config.in_channels))
    fine = np.repeat(np.repeat(np.repeat(coarse, 3, axis=1), s, axis=2), s, axis=3)
    return np.clip(fine + 0.2 * rng.standard_normal(fine.shape), -1, 1).astype(np.float32)


def _rms_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def test_rtn_and_gptq_stay_close_to_float():
    """int8 per-channel weights on every site but the keep_float interface convs; GPTQ, calibrated block by block
    on larger videos (encoder) and their decoded means (decoder), lands closer to float than rounding on a held-out
    clip. (The suite's tiny model, forward and input shape, so its compiled programs are reused.)"""
    model = hv.init_model(TINY, jax.random.key(0))
    calib = {"videos": _smooth_videos(8, TINY, 1, zoom=2)}  # 96 latent positions a clip: full-rank Hessians
    held_out = {"videos": _smooth_videos(1, TINY, 2)}
    expected = forward(model, held_out)[-1]
    errors = {}
    for recipe in ("rtn-w8", "gptq-w8"):
        qmodel = quantize(model, recipe, calib, batch_size=2, progress=False)
        quantized = {path for path, _ in qmodel.quantization.sites}
        assert quantized == {s.path for s in find_sites(model)} - set(hv.FAMILY.keep_float), recipe
        errors[recipe] = _rms_error(forward(qmodel, held_out)[-1], expected)
    assert errors["rtn-w8"] < 0.06, errors
    assert errors["gptq-w8"] < errors["rtn-w8"], errors


def test_calibration_data_is_checked():
    model = hv.init_model(TINY, jax.random.key(0))
    videos = _smooth_videos(2, TINY, 3)
    with pytest.raises(ValueError, match=r"calibration must be a dict \{'videos'"):
        quantize(model, "gptq-w8", videos, progress=False)
    with pytest.raises(ValueError, match=r"videos must be \[B, F, H, W, 3\]"):
        quantize(model, "gptq-w8", {"videos": videos[..., :2]}, progress=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(model, "gptq-w8", {"videos": np.full_like(videos, np.nan)}, progress=False)


def test_export_refuses_a_quantized_model(tmp_path):
    qmodel = quantize(hv.init_model(TINY, jax.random.key(0)), "rtn-w8", progress=False)
    with pytest.raises(ValueError, match="holds a quantized weight"):
        hv.to_diffusers(qmodel, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------


def test_bad_videos_latents_and_chunks_are_refused():
    model = hv.abstract_model(TINY)
    with pytest.raises(ValueError, match=r"videos have 8 frames; the causal VAE takes 1 \+ 4k frames \(1, 5, 9, "):
        model.encode(jnp.zeros((1, 8, 16, 8, 3)))
    with pytest.raises(ValueError, match=r"videos have 6 frames; the causal VAE takes 1 \+ 4k frames"):
        model.latent_shape(6, 16, 8)
    for shape in ((9, 16, 8, 3), (1, 9, 16, 8, 4), (1, 9, 18, 8, 3)):
        with pytest.raises(ValueError, match=r"videos must be \[B, F, H, W, 3\] \(channels last\) with H and W "
                                             r"multiples of 4"):
            model.encode(jnp.zeros(shape))
    with pytest.raises(ValueError, match=r"latents must be \[B, f, h, w, 4\]"):
        model.decode(jnp.zeros((1, 3, 4, 2, 3)))
    with pytest.raises(ValueError, match=r"latents must be \[B, f, h, w, 4\]"):
        model.decode(jnp.zeros((3, 4, 2, 4)))
    real = hv.init_model(TINY, jax.random.key(0))
    with pytest.raises(ValueError, match=r"videos have 4 frames; the causal VAE takes 1 \+ 4k frames"):
        real.encode_chunk(jnp.zeros((1, 4, 16, 8, 3)))
    _, cache = real.encode_chunk(jnp.zeros((1, 1, 16, 8, 3)))
    with pytest.raises(ValueError, match="a chunk after the clip's first holds a positive multiple of 4 frames; got 5"):
        real.encode_chunk(jnp.zeros((1, 5, 16, 8, 3)), cache)
    for bad in (0, 6, 2.0):
        with pytest.raises(ValueError, match=rf"chunk_frames={bad!r} must be a positive multiple of 4"):
            real.encode(jnp.zeros((1, 9, 16, 8, 3)), chunk_frames=bad)
    with pytest.raises(ValueError, match=r"chunk_frames=0 must be a positive multiple of 1"):
        real.decode(jnp.zeros((1, 3, 4, 2, 4)), chunk_frames=0)


def test_config_is_validated():
    with pytest.raises(ValueError, match="divisible by norm_num_groups=32"):
        hv.HunyuanVideoVAEConfig(block_out_channels=(16, 32, 32))
    with pytest.raises(ValueError, match="temporal_compression_ratio=8 with 4 blocks; diffusers' decoder builds only"):
        hv.HunyuanVideoVAEConfig(temporal_compression_ratio=8)
    with pytest.raises(ValueError, match="temporal_compression_ratio=4 with 2 blocks"):
        hv.HunyuanVideoVAEConfig(block_out_channels=(32, 32))
    with pytest.raises(ValueError, match="spatial_compression_ratio=16 must be a power of two of at most 2\\^3"):
        hv.HunyuanVideoVAEConfig(block_out_channels=(32, 32, 32), spatial_compression_ratio=16)
    with pytest.raises(ValueError, match="spatial_compression_ratio=6 must be a power of two"):
        hv.HunyuanVideoVAEConfig(spatial_compression_ratio=6)
    with pytest.raises(ValueError, match="HunyuanVideoVAEConfig.latent_channels must be a positive int"):
        hv.HunyuanVideoVAEConfig(latent_channels=0)


def _write_folder(tmp_path: Path, **config_changes) -> Path:
    """A valid tiny diffusers folder written by jquant, its config.json changed."""
    folder = hv.to_diffusers(hv.init_model(TINY, jax.random.key(0)), tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | config_changes))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"down_block_types": ["HunyuanVideoDownBlock3D", "DownBlock3D", "HunyuanVideoDownBlock3D"]},
     "down_block_types=.*'DownBlock3D'"),
    ({"up_block_types": ["HunyuanVideoUpBlock3D"]}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"use_tiling": True}, r"does not handle: \['use_tiling'\]"),
])
def test_unsupported_config_attributes_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        hv.from_diffusers(_write_folder(tmp_path, **changes))


def test_tensor_mismatches_are_refused(tmp_path):
    folder = _write_folder(tmp_path)
    tensors = hf_io.read_safetensors(folder, weights_name=hf_io.DIFFUSERS_FILE)
    config = hv.config_from_diffusers(json.loads((folder / "config.json").read_text()))
    name = "encoder.mid_block.attentions.0.to_q.weight"
    with pytest.raises(ValueError, match=rf"'{name}' is missing"):
        hv.from_tensors(config, {k: v for k, v in tensors.items() if k != name})
    wrong = tensors | {"decoder.conv_in.conv.weight": np.zeros((8, 4, 1, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"'decoder.conv_in.conv.weight' has shape \(8, 4, 1, 3, 3\), but the config "
                                         r"implies \(8, 4, 3, 3, 3\)"):
        hv.from_tensors(config, wrong)


@pytest.mark.parametrize("blocks, ratio", [((8, 8, 8), 4), ((8, 8, 8, 8), 8)])
def test_compression_variant_halves_the_pixels_and_shares_the_weights(blocks, ratio):
    """VGDFR's compression VAE (spec vgdfr.md §3.2(b), §5.6): decoding ``(T, h, w)`` latents gives ``(4 (T - 1) + 1,
    (c_s / 2) h, (c_s / 2) w)`` frames and encoding those gives ``(T, h, w)`` back; same weights, one spatial
    halving less on each side (the encoder's last spatially striding block, the decoder's up_blocks[0])."""
    config = hv.HunyuanVideoVAEConfig(block_out_channels=blocks, layers_per_block=1, latent_channels=4,
                                      norm_num_groups=4, spatial_compression_ratio=ratio)
    model = hv.init_model(config, jax.random.key(np.random.default_rng().integers(1 << 30)))
    variant = model.compression_variant()
    assert variant.config.compression_variant and variant.config.pixel_ratio == ratio // 2
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(variant, nnx.Param))):
        assert np.array_equal(a[...], b[...]), path
    spatial = [i for i, (_, s) in enumerate(config.block_strides) if s > 1]
    assert variant.encoder.down_blocks[spatial[-1]].spatial_stride == 1
    assert variant.decoder.up_blocks[0].spatial_stride == 1
    latents = jnp.asarray(np.random.default_rng().normal(size=(1, 3, 2, 3, 4)), jnp.float32)
    frames = variant.decode(latents)
    assert frames.shape == (1, 9, ratio, 3 * ratio // 2, 3)
    assert variant.encode(frames).mean.shape == latents.shape
    assert model.decode(latents).shape == (1, 9, 2 * ratio, 3 * ratio, 3)
    with pytest.raises(ValueError, match=f"H and W multiples of {ratio // 2}"):
        variant.encode(jnp.zeros((1, 9, ratio // 2 + 1, ratio // 2, 3)))
    with pytest.raises(ValueError, match="compression variant has no diffusers config"):
        hv.config_to_diffusers(variant.config)
