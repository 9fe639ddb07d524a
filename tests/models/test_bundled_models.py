"""The shipped reference models: loadable, consistent with their recorded numbers, and actually trained."""

import dataclasses
import json

import numpy as np
import pytest

from jquant.data import load_split, token_stream, token_windows
from jquant.eval import perplexity
from jquant.models import DEFAULT_MODEL, list_models, load, registry


def test_default_model_is_bundled():
    assert DEFAULT_MODEL in [m.name for m in list_models()]


def test_default_model_reproduces_its_recorded_validation_perplexity():
    loaded = load(DEFAULT_MODEL)
    info = json.loads((loaded.path / "reference_info.json").read_text())
    windows = token_windows(load_split("validation"), loaded.tokenizer, info["validation_seq_len"])
    result = perplexity(loaded.model, windows, batch_size=16, progress=False)
    assert result.n_tokens == info["validation_tokens"]
    np.testing.assert_allclose(result.ppl, info["validation_ppl"], rtol=1e-4)


def test_default_model_beats_a_bigram_fitted_to_the_training_split():
    loaded = load(DEFAULT_MODEL)
    vocab = loaded.model.config.vocab_size
    stream = token_stream(load_split("train"), loaded.tokenizer)
    counts = np.ones((vocab, vocab))  # add-one smoothing
    np.add.at(counts, (stream[:-1], stream[1:]), 1)
    log_probs = np.log(counts / counts.sum(-1, keepdims=True))
    windows = token_windows(load_split("validation"), loaded.tokenizer, 256, max_windows=40)
    bigram_nll = -log_probs[windows[:, :-1], windows[:, 1:]].mean()
    model_nll = perplexity(loaded.model, windows, batch_size=8, progress=False).nll
    assert model_nll < bigram_nll - 0.3, (model_nll, bigram_nll)


# Config fields a training run sets from its data rather than from the preset (recorded in reference_info.json).
TRAINED_FIELDS = {"scaling_factor", "shift_factor"}


def _without_dtypes(value):
    """A nested config (e.g. a VLM's text config) with its dtypes set aside: the weights' dtype is recorded
    separately (``weights_dtype``) and checked on the top-level config."""
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: "float32" for f in dataclasses.fields(value)
                                            if f.name in ("dtype", "param_dtype")})
    return value


@pytest.mark.parametrize("name", [m.name for m in list_models()])
def test_bundled_model_matches_its_preset(name):
    from jquant.models.loading import resolve
    from jquant.text_to_image import is_pipeline, load_pipeline

    info = json.loads((resolve(name) / "reference_info.json").read_text())
    if is_pipeline(resolve(name)):  # a text-to-image pipeline: its transformer is the preset
        model, tokenizer = load_pipeline(resolve(name)).transformer, None
    else:
        loaded = load(name)
        model, tokenizer = loaded.model, loaded.tokenizer
    family, preset = registry.preset(info.get("preset", name))  # a variant trained from another preset names it
    cfg = model.config
    assert isinstance(model, family.model_class)
    for field in dataclasses.fields(preset):
        if field.name in TRAINED_FIELDS:
            assert getattr(cfg, field.name) == pytest.approx(info[field.name]), field.name
        elif field.name not in ("dtype", "param_dtype"):
            assert _without_dtypes(getattr(cfg, field.name)) == _without_dtypes(getattr(preset, field.name)), field.name
    assert cfg.param_dtype == info.get("weights_dtype", "float32") and cfg.dtype == "float32"
    if tokenizer is not None:
        assert len(tokenizer) == cfg.vocab_size
