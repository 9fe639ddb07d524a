"""QuaRot-style rotations: a random Hadamard of the residual stream and of each value head, plus online Hadamards.

``quarot(model, key)`` (Ashkboos et al., 2024) folds the RMSNorm gains, rotates the
residual stream by ``R_res = diag(ε) H_d / √d`` (fused offline into the embedding,
every reader and writer of the stream and the head), rotates each KV head's values
by ``H_dh`` (fused into v_proj columns and o_proj rows), and switches on the online
Hadamards (MLP product before down_proj; queries and keys after RoPE, which is what
spreads key outliers before KV quantization). Exact before quantization.

Widths with no Hadamard construction: the online rotations zero-pad when
``pad=True`` (see ``jquant.transforms.equivalence.online_size``); the residual
rotation cannot change the hidden size, so ``rotation="orthogonal"`` (a Haar-random
orthogonal matrix, as SpinQuant's random init) replaces it there.
"""

from __future__ import annotations

from typing import Literal

import jax
import numpy as np
from flax import nnx

from jquant.numerics.hadamard import hadamard_numpy, pad_to_hadamard_size, supported_size
from jquant.transforms.equivalence import OnlineRotations, apply_transforms
from jquant.transforms.layout import DecoderLayout, layout_of

Rotation = Literal["hadamard", "orthogonal"]


def _orthogonal(n: int, key: jax.Array) -> np.ndarray:
    """Haar-random orthogonal ``[n, n]`` in float64 (QR of a Gaussian, column signs fixed by ``diag R``)."""
    q, r = np.linalg.qr(np.asarray(jax.random.normal(key, (n, n)), np.float64))
    return q * np.where(np.diagonal(r) >= 0, 1.0, -1.0)[None, :]


def _rotation(n: int, key: jax.Array, kind: Rotation, where: str, *, signs: bool = True) -> np.ndarray:
    """A float64 rotation of order ``n``: (random-sign) Hadamard or Haar-random orthogonal."""
    if kind == "orthogonal":
        return _orthogonal(n, key)
    if kind != "hadamard":
        raise ValueError(f"rotation must be 'hadamard' or 'orthogonal', got {kind!r}.")
    if not supported_size(n):
        raise ValueError(f"{where}: width {n} has no Hadamard construction (the next supported size is "
                         f"{pad_to_hadamard_size(n)}, which would change the width); use rotation='orthogonal'.")
    h = hadamard_numpy(n)
    return np.asarray(jax.random.rademacher(key, (n,)), np.float64)[:, None] * h if signs else h


def quarot_params(layout: DecoderLayout, key: jax.Array, *, rotation: Rotation = "hadamard") -> dict:
    """The QuaRot transform pytree in float64 numpy: random-Hadamard ``residual``, per-KV-head Hadamard ``ov``."""
    k_res, k_ov = jax.random.split(key)
    params = {"residual": _rotation(layout.hidden_size, k_res, rotation, "residual stream"), "layers": []}
    for i, layer in enumerate(layout.layers):
        a = layer.attention
        head = _rotation(a.head_dim, jax.random.fold_in(k_ov, i), rotation, f"{a.path} head_dim", signs=False)
        params["layers"].append({"ov": np.broadcast_to(head, (a.num_kv_heads, a.head_dim, a.head_dim)).copy()})
    return params


def quarot(model: nnx.Module, key: jax.Array, *, online: OnlineRotations | tuple[str, ...] = ("down", "qk"),
           rotation: Rotation = "hadamard", pad: bool = False) -> nnx.Module:
    """A rotated copy of ``model`` (module docstring); the same logits in exact arithmetic."""
    return apply_transforms(model, quarot_params(layout_of(model), key, rotation=rotation), online=online, pad=pad)
