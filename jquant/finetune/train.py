"""Adapter-only fine-tuning with optax (GSQ-Tuning spec §3.5-3.6).

``finetune`` trains the ``LoRAParam`` variables of a model that ``add_lora`` adapted,
with ``nnx.Optimizer(model, tx, wrt=LoRAParam)``: AdamW on the FP32 adapter masters
(β = (0.9, 0.999), no weight decay, gradient clipping at 0.3 as QLoRA), a cosine
schedule with a 3 % linear warm-up. The loss is the mean next-token cross-entropy over
the masked (response) positions. Adapters with stochastic gradient rounding get fresh
keys every step (``set_rounding_keys``), derived from ``seed`` and the step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jquant.finetune.lora import LoRAParam, adapters, set_rounding_keys
from jquant.module_jit import module_jit
from jquant.progress import progress_bar

Batch = tuple[np.ndarray, np.ndarray]  # tokens [B, T + 1] int, mask [B, T] bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Optimisation settings (QLoRA-style defaults; spec §3.5)."""

    steps: int
    lr: float = 2e-4
    warmup_fraction: float = 0.03
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 0.3
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"FinetuneConfig.steps={self.steps!r} must be a positive int.")
        if not self.lr > 0:
            raise ValueError(f"FinetuneConfig.lr={self.lr!r} must be positive.")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"FinetuneConfig.warmup_fraction={self.warmup_fraction!r} must be in [0, 1).")

    def optimizer(self) -> optax.GradientTransformation:
        warmup = max(1, round(self.warmup_fraction * self.steps)) if self.warmup_fraction else 0
        schedule = optax.warmup_cosine_decay_schedule(0.0, self.lr, warmup, self.steps) if warmup \
            else optax.cosine_decay_schedule(self.lr, self.steps)
        return optax.chain(optax.clip_by_global_norm(self.grad_clip),
                           optax.adamw(schedule, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay))


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean NLL over masked positions: ``logits [B, T, V]``, ``targets``/``mask [B, T]`` (float32 maths)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def batch_loss(model: nnx.Module, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """The fine-tuning loss of one batch (see ``masked_cross_entropy``)."""
    return masked_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], mask)


@module_jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, tokens: jax.Array, mask: jax.Array,
               key: jax.Array) -> jax.Array:
    """One AdamW step on the adapters; returns the batch loss before the update."""
    set_rounding_keys(model, key)
    grad_fn = nnx.value_and_grad(batch_loss, argnums=nnx.DiffState(0, LoRAParam))
    loss, grads = grad_fn(model, tokens, mask)
    optimizer.update(model, grads)
    return loss


@module_jit
def _eval_loss(model: nnx.Module, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    return batch_loss(model, tokens, mask)


def evaluate_loss(model: nnx.Module, tokens: np.ndarray, mask: np.ndarray, batch_size: int) -> float:
    """Masked NLL over all rows (token-weighted), in batches of ``batch_size`` (the tail is dropped)."""
    total, count = 0.0, 0.0
    for i in range(0, len(tokens) - batch_size + 1, batch_size):
        n = float(mask[i:i + batch_size].sum())
        total += float(_eval_loss(model, jnp.asarray(tokens[i:i + batch_size]), jnp.asarray(mask[i:i + batch_size]))) * n
        count += n
    return total / max(count, 1.0)


def finetune(model: nnx.Module, batches: Callable[[int], Batch], config: FinetuneConfig, *,
             evaluate: Callable[[nnx.Module], dict] | None = None, eval_every: int = 0,
             progress: bool = True) -> tuple[nnx.Module, list[dict]]:
    """Trains a copy of ``model``'s adapters; returns it and the history.

    Args:
      model: a model with adapters (``add_lora``); it is not modified.
      batches: ``step -> (tokens [B, T + 1], mask [B, T])``.
      config: optimisation settings.
      evaluate: optional ``model -> dict`` of metrics, run every ``eval_every`` steps
        and after the last.
      progress: show a progress bar.

    Returns:
      ``(tuned model, history)``; history rows hold ``step``, ``loss`` (training batch
      loss), ``seconds`` and the ``evaluate`` metrics where they ran.
    """
    if not adapters(model):
        raise ValueError("finetune: the model has no LoRA adapters; call jquant.finetune.add_lora first.")
    model = nnx.clone(model)
    optimizer = nnx.Optimizer(model, config.optimizer(), wrt=LoRAParam)
    base_key = jax.random.key(config.seed)
    history: list[dict] = []
    start = time.perf_counter()
    with progress_bar(total=config.steps, description="fine-tune", enabled=progress) as bar:
        for step in range(config.steps):
            tokens, mask = batches(step)
            loss = train_step(model, optimizer, jnp.asarray(tokens), jnp.asarray(mask),
                              jax.random.fold_in(base_key, step))
            row = {"step": step + 1, "loss": float(loss), "seconds": time.perf_counter() - start}
            last = step + 1 == config.steps
            if evaluate is not None and (last or (eval_every and (step + 1) % eval_every == 0)):
                row.update(evaluate(model))
            history.append(row)
            bar.update()
    return model, history
