"""Agreement of a compressed language model with its float original on the same token windows.

Perplexity differences between quantization methods are often a few hundredths; quantization studies therefore
also report how far the compressed model's next-token distribution moved (e.g. Dettmers et al.; the KL
divergence to the original used by OSTQuant-style distillation). For windows ``[N, T]`` and both models'
logits at every position ``t < T - 1`` (the positions perplexity scores)::

    KL   = mean_{i,t} sum_v p_itv (log p_itv - log q_itv)      p = softmax(reference), q = softmax(model)
    top1 = mean_{i,t} [argmax_v p_itv == argmax_v q_itv]

Both are computed in float32 on device per batch and summed in float64 on the host; batches are padded to
``batch_size`` so each model compiles once per window length. The logits functions follow
``jquant.eval.perplexity``: ``fn(tokens int32[B, T]) -> [B, T, V]``, an ``nnx.Module`` or any callable.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.eval.perplexity import LogitsFn
from jquant.module_jit import module_jit
from jquant.progress import progress_bar


@dataclasses.dataclass(frozen=True)
class AgreementResult:
    """``kl``: mean KL(reference || model) per predicted position (nats); ``top1``: fraction of positions whose
    most likely next token is the same; ``n_positions``: positions counted (``N (T - 1)``)."""

    kl: float
    top1: float
    n_positions: int


def _position_terms(logits: jax.Array, reference: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per position ``(KL(p || q), argmax p == argmax q)`` for ``[B, T, V]`` logits, the last position dropped."""
    log_q = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    log_p = jax.nn.log_softmax(reference[:, :-1].astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    kl = jnp.sum(jnp.where(p == 0, 0.0, p * (log_p - log_q)), axis=-1)
    same = jnp.argmax(log_p, axis=-1) == jnp.argmax(log_q, axis=-1)
    return kl, same


def _logits(fn: LogitsFn, tokens: jax.Array) -> jax.Array:
    return fn(tokens)


_module_logits = module_jit(_logits)
_callable_logits = jax.jit(_logits, static_argnums=0)
_terms = jax.jit(_position_terms)


def _run(fn: LogitsFn, tokens: jax.Array) -> jax.Array:
    return (_module_logits if isinstance(fn, nnx.Module) else _callable_logits)(fn, tokens)


def distribution_agreement(model: LogitsFn, reference: LogitsFn, windows: np.ndarray, *, batch_size: int = 8,
                           progress: bool = False) -> AgreementResult:
    """KL divergence from ``reference``'s next-token distribution to ``model``'s, and their top-1 agreement, on
    token ``windows [N, T]`` (module docstring). ``reference`` is usually the float model, ``model`` a quantized
    copy; both see exactly the same windows, batch by batch."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"distribution_agreement: windows must be [N, T] token ids with N >= 1 and T >= 2, got "
                         f"shape {windows.shape}.")
    if not np.issubdtype(windows.dtype, np.integer):
        raise TypeError(f"distribution_agreement: windows must be integer token ids, got dtype {windows.dtype}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"distribution_agreement: batch_size must be a positive integer, got {batch_size!r}.")
    n = len(windows)
    padded = np.concatenate([windows, np.repeat(windows[:1], -n % batch_size, axis=0)]).astype(np.int32)
    kl_sum, same_sum = 0.0, 0
    with progress_bar(total=len(padded) // batch_size, description="agreement", enabled=progress) as bar:
        for start in range(0, len(padded), batch_size):
            tokens = jnp.asarray(padded[start:start + batch_size])
            got, ref = _run(model, tokens), _run(reference, tokens)
            if got.shape != ref.shape:
                raise ValueError(f"distribution_agreement: model and reference logits differ in shape: {got.shape} "
                                 f"vs {ref.shape} (same vocabulary needed).")
            kl, same = _terms(got, ref)
            keep = min(batch_size, n - start)
            kl_sum += float(np.asarray(kl[:keep], np.float64).sum())
            same_sum += int(np.asarray(same[:keep]).sum())
            bar.update()
    count = n * (windows.shape[1] - 1)
    return AgreementResult(kl=kl_sum / count, top1=same_sum / count, n_positions=count)
