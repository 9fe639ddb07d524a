"""6Bit-Diffusion's outlier smoothing: an online block Hadamard before each quantized linear (spec §3.1).

For a linear ``y = x W`` (jquant's ``[in, out]`` kernels, row-vector activations) and the orthonormal block-diagonal
``H = I_{K/B} ⊗ H_B / √B`` (``K`` input features, block order ``B``, 128 in the paper)::

    x W = (x H)(Hᵀ W)

so the kernel is rotated offline, ``W ← Hᵀ W`` (each block of ``B`` input rows times ``H_Bᵀ / √B``), and the
activation online (``Linear.input_block_hadamard = B``, ``jquant.ops.block_hadamard``), before either is quantized.
The product is unchanged in exact arithmetic; the rotation spreads a channel's outlier over its block, which is
what lets per-token INT8 (one scale per token, else set by the outlier) represent the activations. NVFP4's
16-element blocks already confine an outlier to its own block, and spreading it over ``B`` channels can raise
NVFP4's error instead (tests/transforms/test_block_hadamard.py; measured on the reference model by
``experiments/video_mixed_precision.py``). The same rotated weights serve both routes (the spec's recommendation).
A layer narrower than ``B`` takes one Hadamard of its own width.
"""

from __future__ import annotations

import re

from flax import nnx

from jquant.formats import QArray
from jquant.numerics.hadamard import fwht, supported_size
from jquant.sites import find_sites

DEFAULT_BLOCK = 128


def block_size(in_features: int, block: int, path: str) -> int:
    """The block order used for a linear of ``in_features`` inputs: ``block``, or ``in_features`` when narrower;
    a clear error naming ``path`` when it does not divide the width or has no Hadamard construction."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 2:
        raise ValueError(f"block_hadamard: block must be an integer >= 2 (the paper's 128), got {block!r}.")
    size = min(block, in_features)
    if in_features % size or not supported_size(size):
        raise ValueError(f"block_hadamard: {path} has {in_features} input features, which blocks of {size} do not "
                         f"tile with a Hadamard construction; pick a block that divides {in_features} "
                         f"(a power of two such as 64 or 128).")
    return size


def rotated_linears(model: nnx.Module, layers: str, block: int) -> list[tuple[str, nnx.Module, int]]:
    """``(path, linear, B)`` of every plain linear whose site path fully matches the regex ``layers``; a clear
    error when none does, or when a match already has an online rotation."""
    matched = []
    for site in find_sites(model):
        if site.spec.kind != "linear" or not re.fullmatch(layers, site.path):
            continue
        linear = site.module
        if (getattr(linear, "input_rotation", None) is not None
                or getattr(linear, "input_block_hadamard", 0) is not None):
            raise ValueError(f"block_hadamard: {site.path} already has an online rotation (or no site for one); "
                             "a linear takes one online rotation.")
        matched.append((site.path, linear, block_size(linear.kernel.get_value().shape[0], block, site.path)))
    if not matched:
        paths = [s.path for s in find_sites(model)][:3]
        raise ValueError(f"block_hadamard: layers={layers!r} matches no linear of {type(model).__name__}; its linears "
                         f"look like {paths}.")
    return matched


def block_hadamard_rotation(model: nnx.Module, layers: str = ".*", block: int = DEFAULT_BLOCK) -> nnx.Module:
    """A copy of ``model`` whose linears matching ``layers`` compute ``(x H)(Hᵀ W)``, ``H = I ⊗ H_B / √B``
    (module docstring); same outputs up to float rounding. The kernels must be float (rotate before quantizing)."""
    out = nnx.clone(model)
    for path, linear, size in rotated_linears(out, layers, block):
        kernel = linear.kernel.get_value()
        if isinstance(kernel, QArray):
            raise ValueError(f"block_hadamard: {path} is already quantized; rotate the float model, then quantize.")
        rows = kernel.reshape(kernel.shape[0] // size, size, *kernel.shape[1:])
        rotated = fwht(rows, axis=1)  # along a block's B input rows: H_Bᵀ W_block / √B, as the online op rotates x
        linear.kernel.set_value(rotated.reshape(kernel.shape))
        linear.input_block_hadamard = size
    return out


def add_block_hadamard_structure(model: nnx.Module, layers: str = ".*", block: int = DEFAULT_BLOCK) -> None:
    """Switch the online block Hadamards back on in an abstract model being loaded (in place; the rotated kernels
    come from the checkpoint)."""
    for _, linear, size in rotated_linears(model, layers, block):
        linear.input_block_hadamard = size
