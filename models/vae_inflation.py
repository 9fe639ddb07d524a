"""Initialise a causal 3-D video VAE (HunyuanVideo's) from a trained image VAE (diffusers' ``AutoencoderKL``).

"Inflation" (Carreira & Zisserman 2017, I3D; used for video VAEs by e.g. CV-VAE and Open-Sora-Plan): a 2-D conv
kernel ``W [k, k, C_in, C_out]`` becomes the causal 3-D kernel ``W3 [k_t, k, k, C_in, C_out]`` with ``W3[k_t - 1] =
W`` (the tap that reads the current frame: a causal conv's output frame ``t`` reads frames ``t - k_t + 1 .. t``) and
zeros on the past taps, so each output frame is the 2-D conv of its own input frame. Norms, attention projections
and 1x1 convs are copied. Where the two architectures differ:

- **Down-samplers.** diffusers' 2-D ``Downsample2D`` pads one zero row / column *after* and reads input pixels
  ``2i .. 2i + 2``; HunyuanVideo's strided causal conv pads one on each side and reads ``2i - 1 .. 2i + 1``. The
  2-D taps move one place (``0 -> 1``, ``1 -> 2``) and the last one, which has no counterpart, is added to the new
  last tap (``2 -> 2``): the best match on smooth images (``x[2i + 2] ≈ x[2i + 1]``), not an exact one.
- **Borders.** HunyuanVideo pads with replicated pixels, diffusers' VAE with zeros: equal away from the borders.
- **Time.** Strided temporal down-sampling keeps, at the inflated start, the last frame of each group (latent
  frame ``j`` encodes frame ``4 j``), and the decoder's temporal up-sampling repeats it: frames within a group start
  as copies that training then separates. GroupNorm statistics and the mid-block attention span all frames.
- **Latent channels.** The image latents ``L_2`` map to the first ``L_2`` of the video's ``L_3 >= L_2`` channels
  (means and log-variances alike); the encoder's other output channels keep their random initialisation and the
  decoder reads them through zero weights, so the inflated decoder's output starts independent of them.
- ``quant_conv`` / ``post_quant_conv``: copied when the image VAE has them, else the identity.

So a still clip reconstructs nearly as the image VAE reconstructs its frames (tested), which is a far better start
for training than random weights: the bundled ``jq-video-vae-tiny`` is trained this way from ``jq-vae-tiny``.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jquant.models import hunyuan_video_vae as hv
from jquant.models import vae as image_vae_family

# 2-D down-sampler tap -> HunyuanVideo's strided-conv tap (module docstring)
_DOWNSAMPLE_TAP = (1, 2, 2)


def check_inflatable(image_config: image_vae_family.VAEConfig, video_config: hv.HunyuanVideoVAEConfig) -> None:
    """Raise ``ValueError`` naming the field when ``video_config`` cannot be inflated from ``image_config``."""
    same = ("block_out_channels", "layers_per_block", "norm_num_groups", "in_channels", "out_channels",
            "mid_block_add_attention")
    for name in same:
        if getattr(image_config, name) != getattr(video_config, name):
            raise ValueError(f"inflate_image_vae: the video VAE's {name}={getattr(video_config, name)!r} must equal the "
                             f"image VAE's {getattr(image_config, name)!r}; build the video config with the image "
                             "VAE's sizes.")
    image_ratio = 2 ** (len(image_config.block_out_channels) - 1)
    if video_config.spatial_compression_ratio != image_ratio or video_config.compression_variant:
        raise ValueError(f"inflate_image_vae: the video VAE's spatial_compression_ratio "
                         f"{video_config.spatial_compression_ratio} must be the image VAE's {image_ratio} (and "
                         "compression_variant off).")
    if video_config.latent_channels < image_config.latent_channels:
        raise ValueError(f"inflate_image_vae: the video VAE's latent_channels={video_config.latent_channels} must be "
                         f">= the image VAE's {image_config.latent_channels}.")


def inflate_image_vae(image_vae: image_vae_family.AutoencoderKL, video_config: hv.HunyuanVideoVAEConfig, *,
                      seed: int = 0) -> hv.AutoencoderKLHunyuanVideo:
    """A HunyuanVideo VAE of ``video_config`` whose weights are ``image_vae``'s, inflated (module docstring).

    Parameters the image VAE has no counterpart for (extra latent channels) keep the random initialisation of
    ``hv.init_model(video_config, PRNGKey(seed))``; the scaling factor is the video config's."""
    check_inflatable(image_vae.config, video_config)
    video = hv.init_model(video_config, jax.random.key(seed))
    image_params = {_path(p): np.asarray(v.get_value()) for p, v in nnx.state(image_vae, nnx.Param).flat_state()}
    latents_2d, latents_3d = image_vae.config.latent_channels, video_config.latent_channels
    state = nnx.state(video, nnx.Param)
    for path, variable in state.flat_state():
        name = _path(path)
        init = np.asarray(variable.get_value())
        source = image_params.get(_image_name(name))
        if name.startswith(("quant_conv/", "post_quant_conv/")) and source is None:
            value = _identity(init)
        elif source is None:
            raise ValueError(f"inflate_image_vae: the image VAE has no parameter for the video VAE's {name}.")
        elif name == "encoder/conv_out/conv/kernel":
            value = _inflate_latent_outputs(init, source, latents_2d, latents_3d)
        elif name == "encoder/conv_out/conv/bias":
            value = _map_latent_outputs(init, source, latents_2d, latents_3d)
        elif name == "decoder/conv_in/conv/kernel":
            value = _inflate_latent_inputs(init, source, latents_2d, latents_3d)
        elif name.startswith(("quant_conv/", "post_quant_conv/")):
            value = source  # both 1x1 (x1x1) convs: [C_in, C_out] and [C_out]
        elif name.endswith("/conv/kernel"):
            value = inflate_kernel(source, init.shape, downsampler="downsamplers" in name)
        else:
            value = source
        if value.shape != init.shape:
            raise ValueError(f"inflate_image_vae: {name} has shape {init.shape} in the video VAE but the inflated "
                             f"image weight has {value.shape}.")
        variable.set_value(value.astype(init.dtype))
    nnx.update(video, state)
    return video


def inflate_kernel(kernel_2d: np.ndarray, shape_3d: tuple[int, int], *, downsampler: bool = False) -> np.ndarray:
    """``[k k C_in, C_out]`` (jquant's matrix view of a 2-D conv) -> ``[k_t k k C_in, C_out]`` with the 2-D kernel on
    the last (current-frame) temporal tap, zeros elsewhere; ``downsampler`` moves the spatial taps as the module
    docstring says. A 1x1 kernel (``[C_in, C_out]`` in both) is returned as it is."""
    rows_2d, c_out = kernel_2d.shape
    rows_3d = shape_3d[0]
    if rows_2d == rows_3d:
        return kernel_2d
    c_in = _channels_in(rows_2d, rows_3d)
    k = round((rows_2d // c_in) ** 0.5)
    w = kernel_2d.reshape(k, k, c_in, c_out)
    if downsampler:
        moved = np.zeros_like(w)
        for a in range(k):
            for b in range(k):
                moved[_DOWNSAMPLE_TAP[a], _DOWNSAMPLE_TAP[b]] += w[a, b]
        w = moved
    k_t = rows_3d // rows_2d
    out = np.zeros((k_t, k, k, c_in, c_out), kernel_2d.dtype)
    out[-1] = w
    return out.reshape(rows_3d, c_out)


def _channels_in(rows_2d: int, rows_3d: int) -> int:
    """The input channel count of a square 3-D kernel with ``rows_3d = k^3 C`` rows whose 2-D slice has ``k^2 C``."""
    k = rows_3d // rows_2d
    if k * rows_2d != rows_3d or rows_2d % (k * k):
        raise ValueError(f"inflate_image_vae: cannot inflate a kernel of {rows_2d} rows into one of {rows_3d}.")
    return rows_2d // (k * k)


def _inflate_latent_outputs(init: np.ndarray, source: np.ndarray, l2: int, l3: int) -> np.ndarray:
    """Encoder ``conv_out``: its ``[mean (L_2); logvar (L_2)]`` outputs go to columns ``[0, L_2)`` and ``[L_3, L_3 +
    L_2)`` of the video's ``[mean (L_3); logvar (L_3)]``; the other columns keep ``init``."""
    inflated = inflate_kernel(source, init.shape)
    out = init.copy()
    out[:, :l2], out[:, l3:l3 + l2] = inflated[:, :l2], inflated[:, l2:]
    return out


def _map_latent_outputs(init: np.ndarray, source: np.ndarray, l2: int, l3: int) -> np.ndarray:
    out = init.copy()
    out[:l2], out[l3:l3 + l2] = source[:l2], source[l2:]
    return out


def _inflate_latent_inputs(init: np.ndarray, source: np.ndarray, l2: int, l3: int) -> np.ndarray:
    """Decoder ``conv_in`` ``[k^3 L_3, C]``: the image kernel ``[k^2 L_2, C]`` on the current-frame tap's first
    ``L_2`` input channels, zeros on every other row."""
    c_out = source.shape[1]
    k2 = source.shape[0] // l2
    k_t = init.shape[0] // (k2 * l3)
    out = np.zeros((k_t, k2, l3, c_out), source.dtype)
    out[-1, :, :l2] = source.reshape(k2, l2, c_out)
    return out.reshape(init.shape)


def _identity(init: np.ndarray) -> np.ndarray:
    return np.eye(*init.shape, dtype=init.dtype) if init.ndim == 2 else np.zeros_like(init)


def _image_name(video_name: str) -> str:
    """The image VAE's path of a video VAE parameter: causal convs keep their kernel one level down (``.../conv``)."""
    parts = video_name.split("/")
    if len(parts) >= 2 and parts[-2] == "conv" and parts[-1] in ("kernel", "bias") and not video_name.startswith(
            ("quant_conv/", "post_quant_conv/")):
        parts = parts[:-2] + parts[-1:]
    return "/".join(parts)


def _path(path: tuple) -> str:
    return "/".join(map(str, path))
