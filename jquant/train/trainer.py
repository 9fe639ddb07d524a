"""Next-token training with optax AdamW, warm-up + cosine decay, and resumable orbax checkpoints.

Batches are windows of ``seq_len + 1`` tokens cut at offsets drawn from
``numpy.random.default_rng([seed, step])``, so a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from jquant.atomic import prepare_work_folder
from jquant.losses import cross_entropy as cross_entropy
from jquant.progress import progress_bar


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings. ``steps`` counts optimizer updates of ``batch_size`` windows."""

    steps: int
    batch_size: int = 16
    seq_len: int = 256
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
    eval_windows: int = 32

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "eval_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"TrainConfig.warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}.")
        if self.peak_lr <= 0:
            raise ValueError(f"TrainConfig.peak_lr must be positive, got {self.peak_lr}.")

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


RESUMABLE = ("checkpoints", "history.jsonl")
"""Entries of a work folder that mark an earlier run ``train`` resumes."""


def _decay_mask(params):
    """Weight decay on matrices only (not on norm weights or biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


@dataclasses.dataclass
class TrainResult:
    """The trained model, the loss history and timing."""

    model: nnx.Module
    history: list[dict]
    seconds: float
    final_val_loss: float

    @property
    def final_val_ppl(self) -> float:
        return math.exp(self.final_val_loss)


@nnx.jit
def _train_step(model, optimizer, tokens):
    def loss_fn(m):
        if hasattr(m, "training_loss"):  # models with auxiliary losses (MoE load balancing) add them themselves
            return m.training_loss(tokens[:, :-1], tokens[:, 1:])
        return cross_entropy(m(tokens[:, :-1]), tokens[:, 1:])

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
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
    workdir = prepare_work_folder(workdir, argument="workdir", resumable=RESUMABLE)
    n_val = min(cfg.eval_windows, (len(val_stream) - 1) // (cfg.seq_len + 1))
    if n_val < 1:
        raise ValueError(f"val_stream has {len(val_stream)} tokens; need at least seq_len+1={cfg.seq_len + 1}.")
    val_windows = val_stream[: n_val * (cfg.seq_len + 1)].reshape(n_val, cfg.seq_len + 1)
    eval_batch = min(cfg.batch_size, n_val)

    optimizer = nnx.Optimizer(model, cfg.optimizer(), wrt=nnx.Param)
    manager = ocp.CheckpointManager(
        workdir / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )
    history: list[dict] = []
    start_step = 0
    if manager.latest_step() is not None:
        start_step = manager.latest_step()
        restored = manager.restore(start_step, args=ocp.args.StandardRestore(_checkpoint_state(model, optimizer)))
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
        history = _read_history(workdir)
        history = [h for h in history if h["step"] <= start_step]

    t0 = time.perf_counter()
    elapsed_before = history[-1]["seconds"] if history else 0.0
    schedule = cfg.schedule()
    with progress_bar(total=cfg.steps, initial=start_step, description="train", enabled=progress) as bar:
        for step in range(start_step, cfg.steps):
            batch = _batch(train_stream, cfg, step) if sample_batch is None else sample_batch(step)
            loss = float(_train_step(model, optimizer, jnp.asarray(batch)))
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss} at step {step}; lower TrainConfig.peak_lr or raise warmup_steps. "
                    f"The last good checkpoint is at step {manager.latest_step()}."
                )
            record = {"step": step + 1, "loss": loss, "lr": float(schedule(step)),
                      "seconds": elapsed_before + time.perf_counter() - t0}
            done = step + 1 == cfg.steps
            if (step + 1) % cfg.eval_every == 0 or done:
                record["val_loss"] = _validation_loss(model, val_windows, eval_batch)
            history.append(record)
            bar.update(1, loss=loss, val=record.get("val_loss"))
            if (step + 1) % cfg.checkpoint_every == 0 or done:
                manager.save(step + 1, args=ocp.args.StandardSave(_checkpoint_state(model, optimizer)))
                manager.wait_until_finished()
                _write_history(workdir, history)
    manager.close()
    _write_history(workdir, history)
    final_val = next(h["val_loss"] for h in reversed(history) if "val_loss" in h)
    return TrainResult(model=model, history=history, seconds=history[-1]["seconds"], final_val_loss=final_val)


def _checkpoint_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    return {"model": nnx.state(model, nnx.Param), "optimizer": nnx.state(optimizer)}


def _write_history(workdir: Path, history: list[dict]) -> None:
    tmp = workdir / "history.jsonl.tmp"
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    tmp.replace(workdir / "history.jsonl")


def _read_history(workdir: Path) -> list[dict]:
    path = workdir / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_history(history: list[dict], path: str | Path, title: str = "training") -> Path:
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
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
