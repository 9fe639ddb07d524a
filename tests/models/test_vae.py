"""jquant's image VAE (``AutoencoderKL``): the shared diffusers suite (parity with diffusers' ``AutoencoderKL`` in
float32 and float64 on encode mean / logvar and decode, export round trip, checkpoint round trips float and
quantized, load by ``_class_name``, keep_float) plus the family's own checks: the posterior, the pipelines'
latent scaling, refusals, and quantization with RTN and GPTQ.

Reference models are tiny diffusers ``AutoencoderKL`` with every tensor perturbed, written by
``save_pretrained``: SD3 / Flux style (16 latent channels, no quant convs, shift factor), SD style (quant
convs, 4 latent channels, two resnets per block) and one without mid-block attention and with other
image channel counts. Images are non-square (``8f x 4f``) so a transposed spatial axis shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.models import hf_io, vae
from jquant.quantization import quantize
from jquant.sites import find_sites
from jquant.testing.diffusion_suite import DiffusersSpec, DiffusersSuite
from jquant.testing.hf_reference import relative_error

# case -> diffusers AutoencoderKL keyword arguments (besides the block types, one per block_out_channels entry).
CASES = {
    "sd3-style": dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
                      use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
    "sd-style": dict(block_out_channels=(16, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8),
    "no-attention": dict(in_channels=2, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=3, norm_num_groups=4, mid_block_add_attention=False),
}
# One width, so its quantizable weights come in two shapes (3x3 convs [72, 8], attention [8, 8]): GPTQ compiles twice.
TINY = vae.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)


def build_reference(case: str, folder: Path, seed: int):
    """A tiny diffusers ``AutoencoderKL`` of ``case`` with every tensor perturbed, saved to ``folder`` (eval mode)."""
    import torch
    from diffusers import AutoencoderKL

    kwargs = CASES[case]
    n = len(kwargs["block_out_channels"])
    torch.manual_seed(seed)
    model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                          **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            spread = 0.1 if p.ndim == 1 else 0.5 * float(p.std())
            p.add_(spread * torch.randn_like(p))
    model.eval().save_pretrained(folder)
    return model


def reload_reference(case: str, folder: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder).eval()


def make_inputs(config: vae.VAEConfig, seed: int) -> dict[str, np.ndarray]:
    """Two images ``[2, 8f, 4f, C_in]`` uniform in ``[-1, 1]``."""
    f = config.downsampling
    images = np.random.default_rng(seed).uniform(-1, 1, (2, 8 * f, 4 * f, config.in_channels))
    return {"images": images.astype(np.float32)}


def _torch(array, dtype):
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
            posterior = ref.encode(_torch(inputs["images"], tdtype)).latent_dist
            decoded = ref.decode(posterior.mode()).sample
        parts = (posterior.mean, posterior.logvar, decoded)
        return np.concatenate([_numpy(p).astype(np.float64).ravel() for p in parts])
    finally:
        ref.float()


@nnx.jit
def _outputs(model: vae.AutoencoderKL, images: jax.Array):
    mean, logvar = model.encode(images)
    return mean, logvar, model(images)


def forward(model: vae.AutoencoderKL, inputs: dict):
    """``(mean, logvar, model(images))``: the posterior and diffusers' forward (``decode(mode)``), jitted."""
    return _outputs(model, jnp.asarray(inputs["images"]))


class TestVAEFamily(DiffusersSuite):
    spec = DiffusersSpec(
        family=vae.FAMILY,
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
def sd3_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae-sd3")
    return build_reference("sd3-style", folder, 7), folder


def test_encode_and_decode_match_diffusers_separately(sd3_reference):
    """Each output on its own scale: the mean, the logvar, and decode of latents unrelated to any image."""
    import torch

    ref, folder = sd3_reference
    model = vae.from_diffusers(folder)
    images = make_inputs(model.config, 11)["images"]
    latents = np.random.default_rng(12).standard_normal((3, 8, 4, model.config.latent_channels)).astype(np.float32)
    with torch.no_grad():
        posterior = ref.encode(_torch(images, torch.float32)).latent_dist
        decoded = ref.decode(_torch(latents, torch.float32)).sample
    mean, logvar = model.encode(jnp.asarray(images))
    assert relative_error(mean, _numpy(posterior.mean)) < 1e-5
    assert relative_error(logvar, _numpy(posterior.logvar)) < 1e-5
    assert relative_error(model.decode(jnp.asarray(latents)), _numpy(decoded)) < 1e-5


def test_latent_scaling_follows_the_sd3_and_flux_pipelines(sd3_reference):
    """``latents = (z - shift) * scale`` (training scripts) and ``decode(latents / scale + shift)`` (pipelines)."""
    import torch

    ref, folder = sd3_reference
    model = vae.from_diffusers(folder)
    scale, shift = ref.config.scaling_factor, ref.config.shift_factor
    assert (model.config.scaling_factor, model.config.shift_factor) == (scale, shift)
    images = make_inputs(model.config, 13)["images"]
    latents = np.random.default_rng(14).standard_normal((2, 8, 4, model.config.latent_channels)).astype(np.float32)
    with torch.no_grad():
        mode = ref.encode(_torch(images, torch.float32)).latent_dist.mode()
        decoded = ref.decode(_torch(latents, torch.float32) / scale + shift).sample
    assert relative_error(model.latents(jnp.asarray(images)), _numpy((mode - shift) * scale)) < 1e-5
    assert relative_error(model.decode_latents(jnp.asarray(latents)), _numpy(decoded)) < 1e-5


def test_posterior_sample_and_kl():
    """KL against diffusers' ``DiagonalGaussianDistribution.kl``; samples have the posterior's mean and spread."""
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(3)
    mean, logvar = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 5, 4))
    reference = DiagonalGaussianDistribution(_torch(np.concatenate([mean, logvar], -1), torch.float64)).kl()
    posterior = vae.Posterior(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
    assert relative_error(posterior.kl(), reference.numpy()) < 1e-6
    wide = vae.Posterior(jnp.broadcast_to(posterior.mean[:1], (20000, 3, 5, 4)),
                         jnp.broadcast_to(posterior.logvar[:1], (20000, 3, 5, 4)))
    draws = np.asarray(wide.sample(jax.random.key(0)))
    std = np.exp(0.5 * logvar[0])
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean[0]), 5 * std / np.sqrt(20000))
    np.testing.assert_allclose(draws.std(0), std, rtol=0.05)
    assert not np.array_equal(draws, np.asarray(wide.sample(jax.random.key(1))))


def test_logvar_is_clipped_like_diffusers():
    model = vae.init_model(TINY, jax.random.key(0))
    bias = model.quant_conv.bias
    latent = TINY.latent_channels
    bias.set_value(bias[...].at[latent:].set(jnp.asarray([1e3, -1e3] * (latent // 2))))
    _, logvar = model.encode(jnp.asarray(make_inputs(TINY, 0)["images"]))
    np.testing.assert_array_equal(np.unique(np.asarray(logvar)), [-30.0, 20.0])


def test_every_diffusers_conv_and_linear_is_a_site(sd3_reference):
    ref, folder = sd3_reference
    model = vae.from_diffusers(folder)
    kinds = {}
    for site in find_sites(model):
        kinds[site.spec.kind] = kinds.get(site.spec.kind, 0) + 1
    state = ref.state_dict()
    weights = [n for n in state if n.endswith(".weight") and state[n].ndim in (2, 4)]
    assert kinds == {"conv": sum(state[n].ndim == 4 for n in weights),
                     "linear": sum(state[n].ndim == 2 for n in weights)}


def test_jit_gives_the_eager_outputs():
    model = vae.init_model(TINY, jax.random.key(1))
    images = jnp.asarray(make_inputs(TINY, 2)["images"])
    assert relative_error(nnx.jit(lambda m, x: m(x))(model, images), model(images)) < 1e-5


def test_bfloat16_compute_stays_near_float32():
    """bf16 activations (norms and softmax in float32) on the float32 weights: within bf16's few-percent error."""
    model = vae.init_model(TINY, jax.random.key(3))
    low = nnx.merge(nnx.graphdef(vae.abstract_model(TINY.replace(dtype="bfloat16"))), nnx.state(model))
    images = jnp.asarray(make_inputs(TINY, 4)["images"])
    got = low(images)
    assert got.dtype == jnp.bfloat16 and low.encode(images).mean.dtype == jnp.bfloat16
    assert relative_error(got.astype(jnp.float32), model(images)) < 5e-2


# ----------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------


def _smooth_images(n: int, config: vae.VAEConfig, seed: int) -> np.ndarray:
    """``n`` images of ``make_inputs``' size: a coarse random 4 x 2 grid upsampled, plus noise, in ``[-1, 1]``."""
    f, rng = config.downsampling, np.random.default_rng(seed)
    coarse = np.repeat(np.repeat(rng.uniform(-1, 1, (n, 4, 2, config.in_channels)), 2 * f, axis=1), 2 * f, axis=2)
    return np.clip(coarse + 0.2 * rng.standard_normal(coarse.shape), -1, 1).astype(np.float32)


def _rms_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def test_rtn_and_gptq_stay_close_to_float():
    """int8 per-channel weights on every site but the keep_float interface convs; GPTQ, calibrated block by block
    on the images (encoder) and the decoded means (decoder), lands closer to float than rounding on held-out images.
    (The suite's tiny model and batch shapes, so its compiled programs are reused.)"""
    model = vae.init_model(TINY, jax.random.key(0))
    calib, held_out = {"images": _smooth_images(8, TINY, 1)}, jnp.asarray(_smooth_images(8, TINY, 2))
    expected = model(held_out)
    errors = {}
    for recipe in ("rtn-w8", "gptq-w8"):
        qmodel = quantize(model, recipe, calib, batch_size=2, progress=False)
        quantized = {path for path, _ in qmodel.quantization.sites}
        assert quantized == {s.path for s in find_sites(model)} - set(vae.FAMILY.keep_float), recipe
        errors[recipe] = _rms_error(qmodel(held_out), expected)
    assert errors["rtn-w8"] < 0.06, errors
    assert errors["gptq-w8"] < errors["rtn-w8"], errors


def test_calibration_data_is_checked():
    model = vae.init_model(TINY, jax.random.key(0))
    images = _smooth_images(2, TINY, 3)
    with pytest.raises(ValueError, match=r"calibration must be a dict \{'images'"):
        quantize(model, "gptq-w8", images, progress=False)
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\]"):
        quantize(model, "gptq-w8", {"images": images[..., :2]}, progress=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(model, "gptq-w8", {"images": np.full_like(images, np.nan)}, progress=False)


def test_export_refuses_a_quantized_model(tmp_path):
    qmodel = quantize(vae.init_model(TINY, jax.random.key(0)), "rtn-w8", progress=False)
    with pytest.raises(ValueError, match="holds a quantized weight"):
        vae.to_diffusers(qmodel, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------


def test_bad_images_and_latents_are_refused():
    model = vae.abstract_model(TINY)
    f = TINY.downsampling
    for shape in ((4 * f, 4 * f, 3), (1, 4 * f, 4 * f, 4), (1, 3, 4 * f, 4 * f), (1, 4 * f + 1, 4 * f, 3)):
        with pytest.raises(ValueError, match=rf"images must be \[B, H, W, 3\] \(channels last\) with H and W "
                                             rf"multiples of {f}; got shape \({shape[0]}, {shape[1]}, "):
            model.encode(jnp.zeros(shape))
    with pytest.raises(ValueError, match=r"latents must be \[B, h, w, 4\]"):
        model.decode(jnp.zeros((1, 4, 4, 3)))


def test_config_is_validated():
    with pytest.raises(ValueError, match="divisible by norm_num_groups=32"):
        vae.VAEConfig(block_out_channels=(16, 32))
    with pytest.raises(ValueError, match="VAEConfig.latent_channels must be a positive int"):
        vae.VAEConfig(latent_channels=0)
    with pytest.raises(ValueError, match="scaling_factor must be a finite positive number"):
        vae.VAEConfig(scaling_factor=float("nan"))
    with pytest.raises(ValueError, match="VAEConfig.dtype must be"):
        vae.VAEConfig(dtype="int8")


def _write_folder(tmp_path: Path, **config_changes) -> Path:
    """A valid tiny diffusers folder written by jquant, its config.json changed."""
    folder = vae.to_diffusers(vae.init_model(TINY, jax.random.key(0)), tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | config_changes))
    return folder


@pytest.mark.parametrize("changes, message", [
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), "down_block_types=.*AttnDownEncoder"),
    (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types"),
    (dict(act_fn="gelu"), "act_fn='gelu'"),
    (dict(latents_mean=[0.0] * 4, latents_std=[1.0] * 4), "latents_mean"),
    (dict(use_tiling=True), r"does not handle: \['use_tiling'\]"),
])
def test_unsupported_config_attributes_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        vae.from_diffusers(_write_folder(tmp_path, **changes))


def test_tensor_mismatches_are_refused(tmp_path):
    folder = _write_folder(tmp_path)
    tensors = hf_io.read_safetensors(folder, weights_name=hf_io.DIFFUSERS_FILE)
    config = json.loads((folder / "config.json").read_text())
    missing = {k: v for k, v in tensors.items() if k != "encoder.mid_block.attentions.0.to_q.weight"}
    with pytest.raises(ValueError, match=r"'encoder.mid_block.attentions.0.to_q.weight' is missing"):
        vae.from_tensors(vae.config_from_diffusers(config), missing)
    wrong = tensors | {"decoder.conv_in.weight": np.zeros((8, 4, 1, 1), np.float32)}
    with pytest.raises(ValueError, match=r"'decoder.conv_in.weight' has shape \(8, 4, 1, 1\), but the config implies "
                                         r"\(8, 4, 3, 3\)"):
        vae.from_tensors(vae.config_from_diffusers(config), wrong)
    extra = tensors | {"encoder.mid_block.attentions.0.query.weight": np.zeros((8, 8), np.float32)}
    with pytest.raises(ValueError, match="unexpected tensors.*query.weight"):
        vae.from_tensors(vae.config_from_diffusers(config), extra)
