"""save/load across families: what the shared family suite (``jquant.testing.family_suite``) does not cover.

Every family's float and quantized round trips run in its suite (``tests/models``); Llama's atomic writes and
shape checks are in ``test_checkpoint.py``.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jquant.checkpoint import load, save
from jquant.models import mamba, mamba2, registry

VOCAB = 64
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 12)).astype(np.int32)


def test_bfloat16_config_round_trips(tmp_path):
    cfg = mamba2.Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_heads=4, head_dim=16, state_size=16, num_layers=2,
                              chunk_size=8, dtype="bfloat16", param_dtype="bfloat16",
                              time_step_limit=(0.001, float("inf")))
    model = mamba2.init_model(cfg, jax.random.key(1))
    save(model, tmp_path / "ckpt")
    restored = load(tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(restored(TOKENS)), np.asarray(model(TOKENS)))
    assert restored.config == cfg
    assert restored.layers[0].mixer.in_proj.kernel.get_value().dtype == np.dtype("bfloat16")


def test_unknown_model_type_is_refused(tmp_path):
    class Stranger(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.zeros(3, np.float32))

    with pytest.raises(TypeError, match=r"Stranger is not a model family jquant knows how to save; known: .*RWKV6"):
        save(Stranger(), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_unknown_family_in_a_manifest_is_refused(tmp_path):
    cfg = mamba.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_layers=2, scan_chunk_size=8)
    save(mamba.init_model(cfg, jax.random.key(0)), tmp_path / "ckpt")
    manifest_file = tmp_path / "ckpt" / "jquant.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "family": "gpt2"}))
    known = ", ".join(sorted(registry._FAMILY_MODULES))
    with pytest.raises(ValueError, match=rf"family 'gpt2' is not one jquant knows; known: {known}\."):
        load(tmp_path / "ckpt")
    manifest_file.write_text(json.dumps({**manifest, "config": {**manifest["config"], "d_inner": 7}}))
    with pytest.raises(ValueError, match=r"MambaConfig does not know: \['d_inner'\]"):
        load(tmp_path / "ckpt")
