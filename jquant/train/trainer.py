"""Next-token training of token language models, on ``jquant.train.loop.fit``.

Batches are windows of ``seq_len + 1`` tokens cut at offsets drawn from
``numpy.random.default_rng([seed, step])``, so a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.losses import cross_entropy as cross_entropy
from jquant.module_jit import module_jit
from jquant.train.loop import RESUMABLE as RESUMABLE
from jquant.train.loop import LoopConfig, TrainResult, fit
from jquant.train.loop import plot_history as plot_history


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(LoopConfig):
    """Optimisation settings (``LoopConfig``) plus the token batches: ``batch_size`` windows of ``seq_len``
    tokens per update, ``eval_windows`` validation windows."""

    batch_size: int = 16
    seq_len: int = 256
    eval_windows: int = 32

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
        super().__post_init__()


def _token_loss(model, tokens, key):
    del key  # next-token prediction draws nothing
    if hasattr(model, "training_loss"):  # models with auxiliary losses (MoE load balancing) add them themselves
        return model.training_loss(tokens[:, :-1], tokens[:, 1:])
    return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])


@module_jit
def _eval_loss(model, tokens):
    return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])


def _batch(stream: np.ndarray, cfg: TrainConfig, step: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(stream) - cfg.seq_len - 1, size=cfg.batch_size)
    return stream[starts[:, None] + np.arange(cfg.seq_len + 1)]


def _validation_loss(model, windows: np.ndarray, batch_size: int) -> float:
    losses = [float(_eval_loss(model, windows[i : i + batch_size])) for i in range(0, len(windows) - batch_size + 1, batch_size)]
    return float(np.mean(losses))


def train(
    model: nnx.Module,
    train_stream: np.ndarray,
    val_stream: np.ndarray,
    cfg: TrainConfig,
    workdir: str | Path,
    *,
    progress: bool = True,
    sample_batch: Callable[[int], np.ndarray] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_stream`` (int32 tokens); checkpoints and history go to ``workdir``.

    Batches are random windows of ``train_stream`` drawn from ``default_rng([seed, step])``,
    or ``sample_batch(step) -> [batch_size, seq_len + 1]`` tokens when given (it must be a
    deterministic function of the step, so a resumed run sees the same batches).

    If ``workdir/checkpoints`` holds a checkpoint, training resumes from its
    step (model, optimizer state and history). A non-finite loss stops
    training with an error before the bad update is checkpointed.
    """
    if len(train_stream) <= cfg.seq_len + 1:
        raise ValueError(f"train_stream has {len(train_stream)} tokens; need more than seq_len+1={cfg.seq_len + 1}.")
    n_val = min(cfg.eval_windows, (len(val_stream) - 1) // (cfg.seq_len + 1))
    if n_val < 1:
        raise ValueError(f"val_stream has {len(val_stream)} tokens; need at least seq_len+1={cfg.seq_len + 1}.")
    val_windows = val_stream[: n_val * (cfg.seq_len + 1)].reshape(n_val, cfg.seq_len + 1)
    eval_batch = min(cfg.batch_size, n_val)

    def batch(step: int) -> jnp.ndarray:
        return jnp.asarray(_batch(train_stream, cfg, step) if sample_batch is None else sample_batch(step))

    return fit(model, cfg, workdir, loss=_token_loss, sample_batch=batch,
               validation=lambda m: _validation_loss(m, val_windows, eval_batch), progress=progress)
