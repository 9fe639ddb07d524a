"""Small Llama models with planted activation outliers or peaked attention, for tests of transforms, activation
and KV quantization.

Random-initialised models have no outlier channels, so quantizing their activations
is too easy to tell methods apart; these models get a few embedding columns scaled up
(the residual-stream outliers rotations are meant to spread). ``redrawn_model`` does the same redraw for a model
of any family and lets a test plant its own outliers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.models import llama
from jquant.transforms.equivalence import merge_weights, split_weights

OUTLIERS = (3, 17, 40)


def outlier_model(cfg: llama.LlamaConfig, seed: int, *, outliers: tuple[int, ...] = OUTLIERS, factor: float = 20.0,
                  random_gains: bool = True, head_scale: float = 1.0) -> nnx.Module:
    """A ``Llama`` with kernels ~ N(0, 1/in), embeddings ~ N(0, 1) whose columns ``outliers`` are × ``factor``.

    RMSNorm gains are ``exp(0.3 N(0, 1))`` (``random_gains``) or 1, biases 0, and ``lm_head`` is
    multiplied by ``head_scale`` (larger: more peaked logits). Drawn with numpy in
    parameter order from ``seed`` straight into the abstract model (no per-parameter
    JAX compiles).
    """
    abstract = llama.abstract_model(cfg)
    graphdef, weights, rest = split_weights(abstract)
    rng = np.random.default_rng(seed)
    new = {}
    for path, value in weights.items():
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "kernel":
            a = rng.standard_normal(value.shape) / np.sqrt(value.shape[0])
        elif leaf == "embedding":
            a = rng.standard_normal(value.shape)
            a[:, list(outliers)] *= factor
        elif leaf == "weight":
            a = np.exp(0.3 * rng.standard_normal(value.shape)) if random_gains else np.ones(value.shape)
        else:
            a = np.zeros(value.shape)
        new[path] = jnp.asarray(a * (head_scale if path == "lm_head/kernel" else 1.0), value.dtype)
    return merge_weights(graphdef, new, rest, abstract)


def peaked_random_llama(cfg: llama.LlamaConfig, seed: int) -> llama.Llama:
    """Every parameter random (kernels ~ N(0, 4/in), embeddings ~ N(0, 1), gains exp(0.3 N)) so attention is peaked."""
    abstract = llama.abstract_model(cfg)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(params):
        shape, leaf = var.shape, str(path[-1])
        if leaf == "kernel":
            a = 2.0 * rng.standard_normal(shape) / np.sqrt(shape[0])
        elif leaf == "weight":
            a = np.exp(0.3 * rng.standard_normal(shape))
        else:
            a = rng.standard_normal(shape)
        flat.append((path, var.replace(jnp.asarray(a, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


# Tests' own compiled forwards skip LLVM's optimisation passes: compiling dominates tiny models on CPU. Use them for
# float comparisons; skipped optimisations change float32 rounding slightly, which can flip low-bit codes.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def redrawn_model(model: nnx.Module, seed: int,
                  adjust: Callable[[str, np.ndarray, np.random.Generator], np.ndarray] | None = None) -> nnx.Module:
    """A copy of ``model`` with every ``kernel`` redrawn ~ N(0, 1/in) and every ``embedding`` ~ N(0, 1) (numpy, in
    parameter order, from ``seed``), then ``adjust(path, value, rng)`` applied to every parameter (float64 in, the
    new value out): where a test plants its outliers. Other parameters keep their values unless adjusted."""
    graphdef, weights, rest = split_weights(model)
    rng = np.random.default_rng(seed)
    new = {}
    for path, v in weights.items():
        a = np.asarray(v, np.float64).copy()
        if path.endswith("kernel"):
            a = rng.standard_normal(a.shape) / np.sqrt(a.shape[0])
        elif path.endswith("embedding"):
            a = rng.standard_normal(a.shape)
        if adjust is not None:
            a = adjust(path, a, rng)
        new[path] = jnp.asarray(a, v.dtype)
    return merge_weights(graphdef, new, rest, model)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _step(graphdef, state, tokens, cache):
    return nnx.merge(graphdef, state).step(tokens, cache)


def fast_logits(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """``model(tokens)``, compiled once per model structure with ``FAST_COMPILE``."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, tokens)


def fast_cached_logits(model: nnx.Module, tokens: jax.Array, chunks: tuple[int, ...],
                       capacity: int | None = None) -> tuple[jax.Array, object]:
    """``model.step`` over an empty cache (``capacity``: default ``T + 3``), ``tokens [B, T]`` fed in pieces of
    the ``chunks`` lengths -> (logits ``[B, T, V]``, final cache)."""
    graphdef, state = nnx.split(model)
    cache = model.init_cache(tokens.shape[0], capacity or tokens.shape[1] + 3)
    out, start = [], 0
    for n in chunks:
        logits, cache = _step(graphdef, state, tokens[:, start:start + n], cache)
        out.append(logits)
        start += n
    if start != tokens.shape[1] or int(cache.length) != start:
        raise ValueError(f"chunks {chunks} do not cover the {tokens.shape[1]} tokens.")
    return jnp.concatenate(out, axis=1), cache
