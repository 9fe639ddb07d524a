"""LoRA adapters on a model's linear sites (QLoRA / GSQ-Tuning layer structure, spec §3.2).

``add_lora(model, LoRAConfig(...), key=key)`` returns a copy of ``model`` in which
every targeted linear site carries a ``LoRA`` module: FP32 masters ``A [in, r]``
(Kaiming-uniform, PEFT's default bound ``1/sqrt(in)``) and ``B [r, out]`` (zeros), so
the adapted model starts equal to the base. The site's kernel stays frozen (a float
array or a ``QArray``, e.g. NF4 after ``jq.quantize``); the forward and backward GEMMs
follow ``LoRAConfig.arithmetic`` (``jquant.ops.lora_linear``; an ``FP8Arithmetic``
goes through ``jquant.finetune.fp8.fp8_lora_linear``). Only ``LoRAParam`` variables
are trainable: ``nnx.Optimizer(model, tx, wrt=LoRAParam)``.

``merge_lora`` folds the adapters into dense kernels ``W = deq(W0) + s A B``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jquant import ops
from jquant.finetune.fp8 import FP8Arithmetic, fp8_lora_linear
from jquant.formats import QArray, dequantize
from jquant.ops.lora import LoRAArithmetic
from jquant.recipes import DEFAULT_KEEP_FLOAT
from jquant.sites import Site, find_sites


class LoRAParam(nnx.Param):
    """A trainable adapter weight (the only parameters fine-tuning updates)."""


class LoRARoundingKey(nnx.Variable):
    """The PRNG key of stochastic gradient rounding; ``set_rounding_keys`` refreshes it every step."""


class LoRA(nnx.Module):
    """``y = x W0 + s (x A) B + bias`` with frozen ``W0``; ``s = alpha / rank``."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
                 arithmetic: LoRAArithmetic, key: jax.Array):
        bound = 1.0 / math.sqrt(in_features)
        self.a = LoRAParam(jax.random.uniform(key, (in_features, rank), jnp.float32, -bound, bound))
        self.b = LoRAParam(jnp.zeros((rank, out_features), jnp.float32))
        self.scale = alpha / rank
        self.arithmetic = arithmetic
        self.rounding_key = LoRARoundingKey(jax.random.key(0)) if arithmetic.needs_key else None

    def __call__(self, x: jax.Array, kernel: jax.Array | QArray, bias: jax.Array | None) -> jax.Array:
        key = None if self.rounding_key is None else self.rounding_key.get_value()
        linear = fp8_lora_linear if isinstance(self.arithmetic, FP8Arithmetic) else ops.lora_linear
        return linear(x, kernel, self.a.get_value(), self.b.get_value(),
                      scale=self.scale, arithmetic=self.arithmetic, bias=bias, key=key)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Which linear sites get adapters and how they compute.

    Attributes:
      rank: r (spec default 64).
      alpha: the scale is ``alpha / rank`` (spec default 16).
      targets: regexes over site paths (``layers/3/self_attn/q_proj``); a linear site
        gets an adapter if one matches (``re.fullmatch``) and no ``exclude`` pattern does.
      exclude: patterns never adapted (default: embeddings and the output head).
      arithmetic: the GEMM arithmetic of every adapted linear (``LoRAArithmetic``, or its
        ``FP8Arithmetic`` subclass for the per-tensor E4M3 / E5M2 FP8 baseline).
    """

    rank: int = 64
    alpha: float = 16.0
    targets: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    arithmetic: LoRAArithmetic = LoRAArithmetic()

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig: rank={self.rank!r} must be a positive int (QLoRA uses 64).")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig: alpha={self.alpha!r} must be positive (QLoRA uses 16).")
        if isinstance(self.targets, str) or isinstance(self.exclude, str):
            raise TypeError("LoRAConfig: targets and exclude are tuples of regexes, e.g. targets=(r'.*q_proj',).")
        for pattern in (*self.targets, *self.exclude):
            re.compile(pattern)
        if not isinstance(self.arithmetic, LoRAArithmetic):
            raise TypeError(f"LoRAConfig: arithmetic must be a LoRAArithmetic, got {self.arithmetic!r}.")


def lora_sites(model: nnx.Module, config: LoRAConfig) -> list[Site]:
    """The linear sites ``config`` adapts; raises if a target pattern matches no linear site."""
    linear = [s for s in find_sites(model) if s.spec.kind == "linear"]
    chosen = [s for s in linear if any(re.fullmatch(t, s.path) for t in config.targets)
              and not any(re.fullmatch(e, s.path) for e in config.exclude)]
    for pattern in config.targets:
        if not any(re.fullmatch(pattern, s.path) for s in chosen):
            raise ValueError(
                f"LoRAConfig.targets: {pattern!r} matches no adaptable linear site (after exclude="
                f"{config.exclude}). Linear sites: {[s.path for s in linear]}.")
    return chosen


def add_lora(model: nnx.Module, config: LoRAConfig, *, key: jax.Array) -> nnx.Module:
    """A copy of ``model`` with a ``LoRA`` module on every site ``config`` targets (the input is not modified)."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"add_lora: config must be a LoRAConfig, got {type(config).__name__}.")
    adapted = nnx.clone(model)
    sites = lora_sites(adapted, config)
    for i, site in enumerate(sites):
        module = site.module
        if getattr(module, "lora", None) is not None:
            raise ValueError(f"add_lora: {site.path} already has an adapter; merge_lora first or start from the base.")
        if getattr(module, "activation", None) is not None:
            raise ValueError(f"add_lora: {site.path} quantizes its inputs ({module.activation.name}); LoRA computes "
                             "through its own arithmetic. Quantize the base with a weight-only recipe.")
        in_features, out_features = tuple(site.weight.get_value().shape)
        _check_groups(site.path, config, in_features, out_features)
        module.lora = LoRA(in_features, out_features, rank=config.rank, alpha=config.alpha,
                           arithmetic=config.arithmetic, key=jax.random.fold_in(key, i))
    return adapted


def _check_groups(path: str, config: LoRAConfig, in_features: int, out_features: int) -> None:
    """Operand groups must tile every feature reduction axis (in, out, rank); the token axis is zero-padded."""
    group = getattr(config.arithmetic.operands, "group_size", None)
    if group is None:
        return
    for what, n in (("in_features", in_features), ("out_features", out_features), ("rank", config.rank)):
        if n % group:
            raise ValueError(
                f"add_lora: {path}: {what}={n} is not a multiple of the operand group size {group} "
                f"({config.arithmetic.operands.name}); every GEMM reduces over in, out and rank. Fix: use a "
                f"group size that divides {in_features}, {out_features} and the rank, or a rank that is a "
                f"multiple of {group}.")


def adapters(model: nnx.Module) -> list[tuple[str, LoRA]]:
    """``(site path, LoRA module)`` for every adapted site, in graph order."""
    return [(s.path, s.module.lora) for s in find_sites(model) if getattr(s.module, "lora", None) is not None]


def set_rounding_keys(model: nnx.Module, key: jax.Array) -> None:
    """Gives every adapter with stochastic gradient rounding its own key derived from ``key`` (in place)."""
    for i, (_, lora) in enumerate(adapters(model)):
        if lora.rounding_key is not None:
            lora.rounding_key.set_value(jax.random.fold_in(key, i))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with dense kernels ``deq(W0) + s A B`` (in the kernel's dtype) and no adapters.

    Sites whose base was quantized become float; the model's ``quantization`` report is updated
    (those paths join the recipe's ``keep_float``), so ``jquant.save`` / ``load`` round-trip it.
    """
    merged = nnx.clone(model)
    if not adapters(merged):
        raise ValueError("merge_lora: the model has no LoRA adapters (add_lora adds them).")
    dequantized = []
    for site in find_sites(merged):
        lora = getattr(site.module, "lora", None)
        if lora is None:
            continue
        w0 = site.weight.get_value()
        if isinstance(w0, QArray):
            dequantized.append(site.path)
        base = dequantize(w0, jnp.float32) if isinstance(w0, QArray) else w0.astype(jnp.float32)
        dtype = jnp.dtype(w0.dtype) if isinstance(w0, QArray) else w0.dtype
        delta = lora.scale * jnp.dot(lora.a.get_value(), lora.b.get_value(), precision=jax.lax.Precision.HIGHEST)
        site.weight.set_value((base + delta).astype(dtype))
        site.module.lora = None
    report = getattr(merged, "quantization", None)
    if report is not None and dequantized:
        merged.quantization = _without_sites(report, dequantized, merged)
    return merged


def _without_sites(report, paths: list[str], model: nnx.Module):
    """``report`` with ``paths`` kept in float; None when no quantized site remains."""
    still = [s.path for s in find_sites(model) if isinstance(s.weight.get_value(), QArray)]
    if not still:
        return None
    recipe = dataclasses.replace(report.recipe, keep_float=report.recipe.keep_float + tuple(map(re.escape, paths)))
    return dataclasses.replace(report, recipe=recipe, sites=tuple(x for x in report.sites if x[0] not in paths),
                               unquantized=report.unquantized + tuple(paths))
