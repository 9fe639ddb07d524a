"""Inflation of an image VAE into HunyuanVideo's causal 3-D VAE (``models/vae_inflation.py``): an inflated causal
conv is the 2-D conv of each frame (against a float64 numpy convolution with replicated borders), an inflated
down-sampler reads the moved taps, every image weight lands where the docstring says, the decoder ignores the extra
latent channels, and mismatched sizes are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.models import hunyuan_video_vae as hv
from jquant.models import vae
from jquant.models.hunyuan_video_vae_blocks import CausalConv3d
from jquant.models.vae_inflation import inflate_image_vae, inflate_kernel

IMAGE = vae.VAEConfig(block_out_channels=(8, 8, 16), layers_per_block=1, latent_channels=2, norm_num_groups=4,
                      sample_size=16, use_quant_conv=False, use_post_quant_conv=False)
VIDEO = hv.HunyuanVideoVAEConfig(block_out_channels=(8, 8, 16), layers_per_block=1, latent_channels=5,
                                 norm_num_groups=4, spatial_compression_ratio=4, temporal_compression_ratio=4)


def _conv_frame(frame: np.ndarray, w: np.ndarray, stride: int, taps: tuple[int, ...]) -> np.ndarray:
    """float64 reference: ``out[i, j] = Σ_ab w[a, b] · x_e[s i + taps[a], s j + taps[b]]`` where ``x_e`` is the frame
    ``[H, W, C]`` with one replicated pixel on each side and ``w [k, k, C_in, C_out]``."""
    x = np.pad(frame.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, wd = (frame.shape[0] - 1) // stride + 1, (frame.shape[1] - 1) // stride + 1
    out = np.zeros((h, wd, w.shape[-1]))
    for i in range(h):
        for j in range(wd):
            for a in range(w.shape[0]):
                for b in range(w.shape[1]):
                    out[i, j] += x[stride * i + taps[a], stride * j + taps[b]] @ w[a, b]
    return out


def _moved(w: np.ndarray) -> np.ndarray:
    """2-D down-sampler taps 0, 1, 2 moved to 1, 2, 2 (the 3-D conv reads ``2i - 1 .. 2i + 1``, the 2-D one ``2i ..
    2i + 2``) along both spatial axes of ``w [3, 3, C_in, C_out]``."""
    moved = np.zeros_like(w)
    for a, a3 in enumerate((1, 2, 2)):
        for b, b3 in enumerate((1, 2, 2)):
            moved[a3, b3] += w[a, b]
    return moved


def _causal_conv(kernel: np.ndarray, c_in: int, c_out: int, stride: int) -> CausalConv3d:
    conv = CausalConv3d(c_in, c_out, 3, stride=(stride,) * 3, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    conv.conv.kernel.set_value(jnp.asarray(kernel, jnp.float32))
    conv.conv.bias.set_value(jnp.zeros((c_out,), jnp.float32))
    return conv


def test_inflated_causal_conv_is_the_2d_conv_of_each_frame():
    rng = np.random.default_rng(0)
    c_in, c_out = 3, 5
    w = rng.normal(size=(3, 3, c_in, c_out))
    kernel = inflate_kernel(w.reshape(-1, c_out), (27 * c_in, c_out))
    clip = rng.normal(size=(2, 4, 6, 7, c_in)).astype(np.float32)
    out = np.asarray(_causal_conv(kernel, c_in, c_out, 1)(jnp.asarray(clip)))
    reference = np.stack([np.stack([_conv_frame(f, w, 1, (0, 1, 2)) for f in video]) for video in clip])
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_inflated_downsampler_keeps_each_pairs_last_frame_and_moves_the_taps():
    rng = np.random.default_rng(1)
    c = 4
    w = rng.normal(size=(3, 3, c, c))
    kernel = inflate_kernel(w.reshape(-1, c), (27 * c, c), downsampler=True)
    clip = rng.normal(size=(1, 5, 8, 8, c)).astype(np.float32)
    out = np.asarray(_causal_conv(kernel, c, c, 2)(jnp.asarray(clip)))
    reference = np.stack([_conv_frame(clip[0, f], _moved(w), 2, (0, 1, 2)) for f in (0, 2, 4)])
    assert out.shape == (1, 3, 4, 4, c)
    np.testing.assert_allclose(out[0], reference, rtol=1e-5, atol=1e-5)


def _flat(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.state(model, nnx.Param).flat_state()}


def test_every_image_weight_lands_on_the_current_frame_tap():
    image = vae.init_model(IMAGE, jax.random.key(3))
    video = inflate_image_vae(image, VIDEO, seed=4)
    src, dst = _flat(image), _flat(video)
    l2, l3 = IMAGE.latent_channels, VIDEO.latent_channels
    for name, value in dst.items():
        if name.startswith(("quant_conv/", "post_quant_conv/")):
            expected = np.eye(*value.shape) if value.ndim == 2 else np.zeros_like(value)
            np.testing.assert_array_equal(value, expected, err_msg=name)
            continue
        image_name = name.replace("/conv/kernel", "/kernel").replace("/conv/bias", "/bias")
        source = src[image_name]
        if name.endswith("kernel") and value.shape[0] != source.shape[0]:
            taps = value.reshape(3, -1, value.shape[-1])
            if name == "encoder/conv_out/conv/kernel":
                np.testing.assert_array_equal(taps[2][:, :l2], source[:, :l2])
                np.testing.assert_array_equal(taps[2][:, l3:l3 + l2], source[:, l2:])
                assert not taps[:2, :, :l2].any() and not taps[:2, :, l3:l3 + l2].any()
            elif name == "decoder/conv_in/conv/kernel":
                rows = taps[2].reshape(9, l3, -1)
                np.testing.assert_array_equal(rows[:, :l2], source.reshape(9, l2, -1))
                assert not rows[:, l2:].any()
            else:
                assert not taps[:2].any(), name
                w = source.reshape(3, 3, -1, source.shape[-1])
                expected = _moved(w) if "downsamplers" in name else w
                np.testing.assert_allclose(taps[2], expected.reshape(source.shape), rtol=1e-6, err_msg=name)
        elif name == "encoder/conv_out/conv/bias":
            np.testing.assert_array_equal(value[:l2], source[:l2])
            np.testing.assert_array_equal(value[l3:l3 + l2], source[l2:])
        else:
            np.testing.assert_array_equal(value, source, err_msg=name)


def test_the_inflated_decoder_ignores_the_extra_latent_channels():
    video = inflate_image_vae(vae.init_model(IMAGE, jax.random.key(5)), VIDEO, seed=6)
    rng = np.random.default_rng(7)
    z = rng.normal(size=(2, 3, 4, 4, VIDEO.latent_channels)).astype(np.float32)
    other = z.copy()
    other[..., IMAGE.latent_channels:] = rng.normal(size=other[..., IMAGE.latent_channels:].shape)
    np.testing.assert_array_equal(np.asarray(video.decode(jnp.asarray(z))), np.asarray(video.decode(jnp.asarray(other))))


@pytest.mark.parametrize("change, field", [({"block_out_channels": (8, 16, 16)}, "block_out_channels"),
                                           ({"latent_channels": 1}, "latent_channels"),
                                           ({"norm_num_groups": 2}, "norm_num_groups")])
def test_mismatched_sizes_are_refused(change, field):
    import dataclasses

    image = vae.init_model(IMAGE, jax.random.key(8))
    with pytest.raises(ValueError, match=field):
        inflate_image_vae(image, dataclasses.replace(VIDEO, **change))
