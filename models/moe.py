"""Mixture-of-experts decoders: Mixtral, Qwen1.5/2-MoE, Qwen3-MoE and DeepSeek-MoE-style routing.

Shapes: ``B`` batch, ``T`` tokens, ``V`` vocabulary, ``D`` hidden size, ``E`` routed experts.

The attention, norms and dense blocks are the Llama family's (``jquant.models.llama``); the feed-forward
of a sparse layer is a ``SparseMoE`` (``jquant.models.layers``): a router ``gate [D, E]``, ``E`` SwiGLU
experts stacked as ``[E, in, out]`` and run dropless (tokens sorted by expert, grouped matmuls), and an
optional shared expert. Families:

- ``mixtral``: top-k softmax renormalised to one, no shared expert.
- ``qwen2_moe``: top-k softmax (``norm_topk_prob`` off by default), a shared expert gated by
  ``sigmoid(shared_expert_gate(x))``, q/k/v biases; ``mlp_only_layers`` / ``decoder_sparse_step`` give dense layers.
- ``qwen3_moe``: as Qwen2-MoE without a shared expert, with per-head q/k RMSNorm.
- ``deepseek_moe``: DeepSeek-MoE routing: softmax top-k not renormalised, times ``routed_scaling_factor``,
  ungated shared experts and ``first_k_dense_replace`` leading dense layers; attention is jquant's GQA (not
  DeepSeek-V2's MLA), so this family is saved with ``jquant.save`` only, not as a Hugging Face folder.

Parameter paths: ``layers/{i}/mlp/gate`` (router), ``layers/{i}/mlp/experts/{gate,up,down}_proj/kernel``
``[E, in, out]``, ``layers/{i}/mlp/shared_expert/*``, ``layers/{i}/mlp/shared_expert_gate``; dense layers
have ``layers/{i}/mlp/{gate,up,down}_proj``. On disk (Hugging Face's layout) experts are separate tensors:
``mlp.experts.{e}.{gate,up,down}_proj.weight`` (Mixtral: ``block_sparse_moe.experts.{e}.{w1,w3,w2}.weight``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.models.config_io import check_dtypes_available
from jquant.models.family import LM_KEEP_FLOAT, Family
from jquant.models.layers import Embed, Linear, RMSNorm, SparseMoE, SparseMoEConfig
from jquant.losses import cross_entropy
from jquant.models.llama import DecoderLayer, DecoderLM, DTypeName, LlamaConfig
from jquant.models.llama import _rope_from_hf, _single_id
from jquant.transforms.layout import MLPLayout, SparseMLPLayout

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_moe")
_HF_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                     "qwen3_moe": "Qwen3MoeForCausalLM"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig(LlamaConfig):
    """A Llama-style decoder whose feed-forward layers are sparse mixtures of experts.

    ``intermediate_size`` is the width of dense layers (those in ``dense_layers``),
    ``moe_intermediate_size`` that of each routed expert. ``top_k`` of ``num_experts`` experts serve
    each token; ``norm_topk_prob`` renormalises their probabilities, ``routed_scaling_factor``
    multiplies them. ``shared_expert_size`` > 0 adds an always-on expert (gated when
    ``shared_expert_gate``). ``router_aux_loss_coef`` weighs the load-balancing loss in training.
    """

    FAMILIES = MOE_FAMILIES

    family: str = "mixtral"
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    shared_expert_size: int = 0
    shared_expert_gate: bool = False
    dense_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "dense_layers", tuple(sorted(int(i) for i in self.dense_layers)))
        if any(not 0 <= i < self.num_layers for i in self.dense_layers):
            raise ValueError(f"MoEConfig.dense_layers={self.dense_layers} must index layers 0..{self.num_layers - 1}.")
        if self.moe_intermediate_size <= 0:
            raise ValueError(f"MoEConfig.moe_intermediate_size must be positive, got {self.moe_intermediate_size}.")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"MoEConfig.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}.")
        self.sparse  # validates num_experts / top_k / shared expert

    @property
    def sparse(self) -> SparseMoEConfig:
        return SparseMoEConfig(hidden_size=self.hidden_size, intermediate_size=self.moe_intermediate_size,
                               num_experts=self.num_experts, top_k=self.top_k, normalize=self.norm_topk_prob,
                               scale=self.routed_scaling_factor, shared_size=self.shared_expert_size,
                               shared_gate=self.shared_expert_gate)

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)


class MoE(DecoderLM):
    """A mixture-of-experts causal LM: ``model(tokens)`` -> logits ``[B, T, V]``; ``model.step(tokens, cache)``."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pdt, rngs=rngs)
        self.layers = nnx.List([
            DecoderLayer(cfg, rngs=rngs,
                         mlp=None if i in cfg.dense_layers else SparseMoE(cfg.sparse, param_dtype=pdt, rngs=rngs))
            for i in range(cfg.num_layers)
        ])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.lm_head = (None if cfg.tie_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, sharding=("embed", "vocab"),
                               param_dtype=pdt, rngs=rngs))

    def mlp_layout(self, i: int) -> tuple[tuple[str, ...], MLPLayout | SparseMLPLayout]:
        """Layer ``i``'s feed-forward for equivalence transforms: a dense layer's SwiGLU, or the sparse block's
        readers (router, gate/up expert stacks, shared expert and its gate) and writers (the down projections)."""
        mlp = self.layers[i].mlp
        if not isinstance(mlp, SparseMoE):
            return super().mlp_layout(i)
        p = f"layers/{i}/mlp"
        readers = [f"{p}/gate", f"{p}/experts/gate_proj", f"{p}/experts/up_proj"]
        writers = [f"{p}/experts/down_proj"]
        if mlp.shared_expert is not None:
            readers += [f"{p}/shared_expert/gate_proj", f"{p}/shared_expert/up_proj"]
            writers.append(f"{p}/shared_expert/down_proj")
        if mlp.shared_expert_gate is not None:
            readers.append(f"{p}/shared_expert_gate")
        return tuple(readers), SparseMLPLayout(path=p, writers=tuple(writers))

    def untie_embeddings(self) -> MoE:
        """A float copy whose output head is its own ``lm_head`` (initialised to the embedding); self if untied."""
        if self.lm_head is not None:
            return self
        tensors = to_tensors(self)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        return from_tensors(self.config.replace(tie_embeddings=False), tensors, source="untie_embeddings")

    def moe_layers(self) -> list[SparseMoE]:
        """The sparse feed-forward modules, in layer order."""
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoE)]

    def training_loss(self, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        """Next-token cross-entropy plus ``router_aux_loss_coef`` times the mean load-balancing loss of the layers."""
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
        x = self.embed_tokens(inputs, jnp.dtype(self.config.dtype))
        load = []
        for layer in self.layers:
            h, _ = layer.self_attn(layer.input_layernorm(x), positions, None, None)
            x = x + h
            h = layer.post_attention_layernorm(x)
            if isinstance(layer.mlp, SparseMoE):
                h, layer_load = layer.mlp.forward_with_load_loss(h)
                load.append(layer_load)
            else:
                h = layer.mlp(h)
            x = x + h
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        aux = jnp.mean(jnp.stack(load)) if load else 0.0
        return cross_entropy(logits, targets) + self.config.router_aux_loss_coef * aux


def init_model(cfg: MoEConfig, key: jax.Array) -> MoE:
    """A randomly initialised model (weights ~ N(0, 0.02), norms 1, biases 0)."""
    check_dtypes_available(cfg)
    return MoE(cfg, rngs=nnx.Rngs(params=key))


def abstract_model(cfg: MoEConfig) -> MoE:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------
# Hugging Face import / export
# ----------------------------------------------------------------------------

_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "pad_token_id",
    "initializer_range", "attention_dropout", "hidden_act", "max_window_layers", "layer_types", "use_sliding_window",
    "rope_parameters", "rope_theta", "rope_scaling", "output_router_logits", "router_jitter_noise", "sliding_window",
    "tie_word_embeddings", "attention_bias", "qkv_bias", "head_dim", "bos_token_id", "eos_token_id", "vocab_size",
    "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "num_local_experts", "num_experts",
    "num_experts_per_tok", "norm_topk_prob", "shared_expert_intermediate_size", "decoder_sparse_step",
    "mlp_only_layers", "router_aux_loss_coef", "output_attentions", "output_hidden_states", "return_dict",
    "_name_or_path", "problem_type", "id2label", "label2id", "chunk_size_feed_forward",
}


def config_from_hf(hf: dict, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None) -> MoEConfig:
    """Translate a Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE ``config.json`` dict (or a ``deepseek_moe`` one
    written by ``config_to_hf``) into an ``MoEConfig``; settings this implementation does not compute are refused."""
    family = hf.get("model_type")
    if family not in MOE_FAMILIES:
        raise ValueError(f"config.json model_type={family!r} is not a mixture-of-experts family jquant implements; "
                         f"supported: {list(MOE_FAMILIES)}.")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) experts are supported.")
    if hf.get("use_sliding_window") or (family == "mixtral" and hf.get("sliding_window")):
        raise ValueError(f"config.json of a {family} model asks for sliding-window attention, which jquant's MoE "
                         "family does not compute.")
    if hf.get("router_jitter_noise"):
        raise ValueError("config.json router_jitter_noise is a training-time perturbation; set it to 0 for inference.")
    extra = {"deepseek_moe": {"routed_scaling_factor", "n_shared_experts", "first_k_dense_replace"}}.get(family, set())
    unknown = sorted(k for k in hf if k not in _IGNORED_KEYS | extra and not k.startswith("_"))
    unknown = [k for k in unknown if hf[k] not in (None, False, [], {})]
    if unknown:
        raise ValueError(f"config.json has attributes the {family} converter does not handle: {unknown}.")
    layers = hf["num_hidden_layers"]
    experts = hf.get("num_local_experts") or hf.get("num_experts")
    moe_size = hf.get("moe_intermediate_size") or hf["intermediate_size"]
    if family == "deepseek_moe":
        dense = tuple(range(hf.get("first_k_dense_replace", 0)))
        shared, gated = moe_size * hf.get("n_shared_experts", 0), False
    elif family == "mixtral":
        dense, shared, gated = (), 0, False
    else:
        step = hf.get("decoder_sparse_step", 1) or 1
        only = set(hf.get("mlp_only_layers") or [])
        dense = tuple(i for i in range(layers) if i in only or experts == 0 or (i + 1) % step)
        shared = hf.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0
        gated = shared > 0
    return MoEConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], moe_intermediate_size=moe_size, num_layers=layers,
        num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope=_rope_from_hf(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2_moe" and bool(hf.get("qkv_bias", True)) or bool(hf.get("attention_bias", False)),
        out_bias=family == "qwen3_moe" and bool(hf.get("attention_bias", False)),
        qk_norm=family == "qwen3_moe",
        num_experts=experts, top_k=hf["num_experts_per_tok"],
        norm_topk_prob=True if family == "mixtral" else bool(hf.get("norm_topk_prob", False)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        shared_expert_size=shared, shared_expert_gate=gated, dense_layers=dense,
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)),
        bos_token_id=_single_id(hf.get("bos_token_id")), eos_token_id=_single_id(hf.get("eos_token_id")),
        dtype=dtype, param_dtype=param_dtype or dtype,
    )


def config_to_hf(cfg: MoEConfig) -> dict:
    """The ``config.json`` dict of ``cfg`` (Hugging Face's layout; ``deepseek_moe`` keeps DeepSeek's key names)."""
    rope = {"rope_type": cfg.rope.kind, "rope_theta": cfg.rope.theta}
    if cfg.rope.kind != "default":
        raise ValueError(f"MoE export supports default RoPE only, got {cfg.rope.kind!r}.")
    hf = {
        "model_type": cfg.family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_embeddings,
        "num_experts_per_tok": cfg.top_k, "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "dtype": cfg.param_dtype,
    }
    if cfg.family in _HF_ARCHITECTURES:
        hf["architectures"] = [_HF_ARCHITECTURES[cfg.family]]
    _check_expressible(cfg)
    if cfg.family == "mixtral":
        hf.update(num_local_experts=cfg.num_experts, sliding_window=None)
        hf["intermediate_size"] = cfg.moe_intermediate_size
    elif cfg.family == "deepseek_moe":
        hf.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_intermediate_size,
                  n_shared_experts=cfg.shared_expert_size // cfg.moe_intermediate_size,
                  first_k_dense_replace=len(cfg.dense_layers), norm_topk_prob=cfg.norm_topk_prob,
                  routed_scaling_factor=cfg.routed_scaling_factor)
    else:
        key = "num_experts" if cfg.family == "qwen2_moe" else "num_local_experts"
        hf.update({key: cfg.num_experts}, moe_intermediate_size=cfg.moe_intermediate_size,
                  norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=list(cfg.dense_layers),
                  use_sliding_window=False, sliding_window=None)
        if cfg.family == "qwen2_moe":
            hf.update(shared_expert_intermediate_size=cfg.shared_expert_size, qkv_bias=cfg.qkv_bias)
        else:
            hf["attention_bias"] = cfg.qkv_bias
    return hf


def _check_expressible(cfg: MoEConfig) -> None:
    """Refuse configs the family's config.json cannot say (rather than writing a checkpoint that loads differently)."""
    problems = []
    if cfg.family == "mixtral" and (cfg.shared_expert_size or cfg.dense_layers or not cfg.norm_topk_prob):
        problems.append("Mixtral has no shared expert, no dense layers and always renormalises the top-k weights")
    if cfg.family in ("qwen2_moe", "qwen3_moe", "mixtral") and cfg.routed_scaling_factor != 1.0:
        problems.append(f"{cfg.family} has no routed_scaling_factor")
    if cfg.family == "qwen2_moe" and bool(cfg.shared_expert_size) != cfg.shared_expert_gate:
        problems.append("Qwen2-MoE's shared expert is always gated")
    if cfg.family == "qwen3_moe" and cfg.shared_expert_size:
        problems.append("Qwen3-MoE has no shared expert")
    if cfg.family == "deepseek_moe" and (cfg.shared_expert_gate or cfg.shared_expert_size % cfg.moe_intermediate_size
                                         or cfg.dense_layers != tuple(range(len(cfg.dense_layers)))):
        problems.append("DeepSeek-MoE has ungated shared experts of whole expert widths and leading dense layers")
    if problems:
        raise ValueError(f"MoEConfig cannot be written as a {cfg.family} config.json: {'; '.join(problems)}.")


_MIXTRAL_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _hf_name(path: tuple, family: str) -> tuple[str, bool]:
    """NNX parameter path -> (Hugging Face tensor name, transposed); expert stacks get a ``{e}`` placeholder."""
    *module, leaf = (str(p) for p in path)
    if module == ["embed_tokens"]:
        return "model.embed_tokens.weight", False
    if module == ["lm_head"]:
        return "lm_head.weight", True
    if len(module) > 3 and module[3] == "experts":  # layers/i/mlp/experts/<proj>
        proj = module[4]
        if family == "mixtral":
            return f"model.layers.{module[1]}.block_sparse_moe.experts.{{e}}.{_MIXTRAL_EXPERT[proj]}.weight", True
        return f"model.layers.{module[1]}.mlp.experts.{{e}}.{proj}.weight", True
    if family == "mixtral" and module[2:] == ["mlp", "gate"]:
        return f"model.layers.{module[1]}.block_sparse_moe.gate.weight", True
    if family == "deepseek_moe" and len(module) > 3 and module[3] == "shared_expert":
        module = [*module[:3], "shared_experts", *module[4:]]
    hf_leaf = {"kernel": "weight", "weight": "weight", "bias": "bias"}[leaf]
    return "model." + ".".join(module) + "." + hf_leaf, leaf == "kernel"


def from_hf(path, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None) -> MoE:
    """Load a Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE folder (per-expert tensors as ``save_pretrained``
    writes them), validating every tensor; ``param_dtype`` defaults to the stored dtype."""
    from jquant.models import hf_io

    hf_config = hf_io.read_config(path)
    tensors = {k: v for k, v in hf_io.read_safetensors(path).items() if not k.endswith("rotary_emb.inv_freq")}
    param_dtype = param_dtype or hf_io.stored_dtype(tensors, default=dtype)
    cfg = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return from_tensors(cfg, tensors, source=str(path))


def from_tensors(cfg: MoEConfig, tensors: dict, *, source: str = "tensors") -> MoE:
    """Build an ``MoE`` from Hugging Face-named arrays (per-expert ``[out, in]`` tensors), validating every one."""
    check_dtypes_available(cfg)
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    pdt = jnp.dtype(cfg.param_dtype)
    remaining = dict(tensors)

    def take(name: str, expected: tuple) -> np.ndarray:
        if name not in remaining:
            raise ValueError(f"{source}: tensor {name!r} is missing (expected shape {expected}).")
        array = remaining.pop(name)
        if tuple(array.shape) != expected:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, but the config implies "
                             f"{expected}; every expert of a layer must have the same shape.")
        if not np.issubdtype(np.dtype(array.dtype), np.floating) and str(array.dtype) != "bfloat16":
            raise ValueError(f"{source}: tensor {name!r} has dtype {array.dtype}; a floating-point tensor was expected.")
        return array

    flat = []
    for p, var in nnx.to_flat_state(abstract_state):
        name, transposed = _hf_name(p, cfg.family)
        if "{e}" in name:
            e_count, d_in, d_out = var.shape
            value = np.stack([np.asarray(take(name.format(e=e), (d_out, d_in))).T for e in range(e_count)])
        else:
            expected = tuple(reversed(var.shape)) if transposed else tuple(var.shape)
            array = take(name, expected)
            value = array.T if transposed else array
        flat.append((p, var.replace(jnp.asarray(value, dtype=pdt))))
    if remaining:
        raise ValueError(f"{source}: unexpected tensors not used by a {cfg.family} model of this config: "
                         f"{sorted(remaining)[:8]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def to_tensors(model: MoE) -> dict:
    """Hugging Face-named numpy arrays of ``model`` (per-expert ``[out, in]`` tensors)."""
    out = {}
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = _hf_name(p, model.config.family)
        value = np.asarray(var[...])
        if "{e}" in name:
            out.update({name.format(e=e): np.ascontiguousarray(value[e].T) for e in range(value.shape[0])})
        else:
            out[name] = np.ascontiguousarray(value.T if transposed else value)
    return out


def to_hf(model: MoE, path, *, max_shard_bytes: int = 2 * 1024**3, extra_files=None, overwrite: bool = False):
    """Write ``model`` as a Hugging Face checkpoint folder (atomically); Mixtral, Qwen2-MoE and Qwen3-MoE only.

    ``extra_files(folder)`` adds files (a tokenizer's ``save_pretrained``) before the folder is moved into place.
    """
    from jquant.models import hf_io

    if model.config.family not in _HF_ARCHITECTURES:
        raise ValueError(f"{model.config.family} has no Hugging Face class; save it with jquant.save instead.")
    return hf_io.write_checkpoint(path, config_to_hf(model.config), to_tensors(model),
                                  max_shard_bytes=max_shard_bytes, extra_files=extra_files, overwrite=overwrite)


# ----------------------------------------------------------------------------
# The family declaration, with the named presets of jquant's own reference models
# ----------------------------------------------------------------------------

FAMILY = Family(
    name="moe",
    config_class=MoEConfig,
    model_class=MoE,
    hf_model_types=tuple(_HF_ARCHITECTURES),
    presets={
        # 8 experts, top-2 (Mixtral routing); active parameters per token close to jq-llama-small's.
        # A weak load-balancing loss (Qwen-MoE's 0.001, not Mixtral's 0.02) leaves expert usage imbalanced,
        # the condition MoEQuant's expert-balanced calibration addresses.
        "jq-moe-small": MoEConfig(
            family="mixtral", vocab_size=4096, hidden_size=256, intermediate_size=384, moe_intermediate_size=384,
            num_layers=6, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, max_position_embeddings=1024,
            bos_token_id=0, eos_token_id=1, router_aux_loss_coef=0.001,
        ),
    },
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=config_to_hf,
    config_from_json=config_from_hf,
    checkpoint_protocol="the manifest's config is the config.json dict (config_to_hf / config_from_hf; "
                        "deepseek_moe, which has no Hugging Face class here, is saved with jquant.save only).",
    from_hf=from_hf,
    to_hf=to_hf,
    keep_float=LM_KEEP_FLOAT,
)
