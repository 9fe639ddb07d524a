"""MQuant's rotation of a pre-LayerNorm ViT (Yu et al., ACM MM 2025, §3.1 of the spec; QuaRot + SliceGPT).

A model with a ViT vision tower (a module declaring ``vit_layout() -> ViTLayout``; paths relative to that module)
is transformed, exactly in float, in four steps (jquant's ``[in, out]`` kernels, row-vector activations):

1. **LayerNorm -> RMSNorm.** Every writer of the residual stream (patch embedding, each block's attention output
   ``proj`` and ``fc2``) is centred over its output channels, ``W <- W - W 1 1ᵀ / E``, ``b <- b - mean(b)``, so the
   stream has zero mean per token and ``LN(x) = γ ⊙ x / rms(x) + β``. ``γ`` is folded into the reader's rows
   (``W <- diag(γ) W``), ``β`` into its bias (``b <- b + β W``), and the LayerNorm becomes a gain-free RMSNorm. The
   merger's norm is folded into each of its ``m²`` row chunks.
2. **Residual rotation** ``Q_v`` (a random-sign Hadamard of order ``E``): writers ``W <- W Q_v``, ``b <- b Q_v``;
   readers (``qkv``, ``fc1``) ``W <- Q_vᵀ W``; the merger's first linear ``blockdiag(Q_vᵀ, ...) W``.
3. **Per-head value/output Hadamard** ``H_hd`` (``ov``): the value columns of ``qkv`` per head ``W_v <- W_v H_hd``
   and the matching ``proj`` rows ``W_o <- H_hdᵀ W_o``.
4. **Online Hadamard before fc2** (``online``): ``fc2.input_rotation`` is switched on and ``W_fc2 <- Hᵀ W_fc2``
   (deterministic, so MQuant's RMS, ``jquant.transforms.channel_split``, applies to fc2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.formats import QArray
from jquant.numerics.hadamard import hadamard_numpy
from jquant.transforms.equivalence import module_at, online_size
from jquant.transforms.rotate import _rotation


@dataclasses.dataclass(frozen=True)
class ViTBlockLayout:
    """One pre-LN block ``x += proj(attn(norm1(x)))``, ``x += fc2(act(fc1(norm2(x))))``; ``qkv``'s output columns
    are ``[3, heads, head_dim]`` (q, k, v)."""

    norm1: str
    qkv: str
    proj: str
    norm2: str
    fc1: str
    fc2: str


@dataclasses.dataclass(frozen=True)
class ViTLayout:
    """A ViT's residual stream of width ``width``: the patch-embedding linear ``embed``, the ``blocks``, the merger's
    LayerNorm ``merger_norm`` read by ``merger_reader`` over ``merge_unit`` concatenated patches; ``norm_eps`` is
    the LayerNorms' epsilon (the RMSNorms keep it)."""

    embed: str
    blocks: tuple[ViTBlockLayout, ...]
    merger_norm: str
    merger_reader: str
    merge_unit: int
    width: int
    num_heads: int
    norm_eps: float


def vision_tower(model: nnx.Module) -> tuple[str, nnx.Module]:
    """``(path, module)`` of the one submodule declaring ``vit_layout``; an error names the requirement."""
    found = [("/".join(map(str, p)), m) for p, m in nnx.iter_graph(model) if hasattr(m, "vit_layout")]
    if len(found) != 1:
        raise ValueError(f"vision_rotation: the model must hold exactly one vision tower declaring vit_layout() (a "
                         f"Qwen2-VL model); found {len(found)}.")
    return found[0]


def _get(tower: nnx.Module, path: str, name: str) -> np.ndarray | None:
    var = getattr(module_at(tower, path), name)
    return None if var is None else np.asarray(var.get_value(), np.float64)


def _put(tower: nnx.Module, path: str, name: str, value: np.ndarray) -> None:
    var = getattr(module_at(tower, path), name)
    var.set_value(jnp.asarray(value, var.get_value().dtype))


def _replace_norm(tower: nnx.Module, path: str, width: int, eps: float) -> None:
    """Put a gain-free RMSNorm (weight ones, the parameter dtype of the LayerNorm) at ``path``."""
    from jquant.models.layers import RMSNorm  # on use: importing the transforms imports no model code

    parent, _, name = path.rpartition("/")
    norm = module_at(tower, path)
    dtype = norm.weight.get_value().dtype
    setattr(module_at(tower, parent) if parent else tower, name, RMSNorm(width, eps=eps, param_dtype=dtype))


def _writers(layout: ViTLayout) -> list[str]:
    return [layout.embed, *(b.proj for b in layout.blocks), *(b.fc2 for b in layout.blocks)]


def _norm_readers(layout: ViTLayout) -> list[tuple[str, str, int]]:
    """``(norm, reader, chunks)``: each LayerNorm, the linear reading it, how many norm outputs it concatenates."""
    pairs = [(b.norm1, b.qkv, 1) for b in layout.blocks] + [(b.norm2, b.fc1, 1) for b in layout.blocks]
    return [*pairs, (layout.merger_norm, layout.merger_reader, layout.merge_unit)]


def _check(tower: nnx.Module, layout: ViTLayout) -> None:
    from jquant.models.layers import Linear

    for path, m in nnx.iter_graph(tower):
        if isinstance(m, Linear) and isinstance(m.kernel.get_value(), QArray):
            raise ValueError(f"vision_rotation: {'/'.join(map(str, path))} is already quantized; rotate the float model.")
    for norm, _, _ in _norm_readers(layout):
        if not hasattr(module_at(tower, norm), "bias"):
            raise ValueError(f"vision_rotation: {norm} is not a LayerNorm (already converted, or an RMSNorm ViT such as "
                             "Qwen2.5-VL's); apply the step once, to a LayerNorm ViT.")


def vision_rotation(model: nnx.Module, key: jax.Array, *, online: bool = True, ov: bool = True) -> nnx.Module:
    """A copy of ``model`` with its ViT converted and rotated (module docstring); the same outputs in exact
    arithmetic. ``key`` draws the signs of ``Q_v``."""
    model = nnx.clone(model)
    _, tower = vision_tower(model)
    layout = tower.vit_layout()
    _check(tower, layout)
    e = layout.width
    for path in _writers(layout):  # 1. centre the writers
        w = _get(tower, path, "kernel")
        _put(tower, path, "kernel", w - w.mean(axis=1, keepdims=True))
        if (b := _get(tower, path, "bias")) is not None:
            _put(tower, path, "bias", b - b.mean())
    for norm, reader, chunks in _norm_readers(layout):  # 1. fold γ, β and switch to RMSNorm
        gamma, beta = _get(tower, norm, "weight"), _get(tower, norm, "bias")
        w = _get(tower, reader, "kernel").reshape(chunks, e, -1)
        _put(tower, reader, "bias", _get(tower, reader, "bias") + np.einsum("e,ceo->o", beta, w))
        _put(tower, reader, "kernel", (gamma[None, :, None] * w).reshape(chunks * e, -1))
        _replace_norm(tower, norm, e, layout.norm_eps)
    q = _rotation(e, key, "hadamard", "vision residual stream")  # 2. residual rotation
    for path in _writers(layout):
        _put(tower, path, "kernel", _get(tower, path, "kernel") @ q)
        if (b := _get(tower, path, "bias")) is not None:
            _put(tower, path, "bias", b @ q)
    for block in layout.blocks:
        for reader in (block.qkv, block.fc1):
            _put(tower, reader, "kernel", q.T @ _get(tower, reader, "kernel"))
    w = _get(tower, layout.merger_reader, "kernel").reshape(layout.merge_unit, e, -1)
    _put(tower, layout.merger_reader, "kernel", np.einsum("fe,cfo->ceo", q, w).reshape(layout.merge_unit * e, -1))
    if ov:  # 3. per-head value / output Hadamard
        hd = e // layout.num_heads
        h = hadamard_numpy(hd)
        for block in layout.blocks:
            w = _get(tower, block.qkv, "kernel").reshape(e, 3, layout.num_heads, hd)
            w[:, 2] = w[:, 2] @ h
            _put(tower, block.qkv, "kernel", w.reshape(e, 3 * e))
            b = _get(tower, block.qkv, "bias").reshape(3, layout.num_heads, hd)
            b[2] = b[2] @ h
            _put(tower, block.qkv, "bias", b.reshape(-1))
            o = _get(tower, block.proj, "kernel").reshape(layout.num_heads, hd, -1)
            _put(tower, block.proj, "kernel", np.einsum("ji,hjo->hio", h, o).reshape(e, -1))
    if online:  # 4. online Hadamard before fc2
        for block in layout.blocks:
            fc2 = module_at(tower, block.fc2)
            n = online_size(fc2.kernel.get_value().shape[0], False, block.fc2)
            _put(tower, block.fc2, "kernel", hadamard_numpy(n).T @ _get(tower, block.fc2, "kernel"))
            fc2.input_rotation = n
    return model


def add_vision_structure(model: nnx.Module, *, online: bool = True) -> None:
    """Give an abstract model (``jquant.load``) the structure :func:`vision_rotation` leaves (in place): RMSNorms
    for the LayerNorms and the online Hadamards before fc2; the weights come from the checkpoint."""
    _, tower = vision_tower(model)
    layout = tower.vit_layout()
    for norm, _, _ in _norm_readers(layout):
        _replace_norm(tower, norm, layout.width, layout.norm_eps)
    if online:
        for block in layout.blocks:
            fc2 = module_at(tower, block.fc2)
            fc2.input_rotation = online_size(fc2.kernel.get_value().shape[0], False, block.fc2)
