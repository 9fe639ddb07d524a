"""Llama-family decoders: Llama 2/3, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm).

Shapes: ``B`` batch, ``T`` tokens, ``V`` vocabulary, ``D`` hidden size.

Parameter paths mirror Hugging Face names so recipes can match them:
``embed_tokens/embedding``, ``layers/{i}/self_attn/{q,k,v,o}_proj/kernel``,
``layers/{i}/mlp/{gate,up,down}_proj/kernel``,
``layers/{i}/{input,post_attention}_layernorm/weight``, ``norm/weight``,
``lm_head/kernel`` (absent when embeddings are tied).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jquant.kv import KVCache, init_cache
from jquant.models.config_io import check_dtypes_available
from jquant.models.family import LM_KEEP_FLOAT
from jquant.models.family import Family as FamilyDeclaration
from jquant.models.layers import Attention, AttentionConfig, Embed, Linear, RMSNorm, RopeConfig, SwiGLU
from jquant.transforms.layout import AttentionLayout, DecoderLayout, MLPLayout, NormGroup, SparseMLPLayout
from jquant.transforms.layout import DecoderLayer as DecoderLayerLayout

Family = Literal["llama", "mistral", "qwen2", "qwen3"]
DTypeName = Literal["float32", "bfloat16", "float16", "float64"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (validated on construction).

    ``head_dim`` defaults to ``hidden_size // num_heads``. ``qkv_bias`` is
    Qwen2's q/k/v bias; ``out_bias`` an o_proj bias (Llama's
    ``attention_bias`` sets both); ``qk_norm`` is Qwen3's per-head RMSNorm of
    queries and keys. ``dtype`` is the compute dtype, ``param_dtype`` the
    storage dtype.
    """

    family: Family = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: DTypeName = "float32"
    param_dtype: DTypeName = "float32"

    FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

    def __post_init__(self):
        if self.family not in self.FAMILIES:
            raise ValueError(f"{type(self).__name__}.family must be one of {self.FAMILIES}, got {self.family!r}.")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be positive, got {getattr(self, name)}.")
        if not math.isfinite(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            raise ValueError(f"{type(self).__name__}.rms_norm_eps (config.json rms_norm_eps) must be a finite "
                             f"number > 0, got {self.rms_norm_eps}; the usual values are 1e-5 or 1e-6.")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim explicitly."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}.")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16", "float64"):
                raise ValueError(f"LlamaConfig.{name} must be float32, bfloat16, float16 or float64, got {getattr(self, name)!r}.")

    @property
    def attention(self) -> AttentionConfig:
        return AttentionConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            qkv_bias=self.qkv_bias,
            out_bias=self.out_bias,
            qk_norm=self.qk_norm,
            norm_eps=self.rms_norm_eps,
            sliding_window=self.sliding_window,
            rope=self.rope,
        )

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    ``mlp`` replaces the dense SwiGLU feed-forward (the MoE family passes a ``SparseMoE``).
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, mlp: nnx.Module | None = None):
        pdt = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.self_attn = Attention(cfg.attention, param_dtype=pdt, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.mlp = mlp or SwiGLU(cfg.hidden_size, cfg.intermediate_size, use_bias=cfg.mlp_bias, param_dtype=pdt, rngs=rngs)

    def __call__(self, x, positions, cache, cache_start):
        h, cache = self.self_attn(self.input_layernorm(x), positions, cache, cache_start)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache

    def calibration_forward(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """The block as ``hidden [B, T, D] -> hidden`` (no cache), for block-by-block calibration."""
        return self(x, positions, None, None)[0]


class DecoderLM(nnx.Module):
    """What every pre-norm decoder LM shares (Llama family, MoE family): forward, cached step, calibration blocks.

    A subclass sets ``config`` (with ``num_layers``, ``num_kv_heads``, ``head_dim``, ``dtype``,
    ``max_position_embeddings``), ``embed_tokens``, ``layers`` (each ``layer(x, positions, cache, start)``
    with a ``self_attn``), ``norm`` and ``lm_head`` (None when tied).
    """

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Causal forward over ``tokens [B, T]`` (positions default to ``0..T-1``) -> logits ``[B, T, V]``."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, _ = self._forward(tokens, positions, None, None)
        return logits

    def step(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Append ``tokens [B, T]`` after the ``cache.length`` cached ones -> logits ``[B, T, V]``, new cache.

        Prefill is a step with the whole prompt; decoding is a step with
        ``T = 1``. Writing past the cache capacity is an error the caller
        must avoid (``generate`` sizes the cache).
        """
        start = cache.length
        positions = start + jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, layers = self._forward(tokens, positions, cache.layers, start)
        return logits, KVCache(layers=layers, length=start + tokens.shape[1])

    def block_inputs(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Hidden states entering the first block and the per-token context (positions) every block takes."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return self.embed_tokens(tokens, jnp.dtype(self.config.dtype)), positions

    def blocks(self) -> list[DecoderLayer]:
        """The repeated blocks, in order (each has ``calibration_forward(hidden, context)``)."""
        return list(self.layers)

    def init_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``capacity`` tokens.

        Layers whose attention has a ``kv_cache`` config (set by a KV-quantizing recipe
        or method) get a cache held that way.
        """
        cfg = self.config
        return init_cache(
            num_layers=cfg.num_layers,
            batch=batch,
            capacity=capacity,
            kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=jnp.dtype(cfg.dtype),
            configs=tuple(layer.self_attn.kv_cache for layer in self.layers),
            max_context=cfg.max_position_embeddings,
        )

    def mlp_layout(self, i: int) -> tuple[tuple[str, ...], MLPLayout | SparseMLPLayout]:
        """Layer ``i``'s feed-forward for equivalence transforms: (the linears reading its norm, its layout).

        A dense SwiGLU at ``layers/{i}/mlp``; families with other feed-forwards override this.
        """
        p = f"layers/{i}/mlp"
        mlp = MLPLayout(up=f"{p}/up_proj", gate=f"{p}/gate_proj", down=f"{p}/down_proj",
                        hidden=self.config.intermediate_size)
        return (mlp.up, mlp.gate), mlp

    def equivalence_layout(self) -> DecoderLayout:
        """The residual-stream structure equivalence transforms act on (``jquant.transforms.layout``)."""
        cfg = self.config
        layers = []
        for i in range(cfg.num_layers):
            p = f"layers/{i}"
            attn = AttentionLayout(
                path=f"{p}/self_attn", q=f"{p}/self_attn/q_proj", k=f"{p}/self_attn/k_proj", v=f"{p}/self_attn/v_proj",
                o=f"{p}/self_attn/o_proj", num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim, qk_norm=cfg.qk_norm,
            )
            readers, mlp = self.mlp_layout(i)
            layers.append(DecoderLayerLayout(
                attn_norm=NormGroup(f"{p}/input_layernorm", (attn.q, attn.k, attn.v)),
                attention=attn,
                mlp_norm=NormGroup(f"{p}/post_attention_layernorm", readers),
                mlp=mlp,
            ))
        head = None if self.lm_head is None else "lm_head"
        return DecoderLayout(hidden_size=cfg.hidden_size, embedding="embed_tokens", layers=tuple(layers),
                             final_norm=NormGroup("norm", (head,) if head else ()), head=head)

    def _forward(self, tokens, positions, layer_caches, start):
        x = self.embed_tokens(tokens, jnp.dtype(self.config.dtype))
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, positions, None if layer_caches is None else layer_caches[i], start)
            new_caches.append(c)
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits, tuple(new_caches) if layer_caches is not None else None


class Llama(DecoderLM):
    """A Llama-family causal language model.

    ``model(tokens)`` is the training/prefill forward (``[B, T]`` int ->
    logits ``[B, T, V]``); ``model.step(tokens, cache)`` runs a chunk of new
    tokens against a KV cache and returns ``(logits, cache)``.
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pdt, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, sharding=("embed", "vocab"), param_dtype=pdt, rngs=rngs)
        )

    def untie_embeddings(self) -> Llama:
        """A float copy whose output head is its own ``lm_head`` (initialised to the embedding); self if untied."""
        if self.lm_head is not None:
            return self
        tensors = to_tensors(self)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        return from_tensors(self.config.replace(tie_embeddings=False), tensors, source="untie_embeddings")


def init_model(cfg: LlamaConfig, key: jax.Array) -> Llama:
    """A randomly initialised model (weights ~ N(0, 0.02), norms 1, biases 0)."""
    check_dtypes_available(cfg)
    return Llama(cfg, rngs=nnx.Rngs(params=key))


def abstract_model(cfg: LlamaConfig) -> Llama:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------
# Hugging Face import / export
# ----------------------------------------------------------------------------

_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Config keys that carry no architecture (training, generation or bookkeeping settings).
_HF_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "pad_token_id",
    "initializer_range", "attention_dropout", "pretraining_tp", "hidden_act", "max_window_layers", "layer_types",
    "use_sliding_window", "rope_parameters", "rope_theta", "rope_scaling", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "tie_word_embeddings", "attention_bias", "mlp_bias", "head_dim",
    "sliding_window", "bos_token_id", "eos_token_id", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
    "use_qk_norm", "partial_rotary_factor", "chunk_size_feed_forward", "problem_type", "id2label", "label2id",
}


def config_from_hf(hf: dict, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None) -> LlamaConfig:
    """Translate a Hugging Face ``config.json`` dict into a ``LlamaConfig``.

    Rejects settings this implementation does not compute (other activations,
    rope types, partial rotary, per-layer sliding windows) instead of
    silently ignoring them.
    """
    family = hf.get("model_type")
    if family not in _HF_ARCHITECTURES:
        raise ValueError(
            f"config.json model_type={family!r} is not a Llama-family model; supported: {sorted(_HF_ARCHITECTURES)}."
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported.")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json partial_rotary_factor={hf['partial_rotary_factor']}: only 1.0 is supported.")
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise ValueError(
            f"config.json of a {family} model asks for per-layer sliding-window attention "
            "(use_sliding_window / layer_types), which is not supported; only Mistral's global sliding_window is."
        )
    unknown = sorted(k for k in hf if k not in _HF_IGNORED_KEYS and not k.startswith("_"))
    unknown = [k for k in unknown if hf[k] not in (None, False, [], {})]
    if unknown:
        raise ValueError(f"config.json has attributes the {family} converter does not handle: {unknown}.")
    rope = _rope_from_hf(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    return LlamaConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=rope,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if family == "qwen2" else attention_bias,
        out_bias=attention_bias if family in ("llama", "qwen3") else False,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        sliding_window=hf.get("sliding_window") if family == "mistral" else None,
        bos_token_id=_single_id(hf.get("bos_token_id")),
        eos_token_id=_single_id(hf.get("eos_token_id")),
        dtype=dtype,
        param_dtype=param_dtype or dtype,
    )


def _single_id(value) -> int | None:
    return value[0] if isinstance(value, list) and value else value


def _rope_from_hf(hf: dict) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"config.json rope type {kind!r} is not supported; supported: default, linear, llama3.")
    kw = dict(theta=float(theta), kind=kind)
    if kind != "default":
        kw["factor"] = float(params["factor"])
    if kind == "llama3":
        kw.update(
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    return RopeConfig(**kw)


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The Hugging Face ``config.json`` dict of ``cfg`` (transformers 5 layout, ``rope_parameters``)."""
    rope = {"rope_type": cfg.rope.kind, "rope_theta": cfg.rope.theta}
    if cfg.rope.kind != "default":
        rope["factor"] = cfg.rope.factor
    if cfg.rope.kind == "llama3":
        rope.update(
            low_freq_factor=cfg.rope.low_freq_factor,
            high_freq_factor=cfg.rope.high_freq_factor,
            original_max_position_embeddings=cfg.rope.original_max_position_embeddings,
        )
    hf = {
        "architectures": [_HF_ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "dtype": cfg.param_dtype,
    }
    if cfg.family in ("llama", "qwen3"):
        if cfg.qkv_bias != cfg.out_bias:
            raise ValueError(f"{cfg.family} has one attention_bias for q/k/v/o; qkv_bias={cfg.qkv_bias} != out_bias={cfg.out_bias}.")
        hf["attention_bias"] = cfg.qkv_bias
    elif cfg.qkv_bias != (cfg.family == "qwen2") or cfg.out_bias:
        raise ValueError(f"{cfg.family} cannot express qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias} in its config.json.")
    if cfg.family == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    elif cfg.mlp_bias:
        raise ValueError(f"{cfg.family} has no mlp_bias option.")
    if cfg.family == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    elif cfg.sliding_window is not None:
        raise ValueError(f"{cfg.family}: sliding_window export is only supported for Mistral.")
    if cfg.family in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None)
    if cfg.qk_norm != (cfg.family == "qwen3"):
        raise ValueError(f"{cfg.family} cannot express qk_norm={cfg.qk_norm} in its config.json (Qwen3 always "
                         "normalises q/k, the others never); set family='qwen3' for a q/k-normalised model.")
    return hf



def _hf_name(path: tuple) -> tuple[str, bool]:
    """NNX parameter path -> (Hugging Face tensor name, whether the tensor is transposed)."""
    *module, leaf = (str(p) for p in path)
    if module == ["embed_tokens"]:
        return "model.embed_tokens.weight", False
    if module == ["lm_head"]:
        return "lm_head.weight", True
    hf_leaf = {"kernel": "weight", "weight": "weight", "bias": "bias"}[leaf]
    return "model." + ".".join(module) + "." + hf_leaf, leaf == "kernel"


def from_hf(path, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None) -> Llama:
    """Load a Hugging Face Llama/Mistral/Qwen2/Qwen3 checkpoint folder into a ``Llama``.

    Reads ``config.json`` and ``model.safetensors`` (or the shards listed in
    ``model.safetensors.index.json``). Every expected tensor must be present
    with the shape the config implies and nothing unexpected may remain;
    otherwise a ``ValueError`` names the tensor, the expected shape and the
    one found, and no model is returned.

    ``dtype`` is the compute dtype. ``param_dtype`` defaults to the dtype the
    tensors are stored in, so weights are kept exactly as stored (a bf16
    checkpoint stays bf16 in memory and is upcast inside each matmul).
    """
    from jquant.models import hf_io

    hf_config = hf_io.read_config(path)
    tensors = hf_io.read_safetensors(path)
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    param_dtype = param_dtype or hf_io.stored_dtype(tensors, default=dtype)
    cfg = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return from_tensors(cfg, tensors, source=str(path))


def from_tensors(cfg: LlamaConfig, tensors: dict, *, source: str = "tensors") -> Llama:
    """Build a ``Llama`` from Hugging Face-named arrays (``[out, in]`` linear weights), validating every one."""
    check_dtypes_available(cfg)
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    pdt = jnp.dtype(cfg.param_dtype)
    remaining = dict(tensors)
    flat = []
    for p, var in nnx.to_flat_state(abstract_state):
        name, transposed = _hf_name(p)
        if name not in remaining:
            raise ValueError(f"{source}: tensor {name!r} is missing (expected shape {tuple(reversed(var.shape)) if transposed else tuple(var.shape)}).")
        array = remaining.pop(name)
        expected = tuple(reversed(var.shape)) if transposed else tuple(var.shape)
        if tuple(array.shape) != expected:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(array.shape)}, but the config implies {expected}."
            )
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"{source}: tensor {name!r} has dtype {array.dtype}; a floating-point tensor was expected.")
        value = array.T if transposed else array
        flat.append((p, var.replace(jnp.asarray(value, dtype=pdt))))
    if remaining:
        raise ValueError(f"{source}: unexpected tensors not used by a {cfg.family} model of this config: {sorted(remaining)[:8]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def to_tensors(model: Llama) -> dict:
    """Hugging Face-named numpy arrays of ``model`` (linear weights transposed back to ``[out, in]``)."""
    import numpy as np

    out = {}
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = _hf_name(p)
        value = np.asarray(var[...])
        out[name] = np.ascontiguousarray(value.T if transposed else value)
    return out


def to_hf(model: Llama, path, *, max_shard_bytes: int = 2 * 1024**3, extra_files=None, overwrite: bool = False):
    """Write ``model`` as a Hugging Face checkpoint folder (atomically; sharded above ``max_shard_bytes``).

    ``extra_files(folder)`` adds files (a tokenizer's ``save_pretrained``) before the folder is moved into
    place; ``overwrite=True`` replaces a folder jquant wrote earlier (``hf_io.write_checkpoint``).
    """
    from jquant.models import hf_io

    return hf_io.write_checkpoint(path, config_to_hf(model.config), to_tensors(model), max_shard_bytes=max_shard_bytes,
                                  extra_files=extra_files, overwrite=overwrite)


# ----------------------------------------------------------------------------
# The family declaration, with the named presets of jquant's own reference models
# ----------------------------------------------------------------------------

FAMILY = FamilyDeclaration(
    name="llama",
    config_class=LlamaConfig,
    model_class=Llama,
    hf_model_types=tuple(_HF_ARCHITECTURES),
    presets={
        # ~3.2M parameters: trains in minutes on a 2-core CPU; the default model of the README and tests.
        "jq-llama-tiny": LlamaConfig(
            vocab_size=4096, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6, num_kv_heads=2,
            max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
        ),
        # ~10M parameters: the reference model of the result tables.
        "jq-llama-small": LlamaConfig(
            vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=10, num_heads=4, num_kv_heads=2,
            max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
        ),
        # jq-llama-small's shape with a 4096-token context: the long-context model of the KV-cache results,
        # trained on 4096-token windows with needle-retrieval sequences mixed in (experiments/train_long_context.py).
        "jq-llama-long": LlamaConfig(
            vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=10, num_heads=4, num_kv_heads=2,
            max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
        ),
    },
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=config_to_hf,
    config_from_json=config_from_hf,
    checkpoint_protocol="the manifest's config is the Hugging Face config.json dict (config_to_hf / config_from_hf).",
    from_hf=from_hf,
    to_hf=to_hf,
    keep_float=LM_KEEP_FLOAT,
)
