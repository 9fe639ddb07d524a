"""The training loop every jquant model trains with: optax AdamW, warm-up + cosine decay, EMA, resumable orbax.

``fit(model, cfg, workdir, loss=..., sample_batch=..., validation=...)`` trains any NNX model on any batch
pytree: ``sample_batch(step)`` gives the step's batch (a deterministic function of the step, so a resumed
run sees exactly the batches an uninterrupted one would), ``loss(model, batch, key)`` the scalar loss,
with ``key = fold_in(key(seed), step)`` for the randomness a loss draws (a diffusion loss's noise and
timesteps). Token language models train through ``jquant.train.trainer.train``, which builds these.

With ``ema_decay`` set, an exponential moving average of the parameters
``ema <- d * ema + (1 - d) * params`` (after each update) is kept, checkpointed, used for validation, and
written into the model at the end (diffusion models sample from their EMA weights).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx

from jquant.atomic import prepare_work_folder
from jquant.module_jit import module_jit
from jquant.progress import progress_bar
from jquant.sharding import restore_uncommitted

RESUMABLE = ("checkpoints", "history.jsonl")
"""Entries of a work folder that mark an earlier run ``fit`` resumes."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Optimisation settings. ``steps`` counts optimizer updates; ``ema_decay`` (in [0, 1)) keeps an EMA."""

    steps: int
    peak_lr: float = 2e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 200
    ema_decay: float | None = None

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"{type(self).__name__}.warmup_steps must be in [0, steps={self.steps}), got "
                             f"{self.warmup_steps}.")
        if self.peak_lr <= 0:
            raise ValueError(f"{type(self).__name__}.peak_lr must be positive, got {self.peak_lr}.")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"{type(self).__name__}.ema_decay must be in [0, 1) or None, got {self.ema_decay}.")

    def schedule(self) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=self.peak_lr,
            warmup_steps=self.warmup_steps,
            decay_steps=self.steps,
            end_value=self.peak_lr * self.final_lr_fraction,
        )

    def optimizer(self) -> optax.GradientTransformation:
        return optax.chain(
            optax.clip_by_global_norm(self.grad_clip),
            optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, weight_decay=self.weight_decay, mask=_decay_mask),
        )


def _decay_mask(params):
    """Weight decay on matrices only (not on norm weights or biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


@dataclasses.dataclass
class TrainResult:
    """The trained model (its EMA weights when kept), the loss history and timing."""

    model: nnx.Module
    history: list[dict]
    seconds: float
    final_val_loss: float

    @property
    def final_val_ppl(self) -> float:
        return math.exp(self.final_val_loss)


def fit(
    model: nnx.Module,
    cfg: LoopConfig,
    workdir: str | Path,
    *,
    loss: Callable[[nnx.Module, Any, jax.Array], jax.Array],
    sample_batch: Callable[[int], Any],
    validation: Callable[[nnx.Module], float],
    progress: bool = True,
    description: str = "train",
) -> TrainResult:
    """Train ``model`` in place; checkpoints and ``history.jsonl`` go to ``workdir`` (see the module docstring).

    ``validation(model) -> float`` runs every ``eval_every`` steps and at the end (on the EMA weights when
    kept). If ``workdir/checkpoints`` holds a checkpoint, training resumes from its step (model, optimizer
    state, EMA and history). A non-finite loss stops training with an error before the bad update is
    checkpointed.
    """
    workdir = prepare_work_folder(workdir, argument="workdir", resumable=RESUMABLE)
    optimizer = nnx.Optimizer(model, cfg.optimizer(), wrt=nnx.Param)
    ema = None if cfg.ema_decay is None else jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))

    @module_jit
    def train_step(model, optimizer, batch, key):
        value, grads = nnx.value_and_grad(lambda m: loss(m, batch, key))(model)
        optimizer.update(model, grads)
        return value

    @jax.jit
    def ema_step(ema, params):
        return jax.tree.map(lambda e, p: cfg.ema_decay * e + (1.0 - cfg.ema_decay) * p, ema, params)

    def evaluated_model() -> nnx.Module:
        if ema is None:
            return model
        copy = nnx.clone(model)  # a copy: updating it must not touch the parameters being trained
        nnx.update(copy, ema)
        return copy

    manager = ocp.CheckpointManager(workdir / "checkpoints",
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    history: list[dict] = []
    start_step = 0
    if manager.latest_step() is not None:
        start_step = manager.latest_step()
        live = _state(model, optimizer, ema)
        restored = restore_uncommitted(lambda: manager.restore(start_step, args=ocp.args.StandardRestore(live)),
                                       like=live)
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
        ema = restored.get("ema")
        history = [h for h in _read_history(workdir) if h["step"] <= start_step]

    t0 = time.perf_counter()
    elapsed_before = history[-1]["seconds"] if history else 0.0
    schedule = cfg.schedule()
    base_key = jax.random.key(cfg.seed)
    with progress_bar(total=cfg.steps, initial=start_step, description=description, enabled=progress) as bar:
        for step in range(start_step, cfg.steps):
            value = float(train_step(model, optimizer, sample_batch(step), jax.random.fold_in(base_key, step)))
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss became {value} at step {step}; lower {type(cfg).__name__}.peak_lr or raise "
                    f"warmup_steps. The last good checkpoint is at step {manager.latest_step()}.")
            if ema is not None:
                ema = ema_step(ema, nnx.state(model, nnx.Param))
            record = {"step": step + 1, "loss": value, "lr": float(schedule(step)),
                      "seconds": elapsed_before + time.perf_counter() - t0}
            done = step + 1 == cfg.steps
            if (step + 1) % cfg.eval_every == 0 or done:
                record["val_loss"] = float(validation(evaluated_model()))
            history.append(record)
            bar.update(1, loss=value, val=record.get("val_loss"))
            if (step + 1) % cfg.checkpoint_every == 0 or done:
                manager.save(step + 1, args=ocp.args.StandardSave(_state(model, optimizer, ema)))
                manager.wait_until_finished()
                _write_history(workdir, history)
    manager.close()
    _write_history(workdir, history)
    if ema is not None:
        nnx.update(model, ema)
    final_val = next(h["val_loss"] for h in reversed(history) if "val_loss" in h)
    return TrainResult(model=model, history=history, seconds=history[-1]["seconds"], final_val_loss=final_val)


def _state(model: nnx.Module, optimizer: nnx.Optimizer, ema) -> dict:
    state = {"model": nnx.state(model, nnx.Param), "optimizer": nnx.state(optimizer)}
    if ema is not None:
        state["ema"] = ema
    return state


def _write_history(workdir: Path, history: list[dict]) -> None:
    tmp = workdir / "history.jsonl.tmp"
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    tmp.replace(workdir / "history.jsonl")


def _read_history(workdir: Path) -> list[dict]:
    path = workdir / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_history(history: list[dict], path: str | Path, title: str = "training",
                 ylabel: str = "cross-entropy (nats/token)") -> Path:
    """Write a loss-curve PNG (train loss per step, validation loss at eval steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [h["loss"] for h in history], lw=0.8, label="train loss")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
