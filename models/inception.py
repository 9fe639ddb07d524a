"""The Inception-v3 network FID is defined with (pytorch-fid's port of TensorFlow's 2015-12-05 graph), to pool3.

FID (Heusel et al. 2017) compares Gaussians fitted to the 2048-d "pool3" features of this network. pytorch-fid
(``pytorch_fid/inception.py``, ``InceptionV3([3])``) builds it from torchvision's Inception-v3
(``torchvision/models/inception.py``) with the blocks the TensorFlow graph differs in:

- ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1`` (Mixed_5b-d, 6b-e, 7b): the pool branch averages
  over the positions inside the image only (``count_include_pad=False``);
- ``FIDInceptionE_2`` (Mixed_7c): the pool branch is a 3x3 max pool;
- Mixed_6a / Mixed_7a are torchvision's InceptionB / InceptionD.

Every convolution is torchvision's ``BasicConv2d``: ``ReLU(BN(conv(x)))`` with BatchNorm in inference form, eps
1e-3. The import folds BN into the convolution in float64: ``W' = W γ / sqrt(v + eps)``, ``b' = β - m γ /
sqrt(v + eps)`` (``m``/``v`` the running mean/variance), so each unit here is one biased ``layers.Conv`` and a
ReLU. Parameter paths mirror torchvision's names: ``Mixed_5b/branch1x1/conv/kernel`` comes from
``Mixed_5b.branch1x1.conv.weight`` and ``Mixed_5b.branch1x1.bn.*``.

Channels last: ``FIDInception(x [B, H, W, 3])`` -> pool3 ``[B, 2048]`` for ``x`` in ``[-1, 1]`` (the network's
input range); ``H, W >= 75`` (the smallest input the strided stages leave a pixel of). ``preprocess`` is
pytorch-fid's input transform for images in ``[-1, 1]``: bilinear resize to 299 x 299 (``F.interpolate``,
``align_corners=False``, no antialiasing), which commutes with its ``2 x - 1`` map from ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jquant.models.layers import Conv
from jquant.models.pooling import avg_pool, max_pool, resize_bilinear
from jquant.models.tensor_io import load_parameters

INPUT_SIZE = 299
MIN_SIZE = 75
FEATURES = 2048
BN_EPS = 1e-3
_BN = ("weight", "bias", "running_mean", "running_var")


class BasicConv(nnx.Module):
    """``ReLU(conv(x) + b)``: torchvision's ``BasicConv2d`` with its BatchNorm folded into ``conv``."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], *, rngs: nnx.Rngs, stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (padding, padding) if isinstance(padding, int) else padding
        self.conv = Conv(c_in, c_out, kernel, stride=stride, padding=padding, use_bias=True,
                         param_dtype=jnp.float32, rngs=rngs, init_std=(kernel[0] * kernel[1] * c_in) ** -0.5)
        self.in_channels, self.out_channels = c_in, c_out

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv(x))


def _cat(*branches: jax.Array) -> jax.Array:
    return jnp.concatenate(branches, axis=-1)


class InceptionA(nnx.Module):
    """Mixed_5b-d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool (inside positions) -> 1x1."""

    def __init__(self, c_in: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv(c_in, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv(c_in, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(c_in, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv(c_in, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _cat(self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    self.branch_pool(avg_pool(x, 3, 1, 1)))


class InceptionB(nnx.Module):
    """Mixed_6a (stride 2): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool 3x3/2."""

    def __init__(self, c_in: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv(c_in, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(c_in, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _cat(self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    max_pool(x, 3, 2))


class InceptionC(nnx.Module):
    """Mixed_6b-e: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg pool (inside) -> 1x1."""

    def __init__(self, c_in: int, c7: int, *, rngs: nnx.Rngs):
        row, col = {"padding": (0, 3)}, {"padding": (3, 0)}
        self.branch1x1 = BasicConv(c_in, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv(c_in, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), **row, rngs=rngs)
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), **col, rngs=rngs)
        self.branch7x7dbl_1 = BasicConv(c_in, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), **col, rngs=rngs)
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), **row, rngs=rngs)
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), **col, rngs=rngs)
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), **row, rngs=rngs)
        self.branch_pool = BasicConv(c_in, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return _cat(self.branch1x1(x), b7, d, self.branch_pool(avg_pool(x, 3, 1, 1)))


class InceptionD(nnx.Module):
    """Mixed_7a (stride 2): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool 3x3/2."""

    def __init__(self, c_in: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv(c_in, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv(c_in, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return _cat(self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool(x, 3, 2))


class InceptionE(nnx.Module):
    """Mixed_7b/7c: 1x1 | 1x1 -> [1x3, 3x1] | 1x1 -> 3x3 -> [1x3, 3x1] | pool -> 1x1; the pool is the inside-positions
    average (``FIDInceptionE_1``) or a 3x3 max pool (``FIDInceptionE_2``, ``pool="max"``)."""

    def __init__(self, c_in: int, *, pool: str, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv(c_in, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv(c_in, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(c_in, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv(c_in, 192, 1, rngs=rngs)
        self.pool = pool

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = max_pool(x, 3, 1, 1) if self.pool == "max" else avg_pool(x, 3, 1, 1)
        return _cat(self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3), self.branch3x3dbl_3a(d),
                    self.branch3x3dbl_3b(d), self.branch_pool(pooled))


class FIDInception(nnx.Module):
    """pytorch-fid's ``InceptionV3([3])`` up to pool3 (module docstring): ``x [B, H, W, 3]`` -> ``[B, 2048]``."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"FIDInception: x must be [B, H, W, 3] with H, W >= {MIN_SIZE} (channels last, in "
                             f"[-1, 1]); got shape {tuple(x.shape)}. Use preprocess() to resize to {INPUT_SIZE}.")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x.astype(jnp.float32))))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x, 3, 2)))
        x = max_pool(x, 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(axis=(1, 2))


def preprocess(images: jax.Array) -> jax.Array:
    """Images ``[B, H, W, 3]`` in ``[-1, 1]`` -> ``[B, 299, 299, 3]`` (pytorch-fid's bilinear resize)."""
    return resize_bilinear(images.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))


def abstract_model() -> FIDInception:
    """The network's structure with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: FIDInception(rngs=nnx.Rngs(0)))


def _units(model: nnx.Module) -> dict[tuple, BasicConv]:
    return {path: node for path, node in nnx.iter_graph(model) if isinstance(node, BasicConv)}


def expected_tensors(model: FIDInception) -> dict[str, tuple[int, ...]]:
    """The state-dict names and PyTorch shapes ``model`` is built from (conv weights ``[out, in, kh, kw]``, BN)."""
    out = {}
    for path, unit in _units(model).items():
        prefix = ".".join(map(str, path))
        out[f"{prefix}.conv.weight"] = (unit.out_channels, unit.in_channels, *unit.conv.kernel_size)
        out.update({f"{prefix}.bn.{name}": (unit.out_channels,) for name in _BN})
    return out


def is_unused_tensor(name: str) -> bool:
    """Tensors of pytorch-fid's weights file that pool3 does not use: the 1008-class head, BN batch counters."""
    return name in ("fc.weight", "fc.bias") or name.endswith(".bn.num_batches_tracked")


def from_state_dict(tensors: Mapping[str, np.ndarray], *, source: str) -> FIDInception:
    """The network from a checked pytorch-fid state dict (``jquant.eval.weights_file.check_tensors`` against
    ``expected_tensors``), BatchNorm folded into each convolution in float64 (module docstring)."""
    abstract = abstract_model()
    folded, entries = {}, {}
    for path, unit in _units(abstract).items():
        prefix = ".".join(map(str, path))
        gamma, beta, mean, var = (np.asarray(tensors[f"{prefix}.bn.{n}"], np.float64) for n in _BN)
        scale = gamma / np.sqrt(var + BN_EPS)
        weight = np.asarray(tensors[f"{prefix}.conv.weight"], np.float64) * scale[:, None, None, None]
        folded[f"{prefix}.conv.weight"] = np.moveaxis(weight, (0, 1), (-1, -2)).reshape(-1, unit.out_channels)
        folded[f"{prefix}.conv.bias"] = beta - mean * scale
        entries[(*path, "conv", "kernel")] = (f"{prefix}.conv.weight", np.asarray)
        entries[(*path, "conv", "bias")] = (f"{prefix}.conv.bias", np.asarray)
    return load_parameters(abstract, entries, folded, param_dtype="float32", source=source, what="FID Inception-v3")
