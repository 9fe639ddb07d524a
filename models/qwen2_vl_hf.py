"""Hugging Face import / export of Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``), in the on-disk layout ``save_pretrained`` writes.

Tensor names: ``visual.patch_embed.proj.weight [E, C, Tp, P, P]`` (jquant: ``visual/patch_embed/proj/kernel
[C Tp P P, E]``), ``visual.blocks.{i}.{norm1, norm2, attn.qkv, attn.proj, mlp.*}``, ``visual.merger.ln_q``,
``visual.merger.mlp.0`` / ``mlp.2`` (jquant ``merger/fc1`` / ``fc2``); the text model as in ``llama.py``
(``model.embed_tokens``, ``model.layers.{i}...``, ``model.norm``, ``lm_head``). Linear weights are ``[out, in]``
there and ``[in, out]`` here. The config is nested (``text_config``, ``vision_config``, transformers 5) or flat
(text fields at the top, ``rope_scaling.mrope_section``: the released checkpoints); export writes the nested form.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from flax import nnx

from jquant.models import llama
from jquant.models.config_io import check_dtypes_available
from jquant.models.qwen2_vl_model import DTypeName, Qwen2VL, Qwen2VLConfig, abstract_model
from jquant.models.qwen2_vl_vision import VisionConfig

_ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
_TOP_KEYS = {"architectures", "model_type", "text_config", "vision_config", "image_token_id", "video_token_id",
             "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings", "transformers_version", "dtype",
             "torch_dtype", "_name_or_path", "vision_token_id"}
_VISION_KEYS = {
    "qwen2_vl": {"depth", "embed_dim", "hidden_size", "hidden_act", "mlp_ratio", "num_heads", "in_channels", "in_chans",
                 "patch_size", "spatial_merge_size", "temporal_patch_size", "rope_parameters", "model_type",
                 "initializer_range", "dtype", "torch_dtype"},
    "qwen2_5_vl": {"depth", "hidden_size", "out_hidden_size", "intermediate_size", "hidden_act", "num_heads",
                   "in_channels", "in_chans", "patch_size", "spatial_merge_size", "temporal_patch_size",
                   "tokens_per_second", "window_size", "fullatt_block_indexes", "rope_parameters", "model_type",
                   "initializer_range", "dtype", "torch_dtype", "spatial_patch_size"},
}


def _vision_from_hf(family: str, v: dict) -> VisionConfig:
    unknown = sorted(set(v) - _VISION_KEYS[family])
    if unknown:
        raise ValueError(f"config.json vision_config has attributes the {family} converter does not handle: {unknown}.")
    if v.get("spatial_patch_size", v["patch_size"]) != v["patch_size"]:
        raise ValueError(f"config.json vision_config spatial_patch_size={v['spatial_patch_size']} differs from "
                         f"patch_size={v['patch_size']}; only square patches of one size are supported.")
    rope = v.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"config.json vision_config rope_type {rope['rope_type']!r}: only 'axial' is supported.")
    common = dict(variant=family, depth=v["depth"], num_heads=v["num_heads"],
                  in_channels=v.get("in_channels", v.get("in_chans", 3)), patch_size=v["patch_size"],
                  temporal_patch_size=v["temporal_patch_size"], spatial_merge_size=v["spatial_merge_size"],
                  rope_theta=float(rope.get("rope_theta", 10000.0)))
    if family == "qwen2_vl":
        width = int(v["embed_dim"] * v.get("mlp_ratio", 4))
        return VisionConfig(embed_dim=v["embed_dim"], intermediate_size=width, out_hidden_size=v["hidden_size"],
                            hidden_act=v.get("hidden_act", "quick_gelu"), **common)
    return VisionConfig(embed_dim=v["hidden_size"], intermediate_size=v["intermediate_size"],
                        out_hidden_size=v["out_hidden_size"], hidden_act=v.get("hidden_act", "silu"),
                        window_size=v["window_size"], fullatt_block_indexes=tuple(v["fullatt_block_indexes"]),
                        tokens_per_second=v.get("tokens_per_second", 4), **common)


def _vision_to_hf(cfg: VisionConfig) -> dict:
    common = dict(depth=cfg.depth, num_heads=cfg.num_heads, in_channels=cfg.in_channels, patch_size=cfg.patch_size,
                  temporal_patch_size=cfg.temporal_patch_size, spatial_merge_size=cfg.spatial_merge_size,
                  hidden_act=cfg.hidden_act, rope_parameters={"rope_type": "axial", "rope_theta": cfg.rope_theta},
                  model_type=f"{cfg.variant}_vision" if cfg.variant == "qwen2_5_vl" else "qwen2_vl_vision")
    if cfg.variant == "qwen2_vl":
        if cfg.intermediate_size % cfg.embed_dim:
            raise ValueError(f"Qwen2-VL's config expresses the vision MLP width as embed_dim * mlp_ratio (an int); "
                             f"intermediate_size={cfg.intermediate_size} is not a multiple of embed_dim={cfg.embed_dim}.")
        return dict(common, embed_dim=cfg.embed_dim, hidden_size=cfg.out_hidden_size,
                    mlp_ratio=cfg.intermediate_size // cfg.embed_dim)
    return dict(common, hidden_size=cfg.embed_dim, out_hidden_size=cfg.out_hidden_size,
                intermediate_size=cfg.intermediate_size, window_size=cfg.window_size,
                fullatt_block_indexes=list(cfg.fullatt_block_indexes), tokens_per_second=cfg.tokens_per_second)


def config_from_hf(hf: dict, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None) -> Qwen2VLConfig:
    """A ``Qwen2VLConfig`` from a Hugging Face ``config.json`` dict (nested or flat); unknown settings are refused."""
    family = hf.get("model_type")
    if family not in _ARCHITECTURES:
        raise ValueError(f"config.json model_type={family!r} is not Qwen2-VL; supported: {sorted(_ARCHITECTURES)}.")
    if "text_config" in hf:
        unknown = sorted(k for k in set(hf) - _TOP_KEYS if hf[k] not in (None, False, [], {}))
        if unknown:
            raise ValueError(f"config.json has attributes the {family} converter does not handle: {unknown}.")
        text = dict(hf["text_config"])
    else:  # the released checkpoints: the text settings at the top level
        text = {k: v for k, v in hf.items() if k not in _TOP_KEYS}
    rope = dict(text.pop("rope_parameters", None) or text.pop("rope_scaling", None) or {})
    if "rope_theta" in text:
        rope.setdefault("rope_theta", text.pop("rope_theta"))
    sections = rope.pop("mrope_section", None)
    if sections is None:
        raise ValueError("config.json has no mrope_section (text_config.rope_parameters); it is needed for M-RoPE.")
    rope.pop("type", None)
    rope["rope_type"] = "default" if rope.get("rope_type", "default") in ("default", "mrope") else rope["rope_type"]
    text.pop("model_type", None)
    text = dict(text, model_type="qwen2", rope_parameters=rope,
                tie_word_embeddings=hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    text_cfg = llama.config_from_hf(text, dtype=dtype, param_dtype=param_dtype)
    return Qwen2VLConfig(family=family, text=text_cfg, vision=_vision_from_hf(family, hf["vision_config"]),
                         mrope_section=tuple(sections), image_token_id=hf["image_token_id"],
                         video_token_id=hf["video_token_id"], vision_start_token_id=hf["vision_start_token_id"],
                         vision_end_token_id=hf["vision_end_token_id"], dtype=dtype, param_dtype=param_dtype or dtype)


def config_to_hf(cfg: Qwen2VLConfig) -> dict:
    """The nested Hugging Face ``config.json`` dict of ``cfg``."""
    text = llama.config_to_hf(cfg.text)
    for key in ("architectures", "dtype", "tie_word_embeddings"):
        text.pop(key)
    text["model_type"] = f"{cfg.family}_text"
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=list(cfg.mrope_section))
    return {
        "architectures": [_ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "text_config": text,
        "vision_config": _vision_to_hf(cfg.vision),
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": cfg.text.tie_embeddings,
        "dtype": cfg.param_dtype,
    }


def _hf_name(path: tuple) -> str:
    """NNX parameter path -> Hugging Face tensor name."""
    *module, leaf = (str(p) for p in path)
    hf_leaf = {"kernel": "weight", "weight": "weight", "bias": "bias", "embedding": "weight"}[leaf]
    if module[0] == "visual":
        renamed = {("merger", "fc1"): ["merger", "mlp", "0"], ("merger", "fc2"): ["merger", "mlp", "2"]}
        module = ["visual", *renamed.get(tuple(module[1:]), module[1:])]
        return ".".join(module) + "." + hf_leaf
    if module == ["lm_head"]:
        return "lm_head.weight"
    return "model." + ".".join(module) + "." + hf_leaf


def _to_hf_layout(path: tuple, value: np.ndarray, cfg: Qwen2VLConfig) -> np.ndarray:
    """A jquant array in Hugging Face's layout: linears ``[out, in]``, the patch embedding ``[E, C, Tp, P, P]``."""
    if str(path[-1]) != "kernel":
        return value
    if tuple(str(p) for p in path[:3]) == ("visual", "patch_embed", "proj"):
        v = cfg.vision
        return value.T.reshape(v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return value.T


def from_hf(path, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None) -> Qwen2VL:
    """Load a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint folder; every tensor is checked (name, shape, dtype)."""
    from jquant.models import hf_io

    tensors = hf_io.read_safetensors(path)
    param_dtype = param_dtype or hf_io.stored_dtype(tensors, default=dtype)
    cfg = config_from_hf(hf_io.read_config(path), dtype=dtype, param_dtype=param_dtype)
    if cfg.text.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return from_tensors(cfg, tensors, source=str(path))


def from_tensors(cfg: Qwen2VLConfig, tensors: dict, *, source: str = "tensors") -> Qwen2VL:
    """Build a ``Qwen2VL`` from Hugging Face-named arrays, validating every one."""
    check_dtypes_available(cfg)
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    pdt = jnp.dtype(cfg.param_dtype)
    remaining = dict(tensors)
    flat = []
    for p, var in nnx.to_flat_state(abstract_state):
        name = _hf_name(p)
        expected = _to_hf_layout(p, np.empty(var.shape, np.int8), cfg).shape
        if name not in remaining:
            raise ValueError(f"{source}: tensor {name!r} is missing (expected shape {tuple(expected)}).")
        array = np.asarray(remaining.pop(name))
        if tuple(array.shape) != tuple(expected):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, but the config implies "
                             f"{tuple(expected)}.")
        if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
            raise ValueError(f"{source}: tensor {name!r} has dtype {array.dtype}; a floating-point tensor was expected.")
        value = array.reshape(array.shape[0], -1).T if str(p[-1]) == "kernel" else array
        flat.append((p, var.replace(jnp.asarray(value, dtype=pdt))))
    if remaining:
        raise ValueError(f"{source}: unexpected tensors not used by a {cfg.family} model of this config: "
                         f"{sorted(remaining)[:8]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def to_tensors(model: Qwen2VL) -> dict:
    """Hugging Face-named numpy arrays of ``model``."""
    return {_hf_name(p): np.ascontiguousarray(_to_hf_layout(p, np.asarray(var[...]), model.config))
            for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def to_hf(model: Qwen2VL, path, *, max_shard_bytes: int = 2 * 1024**3, extra_files=None, overwrite: bool = False):
    """Write ``model`` as a Hugging Face checkpoint folder (atomically; ``hf_io.write_checkpoint``)."""
    from jquant.models import hf_io

    return hf_io.write_checkpoint(path, config_to_hf(model.config), to_tensors(model), max_shard_bytes=max_shard_bytes,
                                  extra_files=extra_files, overwrite=overwrite)
