"""Bad checkpoints and configs fail with errors that name the tensor/attribute and the shapes."""

import json

import jax
import numpy as np
import pytest

from jquant.models import hf_io, llama, load

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture()
def checkpoint(tmp_path):
    model = llama.init_model(CFG, jax.random.key(0))
    llama.to_hf(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _rewrite(folder, mutate_tensors=None, mutate_config=None):
    tensors = hf_io.read_safetensors(folder)
    config = hf_io.read_config(folder)
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_config:
        mutate_config(config)
    hf_io.write_checkpoint(folder, config, tensors, overwrite=True)


def test_missing_tensor_is_named(checkpoint):
    _rewrite(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing.*\(48, 32\)"):
        llama.from_hf(checkpoint)


def test_wrong_shape_names_expected_and_found(checkpoint):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]

    _rewrite(checkpoint, shrink)
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(8, 32\).*\(16, 32\)"):
        llama.from_hf(checkpoint)


def test_config_that_disagrees_with_weights(checkpoint):
    def more_ffn(c):
        c["intermediate_size"] = 64

    _rewrite(checkpoint, mutate_config=more_ffn)
    with pytest.raises(ValueError, match=r"mlp\.down_proj\.weight.*has shape \(32, 48\).*implies \(32, 64\)"):
        llama.from_hf(checkpoint)


def test_unexpected_tensor_is_reported(checkpoint):
    _rewrite(checkpoint, lambda t: t.__setitem__("model.layers.2.mlp.up_proj.weight", np.zeros((48, 32), np.float32)))
    with pytest.raises(ValueError, match=r"unexpected tensors.*layers\.2"):
        llama.from_hf(checkpoint)


def test_unsupported_config_attribute_is_rejected(checkpoint):
    _rewrite(checkpoint, mutate_config=lambda c: c.__setitem__("hidden_act", "gelu"))
    with pytest.raises(ValueError, match="hidden_act"):
        llama.from_hf(checkpoint)
    _rewrite(checkpoint, mutate_config=lambda c: c.update(hidden_act="silu", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(ValueError, match="yarn"):
        llama.from_hf(checkpoint)
    _rewrite(checkpoint, mutate_config=lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 1e4}, some_new_feature=3))
    with pytest.raises(ValueError, match="some_new_feature"):
        llama.from_hf(checkpoint)


def test_missing_files_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(llama.config_to_hf(CFG)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        llama.from_hf(tmp_path)


def test_unknown_model_name_lists_the_bundled_ones():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*jquant list models"):
        load("no-such-model")


def test_failed_export_leaves_no_checkpoint_behind(tmp_path):
    model = llama.init_model(CFG, jax.random.key(0))

    def explode(folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        hf_io.write_checkpoint(tmp_path / "out", llama.config_to_hf(CFG), llama.to_tensors(model), extra_files=explode)
    assert list(tmp_path.iterdir()) == []


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        llama.LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=3).attention
    with pytest.raises(ValueError, match="head_dim"):
        llama.LlamaConfig(vocab_size=8, hidden_size=30, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="llama cannot express qk_norm=True"):
        llama.config_to_hf(CFG.replace(qk_norm=True))
    with pytest.raises(ValueError, match="jax_enable_x64"):
        llama.init_model(CFG.replace(dtype="float64"), jax.random.key(0))
