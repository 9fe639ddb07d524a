"""LPIPS (Zhang et al. 2018), version 0.1, from local weights files: a torchvision backbone and the linear heads.

``load_lpips(backbone_path, linear_path, net=None)`` reads torchvision's ``alexnet-owt-7be5be79.pth`` /
``vgg16-397923af.pth`` (the classifier layers are ignored) and the lpips package's ``weights/v0.1/alex.pth`` /
``vgg.pth`` (shipped inside the lpips wheel), or the same tensors as ``.safetensors`` / ``.npz``; ``net``
(``"alex"`` or ``"vgg"``) is read from the backbone's first convolution when not given. ``lpips(a, b, net)``
gives one distance per image pair ``[B]`` for images in ``[-1, 1]`` (``jquant.models.lpips_net``).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from jquant.eval.fid import check_images
from jquant.eval.weights_file import check_tensors, read_weights
from jquant.models.lpips_net import (
    BACKBONES,
    MIN_SIZE,
    LPIPSNet,
    backbone_tensors,
    from_state_dicts,
    is_unused_backbone_tensor,
    linear_tensors,
)
from jquant.module_jit import module_jit


def _infer_net(backbone: dict[str, np.ndarray], source: str) -> str:
    first = backbone.get("features.0.weight")
    for net in BACKBONES:
        if first is not None and tuple(first.shape) == backbone_tensors(net)["features.0.weight"]:
            return net
    raise ValueError(f"{source}: not a torchvision AlexNet or VGG16 state dict (features.0.weight is "
                     f"{None if first is None else tuple(first.shape)}); pass net='alex' or 'vgg' to see which "
                     "tensors differ.")


def load_lpips(backbone_path: str | os.PathLike, linear_path: str | os.PathLike, net: str | None = None) -> LPIPSNet:
    """LPIPS from a torchvision backbone file and an lpips linear-head file (module docstring), both checked first."""
    if net is not None and net not in BACKBONES:
        raise ValueError(f"load_lpips: net={net!r}; use one of {sorted(BACKBONES)} (or None to read it from the "
                         "backbone file).")
    backbone = read_weights(backbone_path, what="LPIPS backbone weights")
    linear = read_weights(linear_path, what="LPIPS linear-head weights")
    net = net or _infer_net(backbone, str(backbone_path))
    check_tensors(backbone, backbone_tensors(net), source=str(backbone_path), ignored=is_unused_backbone_tensor,
                  what=f"LPIPS' torchvision {'AlexNet' if net == 'alex' else 'VGG16'} backbone (net={net!r})")
    check_tensors(linear, linear_tensors(net), source=str(linear_path),
                  what=f"LPIPS v0.1 linear heads for net={net!r} (the lpips package's weights/v0.1/{net}.pth)")
    return from_state_dicts(net, backbone, linear, source=f"{backbone_path} + {linear_path}")


@module_jit
def _distances(net: LPIPSNet, a, b):
    return net(a, b)


def lpips(a, b, net: LPIPSNet, *, batch_size: int = 32) -> np.ndarray:
    """LPIPS of each image pair: ``a, b [B, H, W, 3]`` in ``[-1, 1]`` -> ``[B]`` (float64 copy of float32 values)."""
    a = check_images(a, "lpips", MIN_SIZE[net.net])
    b = check_images(b, "lpips", MIN_SIZE[net.net])
    if a.shape != b.shape:
        raise ValueError(f"lpips: a and b must have one shape (image pairs), got {a.shape} and {b.shape}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"lpips: batch_size must be a positive int, got {batch_size!r}.")
    return np.concatenate([np.asarray(_distances(net, jnp.asarray(a[i:i + batch_size]), jnp.asarray(b[i:i + batch_size])),
                                      np.float64) for i in range(0, len(a), batch_size)])
