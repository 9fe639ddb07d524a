"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), version 0.1.

The lpips package's ``LPIPS(net="alex" | "vgg", version="0.1")`` (``lpips/lpips.py``, ``pretrained_networks.py``),
channels last. For images ``x, y [B, H, W, 3]`` in ``[-1, 1]``:

1. the scaling layer: ``(x - shift) / scale`` per channel, ``shift = (-0.030, -0.088, -0.188)``,
   ``scale = (0.458, 0.448, 0.450)``;
2. the backbone's five ReLU outputs ``f_l [B, H_l, W_l, C_l]`` (torchvision's ``features`` stack: AlexNet's five
   convolutions, ``C = 64, 192, 384, 256, 256``; VGG16's relu1_2, relu2_2, relu3_3, relu4_3, relu5_3,
   ``C = 64, 128, 256, 512, 512``), each unit-normalised along channels: ``f / (||f||_2 + 1e-10)``;
3. ``d(x, y) = Σ_l mean_{h,w} Σ_c w_{l,c} (f̂_l(x) - f̂_l(y))²_{h,w,c}`` with the learned ``1x1`` linear heads
   ``w_l [C_l]`` (``lin{l}.model.1.weight [1, C_l, 1, 1]``; their dropout is off at evaluation).

Convolutions (backbone and heads) are ``layers.Conv``; pooling is ``models.pooling.max_pool``. Parameter paths:
backbone conv ``features/{i}`` is torchvision's ``features.{index}`` (``BACKBONES[net]`` lists the indices), head
``lins/{l}`` is ``lin{l}.model.1``. Smallest input side: 32 (AlexNet), 16 (VGG16).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jquant.models.layers import Conv
from jquant.models.pooling import max_pool
from jquant.models.tensor_io import load_parameters

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10

# Per network: five stages, each (max pool (kernel, stride) before it or None, its convolutions as
# (torchvision features index, C_in, C_out, kernel, stride, padding)); a stage ends at an LPIPS tap.
_VGG = [(i, c_in, c_out, 3, 1, 1) for i, c_in, c_out in (
    (0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512))]
BACKBONES: dict[str, list[tuple[tuple[int, int] | None, list[tuple[int, ...]]]]] = {
    "alex": [(None, [(0, 3, 64, 11, 4, 2)]), ((3, 2), [(3, 64, 192, 5, 1, 2)]), ((3, 2), [(6, 192, 384, 3, 1, 1)]),
             (None, [(8, 384, 256, 3, 1, 1)]), (None, [(10, 256, 256, 3, 1, 1)])],
    "vgg": [(None, _VGG[0:2]), ((2, 2), _VGG[2:4]), ((2, 2), _VGG[4:7]), ((2, 2), _VGG[7:10]), ((2, 2), _VGG[10:13])],
}
MIN_SIZE = {"alex": 32, "vgg": 16}


def _convs(net: str) -> list[tuple[int, ...]]:
    return [conv for _, stage in BACKBONES[net] for conv in stage]


def channels(net: str) -> list[int]:
    """``C_l`` of the five taps."""
    return [stage[-1][2] for _, stage in BACKBONES[net]]


class LPIPSNet(nnx.Module):
    """``LPIPSNet(net)(x, y)`` -> ``[B]`` distances (module docstring)."""

    def __init__(self, net: str, *, rngs: nnx.Rngs):
        if net not in BACKBONES:
            raise ValueError(f"LPIPSNet: net={net!r}; use one of {sorted(BACKBONES)}.")
        self.net = net
        self.features = nnx.List([
            Conv(c_in, c_out, (k, k), stride=s, padding=p, use_bias=True, param_dtype=jnp.float32, rngs=rngs,
                 init_std=(k * k * c_in) ** -0.5) for _, c_in, c_out, k, s, p in _convs(net)])
        self.lins = nnx.List([Conv(c, 1, (1, 1), use_bias=False, param_dtype=jnp.float32, rngs=rngs, init_std=c ** -0.5)
                              for c in channels(net)])

    def taps(self, x: jax.Array) -> list[jax.Array]:
        """Scaled images ``[B, H, W, 3]`` -> the five ReLU outputs ``[B, H_l, W_l, C_l]``."""
        out, convs = [], iter(self.features)
        for pool, stage in BACKBONES[self.net]:
            if pool is not None:
                x = max_pool(x, *pool)
            for _ in stage:
                x = jax.nn.relu(next(convs)(x))
            out.append(x)
        return out

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """``x, y [B, H, W, 3]`` in ``[-1, 1]`` -> LPIPS ``[B]``."""
        size = MIN_SIZE[self.net]
        if x.ndim != 4 or x.shape != y.shape or x.shape[-1] != 3 or min(x.shape[1:3]) < size:
            raise ValueError(f"LPIPSNet: x and y must be two [B, H, W, 3] arrays of one shape with H, W >= {size} "
                             f"(channels last, in [-1, 1]); got {tuple(x.shape)} and {tuple(y.shape)}.")
        shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
        both = (jnp.concatenate([x, y]).astype(jnp.float32) - shift) / scale
        total = jnp.zeros((x.shape[0],), jnp.float32)
        for tap, lin in zip(self.taps(both), self.lins):
            unit = tap / (jnp.sqrt(jnp.sum(tap * tap, axis=-1, keepdims=True)) + NORM_EPS)
            fx, fy = jnp.split(unit, 2)
            total = total + lin(jnp.square(fx - fy)).mean(axis=(1, 2, 3))
        return total


def abstract_model(net: str) -> LPIPSNet:
    """The network's structure with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: LPIPSNet(net, rngs=nnx.Rngs(0)))


def backbone_tensors(net: str) -> dict[str, tuple[int, ...]]:
    """torchvision state-dict names and shapes of the backbone convolutions LPIPS uses."""
    out = {}
    for index, c_in, c_out, k, _, _ in _convs(net):
        out[f"features.{index}.weight"], out[f"features.{index}.bias"] = (c_out, c_in, k, k), (c_out,)
    return out


def linear_tensors(net: str) -> dict[str, tuple[int, ...]]:
    """The lpips package's head names and shapes (``weights/v0.1/{net}.pth``)."""
    return {f"lin{layer}.model.1.weight": (1, c, 1, 1) for layer, c in enumerate(channels(net))}


def is_unused_backbone_tensor(name: str) -> bool:
    """torchvision's classifier layers, which LPIPS does not use."""
    return name.startswith("classifier.")


def from_state_dicts(net: str, backbone: Mapping[str, np.ndarray], linear: Mapping[str, np.ndarray], *,
                     source: str) -> LPIPSNet:
    """The network from checked state dicts (``backbone_tensors`` / ``linear_tensors`` names and shapes)."""
    def matrix(w: np.ndarray) -> np.ndarray:  # PyTorch [C_out, C_in, k, k] -> the matrix view [k k C_in, C_out]
        return np.moveaxis(w, (0, 1), (-1, -2)).reshape(-1, w.shape[0])

    entries = {}
    for position, (index, *_) in enumerate(_convs(net)):
        entries[("features", position, "kernel")] = (f"features.{index}.weight", matrix)
        entries[("features", position, "bias")] = (f"features.{index}.bias", np.asarray)
    for layer in range(len(channels(net))):
        entries[("lins", layer, "kernel")] = (f"lin{layer}.model.1.weight", matrix)
    used = {name for name, _ in entries.values()}
    tensors = {**{k: v for k, v in backbone.items() if k in used}, **linear}
    return load_parameters(abstract_model(net), entries, tensors, param_dtype="float32", source=source,
                           what=f"LPIPS ({net})")

