"""Autoregressive generation for any model with ``step(tokens, cache)`` and ``init_cache(batch, capacity)``.

The model is split into a graph definition (static) and a state pytree; the
prefill and a ``lax.scan`` over decode steps form one ``jax.jit``-compiled pure
function of ``(state, prompt, cache, key)``, compiled once per prompt shape,
length and sampling setting and reused across calls.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` is greedy decoding; otherwise sample, optionally from the ``top_k`` logits."""

    temperature: float = 0.0
    top_k: int | None = None

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {self.temperature}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"SamplingConfig.top_k must be a positive integer or None, got {self.top_k}.")


def max_context(model: nnx.Module) -> int | None:
    """The longest sequence ``model`` is built for (its config's ``max_position_embeddings``; None when unbounded)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _pick(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """``logits [B, V]`` -> next tokens ``[B]``."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k is not None:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    model: nnx.Module,
    prompt: jax.Array | np.ndarray,
    max_new_tokens: int,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    eos_token_id: int | None = None,
) -> np.ndarray:
    """Continue ``prompt [B, T]`` by ``max_new_tokens`` tokens -> ``[B, T + max_new_tokens]`` int32.

    Sequences that emitted ``eos_token_id`` keep emitting it. Sampling
    (``temperature > 0``) needs an explicit PRNG ``key``.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"generate: prompt must be a non-empty [batch, tokens] array, got shape {prompt.shape}.")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}.")
    if sampling.temperature > 0 and key is None:
        raise ValueError("generate: sampling with temperature > 0 needs a PRNG key, e.g. key=jax.random.key(0).")
    vocab = getattr(model.config, "vocab_size", None)
    if sampling.top_k is not None and vocab is not None and sampling.top_k > vocab:
        raise ValueError(f"generate: top_k={sampling.top_k} exceeds the model's vocabulary of {vocab} tokens; "
                         f"pass a top_k <= {vocab} (or None for no top-k cut).")
    context = max_context(model)
    if context is not None and prompt.shape[1] + max_new_tokens > context:
        raise ValueError(f"generate: the prompt ({prompt.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's context of {context} tokens; shorten the prompt or generate fewer tokens.")
    key = jax.random.key(0) if key is None else key
    if max_new_tokens == 0:
        return np.asarray(prompt)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
    new = _generate(graphdef, state, prompt, cache, key, sampling=sampling, eos_token_id=eos_token_id,
                    max_new_tokens=max_new_tokens)
    return np.asarray(jnp.concatenate([prompt, new], axis=1))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_token_id", "max_new_tokens"))
def _generate(graphdef, state, prompt, cache, key, *, sampling, eos_token_id, max_new_tokens):
    """Prefill, then ``max_new_tokens - 1`` decode steps in a ``lax.scan``; compiled once per shape and setting."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.step(prompt, cache)
    key, sub = jax.random.split(key)
    first = _pick(logits[:, -1], sub, sampling)
    done = jnp.zeros((prompt.shape[0],), bool)

    def body(carry, _):
        token, cache, key, done = carry
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        logits, cache = model.step(token[:, None], cache)
        key, sub = jax.random.split(key)
        nxt = _pick(logits[:, -1], sub, sampling)
        if eos_token_id is not None:
            nxt = jnp.where(done, eos_token_id, nxt)
        return (nxt, cache, key, done), token

    (last, _, _, _), tokens = jax.lax.scan(body, (first, cache, key, done), None, length=max_new_tokens - 1)
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)
