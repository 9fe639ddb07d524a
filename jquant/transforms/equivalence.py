"""Equivalence transforms folded into a pre-norm decoder's weights (QuaRot / SpinQuant / OSTQuant placement).

Row-vector convention with jquant's ``[in, out]`` kernels (``y = x W + b``). Given a
:class:`~jquant.transforms.layout.DecoderLayout` and a parameter pytree (every entry
optional; a missing entry is the identity)::

    {"residual": R [d, d] orthogonal,                       # R_res
     "layers": [{"attn_scale": [d], "mlp_scale": [d],       # S_attn, S_ffn (> 0)
                 "qk_scale": [K, dh/2],                     # S_qk, tied across RoPE pairs (spec §7.3)
                 "ov_scale": [K * dh],                      # S_ov
                 "ov": [K, dh, dh] orthogonal,              # R_ov, one per KV head
                 "ud_scale": [dff]}, ...]}                  # S_ud

:func:`fold` rewrites the weights so the float model computes exactly the same
function (OSTQuant spec §3.3, §3.8; §7.1–7.3 exact-maths choices):

- embedding ``E ← E R`` and input writers (``layout.input_writers``: a vision merger)
  ``W ← W R``, ``b ← b R``; q/k/v and up/gate ``W ← diag(s) Rᵀ W`` with the norm gain
  ``γ ← 1/s`` (the quantized input is ``(x̂ R) ⊘ s``); head ``W ← Rᵀ W``;
- o_proj and down_proj (residual writers) ``W ← W R``, ``b ← b R``;
- expert stacks ``kernel [E, in, out]`` (mixture-of-experts blocks) take the same maps
  expert by expert: readers (router, gate/up stacks, shared expert and its gate)
  ``W_e ← diag(s) Rᵀ W_e``, down stacks ``W_e ← W_e R``;
- ``W_q`` columns ``÷ s_qk``, ``W_k`` columns ``× s_qk`` (``s`` repeated over the
  RoPE pair and over the query heads of a KV head);
- ``W_v`` columns ``÷ s_ov`` then head block ``j`` ``← W_v[:, j] R_j``; ``W_o`` row block
  of query head ``h`` (KV head ``j``) ``← R_jᵀ diag(s_ov,j) W_o[h]``;
- ``W_up`` columns ``÷ s_ud``; ``W_down ← Hᵀ diag(s_ud) W_down`` where ``H`` is the
  online Hadamard of the MLP product when ``online.down`` is on (``(W_down diag(s)) H``
  in the spec's ``[out, in]`` notation, §7.2).

:func:`fold` is a pure function of arrays (numpy or JAX; differentiable in the
parameters), so OSTQuant trains through exactly the function that later merges
the transforms (no train/deploy mismatch, spec §5.6). :func:`apply_transforms` is the
model-level ``model -> model`` form; it folds the RMSNorm gains first
(:func:`fold_norms`) and switches on the online rotations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.formats import QArray
from jquant.numerics.hadamard import fwht, hadamard_numpy, pad_to_hadamard_size, supported_size
from jquant.sites import path_string
from jquant.transforms.layout import DecoderLayout, layout_of

Weights = dict[str, Any]  # "module/path/param" -> array
Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class OnlineRotations:
    """Run-time Hadamards: ``down`` on the MLP product before down_proj, ``qk`` on queries and keys after RoPE.

    ``pad``: when the MLP width has no Hadamard construction, zero-pad the product to
    the next supported size (``pad_to_hadamard_size``; down_proj grows to that many
    input rows). Without it such a width is an error.
    """

    down: bool = False
    qk: bool = False
    pad: bool = False

    @classmethod
    def parse(cls, online: OnlineRotations | tuple[str, ...] | list[str] | str | None, *, pad: bool = False) -> OnlineRotations:
        """``("down", "qk")``-style names (or an ``OnlineRotations``) -> ``OnlineRotations``."""
        if isinstance(online, OnlineRotations):
            return online
        names = (online,) if isinstance(online, str) else tuple(online or ())
        unknown = set(names) - {"down", "qk"}
        if unknown:
            raise ValueError(f"online rotations {sorted(unknown)} are unknown; the sites are 'down' (MLP product before "
                             "down_proj) and 'qk' (queries and keys after RoPE).")
        return cls(down="down" in names, qk="qk" in names, pad=pad)


# ---- weights as a flat dict ------------------------------------------------------------------------
def split_weights(model: nnx.Module) -> tuple[nnx.GraphDef, Weights, nnx.State]:
    """``model -> (graphdef, {"path/param": array} of its Params, the other state)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    weights = {path_string(p): v.get_value() for p, v in nnx.to_flat_state(params)}
    return graphdef, weights, rest


def merge_weights(graphdef: nnx.GraphDef, weights: Weights, rest: nnx.State, like: nnx.Module) -> nnx.Module:
    """The inverse of :func:`split_weights` (``like`` supplies the Param variables' metadata)."""
    _, params, _ = nnx.split(like, nnx.Param, ...)
    flat = [(p, v.replace(weights[path_string(p)])) for p, v in nnx.to_flat_state(params)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def module_at(model: nnx.Module, path: str) -> nnx.Module:
    """The submodule of ``model`` at ``/``-joined ``path`` (``layers/3/mlp/down_proj``)."""
    node = model
    for part in path.split("/"):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


# ---- the pure fold -----------------------------------------------------------------------------------
def _xp(a):
    return np if isinstance(a, np.ndarray) else jnp


def _hadamard_rows(w, size: int):
    """``Hᵀ [w; 0]`` for ``w [n, out]`` zero-padded to ``size`` rows (``H`` orthonormal, order ``size``)."""
    xp = _xp(w)
    if size > w.shape[0]:
        w = xp.concatenate([w, xp.zeros((size - w.shape[0], w.shape[1]), w.dtype)], axis=0)
    if xp is np:
        return hadamard_numpy(size).T @ w
    return fwht(w, axis=0)


def _rope_tied(s_half, heads_per_kv: int):
    """``[K, dh/2]`` -> per-query-head feature scale ``[K * g * dh]`` (duplicated over RoPE pairs and the group)."""
    xp = _xp(s_half)
    full = xp.concatenate([s_half, s_half], axis=-1)  # [K, dh]
    return xp.repeat(full[:, None, :], heads_per_kv, axis=1).reshape(-1)


def fold(weights: Weights, params: Params, layout: DecoderLayout, online: OnlineRotations = OnlineRotations()) -> Weights:
    """Rewrite ``weights`` so the model computes the same function under ``params`` (module docstring).

    Pure; numpy inputs stay numpy (float64 host merges), JAX inputs stay JAX (and are
    differentiable in ``params``). Norm gains of the norm groups must already be folded
    (all ones) when ``params["residual"]`` is given; :func:`apply_transforms` does that.
    """
    w = dict(weights)
    rot = params.get("residual")
    layers = params.get("layers") or [{}] * len(layout.layers)
    if len(layers) != len(layout.layers):
        raise ValueError(f"fold: params['layers'] has {len(layers)} entries for {len(layout.layers)} layers.")

    def read_group(group, scale):
        for c in group.consumers:
            k = w[f"{c}/kernel"]
            if rot is not None:
                k = rot.T @ k
            if scale is not None:
                k = scale[:, None] * k
            w[f"{c}/kernel"] = k
        if scale is not None:
            w[f"{group.norm}/weight"] = w[f"{group.norm}/weight"] / scale

    def cols(path, scale, op):
        w[f"{path}/kernel"] = op(w[f"{path}/kernel"], scale[None, :])
        if f"{path}/bias" in w:
            w[f"{path}/bias"] = op(w[f"{path}/bias"], scale)

    def write(path):
        if rot is None:
            return
        w[f"{path}/kernel"] = w[f"{path}/kernel"] @ rot
        if f"{path}/bias" in w:
            w[f"{path}/bias"] = w[f"{path}/bias"] @ rot

    for layer, p in zip(layout.layers, layers):
        a, m = layer.attention, layer.dense_mlp
        read_group(layer.attn_norm, p.get("attn_scale"))
        read_group(layer.mlp_norm, p.get("mlp_scale"))
        if (s := p.get("qk_scale")) is not None:
            cols(a.q, _rope_tied(s, a.group), lambda x, y: x / y)
            cols(a.k, _rope_tied(s, 1), lambda x, y: x * y)
        s_ov, r_ov = p.get("ov_scale"), p.get("ov")
        if s_ov is not None:
            cols(a.v, s_ov, lambda x, y: x / y)
        if r_ov is not None:
            xp = _xp(r_ov)
            k = w[f"{a.v}/kernel"]
            w[f"{a.v}/kernel"] = xp.einsum("dki,kij->dkj", k.reshape(k.shape[0], a.num_kv_heads, a.head_dim),
                                           r_ov).reshape(k.shape)
            if f"{a.v}/bias" in w:
                b = w[f"{a.v}/bias"]
                w[f"{a.v}/bias"] = xp.einsum("ki,kij->kj", b.reshape(a.num_kv_heads, a.head_dim), r_ov).reshape(b.shape)
        if s_ov is not None or r_ov is not None:
            o = w[f"{a.o}/kernel"]
            blocks = o.reshape(a.num_kv_heads, a.group, a.head_dim, o.shape[1])
            if s_ov is not None:
                blocks = blocks * s_ov.reshape(a.num_kv_heads, 1, a.head_dim, 1)
            if r_ov is not None:
                blocks = _xp(r_ov).einsum("kia,kgid->kgad", r_ov, blocks)
            w[f"{a.o}/kernel"] = blocks.reshape(o.shape)
        write(a.o)
        if m is not None and (s := p.get("ud_scale")) is not None:
            cols(m.up, s, lambda x, y: x / y)
            w[f"{m.down}/kernel"] = s[:, None] * w[f"{m.down}/kernel"]
        if m is not None and online.down:
            w[f"{m.down}/kernel"] = _hadamard_rows(w[f"{m.down}/kernel"], online_size(m.hidden, online.pad, m.down))
        for path in layer.mlp_writers:
            write(path)
    if rot is not None:
        w[f"{layout.embedding}/embedding"] = w[f"{layout.embedding}/embedding"] @ rot
    for path in layout.input_writers:
        write(path)
    read_group(layout.final_norm, None)
    return w


def online_size(n: int, pad: bool, where: str) -> int:
    """The Hadamard order used for an online rotation of width ``n`` (error without a construction unless ``pad``)."""
    if supported_size(n):
        return n
    if not pad:
        raise ValueError(
            f"{where}: width {n} has no Hadamard construction (n = m·2^k with m in the stored orders); pass pad=True "
            f"to zero-pad it to {pad_to_hadamard_size(n)}, or leave this online rotation off."
        )
    return pad_to_hadamard_size(n)


# ---- model-level transforms ----------------------------------------------------------------------------
def _check_float(model: nnx.Module, what: str) -> None:
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(v.get_value(), QArray):
            raise ValueError(f"{what}: parameter {path_string(p)!r} is already quantized; transform the float model "
                             "first, then quantize.")


def _checked_layout(model: nnx.Module, what: str) -> DecoderLayout:
    layout = layout_of(model)
    if layout.head is None:
        raise ValueError(f"{what}: the model ties its output head to the embedding, so the final norm cannot be folded "
                         "into the head alone; call model.untie_embeddings() first.")
    _check_float(model, what)
    return layout


def fold_norms(model: nnx.Module) -> nnx.Module:
    """A copy with every norm group's RMSNorm gain folded into its consumers (``W ← diag(γ) W``, ``γ ← 1``).

    Exact in exact arithmetic (``(γ ⊙ n(x)) W = n(x) (diag(γ) W)``), and the prerequisite of a
    residual rotation, since a gain-free RMSNorm commutes with orthogonal maps.
    """
    layout = _checked_layout(model, "fold_norms")
    graphdef, w, rest = split_weights(model)
    for group in layout.norm_groups:
        gain = np.asarray(w[f"{group.norm}/weight"], np.float64)
        for c in group.consumers:
            k = w[f"{c}/kernel"]
            w[f"{c}/kernel"] = jnp.asarray(gain[:, None] * np.asarray(k, np.float64), k.dtype)
        w[f"{group.norm}/weight"] = jnp.ones_like(w[f"{group.norm}/weight"])
    return merge_weights(graphdef, w, rest, model)


def check_params(params: Params, layout: DecoderLayout) -> None:
    """Shapes (and, for concrete values, positivity of scales) of a transform pytree; errors name the layer."""
    d = layout.hidden_size
    if (r := params.get("residual")) is not None and tuple(r.shape) != (d, d):
        raise ValueError(f"params['residual'] must be [{d}, {d}], got {tuple(r.shape)}.")
    layers = params.get("layers")
    if layers is None:
        return
    if len(layers) != len(layout.layers):
        raise ValueError(f"params['layers'] has {len(layers)} entries for {len(layout.layers)} layers.")
    for i, (layer, p) in enumerate(zip(layout.layers, layers)):
        a = layer.attention
        shapes = {"attn_scale": (d,), "mlp_scale": (d,), "qk_scale": (a.num_kv_heads, a.head_dim // 2),
                  "ov_scale": (a.num_kv_heads * a.head_dim,), "ov": (a.num_kv_heads, a.head_dim, a.head_dim)}
        if layer.dense_mlp is not None:
            shapes["ud_scale"] = (layer.dense_mlp.hidden,)
        elif p.get("ud_scale") is not None:
            raise ValueError(f"params['layers'][{i}]: 'ud_scale' scales a dense MLP's hidden units, but layer {i} is a "
                             f"mixture of experts ({layer.mlp.path}); drop it for this layer.")
        unknown = set(p) - set(shapes) - {"ud_scale"}
        if unknown:
            raise ValueError(f"params['layers'][{i}] has unknown entries {sorted(unknown)}; allowed: {sorted(shapes)}.")
        for name, value in p.items():
            if value is not None and name in shapes and tuple(value.shape) != shapes[name]:
                raise ValueError(f"layer {i} ({a.path}): params {name!r} must have shape {shapes[name]}, got "
                                 f"{tuple(value.shape)}.")
            if name.endswith("scale") and value is not None:
                value = np.asarray(value)
                if not (np.all(value > 0) and np.all(np.isfinite(value))):
                    raise ValueError(f"layer {i} ({a.path}): params {name!r} must be finite and > 0.")
        if "qk_scale" in p and a.qk_norm:
            raise ValueError(f"layer {i} ({a.path}): q/k scaling is not an equivalence when queries and keys pass "
                             "through a per-head RMSNorm (qk_norm); drop 'qk_scale'.")


def _check_dense_for_online_down(layer) -> None:
    if layer.dense_mlp is None:
        raise ValueError(f"{layer.mlp.path} is a mixture of experts: the online Hadamard before down_proj is defined "
                         "for dense MLPs only; leave 'down' out of the online rotations (online=('qk',) or ()).")


def set_online_rotations(model: nnx.Module, layout: DecoderLayout, online: OnlineRotations) -> None:
    """Switch on the run-time halves of ``online`` in ``model`` (in place; the offline halves are :func:`fold`'s)."""
    for layer in layout.layers:
        if online.down:
            _check_dense_for_online_down(layer)
            down = module_at(model, layer.mlp.down)
            if getattr(down, "input_rotation", None) is not None:
                raise ValueError(f"{layer.mlp.down} already has an online rotation; apply it once.")
            if not hasattr(down, "input_rotation"):
                raise ValueError(f"{layer.mlp.down}: this layer has no online-rotation site (input_rotation).")
            down.input_rotation = online_size(layer.mlp.hidden, online.pad, layer.mlp.down)
        if online.qk:
            attn = module_at(model, layer.attention.path)
            if not hasattr(attn, "qk_rotation"):
                raise ValueError(f"{layer.attention.path}: this attention has no q/k online-rotation site.")
            if attn.qk_rotation:
                raise ValueError(f"{layer.attention.path} already rotates queries and keys online; apply it once.")
            if not supported_size(layer.attention.head_dim):
                raise ValueError(f"{layer.attention.path}: head_dim {layer.attention.head_dim} has no Hadamard "
                                 "construction, so queries and keys cannot be rotated online; leave 'qk' off.")
            attn.qk_rotation = True


def apply_transforms(model: nnx.Module, params: Params, *, online: OnlineRotations | tuple[str, ...] = (),
                     pad: bool = False) -> nnx.Module:
    """``model -> model``: fold RMSNorm gains, fold ``params`` (module docstring) and enable ``online`` rotations.

    The merge runs on the host in float64 and is cast back to each parameter's dtype.
    Exact up to that final rounding: in a float64 model the logits equal the original's
    to ~1e-12 relative. The input model is not modified.
    """
    online = OnlineRotations.parse(online, pad=pad)
    layout = _checked_layout(model, "apply_transforms")
    check_params(params, layout)
    for layer, p in zip(layout.layers, params.get("layers") or ()):
        if layer.dense_mlp is None:
            continue
        if p.get("ud_scale") is not None and getattr(module_at(model, layer.mlp.down), "input_rotation", None):
            raise ValueError(f"{layer.mlp.down} already has an online Hadamard on its input, so 'ud_scale' cannot be "
                             "folded into it; apply scalings together with (or before) the online rotation.")
    folded = fold_norms(model)
    set_online_rotations(folded, layout, online)
    graphdef, w, rest = split_weights(folded)
    dtypes = {k: v.dtype for k, v in w.items()}
    host = jax.tree.map(lambda a: np.asarray(a, np.float64), (w, dict(params)))
    merged = fold(host[0], host[1], layout, online)
    merged = {k: jnp.asarray(v, dtypes[k]) for k, v in merged.items()}
    return merge_weights(graphdef, merged, rest, folded)


def identity_params(layout: DecoderLayout, *, residual: bool = True, ov: bool = True, scales: bool = True,
                    dtype=jnp.float32) -> dict:
    """The identity transform pytree (all rotations ``I``, all scales 1) for the chosen entries."""
    d = layout.hidden_size
    out: dict = {}
    if residual:
        out["residual"] = jnp.eye(d, dtype=dtype)
    layers = []
    for layer in layout.layers:
        a = layer.attention
        p = {}
        if ov:
            p["ov"] = jnp.broadcast_to(jnp.eye(a.head_dim, dtype=dtype), (a.num_kv_heads, a.head_dim, a.head_dim))
        if scales:
            p.update(attn_scale=jnp.ones((d,), dtype), mlp_scale=jnp.ones((d,), dtype),
                     ov_scale=jnp.ones((a.num_kv_heads * a.head_dim,), dtype))
            if layer.dense_mlp is not None:
                p["ud_scale"] = jnp.ones((layer.dense_mlp.hidden,), dtype)
            if not a.qk_norm:
                p["qk_scale"] = jnp.ones((a.num_kv_heads, a.head_dim // 2), dtype)
        layers.append(p)
    out["layers"] = layers
    return out
