"""Losses: next-token cross-entropy, and distillation losses between a student's and a teacher's logits
(OSTQuant spec §3.5).

Logits are ``[..., V]``: every leading index is one position (token). Both losses are computed in at least
float32 (bf16 / fp16 inputs are upcast; float64 stays float64), stop the gradient into the teacher, and average
over the positions selected by an optional mask ``[...]`` (``True`` / nonzero = counted). With no valid position
the loss is 0.
Teacher entries with probability 0 (logit ``-inf``, e.g. padded vocabulary) contribute 0, as in
``torch.nn.functional.kl_div``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _log_probs(student_logits: jax.Array, teacher_logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(teacher logits, log p, log q)`` in at least float32, over the full vocabulary; the teacher is
    stop-gradient'ed.

    ``p = softmax(teacher)``, ``q = softmax(student)``. Shapes: ``[..., V]`` each.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim < 1:
        raise ValueError(f"student and teacher logits must share one shape [..., V], got {student_logits.shape} "
                         f"and {teacher_logits.shape}.")
    dtype = jnp.promote_types(jnp.promote_types(student_logits.dtype, teacher_logits.dtype), jnp.float32)
    teacher = jax.lax.stop_gradient(teacher_logits.astype(dtype))
    student = student_logits.astype(dtype)
    return teacher, jax.nn.log_softmax(teacher, axis=-1), jax.nn.log_softmax(student, axis=-1)


def _kl_terms(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """Element-wise ``p (log p − log q)``, with 0 where ``p = 0`` (NaN stays NaN). Shapes: ``[..., K]`` -> ``[..., K]``."""
    p = jnp.exp(log_p)
    return jnp.where(p == 0, 0.0, p * (log_p - log_q))


def _masked_mean(per_position: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``per_position [...]`` over positions where ``mask [...]`` holds (all when None); 0 if none do."""
    if mask is None:
        return jnp.mean(per_position)
    mask = jnp.asarray(mask)
    if mask.shape != per_position.shape:
        raise ValueError(f"mask must have the logits' leading shape {per_position.shape}, got {mask.shape}.")
    valid = mask.astype(bool)
    total = jnp.sum(jnp.where(valid, per_position, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(per_position.dtype)


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array,
                  mask: jax.Array | None = None) -> jax.Array:
    """Forward KL from teacher to student, averaged over positions: ``mean_t Σ_i p_ti (log p_ti − log q_ti)``.

    Shapes: logits ``[..., V]``, mask ``[...]`` -> scalar (at least float32). Gradient flows into the student
    only.
    """
    _, log_p, log_q = _log_probs(student_logits, teacher_logits)
    return _masked_mean(jnp.sum(_kl_terms(log_p, log_q), axis=-1), mask)


def kl_top(student_logits: jax.Array, teacher_logits: jax.Array, k: int = 1000,
           mask: jax.Array | None = None) -> jax.Array:
    """OSTQuant's KL-Top loss (code path ``post_attn=True``), averaged over positions.

    Per position ``t``, with ``p = softmax(teacher_t)`` and ``log q = log_softmax(student_t)`` over the full
    vocabulary and ``I`` the indices of the teacher's ``k`` largest logits::

        L_t = Σ_{i ∈ I} p_i (log p_i − log q_i)          (no renormalisation over I)

    Returns ``mean_t L_t`` over valid positions. Shapes: logits ``[..., V]``, mask ``[...]`` -> scalar (at
    least float32). ``k`` must satisfy ``1 <= k <= V``; ``k = V`` is :func:`kl_divergence`. Under ``jax.jit``
    pass ``k`` as a static argument. Gradient flows into the student only.
    """
    vocab = teacher_logits.shape[-1] if teacher_logits.ndim else 0
    if not 1 <= k <= vocab:
        raise ValueError(f"kl_top needs 1 <= k <= vocabulary size {vocab}, got k={k}.")
    teacher, log_p, log_q = _log_probs(student_logits, teacher_logits)
    _, top = jax.lax.top_k(teacher, k)
    terms = _kl_terms(jnp.take_along_axis(log_p, top, axis=-1), jnp.take_along_axis(log_q, top, axis=-1))
    return _masked_mean(jnp.sum(terms, axis=-1), mask)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood; ``logits [B, T, V]``, ``targets [B, T]`` (float32 maths)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
