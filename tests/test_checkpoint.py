"""save/load: exact round trips with the recipe, atomic writes, shape mismatches named."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jquant.checkpoint import load, save
from jquant.models import llama
from jquant.quantization import quantize

CFG = llama.LlamaConfig(family="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, qkv_bias=True)
TOKENS = np.arange(24).reshape(2, 12) % 64


@pytest.fixture(scope="module")
def model():
    return llama.init_model(CFG, jax.random.key(0))


@pytest.mark.parametrize("recipe", ["rtn-w8a8", "rtn-w2g64", "nvfp4-w4a16", "mxfp4-w4a16", "fp8-w8a8", None])
def test_round_trip_is_exact(model, tmp_path, recipe):
    qmodel = quantize(model, recipe, progress=False) if recipe else model
    save(qmodel, tmp_path / "ckpt")
    restored = load(tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(restored(TOKENS)), np.asarray(qmodel(TOKENS)))
    assert (tmp_path / "ckpt" / "recipe.json").is_file() == (recipe is not None)


@pytest.mark.parametrize("recipe", ["rtn-w8", None])
def test_loaded_model_reuses_the_saved_models_compiled_forward(model, tmp_path, recipe):
    """A loaded model has the saved one's graph (the quantization report's timing is not part of it) and
    uncommitted arrays, as a freshly built model has: a jitted forward compiled for one serves the other."""
    qmodel = quantize(model, recipe, progress=False) if recipe else model
    save(qmodel, tmp_path / "ckpt")
    restored = load(tmp_path / "ckpt")
    assert nnx.graphdef(restored) == nnx.graphdef(qmodel)
    assert not any(leaf.committed for leaf in jax.tree.leaves(nnx.state(restored)))

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(nnx.graphdef(qmodel), state)(tokens)

    forward(nnx.state(qmodel), TOKENS)
    forward(nnx.state(restored), TOKENS)
    assert forward._cache_size() == 1


def test_interrupted_save_leaves_nothing_behind(model, tmp_path):
    class FailingTokenizer:
        def save_pretrained(self, folder):
            raise KeyboardInterrupt("interrupted")

    qmodel = quantize(model, "rtn-w8", progress=False)
    with pytest.raises(KeyboardInterrupt):
        save(qmodel, tmp_path / "ckpt", tokenizer=FailingTokenizer())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not a complete jquant checkpoint"):
        load(tmp_path / "ckpt")


def test_overwriting_keeps_the_old_checkpoint_until_the_new_one_is_complete(model, tmp_path):
    qmodel = quantize(model, "rtn-w8", progress=False)
    save(qmodel, tmp_path / "ckpt")

    class FailingTokenizer:
        def save_pretrained(self, folder):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save(model, tmp_path / "ckpt", tokenizer=FailingTokenizer(), overwrite=True)
    np.testing.assert_array_equal(np.asarray(load(tmp_path / "ckpt")(TOKENS)), np.asarray(qmodel(TOKENS)))


def test_checkpoint_of_another_shape_is_rejected_with_the_path(model, tmp_path):
    qmodel = quantize(model, "rtn-w8", progress=False)
    save(qmodel, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "jquant.json").read_text())
    manifest["config"]["intermediate_size"] = 192
    (tmp_path / "ckpt" / "jquant.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"layers/0/mlp/down_proj/kernel/.*codes has shape \(128, 64\).*expects \(192, 64\)"):
        load(tmp_path / "ckpt")


def test_loaded_model_reports_what_the_saved_one_did(model, tmp_path):
    """The whole report: recipe, sites, time taken and the transform steps' logs."""
    calib = np.random.default_rng(0).integers(0, 64, size=(4, 8)).astype(np.int32)
    qmodel = quantize(model, "smoothquant-w8a8", calib, progress=False)
    assert [t.kind for t in qmodel.quantization.transforms] == ["smoothquant"] and qmodel.quantization.seconds > 0
    save(qmodel, tmp_path / "ckpt")
    restored = load(tmp_path / "ckpt").quantization
    assert restored.recipe == qmodel.quantization.recipe
    assert restored.sites == qmodel.quantization.sites
    assert restored == qmodel.quantization


def test_static_activation_scales_round_trip(model, tmp_path):
    calib = np.random.default_rng(0).integers(0, 64, size=(4, 8)).astype(np.int32)
    qmodel = quantize(model, "rtn-w8a8-static", calib, progress=False)
    save(qmodel, tmp_path / "ckpt")
    restored = load(tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(restored(TOKENS)), np.asarray(qmodel(TOKENS)))
    assert float(restored.layers[0].mlp.up_proj.activation_scale.get_value()) == float(
        qmodel.layers[0].mlp.up_proj.activation_scale.get_value())
