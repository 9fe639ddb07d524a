"""Next-token log-likelihood scoring and perplexity.

Every evaluation takes a *logits function*: any callable
``logits_fn(tokens: int32[B, T]) -> float[B, T, V]`` (an ``nnx.Module`` such as
the jquant Llama, or a plain function). It is compiled once per input shape:
``nnx.jit`` for modules, ``jax.jit`` (callable as a static argument) otherwise.
Batches are padded to a fixed ``batch_size``, so one evaluation compiles once.
Plain callables are hashed by identity; arrays they close over become
compile-time constants, so pass large models as ``nnx.Module``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import PreTrainedTokenizerBase

from jquant.data.corpus import load_split
from jquant.data.windows import token_windows
from jquant.module_jit import module_jit
from jquant.progress import progress_bar

LogitsFn = Callable[[jax.Array], jax.Array]


def _next_token_logprobs(logits_fn: LogitsFn, tokens: jax.Array) -> jax.Array:
    """``log p(tokens[:, t+1] | tokens[:, :t+1])`` in float32: ``[B, T-1]``."""
    logits = logits_fn(tokens)[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


_jit_module = module_jit(_next_token_logprobs)
_jit_callable = jax.jit(_next_token_logprobs, static_argnums=0)


def target_logprobs(logits_fn: LogitsFn, tokens: np.ndarray, *, batch_size: int = 8,
                    progress: bool = False, desc: str = "scoring") -> np.ndarray:
    """Log-probability of every next token: float32 ``[N, T-1]`` for ``tokens [N, T]``.

    Entry ``[i, t]`` is ``log p(tokens[i, t+1] | tokens[i, :t+1])``. Rows are run
    in batches of exactly ``batch_size`` (the last batch is padded with copies of
    row 0 whose results are discarded), so there is one compile per ``T``.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [N, T] with T >= 2, got shape {tokens.shape}.")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    n = len(tokens)
    padded = np.concatenate([tokens, np.repeat(tokens[:1], -n % batch_size, axis=0)])
    padded = padded.astype(np.int32)
    score = _jit_module if isinstance(logits_fn, nnx.Module) else _jit_callable
    out = []
    with progress_bar(total=len(padded) // batch_size, description=desc, enabled=progress) as bar:
        for start in range(0, len(padded), batch_size):
            out.append(np.asarray(score(logits_fn, jnp.asarray(padded[start:start + batch_size]))))
            bar.update()
    return np.concatenate(out)[:n] if out else np.zeros((0, tokens.shape[1] - 1), np.float32)


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``; ``nll`` is the mean negative log-likelihood per predicted token."""

    ppl: float
    nll: float
    n_tokens: int


def perplexity(model: LogitsFn, windows: np.ndarray, *, batch_size: int = 8,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on token ``windows [N, T]``.

    Each window predicts its tokens ``1..T-1`` from the preceding ones, so
    ``n_tokens = N * (T - 1)``. Log-softmax runs in float32 on device; the sum
    is accumulated in float64 on the host.
    """
    if len(windows) == 0:
        raise ValueError("windows is empty; pass at least one [T] window.")
    logp = target_logprobs(model, windows, batch_size=batch_size, progress=progress,
                           desc="perplexity")
    nll = -float(logp.astype(np.float64).mean())
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=int(logp.size))


def split_perplexity(model: LogitsFn, tokenizer: PreTrainedTokenizerBase, split: str = "validation",
                     seq_len: int = 256, max_windows: int | None = None, *, batch_size: int = 8,
                     progress: bool = True) -> PerplexityResult:
    """Perplexity on non-overlapping ``seq_len`` windows of a bundled corpus split."""
    windows = token_windows(load_split(split), tokenizer, seq_len, max_windows=max_windows)
    return perplexity(model, windows, batch_size=batch_size, progress=progress)
