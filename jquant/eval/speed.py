"""Prefill and decode latency of a language model with ``step``/``init_cache`` (see ``jquant.generate``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jquant.eval.report import LatencyResult, measure_latency


def prefill_decode_latency(
    model: nnx.Module, *, batch: int = 1, prompt_len: int = 128, iters: int = 10
) -> dict[str, LatencyResult]:
    """Latency of a jitted prefill of ``[batch, prompt_len]`` tokens and of one jitted decode step after it."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, tokens, cache):
        return nnx.merge(graphdef, state).step(tokens, cache)

    @jax.jit
    def decode(state, token, cache):
        return nnx.merge(graphdef, state).step(token, cache)

    tokens = jnp.zeros((batch, prompt_len), jnp.int32)
    cache = model.init_cache(batch, prompt_len + 1)
    _, filled = prefill(state, tokens, cache)
    return {
        "prefill": measure_latency(prefill, state, tokens, cache, iters=iters),
        "decode_step": measure_latency(decode, state, tokens[:, :1], filled, iters=iters),
    }
