"""Needle-in-a-haystack retrieval through the model's (possibly quantized) KV cache.

Protocol, per batch of prompts of equal length ``L`` (``jquant.data.needle.make_example``):
the first ``L - decode_tail`` tokens are prefilled in chunks of ``prefill_chunk`` tokens (later
chunks read earlier ones from the cache, quantized where the cache quantizes), the last
``decode_tail`` prompt tokens (the question and a little text before it) are fed one at a time,
then the answer is decoded greedily. So the question really reads the haystack from the cache;
nothing is scored from a full-precision prefill. An answer is correct when every digit is.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.data.needle import NeedleExample
from jquant.progress import progress_bar


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
    """Exact-answer accuracy overall and per depth, per-digit accuracy, and the number of prompts."""

    accuracy: float
    digit_accuracy: float
    by_depth: dict[float, float]
    n: int
    context_len: int


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, tokens, cache):
    return nnx.merge(graphdef, state).step(tokens, cache)


def answer(model: nnx.Module, prompts: np.ndarray, n_answer: int, *, prefill_chunk: int = 512,
           decode_tail: int = 16) -> np.ndarray:
    """Greedy continuation ``[B, n_answer]`` of ``prompts [B, L]`` under the protocol above."""
    prompts = jnp.asarray(prompts, jnp.int32)
    b, length = prompts.shape
    if not 1 <= decode_tail < length:
        raise ValueError(f"answer: decode_tail={decode_tail} must be in [1, prompt length {length}).")
    graphdef, state = nnx.split(model)
    cache = model.init_cache(b, length + n_answer)
    split = length - decode_tail
    for start in range(0, split, prefill_chunk):
        _, cache = _step(graphdef, state, prompts[:, start:min(start + prefill_chunk, split)], cache)
    for t in range(split, length):
        logits, cache = _step(graphdef, state, prompts[:, t:t + 1], cache)
    out = []
    for i in range(n_answer):
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out.append(token)
        if i + 1 < n_answer:
            logits, cache = _step(graphdef, state, token[:, None], cache)
    return np.asarray(jnp.stack(out, axis=1))


def needle_retrieval(model: nnx.Module, examples: list[NeedleExample], *, batch_size: int = 4,
                     prefill_chunk: int = 512, decode_tail: int = 16, progress: bool = False) -> RetrievalResult:
    """Accuracy of ``model`` on ``examples`` (all of one prompt length)."""
    if not examples:
        raise ValueError("needle_retrieval: no examples.")
    lengths = {len(e.prompt) for e in examples}
    if len(lengths) != 1 or len({len(e.answer) for e in examples}) != 1:
        raise ValueError(f"needle_retrieval: prompts (and answers) must share one length, got prompts {sorted(lengths)}.")
    n_answer = len(examples[0].answer)
    correct, digits = [], []
    with progress_bar(total=len(examples), description="retrieval", enabled=progress) as bar:
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            pad = batch_size - len(batch)  # one compile per batch shape: pad with the first example
            prompts = np.stack([e.prompt for e in batch] + [batch[0].prompt] * pad)
            got = answer(model, prompts, n_answer, prefill_chunk=prefill_chunk, decode_tail=decode_tail)[:len(batch)]
            want = np.stack([e.answer for e in batch])
            correct.extend((got == want).all(axis=1).tolist())
            digits.extend((got == want).mean(axis=1).tolist())
            bar.update(len(batch))
    correct_arr = np.asarray(correct, np.float64)
    depths = np.asarray([e.depth for e in examples])
    by_depth = {float(d): float(correct_arr[depths == d].mean()) for d in sorted(set(depths.tolist()))}
    return RetrievalResult(accuracy=float(correct_arr.mean()), digit_accuracy=float(np.mean(digits)),
                           by_depth=by_depth, n=len(examples), context_len=len(examples[0].prompt))
