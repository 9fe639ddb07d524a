"""jquant's CogVideoX video VAE (``AutoencoderKLCogVideoX``): the shared diffusers suite (parity with diffusers in
float32 and float64 on encode mean / logvar and decode of a 17-frame clip, which diffusers itself splits into
two frame batches and two latent batches; export round trip; checkpoint round trips float and quantized; load
by ``_class_name``; keep_float) plus the family's own checks: a single frame and arbitrary latents against
diffusers, chunked encode / decode with the causal cache equal to one shot, the pipelines' latent scaling,
quantization with RTN and GPTQ, and refusals.

Reference models are tiny diffusers ``AutoencoderKLCogVideoX`` with every tensor perturbed, written by
``save_pretrained``: CogVideoX-style (four blocks, temporal compression 4) and a two-block one with temporal
compression 2, other channel counts and another norm eps. Frames are non-square (``2s x 4s``) so a transposed
spatial axis shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.models import cogvideox_vae as cv
from jquant.models.cogvideox_vae_blocks import batched_group_norm, frame_batches
from jquant.models.image_layers import GroupNorm
from jquant.quantization import quantize
from jquant.sites import find_sites
from jquant.testing.diffusion_suite import DiffusersSpec, DiffusersSuite
from jquant.testing.hf_reference import relative_error

# case -> diffusers AutoencoderKLCogVideoX keyword arguments (besides the block types, one per block).
CASES = {
    "cogvideox": {"block_out_channels": (16, 32, 32, 32), "latent_channels": 4, "layers_per_block": 1,
                  "norm_num_groups": 4, "scaling_factor": 0.7},
    "time-2": {"in_channels": 2, "out_channels": 1, "block_out_channels": (8, 16), "latent_channels": 3,
               "layers_per_block": 1, "norm_num_groups": 4, "temporal_compression_ratio": 2, "norm_eps": 1e-5},
}
# Temporal compression 4 as CogVideoX, one width: the suite's checkpoint round trips and the family's own checks.
TINY = cv.CogVideoXVAEConfig(block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4)


def build_reference(case: str, folder: Path, seed: int):
    """A tiny diffusers ``AutoencoderKLCogVideoX`` of ``case`` with every tensor perturbed, saved to ``folder``."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    kwargs = CASES[case]
    n = len(kwargs["block_out_channels"])
    torch.manual_seed(seed)
    model = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * n,
                                   up_block_types=("CogVideoXUpBlock3D",) * n, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            spread = 0.1 if p.ndim == 1 else 0.5 * float(p.std())
            p.add_(spread * torch.randn_like(p))
    model.eval().save_pretrained(folder)
    return model


def reload_reference(case: str, folder: Path):
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX.from_pretrained(folder).eval()


def make_inputs(config: cv.CogVideoXVAEConfig, seed: int, frames: int = 17) -> dict[str, np.ndarray]:
    """Two clips ``[2, frames, 2s, 4s, C_in]`` uniform in ``[-1, 1]`` (two, so frame batches of different clips
    are seen not to mix)."""
    s = config.spatial_compression
    videos = np.random.default_rng(seed).uniform(-1, 1, (2, frames, 2 * s, 4 * s, config.in_channels))
    return {"videos": videos.astype(np.float32)}


def _torch(array, dtype):
    """Channels-last ``[B, F, H, W, C]`` -> diffusers' ``[B, C, F, H, W]``."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(array), -1, 1))).to(dtype)


def _numpy(tensor) -> np.ndarray:
    return np.moveaxis(tensor.detach().numpy(), 1, -1)


def reference_forward(ref, inputs: dict, dtype: str) -> np.ndarray:
    """diffusers' posterior mean, logvar and ``decode(mean)``, channels last, raveled and concatenated."""
    import torch

    tdtype = getattr(torch, dtype)
    ref.double() if dtype == "float64" else ref.float()
    try:
        with torch.no_grad():
            posterior = ref.encode(_torch(inputs["videos"], tdtype)).latent_dist
            decoded = ref.decode(posterior.mode()).sample
        parts = (posterior.mean, posterior.logvar, decoded)
        return np.concatenate([_numpy(p).astype(np.float64).ravel() for p in parts])
    finally:
        ref.float()


@nnx.jit
def _outputs(model: cv.AutoencoderKLCogVideoX, videos: jax.Array):
    mean, logvar = model.encode(videos)
    return mean, logvar, model.decode(mean)


def forward(model: cv.AutoencoderKLCogVideoX, inputs: dict):
    """``(mean, logvar, decode(mean))``: the posterior and diffusers' forward, jitted."""
    return _outputs(model, jnp.asarray(inputs["videos"]))


class TestCogVideoXVAEFamily(DiffusersSuite):
    spec = DiffusersSpec(
        family=cv.FAMILY,
        tiny_config=TINY,
        cases=tuple(CASES),
        build_reference=build_reference,
        make_inputs=make_inputs,
        reference_forward=reference_forward,
        forward=forward,
        reload_reference=reload_reference,
        float32_tolerance=1e-5,
        float64_tolerance=1e-10,
        save_recipes=("rtn-w8",),  # GPTQ's calibration walk is checked in test_rtn_and_gptq_stay_close_to_float
    )


# ----------------------------------------------------------------------------
# The family's own checks
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cog_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cogvideox-vae")
    return build_reference("cogvideox", folder, 7), folder


def test_frame_batches_follow_diffusers_split():
    """diffusers' ``_encode`` loop: ``max(F // b, 1)`` batches, the first taking the ``F mod b`` extra frames."""
    for frames in range(1, 60):
        for batch in (2, 4, 8):
            count = max(frames // batch, 1)
            bounds = [(batch * i + (0 if i == 0 else frames % batch), batch * (i + 1) + frames % batch)
                      for i in range(count)]
            expected = tuple(min(stop, frames) - start for start, stop in bounds)
            assert frame_batches(frames, batch) == expected, (frames, batch)


def test_batched_group_norm_is_torch_group_norm_per_frame_batch():
    """Three frame batches (9, 8, 8 frames) of two clips: ``torch.nn.GroupNorm`` on each batch of each clip alone
    (float64), with perturbed weight and bias."""
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 25, 3, 5, 8)) * rng.uniform(0.5, 2, (1, 25, 1, 1, 8)) + rng.standard_normal(8)
    norm = GroupNorm(8, 4, eps=1e-6, param_dtype=jnp.float32)
    reference = torch.nn.GroupNorm(4, 8, eps=1e-6).double()
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(rng.standard_normal(8)))
        reference.bias.copy_(torch.from_numpy(rng.standard_normal(8)))
    norm.weight.set_value(jnp.asarray(reference.weight.detach().numpy(), jnp.float32))
    norm.bias.set_value(jnp.asarray(reference.bias.detach().numpy(), jnp.float32))
    expected = np.concatenate([_numpy(reference(_torch(x[:, start:stop], torch.float64)))
                               for start, stop in ((0, 9), (9, 17), (17, 25))], axis=1)
    assert relative_error(batched_group_norm(norm, jnp.asarray(x, jnp.float32), 8), expected) < 1e-5


def test_single_frame_free_latents_and_latent_scaling_match_diffusers(cog_reference):
    """An image (one frame: no temporal resampling, no split first frame) and single-frame latents unrelated to
    any image, through the CogVideoX pipelines' scaling: ``latents = z * scaling_factor`` and videos
    ``decode(latents / scaling_factor)``."""
    import torch

    ref, folder = cog_reference
    model = cv.from_diffusers(folder)
    scale = ref.config.scaling_factor
    assert model.config.scaling_factor == scale
    image = make_inputs(model.config, 11, frames=1)["videos"]
    z = np.random.default_rng(12).standard_normal((2, 1, 2, 4, model.config.latent_channels)).astype(np.float32)
    with torch.no_grad():
        posterior = ref.encode(_torch(image, torch.float32)).latent_dist
        decoded = ref.decode(_torch(z, torch.float32)).sample
    run = nnx.jit(lambda m, x, latents: (*m.encode(x), m.latents(x), m.decode_latents(latents)))
    mean, logvar, latents, got = run(model, jnp.asarray(image), jnp.asarray(z * scale))
    assert mean.shape == (2, 1, 2, 4, 4) and got.shape == (2, 1, 16, 32, 3)
    assert relative_error(mean, _numpy(posterior.mean)) < 1e-5
    assert relative_error(logvar, _numpy(posterior.logvar)) < 1e-5
    assert relative_error(latents, _numpy(posterior.mode() * scale)) < 1e-5
    assert relative_error(got, _numpy(decoded)) < 1e-5


def _perturbed_tiny(seed: int) -> cv.AutoencoderKLCogVideoX:
    """A random ``TINY`` model whose norms and biases are perturbed too (so no path is tested vacuously)."""
    model = cv.init_model(TINY, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if var[...].ndim == 1:
            var.set_value(var[...] + 0.1 * jnp.asarray(rng.standard_normal(var.shape), var.dtype))
    return model


@nnx.jit
def _chunked(model: cv.AutoencoderKLCogVideoX, videos: jax.Array):
    """Encode in chunks of 8 frames, then decode that in chunks of 2 latent frames (after the first frame / latent
    frame)."""
    mean = model.encode(videos, chunk_frames=8).mean
    return mean, model.decode(mean, chunk_frames=2)


_encode_chunk = nnx.jit(lambda m, x, cache: m.encode_chunk(x, cache))


def test_chunked_encode_and_decode_equal_one_shot():
    """A 17-frame clip encoded 1 + 8, 8 frames at a time and the result decoded 1 + 2, 2 latent frames at a time,
    the causal convs' past passed along as the cache: one shot's latents and frames. A zeroed cache changes the
    second chunk, so the cache carries the past."""
    model = _perturbed_tiny(0)
    videos = jnp.asarray(make_inputs(TINY, 3)["videos"])
    mean, _, decoded = _outputs(model, videos)
    assert mean.shape == (2, 5, 2, 4, 4) and decoded.shape == videos.shape
    chunked_mean, chunked_decoded = _chunked(model, videos)
    assert relative_error(chunked_mean, mean) < 1e-5
    assert relative_error(chunked_decoded, decoded) < 1e-5
    first, cache = _encode_chunk(model, videos[:, :9], None)
    second, _ = _encode_chunk(model, videos[:, 9:], cache)
    no_past, _ = _encode_chunk(model, videos[:, 9:], jax.tree.map(jnp.zeros_like, cache))
    assert relative_error(jnp.concatenate([first.mean, second.mean], axis=1), mean) < 1e-5
    assert relative_error(no_past.mean, mean[:, 3:]) > 1e-2


def test_encode_and_decode_chunk_frames_loop_over_chunks():
    """``encode(chunk_frames=)`` / ``decode(chunk_frames=)`` split as documented (checked on the abstract model's
    shapes, no compute): 1 + 8 m frames -> 1 + 2 m latent frames -> 1 + 8 m frames, whatever the chunk size."""
    model, videos, latents = cv.abstract_model(TINY), jnp.zeros((1, 33, 8, 16, 3)), jnp.zeros((1, 9, 2, 4, 4))
    for chunk in (8, 24):
        posterior = nnx.eval_shape(lambda m, chunk=chunk: m.encode(videos, chunk_frames=chunk), model)
        assert posterior.mean.shape == latents.shape, chunk
    assert TINY.latent_frames(33) == 9
    assert cv.CogVideoXVAEConfig(block_out_channels=(32, 32), temporal_compression_ratio=2).latent_frames(33) == 17
    for chunk in (2, 6):
        decoded = nnx.eval_shape(lambda m, chunk=chunk: m.decode(latents, chunk_frames=chunk), model)
        assert decoded.shape == videos.shape, chunk


def test_every_diffusers_conv_is_a_site(cog_reference):
    ref, folder = cog_reference
    model = cv.from_diffusers(folder)
    state = ref.state_dict()
    convs = [n for n in state if n.endswith(".weight") and state[n].ndim in (4, 5)]
    assert sorted(f"{s.path.replace('/', '.')}.weight" for s in find_sites(model)) == sorted(convs)
    assert {s.spec.kind for s in find_sites(model)} == {"conv"}


def test_bfloat16_compute_stays_near_float32():
    """bf16 activations (norms in float32) on float32 weights: within bf16's few-percent error."""
    model = _perturbed_tiny(2)
    low = nnx.merge(nnx.graphdef(cv.abstract_model(TINY.replace(dtype="bfloat16"))), nnx.state(model))
    videos = jnp.asarray(make_inputs(TINY, 5)["videos"])
    got, expected = _outputs(low, videos)[2], _outputs(model, videos)[2]
    assert got.dtype == jnp.bfloat16
    assert relative_error(got.astype(jnp.float32), expected) < 5e-2


# ----------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------


def _smooth_videos(n: int, frames: int, seed: int) -> np.ndarray:
    """``n`` clips of ``TINY``'s frame size: a coarse random 2 x 4 grid drifting over time, plus noise."""
    s, rng = TINY.spatial_compression, np.random.default_rng(seed)
    start, drift = rng.uniform(-1, 1, (2, n, 1, 2, 4, 3))
    coarse = start + drift * np.linspace(0, 1, frames)[None, :, None, None, None]
    coarse = np.repeat(np.repeat(coarse, s, axis=2), s, axis=3)
    return np.clip(coarse + 0.2 * rng.standard_normal(coarse.shape), -1, 1).astype(np.float32)


def _rms_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def test_rtn_and_gptq_stay_close_to_float():
    """int8 per-channel weights on every conv but the keep_float interface convs; GPTQ, calibrated block by block
    on the videos (encoder) and the posterior means (decoder), lands closer to float than rounding on held-out
    clips."""
    model = _perturbed_tiny(3)
    calib, held_out = {"videos": _smooth_videos(4, 9, 1)}, jnp.asarray(_smooth_videos(2, 17, 2))
    expected = _outputs(model, held_out)[2]
    errors = {}
    for recipe in ("rtn-w8", "gptq-w8"):
        qmodel = quantize(model, recipe, calib, batch_size=2, progress=False)
        quantized = {path for path, _ in qmodel.quantization.sites}
        assert quantized == {s.path for s in find_sites(model)} - set(cv.FAMILY.keep_float), recipe
        errors[recipe] = _rms_error(_outputs(qmodel, held_out)[2], expected)
    assert errors["rtn-w8"] < 0.06, errors
    assert errors["gptq-w8"] < errors["rtn-w8"], errors


def test_calibration_data_is_checked():
    model = cv.init_model(TINY, jax.random.key(0))
    videos = _smooth_videos(2, 9, 3)
    with pytest.raises(ValueError, match=r"calibration must be a dict \{'videos'"):
        quantize(model, "gptq-w8", videos, progress=False)
    with pytest.raises(ValueError, match=r"F = 1 \+ 8 m frames"):
        quantize(model, "gptq-w8", {"videos": videos[:, :5]}, progress=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(model, "gptq-w8", {"videos": np.full_like(videos, np.nan)}, progress=False)


def test_export_refuses_a_quantized_model(tmp_path):
    qmodel = quantize(cv.init_model(TINY, jax.random.key(0)), "rtn-w8", progress=False)
    with pytest.raises(ValueError, match="holds a quantized weight"):
        cv.to_diffusers(qmodel, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 5, 8, 16, 3), (1, 16, 8, 16, 3), (1, 9, 8, 16, 4), (1, 9, 6, 16, 3),
                                   (9, 8, 16, 3), (1, 3, 9, 8, 16)])
def test_bad_videos_are_refused(shape):
    model = cv.abstract_model(TINY)
    with pytest.raises(ValueError, match=r"videos must be \[B, F, H, W, 3\] \(channels last\) with F = 1 \+ 8 m "
                                         r"frames .* and H, W multiples of 4; got shape"):
        model.encode(jnp.zeros(shape))


def test_bad_latents_chunks_and_chunk_sizes_are_refused():
    model = cv.abstract_model(TINY)
    for shape in ((1, 2, 2, 4, 4), (1, 3, 2, 4, 3), (3, 2, 4, 4)):
        with pytest.raises(ValueError, match=r"latents must be \[B, f, h, w, 4\] \(channels last\) with f = 1 \+ 2 m"):
            model.decode(jnp.zeros(shape))
    cache = {"conv_in": jnp.zeros((1, 2, 8, 16, 3))}
    with pytest.raises(ValueError, match=r"F = 8 m frames \(a chunk after the first"):
        model.encode_chunk(jnp.zeros((1, 9, 8, 16, 3)), cache)
    with pytest.raises(ValueError, match=r"f = 2 m latent frames \(a chunk after the first"):
        model.decode_chunk(jnp.zeros((1, 3, 2, 4, 4)), cache)
    with pytest.raises(ValueError, match="chunk_frames=4 must be a positive multiple of 8"):
        model.encode(jnp.zeros((1, 17, 8, 16, 3)), chunk_frames=4)
    with pytest.raises(ValueError, match="chunk_frames=3 must be a positive multiple of 2"):
        model.decode(jnp.zeros((1, 5, 2, 4, 4)), chunk_frames=3)


def test_config_is_validated():
    with pytest.raises(ValueError, match="divisible by norm_num_groups=32"):
        cv.CogVideoXVAEConfig(block_out_channels=(16, 32))
    with pytest.raises(ValueError, match="temporal_compression_ratio=8: use 1, 2 or 4"):
        cv.CogVideoXVAEConfig(temporal_compression_ratio=8)
    with pytest.raises(ValueError, match=r"at most 2\^1"):
        cv.CogVideoXVAEConfig(block_out_channels=(32, 32), temporal_compression_ratio=4)
    with pytest.raises(ValueError, match="latent_channels must be a positive int"):
        cv.CogVideoXVAEConfig(latent_channels=0)
    with pytest.raises(ValueError, match="scaling_factor must be a finite positive number"):
        cv.CogVideoXVAEConfig(scaling_factor=float("nan"))


def _write_folder(tmp_path: Path, **config_changes) -> Path:
    """A valid tiny diffusers folder written by jquant, its config.json changed."""
    folder = cv.to_diffusers(cv.init_model(TINY, jax.random.key(0)), tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | config_changes))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"down_block_types": ["CogVideoXDownBlock3D", "DownEncoderBlock2D", "CogVideoXDownBlock3D"]},
     "down_block_types=.*DownEncoderBlock2D"),
    ({"up_block_types": ["CogVideoXUpBlock3D"]}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"use_quant_conv": True}, "use_quant_conv: quant convs are not supported"),
    ({"shift_factor": 0.1}, "sets shift_factor"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "latents_mean"),
    ({"temporal_compression_ratio": 2.5}, "temporal_compression_ratio=2.5"),
    ({"use_tiling": True}, r"does not handle: \['use_tiling'\]"),
])
def test_unsupported_config_attributes_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        cv.from_diffusers(_write_folder(tmp_path, **changes))


def test_tensor_mismatches_are_refused(tmp_path):
    from jquant.models import hf_io

    folder = _write_folder(tmp_path)
    tensors = hf_io.read_safetensors(folder, weights_name=hf_io.DIFFUSERS_FILE)
    config = cv.config_from_diffusers(json.loads((folder / "config.json").read_text()))
    name = "decoder.norm_out.conv_y.conv.weight"
    with pytest.raises(ValueError, match=rf"'{name}' is missing"):
        cv.from_tensors(config, {k: v for k, v in tensors.items() if k != name})
    wrong = tensors | {"encoder.conv_in.conv.weight": np.zeros((8, 3, 1, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"'encoder.conv_in.conv.weight' has shape \(8, 3, 1, 3, 3\), but the config "
                                         r"implies \(8, 3, 3, 3, 3\)"):
        cv.from_tensors(config, wrong)
    extra = tensors | {"quant_conv.weight": np.zeros((8, 8, 1, 1, 1), np.float32)}
    with pytest.raises(ValueError, match="unexpected tensors.*quant_conv.weight"):
        cv.from_tensors(config, extra)
