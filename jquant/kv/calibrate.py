"""Calibration data for KV-cache quantizers: the queries, keys and values every attention layer computes.

Attention layers expose a ``capture_kv`` flag (and a ``kv_cache`` config); with it set, a forward pass
sows ``q`` (after RoPE), ``k_pre_rope``, ``k`` (after RoPE) and ``v``, each ``[B, T, heads, D]``.
``capture_kv`` runs the model on calibration tokens and returns them per layer as float32 numpy,
on a copy of the model (the model itself is not modified). Nothing here knows a model family:
layers are found by those attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.calib.data import Calibration, batches
from jquant.module_jit import module_jit
from jquant.sites import path_string

NAMES = ("q", "k_pre_rope", "k", "v")


@dataclasses.dataclass(frozen=True)
class KVSamples:
    """One layer's calibration tensors, float32 ``[N, T, heads, D]``."""

    q: np.ndarray
    k_pre_rope: np.ndarray
    k: np.ndarray
    v: np.ndarray

    def keys(self, pre_rope: bool) -> np.ndarray:
        return self.k_pre_rope if pre_rope else self.k

    def channel_range(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel min and max ``[K * D]`` over all tokens of ``x [N, T, K, D]``."""
        flat = x.reshape(-1, x.shape[2] * x.shape[3])
        return flat.min(0), flat.max(0)


def attention_layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """Attention modules (those with ``capture_kv`` and ``kv_cache``) by path, in model order."""
    return {path_string(p): m for p, m in nnx.iter_modules(model) if hasattr(m, "capture_kv") and hasattr(m, "kv_cache")}


def set_kv_cache(model: nnx.Module, configs: dict[str, object] | Callable[[str], object]) -> None:
    """Set every attention layer's ``kv_cache`` (in place) from a dict by path or a function of the path."""
    layers = attention_layers(model)
    if isinstance(configs, dict):
        unknown = sorted(set(configs) - set(layers))
        if unknown:
            raise ValueError(f"set_kv_cache: no attention layer at {unknown}; layers are {sorted(layers)[:4]}...")
    for path, layer in layers.items():
        layer.kv_cache = configs.get(path, layer.kv_cache) if isinstance(configs, dict) else configs(path)


def capture_kv(model: nnx.Module, tokens: Calibration, *, batch_size: int = 4) -> dict[str, KVSamples]:
    """``tokens`` (the model's inputs with a leading sample axis: ids ``[N, T]`` for an LM) through ``model`` ->
    per attention layer path, its ``KVSamples``."""
    chunks = batches(tokens, batch_size)
    probe = nnx.clone(model)
    layers = attention_layers(probe)
    if not layers:
        raise ValueError("capture_kv: the model has no attention layer with a capture_kv flag.")
    for layer in layers.values():
        layer.capture_kv = True
    forward = module_jit(nnx.capture(lambda m, t: m(t), nnx.Intermediate))
    parts: dict[str, dict[str, list]] = {p: {n: [] for n in NAMES} for p in layers}
    for chunk in chunks:
        _, state = forward(probe, jax.tree.map(jnp.asarray, chunk))
        for path, layer_state in _by_layer(state, layers).items():
            for n in NAMES:
                parts[path][n].append(np.asarray(layer_state[f"kv_{n}"], np.float32))
    return {p: KVSamples(**{n: np.concatenate(v[n]) for n in NAMES}) for p, v in parts.items()}


def attention_errors(model: nnx.Module, tokens: Calibration, *, batch_size: int = 4) -> dict[str, float]:
    """Per attention layer: mean squared error of its output caused by its ``kv_cache`` quantization.

    Each layer compares its (decode-simulated) quantized attention with exact attention on the same
    inputs, over ``tokens`` (model inputs with a leading sample axis); layers without a ``kv_cache`` report 0.
    """
    probe = nnx.clone(model)
    layers = attention_layers(probe)
    for layer in layers.values():
        layer.capture_kv = True
    forward = module_jit(nnx.capture(lambda m, t: m(t), nnx.Intermediate))
    totals = {p: [] for p in layers}
    for chunk in batches(tokens, batch_size):
        _, state = forward(probe, jax.tree.map(jnp.asarray, chunk))
        for path, layer_state in _by_layer(state, layers).items():
            if "kv_attention_error" in layer_state:
                totals[path].append(np.asarray(layer_state["kv_attention_error"], np.float64))
    return {p: float(np.concatenate(v).mean()) if v else 0.0 for p, v in totals.items()}


def _by_layer(state: nnx.State, layers: dict[str, nnx.Module]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {p: {} for p in layers}
    for key, value in nnx.to_flat_state(state):
        path, name = path_string(key[:-1]), str(key[-1])
        if path in out and name.startswith("kv_"):
            v = value.get_value() if hasattr(value, "get_value") else value
            out[path][name] = v[0] if isinstance(v, tuple) else v
    return out
