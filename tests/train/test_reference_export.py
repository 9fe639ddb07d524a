"""Reference-model presets of every family, and their export: bf16 weights that load back with ``jquant.load``."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jquant.data import load_tokenizer
from jquant.models import llama, load, mamba, moe, rwkv6
from jquant.models.registry import families, preset
from jquant.testing.tiny_models import fast_logits
from jquant.train.reference import export_reference, recast

TINY = {
    "llama": llama.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                               num_kv_heads=1, max_position_embeddings=64),
    "mamba": mamba.MambaConfig(vocab_size=4096, hidden_size=16, num_layers=2, state_size=4),
    "rwkv6": rwkv6.RWKV6Config(vocab_size=4096, hidden_size=32, intermediate_size=64, num_layers=2, head_size=16,
                               mix_rank=4, decay_rank=8),
    "moe": moe.MoEConfig(vocab_size=4096, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_layers=2,
                         num_heads=2, num_kv_heads=1, num_experts=4, top_k=2, max_position_embeddings=64),
}
FAMILIES = {"llama": llama, "mamba": mamba, "moe": moe, "rwkv6": rwkv6}


def test_every_preset_matches_the_tokenizer_and_resolves_to_its_family():
    from jquant.train.vl import VISION_TOKENS

    vocab = len(load_tokenizer())
    for family in families():
        for name, cfg in family.presets.items():
            assert preset(name) == (family, cfg)
            if hasattr(cfg, "vocab_size"):  # language models read the bundled tokenizer's ids
                extra = len(VISION_TOKENS) if family.name == "qwen2_vl" else 0  # + the vision tokens at the end
                assert cfg.vocab_size == vocab + extra, name


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="jq-mamba-small"):
        preset("jq-mamba-huge")


@pytest.mark.parametrize("family_name", sorted(TINY))
def test_exported_reference_loads_with_the_same_logits(family_name, tmp_path):
    family = FAMILIES[family_name]
    trained = family.init_model(TINY[family_name].replace(dtype="bfloat16"), jax.random.key(1))
    shipped = recast(trained, "bfloat16")
    assert shipped.config.dtype == "float32" and shipped.config.param_dtype == "bfloat16"
    for (_, before), (_, after) in zip(nnx.to_flat_state(nnx.state(trained, nnx.Param)),
                                       nnx.to_flat_state(nnx.state(shipped, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(after[...]), np.asarray(before[...].astype("bfloat16")))
    curve = tmp_path / "curve.png"
    curve.write_bytes(b"png")
    summary = {"validation_ppl": 1.0}
    export_reference(shipped, tmp_path / "export", load_tokenizer(), summary, curve)
    loaded = load(tmp_path / "export")
    assert type(loaded.model) is type(shipped) and loaded.model.config.param_dtype == "bfloat16"
    assert len(loaded.tokenizer) == 4096
    assert json.loads((tmp_path / "export" / "reference_info.json").read_text()) == summary
    tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, 4096, (2, 9)), dtype=jax.numpy.int32)
    np.testing.assert_array_equal(np.asarray(fast_logits(loaded.model, tokens)), np.asarray(fast_logits(shipped, tokens)))
