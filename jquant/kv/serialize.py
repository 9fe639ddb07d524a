"""KV-cache configurations as JSON, so a checkpoint restores how every attention layer caches keys and values.

``configs_to_json(model)`` -> ``{layer path: {config fields, "smoothing": bool}}`` for the layers with a
``kv_cache``; ``restore_configs(model, data)`` sets them on an (abstract) model and gives layers that
had WKVQuant smoothing placeholder ``KVSmoothing`` parameters of the right shapes, which the
checkpoint's arrays then fill.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jquant.formats import get_format
from jquant.kv.cache import KVCacheConfig
from jquant.kv.calibrate import attention_layers, set_kv_cache
from jquant.kv.quantizer import FormatKV, KVQuantizer
from jquant.kv.smoothing import KVSmoothing


def _quantizer_to_dict(q) -> dict | None:
    if q is None:
        return None
    if isinstance(q, FormatKV):
        return {"type": "format", "format": q.format.name}
    d = dataclasses.asdict(q)
    return {"type": "minmax", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}}


def _quantizer_from_dict(d: dict | None):
    if d is None:
        return None
    d = dict(d)
    kind = d.pop("type")
    if kind == "format":
        return FormatKV(get_format(d["format"]))
    if kind != "minmax":
        raise ValueError(f"kv_cache.json: unknown quantizer type {kind!r}.")
    return KVQuantizer(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def config_to_dict(cfg: KVCacheConfig) -> dict:
    return {"key": _quantizer_to_dict(cfg.key), "value": _quantizer_to_dict(cfg.value), "window": cfg.window,
            "sink": cfg.sink, "pre_rope": cfg.pre_rope, "past_only": cfg.past_only}


def config_from_dict(d: dict) -> KVCacheConfig:
    return KVCacheConfig(key=_quantizer_from_dict(d["key"]), value=_quantizer_from_dict(d["value"]),
                         window=d["window"], sink=d["sink"], pre_rope=d["pre_rope"], past_only=d["past_only"])


def configs_to_json(model: nnx.Module) -> dict:
    """Every attention layer's KV-cache config (and whether it has smoothing), by path; {} when none has one."""
    return {path: {**config_to_dict(layer.kv_cache), "smoothing": layer.kv_smoothing is not None}
            for path, layer in attention_layers(model).items() if layer.kv_cache is not None}


def restore_configs(model: nnx.Module, data: dict) -> None:
    """Set the saved configs on ``model`` (in place), with placeholder smoothing parameters where saved."""
    layers = attention_layers(model)
    unknown = sorted(set(data) - set(layers))
    if unknown:
        raise ValueError(f"kv_cache.json names {unknown[0]!r}, which is not an attention layer of this model.")
    set_kv_cache(model, {path: config_from_dict(d) for path, d in data.items()})
    for path, d in data.items():
        layer = layers[path]
        if d.get("smoothing"):
            c = layer.cfg.num_kv_heads * layer.cfg.head_dim
            layer.kv_smoothing = KVSmoothing(*(jax.ShapeDtypeStruct((c,), jnp.float32) for _ in range(4)))
