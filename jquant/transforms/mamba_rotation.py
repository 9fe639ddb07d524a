"""MambaQuant's equivalence transforms on the Mamba families (Xu et al., 2025; spec §3.4–3.7).

Row-vector convention with jquant's ``[in, out]`` kernels. Given an
:class:`~jquant.transforms.ssm_layout.SSMLayout` and a parameter pytree (every entry
optional; missing = identity)::

    {"residual": R1 [d, d] orthogonal,             # a0: residual stream (KLT-enhanced: K1 H_d)
     "blocks": [{"input_scale": s0 [d] (> 0),      # a0: smoothing of the in_proj input (SmoothQuant baseline)
                 "gate_scale": s2 [Di] (> 0),      # a5: smoothing of the out_proj input (S2)
                 "dt_scale": s5 [R] (> 0),         # a3: smoothing of the dt_proj input (S5, Mamba-1)
                 "dt_rotation": R5 [R, R],          # a3: rotation of the dt_proj input (K5 H_R, Mamba-1)
                 "conv_scale": s7 [Di] (> 0),      # a1: smoothing of the conv1d input (S7, Mamba-1)
                 "state_scale": s4 [N] (> 0)}, ...]}  # a4: smoothing of the SSM matmul's h and C (S4, Mamba-1)

:func:`fold` rewrites the weights so the float model computes the same function:

- R1: ``E ← E R1``; ``W_in ← R1ᵀ W_in``; ``W_out ← W_out R1`` (and ``b_out``); ``W_head ← R1ᵀ W_head``
  (the RMSNorm gains are folded into ``W_in``/``W_head`` first: a gain-free RMSNorm commutes with R1);
- S0 (no R1 only): the block's RMSNorm gain ``γ ← γ / s`` and ``W_in ← diag(s) W_in``;
- S2, Mamba-1: the gate columns ``W_z ← W_z / s`` and the mixer's S-SiLU ``z'·σ(s ⊙ z')`` make the
  gated output ``(y ⊙ SiLU(z)) / s``; Mamba-2: the gated-norm gain ``w ← w / s``; both: ``W_out ← diag(s) W_out``;
- S5: ``W_δ ← W_δ / s`` (the δ columns of ``x_proj``), ``W_dt ← diag(s) W_dt``;
- R5: ``W_δ ← W_δ R5``, ``W_dt ← R5ᵀ W_dt`` (the activation becomes ``δ K5 H``, spec §7.4);
- S7: ``W_u ← W_u / s`` (the ``u`` columns of ``in_proj`` and their bias), ``w_conv[:, c] ← s_c w_conv[:, c]``:
  exact because the convolution is depthwise (each channel sees only its own taps); its bias is unchanged;
- S4: ``W_B ← W_B / s`` and ``W_C ← W_C · s`` (the B and C columns of ``x_proj``): the recurrence is diagonal per
  state and linear in ``B``, so ``h' = h / s`` and ``C' = C · s`` and ``Σ_n h'_n C'_n`` is unchanged (spec §3.5b);
- online R2 (``online=True``): ``out_proj`` applies ``x ↦ x H_Di`` at run time
  (``Linear.input_rotation``) and ``W_out ← H_Diᵀ W_out`` (after S2: ``X' = (X/s) H``, spec §3.5);
- online R4 (``rotate_state=True``, Mamba-1): the mixer rotates each token's state ``h ↦ h H_N`` before the SSM
  matmul (``MambaMixer.state_rotation``) and ``W_C ← W_C H_N``, so ``h' C'ᵀ = h H_N H_Nᵀ Cᵀ = h Cᵀ`` (after S4).

:func:`mambaquant_params` computes the pytree from calibration tokens: S2/S5 by
SmoothQuant's rule ``s = max|X|^α / max|W|^{1-α}`` (clamped at 1e-2; S7 takes the max over each channel's
taps, spec §3.6), R1 and R5 by the KLT of
the covariance of exactly the tensor they rotate (after norm folding and smoothing, §7.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.calib.capture import model_input_statistics
from jquant.calib.data import batches
from jquant.module_jit import module_jit
from jquant.numerics.hadamard import hadamard_numpy
from jquant.sites import path_string
from jquant.transforms.equivalence import Weights, merge_weights, module_at, online_size, split_weights
from jquant.transforms.klt import klt_rotation, random_hadamard_rotation
from jquant.transforms.ssm_layout import SSMLayout, ssm_layout_of

MIN_SCALE = 1e-2  # the official code's clamp of every smoothing factor
MAX_STATE_SCALE = 100.0  # and S4's upper clamp (spec §4)
STATE_RULES = ("code", "balanced")  # S4's statistic: max|C| alone (the official code), or SmoothQuant's over h and C


def fold(weights: Weights, params: Mapping[str, Any], layout: SSMLayout, *, online: bool = False,
         rotate_state: bool = False) -> Weights:
    """Rewrite float64 numpy ``weights`` so the model computes the same function under ``params`` (module docstring).

    The RMSNorm gains must already be 1 when ``params["residual"]`` is given, and Mamba-1 weights
    must hold ``{mixer}/gate_scale`` when a ``gate_scale`` is given (:func:`apply_mamba_transforms` does both).
    """
    w = dict(weights)
    rot = params.get("residual")
    blocks = params.get("blocks") or [{}] * len(layout.blocks)
    for b, p in zip(layout.blocks, blocks):
        if (s := p.get("input_scale")) is not None:
            w[f"{b.norm}/weight"] = w[f"{b.norm}/weight"] / s
            w[f"{b.in_proj}/kernel"] = s[:, None] * w[f"{b.in_proj}/kernel"]
        if (s := p.get("gate_scale")) is not None:
            if b.kind == "mamba1":
                lo, hi = b.gate
                _scale_columns(w, b.in_proj, slice(lo, hi), 1.0 / s)
                w[f"{b.path}/gate_scale"] = w[f"{b.path}/gate_scale"] * s
            else:
                w[f"{b.gated_norm}/weight"] = w[f"{b.gated_norm}/weight"] / s
            w[f"{b.out_proj}/kernel"] = s[:, None] * w[f"{b.out_proj}/kernel"]
        if (s := p.get("dt_scale")) is not None:
            _scale_columns(w, b.x_proj, slice(0, b.dt_rank), 1.0 / s)
            w[f"{b.dt_proj}/kernel"] = s[:, None] * w[f"{b.dt_proj}/kernel"]
        if (r5 := p.get("dt_rotation")) is not None:
            k = w[f"{b.x_proj}/kernel"].copy()
            k[:, : b.dt_rank] = k[:, : b.dt_rank] @ r5
            w[f"{b.x_proj}/kernel"] = k
            w[f"{b.dt_proj}/kernel"] = r5.T @ w[f"{b.dt_proj}/kernel"]
        if (s := p.get("conv_scale")) is not None:
            _scale_columns(w, b.in_proj, slice(0, b.inner), 1.0 / s)
            w[f"{b.conv}/weight"] = w[f"{b.conv}/weight"] * s[None, :]
        if b.kind == "mamba1":
            n, c0 = b.state_size, b.dt_rank + b.state_size  # x_proj columns: [δ | B | C]
            if (s := p.get("state_scale")) is not None:
                _scale_columns(w, b.x_proj, slice(b.dt_rank, c0), 1.0 / s)
                _scale_columns(w, b.x_proj, slice(c0, c0 + n), s)
            if rotate_state:
                k = w[f"{b.x_proj}/kernel"].copy()
                k[:, c0:c0 + n] = k[:, c0:c0 + n] @ hadamard_numpy(n)
                w[f"{b.x_proj}/kernel"] = k
        if online:
            w[f"{b.out_proj}/kernel"] = hadamard_numpy(b.inner).T @ w[f"{b.out_proj}/kernel"]
        if rot is not None:
            w[f"{b.in_proj}/kernel"] = rot.T @ w[f"{b.in_proj}/kernel"]
            for leaf in ("kernel", "bias"):
                if f"{b.out_proj}/{leaf}" in w:
                    w[f"{b.out_proj}/{leaf}"] = w[f"{b.out_proj}/{leaf}"] @ rot
    if rot is not None:
        w[f"{layout.embedding}/embedding"] = w[f"{layout.embedding}/embedding"] @ rot
        w[f"{layout.head}/kernel"] = rot.T @ w[f"{layout.head}/kernel"]
    return w


def _scale_columns(w: Weights, path: str, cols: slice, factor: np.ndarray) -> None:
    k = w[f"{path}/kernel"].copy()
    k[:, cols] = k[:, cols] * factor[None, :]
    w[f"{path}/kernel"] = k
    if f"{path}/bias" in w:
        bias = w[f"{path}/bias"].copy()
        bias[cols] = bias[cols] * factor
        w[f"{path}/bias"] = bias


def fold_ssm_norms(weights: Weights, layout: SSMLayout) -> Weights:
    """Fold every block's RMSNorm gain into ``in_proj`` and the final gain into the head (``W ← diag(γ) W``, ``γ ← 1``)."""
    w = dict(weights)
    pairs = [(b.norm, b.in_proj) for b in layout.blocks] + [(layout.final_norm, layout.head)]
    for norm, linear in pairs:
        w[f"{linear}/kernel"] = w[f"{norm}/weight"][:, None] * w[f"{linear}/kernel"]
        w[f"{norm}/weight"] = np.ones_like(w[f"{norm}/weight"])
    return w


def _check_params(params: Mapping[str, Any], layout: SSMLayout) -> None:
    d = layout.hidden_size
    if (r := params.get("residual")) is not None and np.shape(r) != (d, d):
        raise ValueError(f"params['residual'] must be [{d}, {d}], got {np.shape(r)}.")
    blocks = params.get("blocks")
    if blocks is not None and len(blocks) != len(layout.blocks):
        raise ValueError(f"params['blocks'] has {len(blocks)} entries for {len(layout.blocks)} blocks.")
    for b, p in zip(layout.blocks, blocks or ()):
        if "input_scale" in p and params.get("residual") is not None:
            raise ValueError(f"{b.path}: 'input_scale' changes the RMSNorm gain, which the residual rotation needs to be "
                             "1; use one or the other.")
        shapes = {"input_scale": (layout.hidden_size,), "gate_scale": (b.inner,)}
        if b.kind == "mamba1":
            shapes.update(dt_scale=(b.dt_rank,), dt_rotation=(b.dt_rank, b.dt_rank), conv_scale=(b.inner,),
                          state_scale=(b.state_size,))
        unknown = set(p) - set(shapes)
        if unknown:
            raise ValueError(f"{b.path}: unknown transform entries {sorted(unknown)} for a {b.kind} mixer; allowed: "
                             f"{sorted(shapes)}.")
        for name, value in p.items():
            if np.shape(value) != shapes[name]:
                raise ValueError(f"{b.path}: params {name!r} must have shape {shapes[name]}, got {np.shape(value)}.")
            if name.endswith("scale") and not np.all((np.asarray(value) > 0) & np.isfinite(value)):
                raise ValueError(f"{b.path}: params {name!r} must be finite and > 0.")


def add_runtime_structure(model: nnx.Module, *, gate_scale: bool, online: bool, rotate_state: bool = False) -> None:
    """Give ``model`` (in place; concrete or abstract) the run-time sites MambaQuant's folds use.

    ``gate_scale``: every Mamba-1 mixer gets a ``gate_scale [Di]`` parameter (ones: S-SiLU equals
    SiLU until a smoothing is folded in); ``online``: every ``out_proj`` rotates its input by a
    Hadamard of order ``Di`` at run time; ``rotate_state``: every Mamba-1 mixer rotates its states by a Hadamard of
    order ``N`` before the SSM matmul (R4). ``jquant.load`` calls this on the abstract model of a
    saved MambaQuant model before its weights are restored.
    """
    for b in ssm_layout_of(model).blocks:
        mixer = module_at(model, b.path)
        if rotate_state and b.kind == "mamba1":
            if mixer.state_rotation:
                raise ValueError(f"{b.path} already rotates its states online; apply it once.")
            mixer.state_rotation = True
        if gate_scale and b.kind == "mamba1" and mixer.gate_scale is None:
            dtype = mixer.D.get_value().dtype
            ones = jax.ShapeDtypeStruct((b.inner,), dtype) if isinstance(mixer.D.get_value(), jax.ShapeDtypeStruct) \
                else jnp.ones((b.inner,), dtype)
            mixer.gate_scale = nnx.Param(ones, out_sharding=("mlp",), eager_sharding=False)
        if online:
            out = module_at(model, b.out_proj)
            if out.input_rotation is not None:
                raise ValueError(f"{b.out_proj} already has an online rotation; apply it once.")
            out.input_rotation = online_size(b.inner, False, b.out_proj)


def apply_mamba_transforms(model: nnx.Module, params: Mapping[str, Any], *, online: bool = False,
                           rotate_state: bool = False) -> nnx.Module:
    """``model -> model``: untie the head, fold RMSNorm gains, fold ``params`` and enable the online R2 (``online``)
    and R4 (``rotate_state``).

    The merge runs on the host in float64 and is cast back to each parameter's dtype; a float64
    model's logits are unchanged to ~1e-12 relative. The input model is not modified.
    """
    layout = ssm_layout_of(model)
    _check_params(params, layout)
    blocks = params.get("blocks") or ()
    gate_scale = any(p.get("gate_scale") is not None for p in blocks)
    if not online and gate_scale:
        for b in layout.blocks:
            if module_at(model, b.out_proj).input_rotation is not None:
                raise ValueError(f"{b.out_proj} already rotates its input online, so 'gate_scale' cannot be folded "
                                 "into it.")
    model = nnx.clone(model.untie_embeddings())
    layout = ssm_layout_of(model)
    add_runtime_structure(model, gate_scale=gate_scale, online=online, rotate_state=rotate_state)
    graphdef, w, rest = split_weights(model)
    dtypes = {k: v.dtype for k, v in w.items()}
    host = {k: np.asarray(v, np.float64) for k, v in w.items()}
    params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), dict(params))
    merged = fold(fold_ssm_norms(host, layout), params64, layout, online=online, rotate_state=rotate_state)
    return merge_weights(graphdef, {k: jnp.asarray(v, dtypes[k]) for k, v in merged.items()}, rest, model)


def _smoothing(act_absmax: np.ndarray, kernel: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^α / max_o|W[j, o]|^(1-α)`` clamped at ``MIN_SCALE`` (spec §3.5)."""
    w = np.max(np.abs(np.asarray(kernel, np.float64)), axis=1)
    return np.maximum(np.maximum(act_absmax, 1e-12) ** alpha / np.maximum(w, 1e-12) ** (1.0 - alpha), MIN_SCALE)


def mambaquant_params(model: nnx.Module, tokens: np.ndarray, key: jax.Array, *, alpha: float = 0.5,
                      klt: bool = True, smooth: bool = True, rotate: bool = True, smooth_conv: bool = False,
                      smooth_state: bool = False, state_rule: str = "code", batch_size: int = 8) -> dict:
    """MambaQuant's transform pytree for ``model`` on calibration ``tokens [N, T]`` (float64 numpy).

    ``klt=False`` uses plain random Hadamards for R1 and R5 (the QuaRot-style baseline);
    ``smooth=False`` drops S2 and S5; ``rotate=False`` drops R1 and R5, and with ``smooth``
    adds S0 at every ``in_proj`` input (SmoothQuant on Mamba: all three smoothings, no rotation);
    ``smooth_conv`` adds S7 at every Mamba-1 ``conv1d`` input (for recipes that quantize the convolution);
    ``smooth_state`` adds S4 at every Mamba-1 SSM matmul (``h' = h / s``, ``C' = C · s``) by ``state_rule``:
    ``"code"``, the official code's rule from ``C`` alone, ``s_n = clamp(max|C_n|, 1e-2, 100)`` (the maximum where
    the code takes the 0.999999 quantile), or ``"balanced"``, SmoothQuant's rule over the two operands,
    ``s_n = clamp(max|h_n|^α / max|C_n|^(1-α), 1e-2, 100)`` (spec §7.5; maxima over the calibration tokens and
    channels, ``ssm_state_statistics``).
    K1 is the KLT of layer 0's ``in_proj`` input (the gain-free normalised stream, shared by all
    layers, spec §3.4); K5 that of each layer's ``dt_proj`` input after S5
    (``Σ' = diag(1/s) Σ diag(1/s)``).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mambaquant: alpha (migration strength) must lie in [0, 1], got {alpha}.")
    if state_rule not in STATE_RULES:
        raise ValueError(f"mambaquant: state_rule={state_rule!r} must be one of {STATE_RULES}.")
    layout = ssm_layout_of(model)
    folded = apply_mamba_transforms(model, {})
    paths = {b.in_proj for b in layout.blocks} | {b.out_proj for b in layout.blocks}
    paths |= {b.dt_proj for b in layout.blocks if b.kind == "mamba1"}
    if smooth_conv:
        paths |= {b.conv for b in layout.blocks if b.kind == "mamba1"}
    state_stats = ssm_state_statistics(folded, tokens, batch_size=batch_size) if smooth_state else {}
    stats = model_input_statistics(folded, tokens, paths, batch_size=batch_size)
    k_res, k_dt = jax.random.split(key)
    params: dict = {}
    if rotate:
        h_d = random_hadamard_rotation(layout.hidden_size, k_res, "residual stream")
        params["residual"] = klt_rotation(stats[layout.blocks[0].in_proj].covariance, h_d) if klt else h_d
    kernel = lambda path: module_at(folded, path).kernel.get_value()  # noqa: E731
    blocks = []
    for i, b in enumerate(layout.blocks):
        p = {}
        if smooth and not rotate:
            p["input_scale"] = _smoothing(stats[b.in_proj].absmax, kernel(b.in_proj), alpha)
        if smooth:
            p["gate_scale"] = _smoothing(stats[b.out_proj].absmax, kernel(b.out_proj), alpha)
        if b.kind == "mamba1":
            dt = stats[b.dt_proj]
            s = _smoothing(dt.absmax, kernel(b.dt_proj), alpha) if smooth else np.ones(b.dt_rank)
            if smooth:
                p["dt_scale"] = s
            if rotate:
                h_r = random_hadamard_rotation(b.dt_rank, jax.random.fold_in(k_dt, i), f"{b.dt_proj} input")
                p["dt_rotation"] = klt_rotation(dt.covariance / np.outer(s, s), h_r) if klt else h_r
            if smooth_conv:
                taps = module_at(folded, b.conv).weight.get_value()  # [K, Di]: the max runs over each channel's taps
                p["conv_scale"] = _smoothing(stats[b.conv].absmax, np.asarray(taps).T, alpha)
            if smooth_state:
                h_max, c_max = (np.maximum(x, 1e-12) for x in state_stats[b.path])
                s = c_max if state_rule == "code" else h_max ** alpha / c_max ** (1.0 - alpha)
                p["state_scale"] = np.clip(s, MIN_SCALE, MAX_STATE_SCALE)
        blocks.append(p)
    params["blocks"] = blocks
    return params


def ssm_state_statistics(model: nnx.Module, tokens: np.ndarray, *, batch_size: int = 8) -> dict[str, tuple]:
    """Per Mamba-1 mixer path, ``(max|h_n|, max|C_n|)`` float64 ``[N]`` over ``tokens [N_seq, T]`` (every token,
    channel and sequence): the SSM matmul's two operands, from the float model's forward."""
    probe = nnx.clone(model)
    out = {b.path: np.zeros((2, b.state_size)) for b in ssm_layout_of(probe).blocks if b.kind == "mamba1"}
    for path in out:
        module_at(probe, path).capture_state = True
    forward = module_jit(nnx.capture(lambda m, t: m(t), nnx.Intermediate))
    row = {"ssm_state_absmax": 0, "ssm_c_absmax": 1}
    for chunk in batches(tokens, batch_size):
        _, state = forward(probe, jax.tree.map(jnp.asarray, chunk))
        for key, value in nnx.to_flat_state(state):
            path, name = path_string(key[:-1]), str(key[-1])
            if path in out and name in row:
                v = value.get_value() if hasattr(value, "get_value") else value
                out[path][row[name]] = np.maximum(out[path][row[name]], np.asarray(v[0] if isinstance(v, tuple) else v))
    return {p: (m[0], m[1]) for p, m in out.items()}


def mambaquant(model: nnx.Module, tokens: np.ndarray, key: jax.Array, *, alpha: float = 0.5, klt: bool = True,
               smooth: bool = True, rotate: bool = True, online: bool = True, smooth_conv: bool = False,
               smooth_state: bool = False, state_rule: str = "code", rotate_state: bool = False,
               batch_size: int = 8) -> nnx.Module:
    """A MambaQuant-transformed copy of ``model`` (same logits in exact arithmetic), ready for W8A8 / W4A8.

    The defaults are the full method (KLT-enhanced R1/R5, S2/S5 smoothing, online Hadamard R2);
    switching parts off gives the paper's ablation steps and the Hadamard/SmoothQuant baselines. ``smooth_state``
    (S4) and ``rotate_state`` (R4) prepare the SSM matmul for recipes that quantize it (Mamba-1).
    """
    params = mambaquant_params(model, tokens, key, alpha=alpha, klt=klt, smooth=smooth, rotate=rotate,
                               smooth_conv=smooth_conv, smooth_state=smooth_state, state_rule=state_rule,
                               batch_size=batch_size)
    return apply_mamba_transforms(model, params, online=online, rotate_state=rotate_state)
