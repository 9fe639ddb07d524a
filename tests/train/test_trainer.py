"""Trainer: loss goes down, interrupted runs resume to the same weights, bad settings fail clearly."""

import jax
import numpy as np
import pytest
from flax import nnx

from jquant.models import llama
from jquant.train import TrainConfig, cross_entropy, train
from jquant.train import trainer as trainer_module

CFG = llama.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)


def _stream(n=4000, seed=0):
    # a learnable sequence: a noisy cycle through the vocabulary
    rng = np.random.default_rng(seed)
    base = np.arange(n) % CFG.vocab_size
    noise = rng.random(n) < 0.1
    return np.where(noise, rng.integers(0, CFG.vocab_size, n), base).astype(np.int32)


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7))
    targets = rng.integers(0, 7, size=(2, 5))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, targets[..., None], -1).mean()
    assert abs(float(cross_entropy(logits.astype(np.float32), targets)) - expected) < 1e-5


def test_loss_decreases(tmp_path):
    cfg = TrainConfig(steps=30, warmup_steps=3, batch_size=4, seq_len=32, peak_lr=1e-2, eval_every=30, eval_windows=4)
    model = llama.init_model(CFG, jax.random.key(0))
    result = train(model, _stream(), _stream(seed=1), cfg, tmp_path, progress=False)
    assert result.history[-1]["val_loss"] < 0.7 * np.log(CFG.vocab_size)
    assert (tmp_path / "history.jsonl").is_file()


def test_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    cfg = TrainConfig(steps=6, warmup_steps=2, batch_size=2, seq_len=16, checkpoint_every=2, eval_every=3, eval_windows=2)
    straight = llama.init_model(CFG, jax.random.key(0))
    train(straight, _stream(), _stream(seed=1), cfg, tmp_path / "a", progress=False)

    original_batch = trainer_module._batch

    def interrupting_batch(stream, c, step):
        if step == 4:
            raise KeyboardInterrupt("simulated interruption")
        return original_batch(stream, c, step)

    monkeypatch.setattr(trainer_module, "_batch", interrupting_batch)
    first = llama.init_model(CFG, jax.random.key(0))
    with pytest.raises(KeyboardInterrupt):
        train(first, _stream(), _stream(seed=1), cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(trainer_module, "_batch", original_batch)
    resumed = llama.init_model(CFG, jax.random.key(0))  # fresh weights: everything must come from the checkpoint
    result = train(resumed, _stream(), _stream(seed=1), cfg, tmp_path / "b", progress=False)
    assert [h["step"] for h in result.history] == list(range(1, 7))
    for a, b in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_with_a_message(tmp_path):
    cfg = TrainConfig(steps=3, warmup_steps=1, batch_size=2, seq_len=16, eval_windows=2)
    model = llama.init_model(CFG, jax.random.key(0))
    bad = jax.tree.map(lambda x: x * np.nan, nnx.state(model, nnx.Param))
    nnx.update(model, bad)
    with pytest.raises(FloatingPointError, match="peak_lr"):
        train(model, _stream(), _stream(seed=1), cfg, tmp_path, progress=False)


@pytest.mark.parametrize("kwargs, name", [(dict(steps=0), "steps"), (dict(steps=5, warmup_steps=5), "warmup_steps"),
                                          (dict(steps=5, warmup_steps=1, peak_lr=0.0), "peak_lr")])
def test_bad_config_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**kwargs)
