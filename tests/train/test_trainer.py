"""Trainer: loss goes down, interrupted runs resume to the same weights, bad settings fail clearly."""

import jax
import jax.numpy as jnp
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



def test_fit_keeps_an_ema_that_resumes_and_ends_in_the_model(tmp_path):
    """The generic loop on a regression batch pytree: the EMA follows ema_k = d ema_(k-1) + (1 - d) p_k over the
    raw parameters p_k, validation sees it, the final model holds it, and an interrupted run resumes to it."""
    from jquant.models.layers import Linear
    from jquant.train import LoopConfig, fit

    w_true = np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32)
    cfg = LoopConfig(steps=6, warmup_steps=1, peak_lr=0.05, checkpoint_every=2, eval_every=1, ema_decay=0.7)

    def make():
        return Linear(3, 2, use_bias=True, sharding=(None, None), param_dtype=jnp.float32, rngs=nnx.Rngs(0))

    def run(workdir, stop_at=None):
        model, raw, ema = make(), [], []

        def batch(step):
            if step == stop_at:
                raise KeyboardInterrupt("simulated interruption")
            raw.append(np.asarray(model.kernel[...]))  # the raw parameters after `step` updates
            x = np.random.default_rng([1, step]).standard_normal((8, 3)).astype(np.float32)
            return {"x": jnp.asarray(x), "y": jnp.asarray(x @ w_true)}

        def loss(m, b, key):
            noise = 0.01 * jax.random.normal(key, b["y"].shape)  # the step's key reaches the loss
            return jnp.mean((m(b["x"]) - b["y"] - noise) ** 2)

        def validation(m):
            ema.append(np.asarray(m.kernel[...]))
            return 0.0

        fit(model, cfg, workdir, loss=loss, sample_batch=batch, validation=validation, progress=False)
        return model, raw, ema

    model, raw, ema = run(tmp_path / "a")
    assert len(raw) == 6 and len(ema) == 6
    expected = raw[0]  # the EMA starts at the initial parameters
    for k in range(1, 6):
        expected = cfg.ema_decay * expected + (1 - cfg.ema_decay) * raw[k]
        np.testing.assert_allclose(ema[k - 1], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(model.kernel[...]), ema[-1])
    assert not np.allclose(ema[-1], raw[-1])  # the EMA really lags the raw parameters

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=3)
    resumed, _, _ = run(tmp_path / "b")  # fresh weights: parameters, optimizer state and EMA come from step 2
    np.testing.assert_array_equal(np.asarray(resumed.kernel[...]), np.asarray(model.kernel[...]))
    # Restored as the model was built (uncommitted), so the resumed run's training step is the first run's program.
    assert not any(leaf.committed for leaf in jax.tree.leaves(nnx.state(resumed)))


def test_plot_history_writes_the_loss_curve(tmp_path):
    from PIL import Image

    from jquant.train.loop import plot_history

    history = [{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 6, "loss": 0.4, "val_loss": 0.5}]
    path = plot_history(history, tmp_path / "loss_curve.png", title="t", ylabel="loss")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100
