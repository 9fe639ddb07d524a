"""save/load for every model family: exact round trips of RWKV-6, Mamba and Mamba-2, float and quantized.

(Llama's round trips, atomic writes and shape checks are in ``test_checkpoint.py``.)
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jquant.checkpoint import load, save
from jquant.models import mamba, mamba2, rwkv6
from jquant.quantization import quantize
from jquant.recipes import Recipe, Rule

VOCAB = 64
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 12)).astype(np.int32)
CONFIGS = {
    "rwkv6": (rwkv6, rwkv6.RWKV6Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                                       head_size=32, mix_rank=8, decay_rank=8, chunk_size=4)),
    "mamba": (mamba, mamba.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_layers=2,
                                       scan_chunk_size=8, tie_embeddings=False, eos_token_id=2)),
    "mamba2": (mamba2, mamba2.Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_heads=4, head_dim=16, state_size=16,
                                           num_layers=2, chunk_size=8)),  # time_step_limit (0, inf)
}
# Per-channel int4 on the linears: GPTQ (no clip search, to stay fast) for RWKV-6 and Mamba-2, round to nearest
# for Mamba (the same format, so the same checkpoint path). RWKV-6's element-wise token-shift mixes have no
# GEMM for GPTQ: they take int8 RTN.
GPTQ_INT4 = Rule(pattern=r".*", weight="int4", algorithm="gptq")
INT4 = {
    "rwkv6": Recipe(name="rwkv6-gptq-w4", rules=(Rule(pattern=r".*/time_maa_[xwkvrg]", weight="int8"), GPTQ_INT4)),
    "mamba": Recipe(name="rtn-w4", rules=(Rule(pattern=r".*", weight="int4"),)),
    "mamba2": Recipe(name="gptq-w4", rules=(GPTQ_INT4,)),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request):
    module, cfg = CONFIGS[request.param]
    return request.param, module.init_model(cfg, jax.random.key(0))


def _round_trip(model, path):
    save(model, path)
    restored = load(path)
    np.testing.assert_array_equal(np.asarray(restored(TOKENS)), np.asarray(model(TOKENS)))
    return restored


def test_float_round_trip_is_exact(family, tmp_path):
    name, model = family
    restored = _round_trip(model, tmp_path / "ckpt")
    assert type(restored) is type(model)
    assert restored.config == model.config
    manifest = json.loads((tmp_path / "ckpt" / "jquant.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert set(manifest) == {"format_version", "family", "config", "dtype", "param_dtype"}
    assert manifest["family"] == name
    assert not (tmp_path / "ckpt" / "recipe.json").exists()


@pytest.mark.parametrize("recipe", ["rtn-w8", "int4"])
def test_quantized_round_trip_is_exact(family, tmp_path, recipe):
    name, model = family
    qmodel = quantize(model, INT4[name] if recipe == "int4" else recipe, TOKENS, progress=False)
    assert qmodel.quantization.sites
    restored = _round_trip(qmodel, tmp_path / "ckpt")
    assert restored.quantization.recipe == qmodel.quantization.recipe
    assert restored.quantization.sites == qmodel.quantization.sites


def test_bfloat16_config_round_trips(tmp_path):
    cfg = CONFIGS["mamba2"][1].replace(dtype="bfloat16", param_dtype="bfloat16", time_step_limit=(0.001, float("inf")))
    model = mamba2.init_model(cfg, jax.random.key(1))
    restored = _round_trip(model, tmp_path / "ckpt")
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
    module, cfg = CONFIGS["mamba"]
    save(module.init_model(cfg, jax.random.key(0)), tmp_path / "ckpt")
    manifest_file = tmp_path / "ckpt" / "jquant.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "family": "gpt2"}))
    with pytest.raises(ValueError, match=r"family 'gpt2' is not one jquant knows; known: llama, mamba, mamba2, moe, rwkv6"):
        load(tmp_path / "ckpt")
    manifest_file.write_text(json.dumps({**manifest, "config": {**manifest["config"], "d_inner": 7}}))
    with pytest.raises(ValueError, match=r"MambaConfig does not know: \['d_inner'\]"):
        load(tmp_path / "ckpt")
