"""OSTQuant (Hu et al., ICLR 2025): learned orthogonal and scaling transforms, trained with KL-Top on the Stiefel manifold.

Spec: ``shared/specs/ostquant.md``. The transforms are the pytree of
``jquant.transforms.equivalence`` (``R_res``; per layer ``R_ov``, ``S_attn``, ``S_ffn``,
``S_qk``, ``S_ov``, ``S_ud``) plus the fixed online Hadamards (MLP product; queries
and keys after RoPE for KV4). Training (spec §3.5–3.7):

1. the student is the norm-folded model with the online rotations and the target
   setting's fake quantizers on (per-token asymmetric activations, per-head KV, and
   for weight-only settings per-channel symmetric weights with MSE clip search);
   each step rebuilds its weights with the *same* pure ``fold`` that merges them at
   the end (so the trained and the deployed model agree, spec §5.6 / §7.1);
2. the teacher is the original float model; the loss is KL-Top (``k`` teacher logits,
   full-vocabulary softmax, spec §3.5) averaged over positions;
3. rotations take Riemannian Adam steps with the Cayley retraction, scales Adam
   steps, both with cosine decay (``jquant.optim.ostquant_optimizer``);
4. ``ostquant`` merges the trained transforms in float64 (``apply_transforms``);
   weight quantization (GPTQ) follows in ``jquant.quantize``.

SpinQuant (Liu et al. 2024) is the same machinery with the scalings off, the quantized student's own next-token
cross-entropy on the calibration tokens as the loss and Cayley SGD on the rotations (``OSTQuantConfig.objective``,
``rotation_optimizer``).

Initialisation: random Hadamards (``init="hadamard"``) or WOMI (``init="womi"``,
spec §3.4): ``R_res = U H`` with ``U`` the eigenvectors of the covariance of all
q/k/v/up/gate weight vectors, and per KV head ``R_j = U_j H`` from the o_proj
weights of its query heads.

Activation and KV fake quantizers pass gradients through their per-token range as the
official quantizer does (``IntFormat(range_gradient=True)``, spec §3.1); their forward
values are exactly those of the deployed formats.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jquant.formats import Format, IntFormat, fake_quantize, get_format
from jquant.kv.cache import KVCacheConfig
from jquant.kv.calibrate import set_kv_cache
from jquant.losses import cross_entropy, kl_top
from jquant.numerics.hadamard import hadamard_matrix, random_hadamard, supported_size
from jquant.optim.stiefel import ROTATION_LR, SCALE_LR, ostquant_optimizer
from jquant.progress import progress_bar
from jquant.sites import path_string
from jquant.transforms.equivalence import (
    OnlineRotations,
    apply_transforms,
    fold,
    fold_norms,
    identity_params,
    module_at,
    set_online_rotations,
    split_weights,
)
from jquant.transforms.layout import DecoderLayout, layout_of

Init = Literal["hadamard", "womi"]


class TrainingDiverged(FloatingPointError):
    """The OSTQuant loss became NaN or infinite; no model is returned."""


OBJECTIVES = ("kl_top", "next_token")
ROTATION_OPTIMIZERS = ("riemannian_adam", "cayley_sgd")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OSTQuantConfig:
    """Training settings (defaults: the paper's 150 steps × batch 8, the code's learning rates, spec §3.6).

    ``weight``/``activation``/``kv``: format names fake-quantized during training
    (None: that tensor stays float). The paper trains W4A16 with ``weight="int4"`` (per
    channel, symmetric, MSE clip search) and W4A4KV4 with ``activation="int4-asym"``,
    ``kv="int4-asym"`` and no weight quantizer (GPTQ runs afterwards).
    ``online``: run-time Hadamards (``"down"``, and ``"qk"`` when keys are quantized).
    ``top_k``: KL-Top's k (clipped to the vocabulary size).
    ``objective`` / ``rotation_optimizer``: OSTQuant's KL-Top to the float model with Riemannian Adam (cosine
    decay), or SpinQuant's (Liu et al. 2024) next-token cross-entropy on the calibration tokens with Cayley SGD
    (``"cayley_sgd"``, linear decay to 0, no momentum; SpinQuant's rate is 1.5). SpinQuant proper is
    ``learn_scales=False, objective="next_token", rotation_optimizer="cayley_sgd", rotation_lr=1.5``.
    """

    steps: int = 150
    batch_size: int = 8
    rotation_lr: float = ROTATION_LR
    scale_lr: float = SCALE_LR
    top_k: int = 1000
    init: Init = "hadamard"
    online: tuple[str, ...] = ("down",)
    pad: bool = False
    weight: str | Format | None = None
    activation: str | Format | None = None
    kv: str | Format | None = None
    learn_scales: bool = True
    objective: str = "kl_top"
    rotation_optimizer: str = "riemannian_adam"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"OSTQuantConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.rotation_optimizer not in ROTATION_OPTIMIZERS:
            raise ValueError(f"OSTQuantConfig.rotation_optimizer must be one of {ROTATION_OPTIMIZERS}, got "
                             f"{self.rotation_optimizer!r}.")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"OSTQuantConfig: steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}.")
        if self.init not in ("hadamard", "womi"):
            raise ValueError(f"OSTQuantConfig.init must be 'hadamard' or 'womi', got {self.init!r}.")
        if self.top_k < 1:
            raise ValueError(f"OSTQuantConfig.top_k must be >= 1, got {self.top_k}.")
        if not (self.rotation_lr > 0 and self.scale_lr > 0):
            raise ValueError("OSTQuantConfig: learning rates must be positive.")
        object.__setattr__(self, "online", tuple(self.online))
        OnlineRotations.parse(self.online)
        if self.kv is not None and "qk" not in self.online:
            raise ValueError("OSTQuantConfig: quantized keys need the online q/k Hadamard; add 'qk' to online.")


@dataclasses.dataclass(frozen=True)
class OSTQuantResult:
    """Trained transform ``params``, the per-step ``losses`` and the wall time in seconds."""

    params: dict
    losses: tuple[float, ...]
    seconds: float


# ---- initialisation --------------------------------------------------------------------------------
def _eigvecs(rows: np.ndarray) -> np.ndarray:
    centred = rows - rows.mean(axis=0, keepdims=True)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    return vecs


def womi_params(folded: nnx.Module, layout: DecoderLayout, key: jax.Array) -> tuple[np.ndarray, list[np.ndarray]]:
    """WOMI (spec §3.4): ``R_res`` and per-layer ``R_ov [K, dh, dh]`` from weight covariances, in float64."""
    d = layout.hidden_size
    k_res, k_ov = jax.random.split(key)
    readers = [c for layer in layout.layers for c in layer.attn_norm.consumers + layer.mlp_norm.consumers]
    rows = np.concatenate([np.asarray(module_at(folded, c).kernel.get_value(), np.float64).T for c in readers])
    residual = _eigvecs(rows) @ np.asarray(random_hadamard(d, k_res), np.float64)
    ov = []
    for i, layer in enumerate(layout.layers):
        a = layer.attention
        o = np.asarray(module_at(folded, a.o).kernel.get_value(), np.float64)  # [H*dh, d]
        heads = []
        for j in range(a.num_kv_heads):
            block = o[j * a.group * a.head_dim:(j + 1) * a.group * a.head_dim]  # [g*dh, d]
            vecs = block.reshape(a.group, a.head_dim, -1).transpose(0, 2, 1).reshape(-1, a.head_dim)
            h = np.asarray(random_hadamard(a.head_dim, jax.random.fold_in(k_ov, i * 1000 + j)), np.float64)
            heads.append(_eigvecs(vecs) @ h)
        ov.append(np.stack(heads))
    return residual, ov


def init_params(folded: nnx.Module, layout: DecoderLayout, key: jax.Array, config: OSTQuantConfig) -> dict:
    """Starting transforms: rotations by ``config.init``, all scales 1 (float32)."""
    for n, where in [(layout.hidden_size, "hidden size")] + [(lay.attention.head_dim, f"{lay.attention.path} head_dim")
                                                             for lay in layout.layers]:
        if not supported_size(n):
            raise ValueError(f"ostquant: the {where} {n} has no Hadamard construction for the rotation initialisation.")
    params = identity_params(layout, scales=config.learn_scales)
    if config.init == "womi":
        residual, ov = womi_params(folded, layout, key)
        params["residual"] = jnp.asarray(residual, jnp.float32)
        for p, r in zip(params["layers"], ov):
            p["ov"] = jnp.asarray(r, jnp.float32)
    else:
        params["residual"] = random_hadamard(layout.hidden_size, key)
        for p, layer in zip(params["layers"], layout.layers):
            a = layer.attention
            p["ov"] = jnp.broadcast_to(hadamard_matrix(a.head_dim), (a.num_kv_heads, a.head_dim, a.head_dim))
    return params


# ---- the student ---------------------------------------------------------------------------------------
def _training_format(name: str | Format) -> Format:
    """The named format, with gradients through its range when it is an integer format (spec §3.1)."""
    fmt = get_format(name)
    return dataclasses.replace(fmt, range_gradient=True) if isinstance(fmt, IntFormat) else fmt


def student_template(model: nnx.Module, layout: DecoderLayout, config: OSTQuantConfig) -> nnx.Module:
    """The norm-folded model with online rotations and the activation/KV fake quantizers switched on."""
    student = fold_norms(model)
    set_online_rotations(student, layout, OnlineRotations.parse(config.online, pad=config.pad))
    if config.activation is not None:
        fmt = _training_format(config.activation)
        for path in layout.block_linears:
            module_at(student, path).activation = fmt
    if config.kv is not None:
        kv = KVCacheConfig.of_format(_training_format(config.kv))
        set_kv_cache(student, {layer.attention.path: kv for layer in layout.layers})
    return student


def _weight_quantizer(layout: DecoderLayout, weight: str | None) -> Callable[[dict], dict]:
    """Fake-quantize (STE) every block linear's kernel along its input axis (weight-only training settings)."""
    if weight is None:
        return lambda w: w
    fmt = get_format(weight)
    kernels = {f"{c}/kernel" for c in layout.block_linears}

    def quantize_weights(w: dict) -> dict:
        return {k: fake_quantize(v, fmt, axis=0) if k in kernels else v for k, v in w.items()}

    return quantize_weights


ROTATIONS = ("residual", "ov")


def transform_labels(params: dict) -> dict:
    """``"rotation"`` for the orthogonal entries (``residual``, ``ov``), ``"scale"`` for the diagonal ones."""
    def label(path, _):
        return "rotation" if getattr(path[-1], "key", None) in ROTATIONS else "scale"

    return jax.tree_util.tree_map_with_path(label, params)


def _sample(key: jax.Array, n: int, batch: int) -> np.ndarray:
    return np.asarray(jax.random.choice(key, n, (batch,), replace=n < batch))


def train_ostquant(model: nnx.Module, tokens: np.ndarray, key: jax.Array, config: OSTQuantConfig = OSTQuantConfig(), *,
                   progress: bool = True) -> OSTQuantResult:
    """Learn OSTQuant's transforms for ``model`` on calibration ``tokens [N, T]`` (deterministic given ``key``).

    Raises ``TrainingDiverged`` (and returns nothing) if the loss stops being finite.
    The input model is not modified.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"ostquant: calibration tokens must be a non-empty [N, T] array, got shape {tokens.shape}.")
    layout = layout_of(model)
    if layout.has_experts:
        raise ValueError("ostquant: mixture-of-experts blocks are not supported (WOMI and the weight fake-quantizers "
                         "assume [in, out] kernels); rotate MoE models with quarot(model, key, online=('qk',)).")
    k_init, k_data = jax.random.split(key)
    online = OnlineRotations.parse(config.online, pad=config.pad)
    student = student_template(model, layout, config)
    params = init_params(student, layout, k_init, config)
    s_graph, base, s_rest = split_weights(student)
    base = {k: v.astype(jnp.promote_types(v.dtype, jnp.float32)) for k, v in base.items()}  # transforms run in >= fp32
    s_vars = [(p, v) for p, v in nnx.to_flat_state(nnx.split(student, nnx.Param, ...)[1])]
    t_graph, t_state = nnx.split(model)
    quantize_weights = _weight_quantizer(layout, config.weight)
    top_k = min(config.top_k, int(getattr(model.config, "vocab_size", config.top_k)))
    optimizer = ostquant_optimizer(config.steps, rotation_lr=config.rotation_lr, scale_lr=config.scale_lr,
                                   labels=transform_labels, rotation=config.rotation_optimizer)

    def student_logits(p, weights, batch):
        w = quantize_weights(fold(weights, p, layout, online))
        state = nnx.from_flat_state([(path, var.replace(w[path_string(path)])) for path, var in s_vars])
        return nnx.merge(s_graph, state, s_rest)(batch)

    def loss_fn(p, weights, teacher_state, batch):
        if config.objective == "next_token":  # SpinQuant: the quantized network's own language-model loss
            return cross_entropy(student_logits(p, weights, batch[:, :-1]).astype(jnp.float32), batch[:, 1:])
        teacher = jax.lax.stop_gradient(nnx.merge(t_graph, teacher_state)(batch))
        return kl_top(student_logits(p, weights, batch).astype(jnp.float32), teacher.astype(jnp.float32), top_k)

    @jax.jit
    def step(p, opt_state, weights, teacher_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, weights, teacher_state, batch)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    t0 = time.perf_counter()
    with progress_bar(total=config.steps, description="ostquant", enabled=progress) as bar:
        for i in range(config.steps):
            batch = jnp.asarray(tokens[_sample(jax.random.fold_in(k_data, i), len(tokens), config.batch_size)])
            params, opt_state, loss = step(params, opt_state, base, t_state, batch)
            loss = float(loss)
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"ostquant: the {config.objective} loss became {loss} at step {i}; no model is returned. Lower rotation_lr/"
                    f"scale_lr (now {config.rotation_lr}, {config.scale_lr}) or check the model for non-finite outputs."
                )
            losses.append(loss)
            bar.update(1, loss=loss)
    return OSTQuantResult(params=params, losses=tuple(losses), seconds=time.perf_counter() - t0)


def ostquant(model: nnx.Module, tokens: np.ndarray, key: jax.Array, config: OSTQuantConfig = OSTQuantConfig(), *,
             progress: bool = True) -> tuple[nnx.Module, OSTQuantResult]:
    """Train (``train_ostquant``) and merge the transforms in float64: ``(transformed float model, result)``.

    The returned model computes the float function of ``model`` (exact up to the
    final cast) with the online rotations on; quantize it next (``jquant.quantize``).
    """
    result = train_ostquant(model, tokens, key, config, progress=progress)
    merged = apply_transforms(model, result.params, online=config.online, pad=config.pad)
    return merged, result


def plot_losses(losses: tuple[float, ...] | list[float], path, *, title: str = "OSTQuant KL-Top loss") -> None:
    """Write the loss curve to ``path`` (a PNG or PDF, by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(np.arange(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("KL-Top")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
