"""RWKV-6 "Finch" (BlinkDL x060) language models, with BlinkDL checkpoint import.

Shapes: ``B`` batch, ``T`` tokens, ``V`` vocabulary, ``C`` hidden size, ``H``
heads of ``N`` channels (``C = H N``), ``F`` channel-mix size, ``Dm`` / ``Dd``
the ranks of the token-shift and decay LoRAs.

Model: ``x = LN0(Emb[token])`` (LN0 sits in block 0), then per block
``x += TimeMix(LN1 x)``, ``x += ChannelMix(LN2 x)``; ``logits = LN_out(x) W_head``.

TimeMix on ``a_t`` with the token shift ``δ_t = a_{t-1} - a_t`` (``a_{-1}`` is the
carried shift state):

  ``ξ = a + δ ⊙ μ_x``;  ``[m_w, m_k, m_v, m_r, m_g] = tanh(ξ A_mix) B_mix^◇``
  ``a^◇ = a + δ ⊙ μ_◇ + δ ⊙ m_◇`` for ``◇ ∈ {w, k, v, r, g}`` (data-dependent lerp)
  ``r, k, v = a^r W_r, a^k W_k, a^v W_v``;  ``g = SiLU(a^g W_g)``
  ``log w = -exp(d + tanh(a^w A_dec) B_dec)``  (per channel, so ``w ∈ (0, 1)``)
  ``o_t = r_t (S_{t-1} + diag(u) k_tᵀ v_t)``,  ``S_t = diag(w_t) S_{t-1} + k_tᵀ v_t``  (per head, ``S`` is ``N×N``)
  ``out = (GroupNorm_H(o) ⊙ g) W_o``  (ε = 64e-5, as BlinkDL's ``rwkv`` package)

ChannelMix: ``b^k = b + δ ⊙ μ'_k``, ``b^r = b + δ ⊙ μ'_r``,
``out = σ(b^r W_rec) ⊙ (ReLU(b^k W_key)² W_val)``.

Training and prefill use the chunked form of the WKV recurrence
(``jquant.ops.wkv6_chunked``: matrices inside a chunk, ``lax.scan`` across chunks);
decoding uses the recurrence itself (``jquant.ops.wkv6_recurrent``). The carried state per
layer is ``LayerState`` (two shift vectors and ``S [B, H, N, N]``).

Parameter paths mirror BlinkDL names so recipes can match them, except where the
families share a convention (``blocks.{i}`` is ``layers/{i}``, ``emb`` is
``embed_tokens`` and ``head`` is ``lm_head``, which recipes keep in float by default):
``embed_tokens/embedding``, ``layers/{i}/{ln0,ln1,ln2}/{weight,bias}`` (``ln0`` in block 0 only),
``layers/{i}/att/{receptance,key,value,gate,output}/kernel``,
``layers/{i}/att/time_maa_w1/kernel``, ``layers/{i}/att/time_maa_w2/{0..4}/kernel``
(the w, k, v, r, g slots), ``layers/{i}/att/time_decay_w{1,2}/kernel``,
``layers/{i}/att/time_maa_{x,w,k,v,r,g}/weight`` and ``layers/{i}/ffn/time_maa_{k,r}/weight``
(element-wise quantization sites), ``layers/{i}/att/{time_decay,time_faaaa}``,
``layers/{i}/att/ln_x/{weight,bias}``, ``layers/{i}/ffn/{key,receptance,value}/kernel``,
``ln_out/{weight,bias}``, ``lm_head/kernel``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import ops
from jquant.calib.capture import CLIPPED_SQUARE_PERCENTILE, record_input
from jquant.models.config_io import check_dtypes_available, dataclass_config_from_json, dataclass_config_to_json
from jquant.models.family import LM_KEEP_FLOAT, Family
from jquant.models.layers import Embed, Linear
from jquant.sites import SiteSpec

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
_DTYPES = ("float32", "bfloat16", "float16", "float64")
MIX_SLOTS = ("w", "k", "v", "r", "g")  # BlinkDL's order of the five ddlerp slots (time_maa_w2[i])


@dataclasses.dataclass(frozen=True, kw_only=True)
class RWKV6Config:
    """Architecture of an RWKV-6 model (validated on construction).

    ``head_size`` is ``N`` (64 in every released model); ``mix_rank`` and
    ``decay_rank`` are the LoRA ranks ``Dm`` (32) and ``Dd`` (64, or 128 for
    7B/14B). ``chunk_size`` is the chunk length of the parallel WKV form (a
    compute setting: any value gives the same result). ``dtype`` is the compute
    dtype, ``param_dtype`` the storage dtype; the WKV state is kept in at least
    float32.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    head_size: int = 64
    mix_rank: int = 32
    decay_rank: int = 64
    layer_norm_eps: float = 1e-5
    group_norm_eps: float = 64e-5
    chunk_size: int = 16
    dtype: DTypeName = "float32"
    param_dtype: DTypeName = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_size", "mix_rank",
                     "decay_rank", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RWKV6Config.{name} must be a positive int, got {value!r}.")
        if self.hidden_size % self.head_size:
            raise ValueError(
                f"RWKV6Config: hidden_size={self.hidden_size} is not a multiple of head_size={self.head_size}."
            )
        for name in ("layer_norm_eps", "group_norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RWKV6Config.{name} must be positive, got {getattr(self, name)}.")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"RWKV6Config.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}.")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    def replace(self, **changes) -> RWKV6Config:
        return dataclasses.replace(self, **changes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerState:
    """The recurrent state of one block: ``att_shift``, ``ffn_shift`` ``[B, C]`` (the last normed
    inputs of time mix and channel mix) and ``wkv [B, H, N, N]`` (keys × values, float32 or wider)."""

    att_shift: jax.Array
    ffn_shift: jax.Array
    wkv: jax.Array


# ----------------------------------------------------------------------------
# The WKV6 recurrence: recurrent (decode) and chunked (train / prefill) forms
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


def _param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _wide(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


class LayerNorm(nnx.Module):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last axis (computed in at least float32)."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype):
        self.weight = _param(jnp.ones((dim,), param_dtype), ("norm",))
        self.bias = _param(jnp.zeros((dim,), param_dtype), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(_wide(x.dtype))
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(xf.dtype) + self.bias[...].astype(xf.dtype)).astype(x.dtype)


class HeadGroupNorm(nnx.Module):
    """GroupNorm with one group per head, per token: ``x [..., H, N]`` normalised over ``N``, affine ``[H N]``."""

    def __init__(self, num_heads: int, head_size: int, *, eps: float, param_dtype: jnp.dtype):
        self.weight = _param(jnp.ones((num_heads * head_size,), param_dtype), ("norm",))
        self.bias = _param(jnp.zeros((num_heads * head_size,), param_dtype), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., H, N]`` -> ``[..., H N]`` in ``x``'s dtype."""
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(*x.shape[:-2], -1)
        return y * self.weight[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class ElementwiseMix(nnx.Module):
    """A learned per-channel vector ``μ [C]`` applied as ``δ ⊙ μ`` (RWKV's token-shift mixes).

    A quantization site of kind ``"elementwise"``: ``weight`` may become a
    ``QArray`` (dequantized here), and under calibration the inputs ``δ`` are
    recorded like a linear layer's, so ``diag(XᵀX) / count`` is the per-channel
    ``E[δ²]``, and with RWKVQuant's percentile clipping (``clipped_square``) the
    ``E[min(δ², τ²)]`` its codebooks are weighted with.
    """

    QUANT_SITE = SiteSpec(param="weight", contraction_axis=0, kind="elementwise")

    def __init__(self, value: jax.Array):
        self.weight = _param(value, ("embed",))

    def __call__(self, delta: jax.Array) -> jax.Array:
        record_input(self, delta, clip_percentile=CLIPPED_SQUARE_PERCENTILE)
        return delta * ops.as_array(self.weight.get_value(), delta.dtype).astype(delta.dtype)


def _token_shift(x: jax.Array, shift: jax.Array) -> jax.Array:
    """``δ_t = x_{t-1} - x_t`` for ``x [B, T, C]`` with ``x_{-1} = shift [B, C]``."""
    previous = jnp.concatenate([shift[:, None, :].astype(x.dtype), x[:, :-1]], axis=1)
    return previous - x


def _layer_ratios(layer: int, num_layers: int) -> tuple[float, float]:
    """BlinkDL's init ratios: ``layer / (L - 1)`` (0 → 1) and ``1 - layer / L`` (1 → ~0)."""
    return layer / max(num_layers - 1, 1), 1.0 - layer / num_layers


class TimeMix(nnx.Module):
    """RWKV-6 time mixing (``att``): ddlerp token shift, data-dependent decay, WKV6, per-head GroupNorm, SiLU gate."""

    def __init__(self, cfg: RWKV6Config, layer: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c, h, n, pdt = cfg.hidden_size, cfg.num_heads, cfg.head_size, jnp.dtype(cfg.param_dtype)
        to_0, to_almost0 = _layer_ratios(layer, cfg.num_layers)
        ddd = jnp.arange(c, dtype=jnp.float32) / c
        ramp = 1.0 - ddd**to_almost0
        half = 1.0 - ddd ** (0.5 * to_almost0)
        init = {"x": ramp, "w": ramp, "k": ramp, "v": ramp - 0.3 * to_0, "r": half, "g": half}
        for slot in ("x",) + MIX_SLOTS:
            setattr(self, f"time_maa_{slot}", ElementwiseMix(init[slot].astype(pdt)))
        lin = dict(use_bias=False, param_dtype=pdt, rngs=rngs)
        self.time_maa_w1 = Linear(c, 5 * cfg.mix_rank, sharding=("embed", None), init_std=0.0, **lin)
        self.time_maa_w2 = nnx.List(
            [Linear(cfg.mix_rank, c, sharding=(None, "embed"), init_std=0.01, **lin) for _ in MIX_SLOTS]
        )
        channel = jnp.arange(c, dtype=jnp.float32) / max(c - 1, 1)
        self.time_decay = _param((-6.0 + 5.0 * channel ** (0.7 + 1.3 * to_0)).astype(pdt), ("heads",))
        self.time_decay_w1 = Linear(c, cfg.decay_rank, sharding=("embed", None), init_std=0.0, **lin)
        self.time_decay_w2 = Linear(cfg.decay_rank, c, sharding=(None, "heads"), init_std=0.01, **lin)
        bonus = to_0 * (1.0 - channel) + ((jnp.arange(c) + 1) % 3 - 1) * 0.1
        self.time_faaaa = _param(bonus.reshape(h, n).astype(pdt), (None, None))
        self.receptance = Linear(c, c, sharding=("embed", "heads"), **lin)
        self.key = Linear(c, c, sharding=("embed", "heads"), **lin)
        self.value = Linear(c, c, sharding=("embed", "heads"), **lin)
        self.gate = Linear(c, c, sharding=("embed", "heads"), **lin)
        self.output = Linear(c, c, sharding=("heads", "embed"), **lin)
        self.ln_x = HeadGroupNorm(h, n, eps=cfg.group_norm_eps, param_dtype=pdt)

    def _ddlerp(self, a: jax.Array, delta: jax.Array) -> list[jax.Array]:
        """``[a^w, a^k, a^v, a^r, a^g]``, each ``a + δ ⊙ μ_◇ + δ ⊙ m_◇`` with the LoRA offsets ``m``."""
        lora = jnp.tanh(self.time_maa_w1(a + self.time_maa_x(delta)))
        lora = lora.reshape(*lora.shape[:-1], len(MIX_SLOTS), self.cfg.mix_rank)
        mixes = [getattr(self, f"time_maa_{slot}") for slot in MIX_SLOTS]
        return [a + mix(delta) + delta * up(lora[..., i, :])
                for i, (mix, up) in enumerate(zip(mixes, self.time_maa_w2, strict=True))]

    def __call__(self, a: jax.Array, shift: jax.Array, wkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``a = LN1(x) [B, T, C]``, ``shift [B, C]``, ``wkv [B, H, N, N]`` -> output ``[B, T, C]``, new shift, new wkv.

        ``T > 1`` uses the chunked WKV form, ``T = 1`` the recurrence.
        """
        cfg = self.cfg
        b, t, _ = a.shape
        heads = (b, t, cfg.num_heads, cfg.head_size)
        aw, ak, av, ar, ag = self._ddlerp(a, _token_shift(a, shift))
        acc = wkv.dtype
        r = self.receptance(ar).astype(acc).reshape(heads)
        k = self.key(ak).astype(acc).reshape(heads)
        v = self.value(av).astype(acc).reshape(heads)
        g = jax.nn.silu(self.gate(ag))
        omega = self.time_decay[...].astype(acc) + self.time_decay_w2(jnp.tanh(self.time_decay_w1(aw))).astype(acc)
        log_w = -jnp.exp(omega).reshape(heads)
        u = self.time_faaaa[...].astype(acc)
        if t == 1:
            o, wkv = ops.wkv6_recurrent(r, k, v, log_w, u, wkv)
        else:
            o, wkv = ops.wkv6_chunked(r, k, v, log_w, u, wkv, chunk_size=cfg.chunk_size)
        out = self.output(self.ln_x(o).astype(a.dtype) * g)
        return out, a[:, -1], wkv


class ChannelMix(nnx.Module):
    """RWKV-6 channel mixing (``ffn``): ``σ(b^r W_rec) ⊙ (ReLU(b^k W_key)² W_val)``."""

    def __init__(self, cfg: RWKV6Config, layer: int, *, rngs: nnx.Rngs):
        c, pdt = cfg.hidden_size, jnp.dtype(cfg.param_dtype)
        _, to_almost0 = _layer_ratios(layer, cfg.num_layers)
        ramp = (1.0 - (jnp.arange(c, dtype=jnp.float32) / c) ** to_almost0).astype(pdt)
        self.time_maa_k = ElementwiseMix(ramp)
        self.time_maa_r = ElementwiseMix(ramp)
        lin = dict(use_bias=False, param_dtype=pdt, rngs=rngs)
        self.key = Linear(c, cfg.intermediate_size, sharding=("embed", "mlp"), **lin)
        self.receptance = Linear(c, c, sharding=("embed", None), **lin)
        self.value = Linear(cfg.intermediate_size, c, sharding=("mlp", "embed"), **lin)

    def __call__(self, b: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``b = LN2(x) [B, T, C]``, ``shift [B, C]`` -> output ``[B, T, C]``, new shift ``[B, C]``."""
        delta = _token_shift(b, shift)
        key = jnp.square(jax.nn.relu(self.key(b + self.time_maa_k(delta))))
        receptance = jax.nn.sigmoid(self.receptance(b + self.time_maa_r(delta)))
        return receptance * self.value(key), b[:, -1]


class Block(nnx.Module):
    """``x += att(ln1 x)``, ``x += ffn(ln2 x)`` (block 0 first applies ``ln0`` to the embeddings)."""

    def __init__(self, cfg: RWKV6Config, layer: int, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.layer_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))
        self.ln0 = LayerNorm(cfg.hidden_size, **norm) if layer == 0 else None
        self.ln1 = LayerNorm(cfg.hidden_size, **norm)
        self.ln2 = LayerNorm(cfg.hidden_size, **norm)
        self.att = TimeMix(cfg, layer, rngs=rngs)
        self.ffn = ChannelMix(cfg, layer, rngs=rngs)
        self.config = cfg

    def __call__(self, x: jax.Array, state: LayerState) -> tuple[jax.Array, LayerState]:
        """``x [B, T, C]`` and this block's state -> ``[B, T, C]`` and the state after the ``T`` tokens."""
        if self.ln0 is not None:
            x = self.ln0(x)
        h, att_shift, wkv = self.att(self.ln1(x), state.att_shift, state.wkv)
        x = x + h
        h, ffn_shift = self.ffn(self.ln2(x), state.ffn_shift)
        return x + h, LayerState(att_shift=att_shift, ffn_shift=ffn_shift, wkv=wkv)

    def calibration_forward(self, x: jax.Array, context: None = None) -> jax.Array:
        """The block as ``hidden [B, T, C] -> hidden`` from the zero state (block-by-block calibration)."""
        return self(x, _zero_state(self.config, x.shape[0]))[0]


def _zero_state(cfg: RWKV6Config, batch: int) -> LayerState:
    dtype = jnp.dtype(cfg.dtype)
    c, h, n = cfg.hidden_size, cfg.num_heads, cfg.head_size
    return LayerState(att_shift=jnp.zeros((batch, c), dtype), ffn_shift=jnp.zeros((batch, c), dtype),
                      wkv=jnp.zeros((batch, h, n, n), _wide(dtype)))


class RWKV6(nnx.Module):
    """An RWKV-6 causal language model.

    ``model(tokens)`` is the training/prefill forward (``[B, T]`` int -> logits
    ``[B, T, V]``, chunked WKV); ``model.step(tokens, state)`` continues from a
    carried state (``init_cache``) and returns ``(logits, state)``.
    """

    def __init__(self, cfg: RWKV6Config, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pdt, rngs=rngs)
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.ln_out = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=pdt)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, sharding=("embed", "vocab"),
                           param_dtype=pdt, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Causal forward over ``tokens [B, T]`` from the zero state -> logits ``[B, T, V]``."""
        return self.step(tokens, self.init_cache(tokens.shape[0]))[0]

    def step(self, tokens: jax.Array, state: tuple[LayerState, ...]) -> tuple[jax.Array, tuple[LayerState, ...]]:
        """Run ``tokens [B, T]`` after the tokens ``state`` has seen -> logits ``[B, T, V]``, new state.

        Prefill is a step with the whole prompt (chunked form); decoding is a
        step with ``T = 1`` (the recurrence).
        """
        x = self.embed_tokens(tokens, jnp.dtype(self.config.dtype))
        new_state = []
        for block, layer_state in zip(self.layers, state, strict=True):
            x, layer_state = block(x, layer_state)
            new_state.append(layer_state)
        return self.lm_head(self.ln_out(x)), tuple(new_state)

    def init_cache(self, batch: int, capacity: int | None = None) -> tuple[LayerState, ...]:
        """The zero state of ``batch`` sequences, one ``LayerState`` per block.

        Its size does not depend on the sequence length; ``capacity`` is
        accepted for ``jquant.generate``'s protocol and ignored.
        """
        return tuple(_zero_state(self.config, batch) for _ in range(self.config.num_layers))

    def block_inputs(self, tokens: jax.Array) -> tuple[jax.Array, None]:
        """Hidden states entering block 0 (the raw embeddings; ``ln0`` is inside block 0) and no context."""
        return self.embed_tokens(tokens, jnp.dtype(self.config.dtype)), None

    def blocks(self) -> list[Block]:
        """The repeated blocks, in order (each has ``calibration_forward(hidden, context)``)."""
        return list(self.layers)


def init_model(cfg: RWKV6Config, key: jax.Array) -> RWKV6:
    """A randomly initialised model: matrices ~ N(0, 0.02), LoRA down-projections 0, and BlinkDL's
    layer-dependent ramps for the mixes, ``time_decay`` and ``time_faaaa``."""
    check_dtypes_available(cfg)
    return RWKV6(cfg, rngs=nnx.Rngs(params=key))


def abstract_model(cfg: RWKV6Config) -> RWKV6:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: RWKV6(cfg, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------
# BlinkDL checkpoints (.pth state dicts or .safetensors with the same keys)
# ----------------------------------------------------------------------------

_LINEAR_WEIGHT = re.compile(r"(^head|\.(receptance|key|value|gate|output))\.weight$")  # torch [out, in]
_VECTOR = re.compile(r"\.(time_maa_[xwkvrg]|time_decay)$")  # stored [1, 1, C]
_BARE = re.compile(r"\.(time_maa_w1|time_maa_w2\.\d|time_decay_w[12]|time_maa_[xwkvrg])$")  # no ``.weight``
# Per-block keys that identify the other RWKV generations, checked in this order.
_VERSION_MARKERS = (
    ("7 (Goose, x070)", ("att.x_r", "att.w0", "att.a0", "att.k_k", "att.r_k")),
    ("6 (Finch, x060)", ("att.time_maa_w1",)),
    ("5 (Eagle)", ("att.time_faaaa", "att.ln_x.weight")),
    ("4", ("att.time_first", "att.time_mix_k")),
)


def read_blinkdl(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a BlinkDL checkpoint file: a ``.pth`` state dict (needs torch) or a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a BlinkDL .pth or .safetensors checkpoint).")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"{path}: expected a BlinkDL checkpoint ending in .pth or .safetensors.")
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path}: reading a .pth checkpoint needs PyTorch; install torch or convert the state dict to "
            ".safetensors (same keys), which needs no torch."
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(
            f"{path}: entries {not_tensors[:4]} are not tensors; this looks like a checkpoint converted by the rwkv "
            "package (convert_model). Load the raw BlinkDL checkpoint instead."
        )
    return {k: _torch_to_numpy(v) for k, v in state.items()}


def _torch_to_numpy(t) -> np.ndarray:
    import ml_dtypes
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the float32 round trip is exact
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def blinkdl_version(keys) -> tuple[str, str] | None:
    """``(RWKV version, a key that shows it)`` for a BlinkDL state dict's keys, or None if none matches."""
    per_block = {k.split(".", 2)[2]: k for k in sorted(keys) if k.startswith("blocks.") and k.count(".") >= 2}
    for version, markers in _VERSION_MARKERS:
        for marker in markers:
            if marker in per_block:
                return version, per_block[marker]
    return None


def _check_v6(tensors: dict, source: str) -> None:
    found = blinkdl_version(tensors)
    if found is None:
        raise ValueError(
            f"{source}: not an RWKV checkpoint in BlinkDL's layout (no blocks.N.att.* time-mix tensors); "
            "only RWKV-6 (Finch, x060) checkpoints are supported."
        )
    version, key = found
    if not version.startswith("6"):
        raise ValueError(
            f"{source}: this is an RWKV-{version} checkpoint (it has {key!r}); only RWKV-6 (Finch, x060) is supported."
        )


def _tensor(tensors: dict, name: str, ndim: int, source: str) -> np.ndarray:
    if name not in tensors:
        raise ValueError(f"{source}: tensor {name!r} is missing; an RWKV-6 checkpoint needs it to infer the config.")
    value = tensors[name]
    if value.ndim != ndim:
        raise ValueError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}; expected {ndim} dimensions.")
    return value


def config_from_tensors(tensors: dict, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None,
                        chunk_size: int = 16, source: str = "tensors") -> RWKV6Config:
    """The ``RWKV6Config`` a BlinkDL state dict implies, read from tensor shapes.

    ``V, C`` from ``emb.weight``; ``H, N`` from ``time_faaaa``; ``F`` from
    ``ffn.key.weight``; ``Dm`` from ``time_maa_w2``; ``Dd`` from
    ``time_decay_w1``; the layer count from the ``blocks.N`` indices. Other RWKV
    versions are refused with the version found.
    """
    _check_v6(tensors, source)
    vocab, hidden = _tensor(tensors, "emb.weight", 2, source).shape
    heads, head_size = _tensor(tensors, "blocks.0.att.time_faaaa", 2, source).shape
    if heads * head_size != hidden:
        raise ValueError(
            f"{source}: time_faaaa is [{heads}, {head_size}], an attention size of {heads * head_size}, but the hidden "
            f"size is {hidden}; only models whose attention size equals the hidden size (every released RWKV-6) "
            "are supported."
        )
    return RWKV6Config(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(_tensor(tensors, "blocks.0.ffn.key.weight", 2, source).shape[0]),
        num_layers=1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks.")),
        head_size=int(head_size),
        mix_rank=int(_tensor(tensors, "blocks.0.att.time_maa_w2", 3, source).shape[1]),
        decay_rank=int(_tensor(tensors, "blocks.0.att.time_decay_w1", 2, source).shape[1]),
        chunk_size=chunk_size,
        dtype=dtype,
        param_dtype=param_dtype or dtype,
    )


def _to_model_layout(tensors: dict, source: str) -> dict[str, np.ndarray]:
    """BlinkDL arrays in the model's layout: linears ``[in, out]``, vectors ``[C]``, ``time_maa_w2`` split in 5."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(".time_maa_w2"):
            if value.ndim != 3 or value.shape[0] != len(MIX_SLOTS):
                raise ValueError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}; expected [5, Dm, C].")
            out.update({f"{name}.{i}": value[i] for i in range(len(MIX_SLOTS))})
        elif _LINEAR_WEIGHT.search(name) and value.ndim == 2:
            out[name] = value.T
        elif _VECTOR.search(name) and value.ndim == 3 and value.shape[:2] == (1, 1):
            out[name] = value.reshape(-1)
        else:
            out[name] = value
    return out


_TOP_LEVEL = {"layers": "blocks", "embed_tokens": "emb", "lm_head": "head"}


def _blinkdl_key(path: tuple) -> str:
    """NNX parameter path -> BlinkDL tensor name (``time_maa_w2.{i}`` for the slices of ``time_maa_w2``)."""
    *module, leaf = (str(p) for p in path)
    module[0] = _TOP_LEVEL.get(module[0], module[0])
    name = ".".join(module)
    if _BARE.search(name):
        return name
    return f"{name}.{'weight' if leaf in ('kernel', 'embedding') else leaf}"


def from_tensors(cfg: RWKV6Config, tensors: dict, *, source: str = "tensors") -> RWKV6:
    """Build an ``RWKV6`` from a BlinkDL-named state dict (numpy arrays), validating every tensor.

    Every expected tensor must be present with the shape ``cfg`` implies and
    nothing may be left over; otherwise a ``ValueError`` names the tensor.
    """
    check_dtypes_available(cfg)
    _check_v6(tensors, source)
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    pdt = jnp.dtype(cfg.param_dtype)
    remaining = _to_model_layout(tensors, source)
    flat = []
    for p, var in nnx.to_flat_state(abstract_state):
        name = _blinkdl_key(p)
        if name not in remaining:
            raise ValueError(f"{source}: tensor {name!r} is missing (the config implies shape {tuple(var.shape)} "
                             "in jquant's layout).")
        array = remaining.pop(name)
        if tuple(array.shape) != tuple(var.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(array.shape)} in jquant's layout, but the "
                             f"config implies {tuple(var.shape)}.")
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"{source}: tensor {name!r} has dtype {array.dtype}; a floating-point tensor was "
                             "expected.")
        flat.append((p, var.replace(jnp.asarray(array, dtype=pdt))))
    if remaining:
        raise ValueError(f"{source}: unexpected tensors not used by an RWKV-6 model of this config: "
                         f"{sorted(remaining)[:8]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_blinkdl(path: str | os.PathLike, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None,
                 chunk_size: int = 16) -> RWKV6:
    """Load a BlinkDL RWKV-6 checkpoint (``.pth`` or ``.safetensors``), inferring the config from tensor shapes.

    ``param_dtype`` defaults to the dtype the tensors are stored in (a bf16
    checkpoint stays bf16). Checkpoints of RWKV-4, -5 and -7 are refused with
    the version found.
    """
    tensors = read_blinkdl(path)
    if param_dtype is None:
        stored = {str(v.dtype) for v in tensors.values()}
        param_dtype = stored.pop() if len(stored) == 1 and stored <= set(_DTYPES) else dtype
    cfg = config_from_tensors(tensors, dtype=dtype, param_dtype=param_dtype, chunk_size=chunk_size, source=str(path))
    return from_tensors(cfg, tensors, source=str(path))


def to_blinkdl(model: RWKV6) -> dict[str, np.ndarray]:
    """The model's float weights as a BlinkDL state dict (numpy; torch layouts and ``[1, 1, C]`` vectors)."""
    flat = {_blinkdl_key(p): np.asarray(var[...]) for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for name, value in flat.items():
        if re.search(r"\.time_maa_w2\.\d$", name):
            stem = name.rsplit(".", 1)[0]
            out[stem] = np.stack([flat[f"{stem}.{i}"] for i in range(len(MIX_SLOTS))])
        elif _LINEAR_WEIGHT.search(name):
            out[name] = np.ascontiguousarray(value.T)
        elif _VECTOR.search(name):
            out[name] = value.reshape(1, 1, -1)
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------
# The family declaration
# ----------------------------------------------------------------------------

FAMILY = Family(
    name="rwkv6",
    config_class=RWKV6Config,
    model_class=RWKV6,
    presets={
        # ~7.9M parameters (6 blocks of 4 heads of 64, channel-mix 896): the reference model of the RWKVQuant results.
        # WKV chunks of 8 train fastest on 2 CPU cores (3.3 s per 16 x 256-token step; 16: 4.1 s, 32: 6.5 s).
        "jq-rwkv6-small": RWKV6Config(vocab_size=4096, hidden_size=256, intermediate_size=896, num_layers=6, chunk_size=8),
    },
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, RWKV6Config),
    checkpoint_protocol="the manifest's config holds the RWKV6Config fields (all JSON scalars); BlinkDL files are read with "
                        "from_blinkdl and written with to_blinkdl.",
    keep_float=LM_KEEP_FLOAT,
)
