"""Mamba-1 selective state-space language models, and the pieces Mamba-2 (``mamba2.py``) shares.

Shapes: ``B`` batch, ``T`` tokens, ``V`` vocabulary, ``d`` hidden size,
``Di = expand * d`` inner size, ``N`` state size, ``R`` time-step rank,
``K`` convolution width.

Block: ``x <- x + Mixer(RMSNorm(x))`` (the residual kept in float32 when
``residual_in_fp32``); model: ``logits = RMSNorm_f(x) W_head`` (``W_head`` is
the embedding table when tied). Mamba-1 mixer, per token ``t``::

    [u, z]     = x W_in                          u, z in R^Di
    u          = SiLU(b_conv + sum_k w_conv[k] * u_{t-K+1+k})   (causal, depthwise)
    [dl, B, C] = u W_x                           dl in R^R, B, C in R^N
    Delta      = softplus(dl W_dt + b_dt)        in R^Di
    A          = -exp(A_log)                     in R^{Di x N}
    h_t[i, n]  = exp(Delta_t[i] A[i, n]) h_{t-1}[i, n] + Delta_t[i] B_t[n] u_t[i]
    y_t[i]     = sum_n h_t[i, n] C_t[n] + D[i] u_t[i]
    out        = (y * SiLU(z)) W_out

Every weight matmul is a ``layers.Linear`` (``in_proj``, ``x_proj``,
``dt_proj``, ``out_proj``, ``lm_head``), so recipes quantize them and
calibration records their inputs: MambaQuant's sites a0 (``in_proj``), a2
(``x_proj``), a3 (``dt_proj``), a5 (``out_proj``, the gated SSM output) and
a6 (``lm_head``). The depthwise convolution and the scan are element-wise and
stay in this file.

Parameter paths mirror Hugging Face names (less the ``backbone.`` prefix):
``layers/{i}/norm/weight``, ``layers/{i}/mixer/{in_proj,x_proj,dt_proj,out_proj}/kernel``
(and ``dt_proj/bias``), ``layers/{i}/mixer/conv1d/{weight,bias}`` (weight
``[K, Di]``), ``layers/{i}/mixer/{A_log,D}``, ``norm_f/weight``,
``lm_head/kernel`` (absent when tied). The embedding is
``embed_tokens/embedding`` (Hugging Face's ``backbone.embeddings``), as in
every jquant family, so recipes' default keep-float rules find it.

Two forms compute the same thing: the full-sequence form (a chunked
``jax.lax.associative_scan``; no Python loop over time) and the recurrent
form (one token at a time, ``jax.lax.scan``) that decoding uses. Both carry
the conv window and ``h`` in an ``SSMCache``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import ops
from jquant.models.config_io import check_dtypes_available, dataclass_config_from_json, dataclass_config_to_json
from jquant.models.family import LM_KEEP_FLOAT, Family
from jquant.models.layers import CausalConv1d, Embed, Linear, RMSNorm
from jquant.transforms.ssm_layout import SSMLayout, SSMMixerLayout

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
_DTYPES = ("float32", "bfloat16", "float16", "float64")


def accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype scans and gates run in: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------
# Shared building blocks (also used by mamba2.py)
# ----------------------------------------------------------------------------

# What the Mamba families keep in floating point under a recipe that keeps the default: the embedding, the head
# and the depthwise convolutions (common weight-quantization tools target linear layers only); MambaQuant's
# ``*-conv`` recipes name their own keep_float and quantize the convolutions too.
SSM_KEEP_FLOAT: tuple[str, ...] = (*LM_KEEP_FLOAT, r".*/conv1d")


class LayerState(NamedTuple):
    """One layer's recurrent state: ``conv [B, K-1, C]`` (the last conv inputs) and ``ssm`` (family-specific)."""

    conv: jax.Array
    ssm: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SSMCache:
    """Every layer's ``LayerState`` plus ``length``, the number of tokens consumed (int32 scalar).

    Its size does not grow with the sequence: ``capacity`` arguments exist only
    to share ``init_cache(batch, capacity)`` with attention models.
    """

    layers: tuple[LayerState, ...]
    length: jax.Array


class MambaBlock(nnx.Module):
    """``x + mixer(RMSNorm(x))``; the residual is float32 (or wider) when ``residual_in_fp32``.

    ``mixer(h [B, T, d], state) -> (out [B, T, d], state)`` is a Mamba-1 or Mamba-2 mixer.
    """

    def __init__(self, mixer: nnx.Module, *, hidden_size: int, eps: float, residual_in_fp32: bool,
                 dtype: DTypeName, param_dtype: jnp.dtype):
        self.norm = RMSNorm(hidden_size, eps=eps, param_dtype=param_dtype)
        self.mixer = mixer
        self.residual_in_fp32 = residual_in_fp32
        self.dtype = dtype

    def __call__(self, x: jax.Array, state: LayerState | None) -> tuple[jax.Array, LayerState]:
        """``x [B, T, d]`` and the layer state (None: start of sequence) -> ``[B, T, d]``, new state."""
        h, state = self.mixer(self.norm(x.astype(self.dtype)), state)
        residual = x.astype(accumulation_dtype(x.dtype)) if self.residual_in_fp32 else x
        return residual + h.astype(residual.dtype), state

    def calibration_forward(self, x: jax.Array, context: None) -> jax.Array:
        """The block as ``hidden [B, T, d] -> hidden`` from an empty state (``context`` is unused: None)."""
        return self(x, None)[0]


class CausalSSM(nnx.Module):
    """A stack of ``MambaBlock``s between an embedding and an output head (Mamba-1 and Mamba-2 share it).

    ``model(tokens)`` is the full-sequence forward (``[B, T]`` int -> logits
    ``[B, T, V]``); ``model.step(tokens, cache)`` continues from an ``SSMCache``
    and returns ``(logits, cache)``: ``T = 1`` runs the recurrent form, longer
    chunks the full-sequence form from the carried state.
    """

    def __init__(self, cfg, mixer: Callable[..., nnx.Module], *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pdt, rngs=rngs)
        self.layers = nnx.List([
            MambaBlock(mixer(cfg, rngs=rngs), hidden_size=cfg.hidden_size, eps=cfg.layer_norm_epsilon,
                       residual_in_fp32=cfg.residual_in_fp32, dtype=cfg.dtype, param_dtype=pdt)
            for _ in range(cfg.num_layers)
        ])
        self.norm_f = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, param_dtype=pdt)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, sharding=("embed", "vocab"), param_dtype=pdt, rngs=rngs)
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Full-sequence forward over ``tokens [B, T]`` from an empty state -> logits ``[B, T, V]``."""
        return self._forward(tokens, None)[0]

    def step(self, tokens: jax.Array, cache: SSMCache) -> tuple[jax.Array, SSMCache]:
        """Continue after the ``cache.length`` consumed tokens with ``tokens [B, T]`` -> logits ``[B, T, V]``, new cache."""
        logits, layers = self._forward(tokens, cache.layers)
        return logits, SSMCache(layers=layers, length=cache.length + tokens.shape[1])

    def init_cache(self, batch: int, capacity: int = 0) -> SSMCache:
        """The empty state of ``batch`` sequences (``capacity`` is ignored: the state has a fixed size)."""
        layers = tuple(layer.mixer.initial_state(batch) for layer in self.layers)
        return SSMCache(layers=layers, length=jnp.zeros((), jnp.int32))

    def block_inputs(self, tokens: jax.Array) -> tuple[jax.Array, None]:
        """Hidden states entering the first block; Mamba blocks take no per-token context (None)."""
        return self.embed_tokens(tokens, jnp.dtype(self.config.dtype)), None

    def blocks(self) -> list[MambaBlock]:
        """The repeated blocks, in order (each has ``calibration_forward(hidden, context)``)."""
        return list(self.layers)

    def equivalence_layout(self) -> SSMLayout:
        """The residual-stream structure equivalence transforms act on (``jquant.transforms.ssm_layout``)."""
        blocks = tuple(layer.mixer.mixer_layout(f"layers/{i}") for i, layer in enumerate(self.layers))
        return SSMLayout(hidden_size=self.config.hidden_size, embedding="embed_tokens", blocks=blocks,
                         final_norm="norm_f", head=None if self.lm_head is None else "lm_head")

    def untie_embeddings(self) -> CausalSSM:
        """A copy whose output head is its own ``lm_head`` (``kernel = embeddingᵀ``); self if already untied."""
        if self.lm_head is not None:
            return self
        cfg = self.config.replace(tie_embeddings=False)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: type(self)(cfg, rngs=nnx.Rngs(0))))
        values = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(self))}
        head = values[("embed_tokens", "embedding")].T
        flat = [(p, v.replace(values.get(p, head))) for p, v in nnx.to_flat_state(state)]
        return nnx.merge(graphdef, nnx.from_flat_state(flat))

    def _forward(self, tokens, states):
        dtype = jnp.dtype(self.config.dtype)
        x = self.embed_tokens(tokens, dtype)
        new_states = []
        for i, layer in enumerate(self.layers):
            x, state = layer(x, None if states is None else states[i])
            new_states.append(state)
        x = self.norm_f(x).astype(dtype)  # normalised from the (float32) residual, as Hugging Face does
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits, tuple(new_states)


# ----------------------------------------------------------------------------
# Mamba-1 selective scan
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Mamba-1 model
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class MambaConfig:
    """Architecture of a Mamba-1 language model (validated on construction).

    ``time_step_rank`` defaults to ``ceil(hidden_size / 16)`` (Hugging Face's
    "auto"). ``use_bias`` puts biases on ``in_proj``/``out_proj``,
    ``use_conv_bias`` on the convolution. ``scan_chunk_size`` bounds the
    memory of the full-sequence scan (it does not change the result).
    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype.
    """

    vocab_size: int
    hidden_size: int
    state_size: int = 16
    num_layers: int
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: int | None = None
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    scan_chunk_size: int = 256
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: DTypeName = "float32"
    param_dtype: DTypeName = "float32"

    def __post_init__(self):
        if self.time_step_rank is None:
            object.__setattr__(self, "time_step_rank", math.ceil(self.hidden_size / 16))
        for name in ("vocab_size", "hidden_size", "state_size", "num_layers", "expand", "conv_kernel",
                     "time_step_rank", "scan_chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MambaConfig.{name} must be positive, got {getattr(self, name)}.")
        check_dtypes("MambaConfig", self)

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    def replace(self, **changes) -> MambaConfig:
        return dataclasses.replace(self, **changes)


def check_dtypes(owner: str, cfg) -> None:
    """Raise unless ``cfg.dtype``/``cfg.param_dtype`` are known float dtype names."""
    for name in ("dtype", "param_dtype"):
        if getattr(cfg, name) not in _DTYPES:
            raise ValueError(f"{owner}.{name} must be one of {', '.join(_DTYPES)}, got {getattr(cfg, name)!r}.")


def inverse_softplus_time_steps(size: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> np.ndarray:
    """``softplus^{-1}(dt)`` for ``size`` time steps log-spaced in ``[dt_min, dt_max]`` (the usual dt-bias init)."""
    dt = np.geomspace(dt_min, dt_max, size)
    return (dt + np.log(-np.expm1(-dt))).astype(np.float32)


class MambaMixer(nnx.Module):
    """The Mamba-1 selective SSM mixer (module docstring has the equations).

    Paths: ``in_proj [d, 2 Di]``, ``conv1d``, ``x_proj [Di, R + 2N]``,
    ``dt_proj [R, Di]`` (with bias ``b_dt``), ``A_log [Di, N]``, ``D [Di]``,
    ``out_proj [Di, d]``.
    """

    def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, di, n, r = cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
        pdt = jnp.dtype(cfg.param_dtype)
        kw = dict(param_dtype=pdt, rngs=rngs)
        self.in_proj = Linear(d, 2 * di, use_bias=cfg.use_bias, sharding=("embed", "mlp"), **kw)
        self.conv1d = CausalConv1d(di, cfg.conv_kernel, use_bias=cfg.use_conv_bias, **kw)
        self.x_proj = Linear(di, r + 2 * n, use_bias=False, sharding=("mlp", None), **kw)
        self.dt_proj = Linear(r, di, use_bias=True, sharding=(None, "mlp"), **kw)
        self.dt_proj.bias[...] = jnp.asarray(inverse_softplus_time_steps(di), pdt)
        a_log = jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (di, n)))
        self.A_log = nnx.Param(a_log.astype(pdt), out_sharding=("mlp", None), eager_sharding=False)
        self.D = nnx.Param(jnp.ones((di,), pdt), out_sharding=("mlp",), eager_sharding=False)
        self.out_proj = Linear(di, d, use_bias=cfg.use_bias, sharding=("mlp", "embed"), **kw)
        self.gate_scale = nnx.data(None)  # a Param [Di] once MambaQuant's S-SiLU smoothing is folded in
        self.ssm_matmul = None  # a Format once a recipe quantizes the SSM matmul's operands h and C (site a4)
        self.state_rotation = False  # MambaQuant's online R4: h ↦ h H_N before the SSM matmul (C H_N folded in x_proj)
        self.capture_state = False  # sow max|h| and max|C| per state (S4's calibration statistics)

    def mixer_layout(self, prefix: str) -> SSMMixerLayout:
        """This mixer's sites for equivalence transforms, its block at ``prefix`` (``layers/3``)."""
        cfg, m = self.cfg, f"{prefix}/mixer"
        di = cfg.intermediate_size
        return SSMMixerLayout(kind="mamba1", path=m, norm=f"{prefix}/norm", in_proj=f"{m}/in_proj",
                              out_proj=f"{m}/out_proj", inner=di, gate=(di, 2 * di), conv=f"{m}/conv1d",
                              x_proj=f"{m}/x_proj", dt_proj=f"{m}/dt_proj", dt_rank=cfg.time_step_rank,
                              state_size=cfg.state_size)

    def initial_state(self, batch: int) -> LayerState:
        """Zero state: ``conv [B, K-1, Di]`` in the compute dtype, ``ssm [B, Di, N]`` in float32 (or wider)."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        return LayerState(
            conv=jnp.zeros((batch, cfg.conv_kernel - 1, cfg.intermediate_size), dtype),
            ssm=jnp.zeros((batch, cfg.intermediate_size, cfg.state_size), accumulation_dtype(dtype)),
        )

    def __call__(self, x: jax.Array, state: LayerState | None) -> tuple[jax.Array, LayerState]:
        """``x [B, T, d]`` (normalised) and the state before it -> ``[B, T, d]`` and the state after it."""
        cfg = self.cfg
        state = self.initial_state(x.shape[0]) if state is None else state
        acc = accumulation_dtype(x.dtype)
        u, z = jnp.split(self.in_proj(x), 2, axis=-1)
        u, conv = self.conv1d(u, state.conv)
        u = jax.nn.silu(u)
        low, B, C = jnp.split(self.x_proj(u), [cfg.time_step_rank, cfg.time_step_rank + cfg.state_size], axis=-1)
        delta = jax.nn.softplus(self.dt_proj(low).astype(acc))
        A = -jnp.exp(self.A_log[...].astype(acc))
        u_acc = u.astype(acc)
        args = (u_acc, delta, A, B.astype(acc), C.astype(acc), state.ssm.astype(acc))
        if self.capture_state:
            self.sow(nnx.Intermediate, "ssm_state_absmax", ops.selective_scan_state_absmax(*args))
            self.sow(nnx.Intermediate, "ssm_c_absmax", jnp.max(jnp.abs(args[4]), axis=(0, 1)))
        if self.ssm_matmul is not None or self.state_rotation:
            y, h = ops.selective_scan_quantized(*args, fmt=self.ssm_matmul, rotate=self.state_rotation)
        elif x.shape[1] == 1:
            y, h = ops.selective_scan_recurrent(*args)
        else:
            y, h = ops.selective_scan(*args, chunk_size=cfg.scan_chunk_size)
        z = z.astype(acc)
        # SiLU(z), or S-SiLU z·σ(s ⊙ z) when MambaQuant folded 1/s into the gate columns (spec §3.5a)
        gate = jax.nn.silu(z) if self.gate_scale is None else z * jax.nn.sigmoid(self.gate_scale[...].astype(acc) * z)
        y = (y + self.D[...].astype(acc) * u_acc) * gate
        return self.out_proj(y.astype(x.dtype)), LayerState(conv=conv, ssm=h)


class Mamba(CausalSSM):
    """A Mamba-1 causal language model (see ``CausalSSM`` for the call forms)."""

    def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, MambaMixer, rngs=rngs)


def init_model(cfg: MambaConfig, key: jax.Array) -> Mamba:
    """A randomly initialised model (Hugging Face's A_log, D and dt-bias initialisation; kernels ~ N(0, 0.02))."""
    check_dtypes_available(cfg)
    return Mamba(cfg, rngs=nnx.Rngs(params=key))


def abstract_model(cfg: MambaConfig) -> Mamba:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: Mamba(cfg, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------
# Hugging Face import (shared with mamba2.py)
# ----------------------------------------------------------------------------

# Keys of a Mamba/Mamba-2 config.json that carry no architecture (initialisation, training or bookkeeping settings).
HF_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "initializer_range", "rescale_prenorm_residual", "time_step_scale",
    "time_step_min", "time_step_max", "time_step_init_scheme", "time_step_floor", "output_attentions",
    "output_hidden_states", "return_dict", "problem_type", "id2label", "label2id", "chunk_size_feed_forward",
}
HF_ARCHITECTURES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}


def check_hf_config(hf: dict, expected: str, handled: set[str]) -> None:
    """Raise unless ``hf`` is a config.json of ``model_type == expected`` whose settings are all ``handled``.

    A checkpoint of the other Mamba generation gets an error naming both
    architectures and the importer to use.
    """
    found = hf.get("model_type")
    if found != expected:
        hint = f" Use jquant.models.{found}.from_hf for it." if found in HF_ARCHITECTURES else ""
        raise ValueError(
            f"config.json has model_type={found!r} (architectures {hf.get('architectures')}); this importer expects "
            f"model_type={expected!r} ({HF_ARCHITECTURES[expected]}).{hint}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' is supported.")
    unknown = sorted(k for k in hf if k not in HF_IGNORED_KEYS | handled and not k.startswith("_"))
    unknown = [k for k in unknown if hf[k] not in (None, False, [], {})]
    if unknown:
        raise ValueError(f"config.json has attributes the {expected} converter does not handle: {unknown}.")


def single_id(value) -> int | None:
    return value[0] if isinstance(value, list) and value else value


def stored_dtype(tensors: dict, default: str) -> str:
    """The single float dtype the tensors are stored in, else ``default``."""
    stored = {str(v.dtype) for v in tensors.values()}
    return stored.pop() if len(stored) == 1 and stored <= set(_DTYPES) else default


_MAMBA_HANDLED = {
    "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel", "time_step_rank",
    "intermediate_size", "layer_norm_epsilon", "use_bias", "use_conv_bias", "residual_in_fp32", "tie_word_embeddings",
    "hidden_act", "use_mambapy", "use_associative_scan",
}


def config_from_hf(hf: dict, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None) -> MambaConfig:
    """Translate a Hugging Face ``MambaConfig`` dict into a ``MambaConfig``, rejecting settings not computed here.

    ``use_mambapy``/``use_associative_scan`` only pick Hugging Face's scan
    implementation and are accepted; the ``time_step_*`` initialisation
    settings are ignored.
    """
    check_hf_config(hf, "mamba", _MAMBA_HANDLED)
    rank = hf.get("time_step_rank", "auto")
    cfg = MambaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        state_size=hf.get("state_size", 16),
        num_layers=hf["num_hidden_layers"],
        expand=hf.get("expand", 2),
        conv_kernel=hf.get("conv_kernel", 4),
        time_step_rank=None if rank == "auto" else int(rank),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        use_bias=bool(hf.get("use_bias", False)),
        use_conv_bias=bool(hf.get("use_conv_bias", True)),
        residual_in_fp32=bool(hf.get("residual_in_fp32", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=single_id(hf.get("bos_token_id")),
        eos_token_id=single_id(hf.get("eos_token_id")),
        dtype=dtype,
        param_dtype=param_dtype or dtype,
    )
    if hf.get("intermediate_size", cfg.intermediate_size) != cfg.intermediate_size:
        raise ValueError(
            f"config.json intermediate_size={hf['intermediate_size']} differs from expand * hidden_size = "
            f"{cfg.intermediate_size}; Mamba's inner size must be expand * hidden_size."
        )
    return cfg


def hf_name(path: tuple) -> tuple[str, Literal["plain", "linear", "conv"]]:
    """NNX parameter path -> (Hugging Face tensor name, layout: as is, transposed linear, or conv ``[C, 1, K]``)."""
    *module, leaf = (str(p) for p in path)
    if module == ["embed_tokens"]:
        return "backbone.embeddings.weight", "plain"
    if module == ["lm_head"]:
        return "lm_head.weight", "linear"
    hf_leaf = "weight" if leaf == "kernel" else leaf
    layout = "linear" if leaf == "kernel" else "conv" if module[-1] == "conv1d" and leaf == "weight" else "plain"
    return "backbone." + ".".join(module + [hf_leaf]), layout


def _hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if layout == "linear":
        return tuple(reversed(shape))
    if layout == "conv":
        return (shape[1], 1, shape[0])
    return tuple(shape)


def _from_hf_layout(layout: str, array: np.ndarray) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array[:, 0, :].T
    return array


def model_from_tensors(abstract: nnx.Module, tensors: dict, *, source: str) -> nnx.Module:
    """Fill ``abstract`` (a ``CausalSSM`` of ``jax.ShapeDtypeStruct``s) from Hugging Face-named arrays.

    Every expected tensor must be present with the shape the config implies,
    be floating point, and nothing unexpected may remain; otherwise a
    ``ValueError`` names the tensor and no model is returned.
    """
    cfg = abstract.config
    check_dtypes_available(cfg)
    graphdef, abstract_state = nnx.split(abstract)
    pdt = jnp.dtype(cfg.param_dtype)
    remaining = dict(tensors)
    flat = []
    for p, var in nnx.to_flat_state(abstract_state):
        name, layout = hf_name(p)
        expected = _hf_shape(layout, tuple(var.shape))
        if name not in remaining:
            raise ValueError(f"{source}: tensor {name!r} is missing (expected shape {expected}).")
        array = remaining.pop(name)
        if tuple(array.shape) != expected:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, but the config implies {expected}.")
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"{source}: tensor {name!r} has dtype {array.dtype}; a floating-point tensor was expected.")
        flat.append((p, var.replace(jnp.asarray(_from_hf_layout(layout, array), dtype=pdt))))
    if remaining:
        raise ValueError(f"{source}: unexpected tensors not used by a {type(abstract).__name__} of this config: "
                         f"{sorted(remaining)[:8]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def read_hf(path, config_from_hf: Callable[..., object], *, dtype: DTypeName, param_dtype: DTypeName | None):
    """``(config, tensors)`` of a checkpoint folder; the config is checked before any tensor is read.

    ``param_dtype`` defaults to the dtype the tensors are stored in. A tied
    config drops a stored ``lm_head.weight`` (older exports write it).
    """
    from jquant.models import hf_io

    cfg = config_from_hf(hf_io.read_config(path), dtype=dtype, param_dtype=param_dtype)
    tensors = hf_io.read_safetensors(path)
    if param_dtype is None:
        cfg = cfg.replace(param_dtype=stored_dtype(tensors, dtype))
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return cfg, tensors


def from_hf(path, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None) -> Mamba:
    """Load a Hugging Face ``MambaForCausalLM`` folder (config.json + safetensors) into a ``Mamba``.

    ``dtype`` is the compute dtype; ``param_dtype`` defaults to the stored
    dtype. A Mamba-2 (or any other) checkpoint is refused with an error naming
    the expected architecture.
    """
    cfg, tensors = read_hf(path, config_from_hf, dtype=dtype, param_dtype=param_dtype)
    return from_tensors(cfg, tensors, source=str(path))


def from_tensors(cfg: MambaConfig, tensors: dict, *, source: str = "tensors") -> Mamba:
    """Build a ``Mamba`` from Hugging Face-named arrays, validating every one."""
    check_dtypes_available(cfg)
    return model_from_tensors(abstract_model(cfg), tensors, source=source)


# ----------------------------------------------------------------------------
# The family declaration
# ----------------------------------------------------------------------------

FAMILY = Family(
    name="mamba",
    config_class=MambaConfig,
    model_class=Mamba,
    hf_model_types=("mamba",),
    presets={
        # ~6M parameters (12 blocks, inner size 512, N = 16): the reference model of the MambaQuant results.
        # Fewer blocks than Mamba's usual 2 per transformer layer, so that it trains in about an hour on 2 CPU cores.
        "jq-mamba-small": MambaConfig(vocab_size=4096, hidden_size=256, num_layers=12, state_size=16, expand=2,
                                      scan_chunk_size=16, bos_token_id=0, eos_token_id=1),
    },
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, MambaConfig),
    checkpoint_protocol="the manifest's config holds the MambaConfig fields (config_io.dataclass_config_to_json).",
    from_hf=from_hf,
    keep_float=SSM_KEEP_FLOAT,
)
