"""Mamba-2 (state-space duality, SSD) language models.

Shapes: ``B`` batch, ``T`` tokens, ``d`` hidden size, ``Di = expand * d = H * P``
inner size, ``H`` heads of ``P`` channels, ``G`` groups (``H / G`` heads share
one ``B``/``C``), ``N`` state size, ``K`` convolution width.

Blocks, residual, embedding and head are Mamba-1's (``mamba.CausalSSM``).
Mixer, per token ``t`` (head ``h`` uses group ``g(h) = h // (H / G)``)::

    [z, xBC, dt] = x W_in                         sizes Di, Di + 2GN, H
    xBC          = SiLU(CausalDepthwiseConv1d(xBC))   split into x (H x P), B (G x N), C (G x N)
    dt           = clip(softplus(dt + dt_bias), *time_step_limit)       in R^H
    A            = -exp(A_log)                    one scalar per head
    S_t[h]       = exp(dt_t[h] A[h]) S_{t-1}[h] + dt_t[h] x_t[h] (outer) B_t[g(h)]     S in R^{P x N}
    y_t[h]       = S_t[h] C_t[g(h)] + D[h] x_t[h]
    y            = w * GroupRMSNorm(y * SiLU(z))  (G groups of Di / G channels; gate before norm)
    out          = y W_out

The full-sequence form is the chunked SSD algorithm (``jquant.ops.ssd_chunked``: an
intra-chunk masked "attention" plus an inter-chunk state recurrence, with no
loop over time); decoding runs the recurrence (``jquant.ops.ssd_recurrent``).

Every weight matmul is a ``layers.Linear`` (``in_proj``, ``out_proj``,
``lm_head``). Parameter paths mirror Hugging Face names (see ``mamba``): ``embed_tokens/embedding``,
``layers/{i}/norm/weight``, ``layers/{i}/mixer/{in_proj,out_proj}/kernel``,
``layers/{i}/mixer/conv1d/{weight,bias}``, ``layers/{i}/mixer/{A_log,D,dt_bias}``,
``layers/{i}/mixer/norm/weight`` (the gated norm), ``norm_f/weight``, ``lm_head/kernel``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jquant import ops
from jquant.models.config_io import check_dtypes_available, dataclass_config_from_json, dataclass_config_to_json
from jquant.models.family import Family
from jquant.models.layers import CausalConv1d, Linear
from jquant.transforms.ssm_layout import SSMMixerLayout
from jquant.models.mamba import (
    SSM_KEEP_FLOAT,
    CausalSSM,
    DTypeName,
    LayerState,
    accumulation_dtype,
    check_dtypes,
    check_hf_config,
    inverse_softplus_time_steps,
    model_from_tensors,
    read_hf,
    single_id,
)

# ----------------------------------------------------------------------------
# SSD: chunked (full sequence) and recurrent forms
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Config:
    """Architecture of a Mamba-2 language model (validated on construction).

    ``num_heads * head_dim`` must equal ``expand * hidden_size`` and
    ``n_groups`` divide ``num_heads``. ``time_step_limit`` clips ``dt`` after
    the softplus. ``chunk_size`` is the SSD chunk of the full-sequence form (it
    does not change the result beyond rounding). ``use_bias`` puts biases on
    ``in_proj``/``out_proj``, ``use_conv_bias`` on the convolution.
    """

    vocab_size: int
    hidden_size: int
    num_heads: int
    head_dim: int
    state_size: int = 128
    num_layers: int
    expand: int = 2
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 256
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    residual_in_fp32: bool = True
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: DTypeName = "float32"
    param_dtype: DTypeName = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_heads", "head_dim", "state_size", "num_layers", "expand",
                     "n_groups", "conv_kernel", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Mamba2Config.{name} must be positive, got {getattr(self, name)}.")
        if self.num_heads * self.head_dim != self.expand * self.hidden_size:
            raise ValueError(
                f"Mamba2Config: num_heads * head_dim = {self.num_heads * self.head_dim} must equal "
                f"expand * hidden_size = {self.expand * self.hidden_size}."
            )
        if self.num_heads % self.n_groups:
            raise ValueError(f"Mamba2Config: n_groups={self.n_groups} must divide num_heads={self.num_heads}.")
        lo, hi = self.time_step_limit
        if not 0.0 <= lo < hi:
            raise ValueError(f"Mamba2Config.time_step_limit must be (low, high) with 0 <= low < high, got {self.time_step_limit}.")
        check_dtypes("Mamba2Config", self)

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: ``x``, ``B`` and ``C`` (``Di + 2 G N``)."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    def replace(self, **changes) -> Mamba2Config:
        return dataclasses.replace(self, **changes)


class GatedRMSNorm(nnx.Module):
    """``w * GroupRMSNorm(y * SiLU(z))`` over ``groups`` groups of channels, in float32 (or wider)."""

    def __init__(self, dim: int, groups: int, *, eps: float, param_dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        self.groups = groups
        self.eps = eps

    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        """``y, z [..., Di]`` -> ``[..., Di]`` in ``y``'s dtype promoted to at least float32."""
        acc = accumulation_dtype(y.dtype)
        g = (y.astype(acc) * jax.nn.silu(z.astype(acc))).reshape(*y.shape[:-1], self.groups, -1)
        g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(acc) * g.reshape(y.shape)


class Mamba2Mixer(nnx.Module):
    """The Mamba-2 SSD mixer (module docstring has the equations).

    Paths: ``in_proj [d, 2 Di + 2 G N + H]``, ``conv1d`` over ``Di + 2 G N``
    channels, ``dt_bias [H]``, ``A_log [H]``, ``D [H]``, ``norm`` (gated),
    ``out_proj [Di, d]``.
    """

    def __init__(self, cfg: Mamba2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, di, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
        pdt = jnp.dtype(cfg.param_dtype)
        kw = dict(param_dtype=pdt, rngs=rngs)
        self.in_proj = Linear(d, di + cfg.conv_dim + h, use_bias=cfg.use_bias, sharding=("embed", "mlp"), **kw)
        self.conv1d = CausalConv1d(cfg.conv_dim, cfg.conv_kernel, use_bias=cfg.use_conv_bias, **kw)
        head_param = lambda v: nnx.Param(jnp.asarray(v, pdt), out_sharding=("heads",), eager_sharding=False)  # noqa: E731
        self.dt_bias = head_param(inverse_softplus_time_steps(h))
        self.A_log = head_param(jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)))
        self.D = head_param(jnp.ones((h,)))
        self.norm = GatedRMSNorm(di, cfg.n_groups, eps=cfg.layer_norm_epsilon, param_dtype=pdt)
        self.out_proj = Linear(di, d, use_bias=cfg.use_bias, sharding=("mlp", "embed"), **kw)

    def mixer_layout(self, prefix: str) -> SSMMixerLayout:
        """This mixer's sites for equivalence transforms, its block at ``prefix`` (``layers/3``)."""
        di, m = self.cfg.intermediate_size, f"{prefix}/mixer"
        return SSMMixerLayout(kind="mamba2", path=m, norm=f"{prefix}/norm", in_proj=f"{m}/in_proj",
                              out_proj=f"{m}/out_proj", inner=di, gate=(0, di), gated_norm=f"{m}/norm")

    def initial_state(self, batch: int) -> LayerState:
        """Zero state: ``conv [B, K-1, Di + 2GN]`` in the compute dtype, ``ssm [B, H, P, N]`` in float32 (or wider)."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        return LayerState(
            conv=jnp.zeros((batch, cfg.conv_kernel - 1, cfg.conv_dim), dtype),
            ssm=jnp.zeros((batch, cfg.num_heads, cfg.head_dim, cfg.state_size), accumulation_dtype(dtype)),
        )

    def __call__(self, x: jax.Array, state: LayerState | None) -> tuple[jax.Array, LayerState]:
        """``x [B, T, d]`` (normalised) and the state before it -> ``[B, T, d]`` and the state after it."""
        cfg = self.cfg
        b, t, _ = x.shape
        di, gn = cfg.intermediate_size, cfg.n_groups * cfg.state_size
        state = self.initial_state(b) if state is None else state
        acc = accumulation_dtype(x.dtype)
        z, xbc, dt = jnp.split(self.in_proj(x), [di, di + cfg.conv_dim], axis=-1)
        xbc, conv = self.conv1d(xbc, state.conv)
        xs, B, C = jnp.split(jax.nn.silu(xbc).astype(acc), [di, di + gn], axis=-1)
        xs = xs.reshape(b, t, cfg.num_heads, cfg.head_dim)
        B = B.reshape(b, t, cfg.n_groups, cfg.state_size)
        C = C.reshape(b, t, cfg.n_groups, cfg.state_size)
        dt = jnp.clip(jax.nn.softplus(dt.astype(acc) + self.dt_bias[...].astype(acc)), *cfg.time_step_limit)
        A = -jnp.exp(self.A_log[...].astype(acc))
        args = (xs, dt, A, B, C, state.ssm.astype(acc))
        y, s = ops.ssd_recurrent(*args) if t == 1 else ops.ssd_chunked(*args, chunk_size=cfg.chunk_size)
        y = (y + self.D[...].astype(acc)[:, None] * xs).reshape(b, t, di)
        return self.out_proj(self.norm(y, z).astype(x.dtype)), LayerState(conv=conv, ssm=s)


class Mamba2(CausalSSM):
    """A Mamba-2 causal language model (see ``mamba.CausalSSM`` for the call forms)."""

    def __init__(self, cfg: Mamba2Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, Mamba2Mixer, rngs=rngs)


def init_model(cfg: Mamba2Config, key: jax.Array) -> Mamba2:
    """A randomly initialised model (Hugging Face's A_log, D and dt-bias initialisation; kernels ~ N(0, 0.02))."""
    check_dtypes_available(cfg)
    return Mamba2(cfg, rngs=nnx.Rngs(params=key))


def abstract_model(cfg: Mamba2Config) -> Mamba2:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: Mamba2(cfg, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------
# Hugging Face import
# ----------------------------------------------------------------------------

_HANDLED = {
    "vocab_size", "hidden_size", "num_heads", "head_dim", "state_size", "num_hidden_layers", "expand", "n_groups",
    "conv_kernel", "chunk_size", "time_step_limit", "layer_norm_epsilon", "use_bias", "use_conv_bias",
    "residual_in_fp32", "tie_word_embeddings", "hidden_act", "time_step_rank", "rms_norm", "norm_before_gate",
}


def _hf_float(value) -> float:
    """A config.json number; transformers 5 writes infinities as ``{"__float__": "Infinity"}``."""
    return float(value["__float__"]) if isinstance(value, dict) else float(value)


def config_from_hf(hf: dict, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None) -> Mamba2Config:
    """Translate a Hugging Face ``Mamba2Config`` dict into a ``Mamba2Config``, rejecting settings not computed here.

    ``time_step_rank`` is unused by the Mamba-2 mixer and the ``time_step_*``
    initialisation settings are ignored. The gated norm is an RMSNorm applied
    after the gate (Hugging Face's only form): ``rms_norm=False`` or
    ``norm_before_gate=True`` is refused.
    """
    check_hf_config(hf, "mamba2", _HANDLED)
    if not hf.get("rms_norm", True) or hf.get("norm_before_gate", False):
        raise ValueError(
            f"config.json rms_norm={hf.get('rms_norm')}, norm_before_gate={hf.get('norm_before_gate')}: only the gated "
            "RMSNorm applied after the gate (rms_norm=true, norm_before_gate=false) is supported."
        )
    limit = hf.get("time_step_limit", (0.0, math.inf))
    return Mamba2Config(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_heads=hf["num_heads"],
        head_dim=hf["head_dim"],
        state_size=hf.get("state_size", 128),
        num_layers=hf["num_hidden_layers"],
        expand=hf.get("expand", 2),
        n_groups=hf.get("n_groups", 1),
        conv_kernel=hf.get("conv_kernel", 4),
        chunk_size=hf.get("chunk_size", 256),
        time_step_limit=(_hf_float(limit[0]), _hf_float(limit[1])),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        use_bias=bool(hf.get("use_bias", False)),
        use_conv_bias=bool(hf.get("use_conv_bias", True)),
        residual_in_fp32=bool(hf.get("residual_in_fp32", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=single_id(hf.get("bos_token_id")),
        eos_token_id=single_id(hf.get("eos_token_id")),
        dtype=dtype,
        param_dtype=param_dtype or dtype,
    )


def from_hf(path, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None) -> Mamba2:
    """Load a Hugging Face ``Mamba2ForCausalLM`` folder (config.json + safetensors) into a ``Mamba2``.

    ``dtype`` is the compute dtype; ``param_dtype`` defaults to the stored
    dtype. A Mamba-1 (or any other) checkpoint is refused with an error naming
    the expected architecture.
    """
    cfg, tensors = read_hf(path, config_from_hf, dtype=dtype, param_dtype=param_dtype)
    return from_tensors(cfg, tensors, source=str(path))


def from_tensors(cfg: Mamba2Config, tensors: dict, *, source: str = "tensors") -> Mamba2:
    """Build a ``Mamba2`` from Hugging Face-named arrays, validating every one."""
    check_dtypes_available(cfg)
    return model_from_tensors(abstract_model(cfg), tensors, source=source)


# ----------------------------------------------------------------------------
# The family declaration
# ----------------------------------------------------------------------------

FAMILY = Family(
    name="mamba2",
    config_class=Mamba2Config,
    model_class=Mamba2,
    hf_model_types=("mamba2",),
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, Mamba2Config),
    checkpoint_protocol="the manifest's config holds the Mamba2Config fields (config_io.dataclass_config_to_json).",
    from_hf=from_hf,
    keep_float=SSM_KEEP_FLOAT,
)
