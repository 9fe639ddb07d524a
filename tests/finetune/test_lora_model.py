"""LoRA on a whole model: add/merge, adapter-only training, frozen base, memory accounting, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jquant as jq
from jquant.finetune import (FinetuneConfig, FP8Arithmetic, LoRAArithmetic, LoRAConfig, LoRAParam, adapters, add_lora,
                             finetune, lora_sites, merge_lora, set_rounding_keys)
from jquant.finetune.memory import training_memory
from jquant.finetune.train import batch_loss
from jquant.formats import GSEFormat, IntFormat, QArray
from jquant.models import llama
from jquant.recipes import Recipe, Rule

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
NF4 = Recipe(name="nf4", rules=(Rule(pattern=".*", weight="nf4"),))
F32 = LoRAArithmetic(compute_dtype="float32")


@pytest.fixture(scope="module")
def model():
    return llama.init_model(CFG, jax.random.key(0))


def _tokens(seed, batch=4, length=17):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size)


def _kernels(m):
    return {s.path: s.weight.get_value() for s in jq.sites.find_sites(m) if s.spec.kind == "linear"}


def test_add_lora_starts_equal_and_leaves_the_input_alone(model):
    tokens = _tokens(0)
    adapted = add_lora(model, LoRAConfig(rank=8, arithmetic=F32), key=jax.random.key(1))
    np.testing.assert_allclose(np.asarray(adapted(tokens)), np.asarray(model(tokens)), rtol=1e-5, atol=1e-5)
    assert not adapters(model)
    paths = [p for p, _ in adapters(adapted)]
    assert len(paths) == 7 * CFG.num_layers and "lm_head" not in paths
    only_q = LoRAConfig(rank=4, targets=(r".*q_proj",))
    assert [s.path for s in lora_sites(model, only_q)] == ["layers/0/self_attn/q_proj", "layers/1/self_attn/q_proj"]


@pytest.mark.parametrize("arithmetic", [F32, LoRAArithmetic(operands=GSEFormat(bits=6), saved="quantized"),
                                        LoRAArithmetic(operands=GSEFormat(bits=5), gradient_rounding="stochastic"),
                                        FP8Arithmetic(saved="quantized")],
                         ids=lambda a: a.name)
def test_finetune_trains_adapters_only_and_fits_a_batch(model, arithmetic):
    base = jq.quantize(model, NF4, progress=False)
    adapted = add_lora(base, LoRAConfig(rank=32, alpha=16, arithmetic=arithmetic), key=jax.random.key(2))
    tokens = np.asarray(_tokens(3))
    mask = np.ones((4, 16), bool)
    tuned, history = finetune(adapted, lambda step: (tokens, mask),
                              FinetuneConfig(steps=30, lr=1e-2, warmup_fraction=0.0), progress=False)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    before, after = _kernels(adapted), _kernels(tuned)
    assert sum(isinstance(w, QArray) for w in before.values()) == 7 * CFG.num_layers
    for path, w in before.items():  # frozen base: bit-identical NF4 codes and float head
        leaves = zip(jax.tree.leaves(after[path]), jax.tree.leaves(w))
        assert all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in leaves), path
    moved = [float(jnp.abs(lora.b.get_value()).max()) for _, lora in adapters(tuned)]
    assert min(moved) > 0  # every adapter trained
    assert all(float(jnp.abs(lora.b.get_value()).max()) == 0 for _, lora in adapters(adapted))  # input untouched


def test_merge_lora_equals_the_adapted_model(model):
    adapted = add_lora(model, LoRAConfig(rank=8, arithmetic=F32), key=jax.random.key(4))
    for _, lora in adapters(adapted):  # non-zero B so the merge is not vacuous
        lora.b.set_value(0.05 * jax.random.normal(jax.random.key(5), lora.b.get_value().shape))
    tokens = _tokens(6)
    merged = merge_lora(adapted)
    assert not adapters(merged)
    np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(adapted(tokens)), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(merged(tokens)), np.asarray(model(tokens)), atol=1e-3)


def test_rounding_keys_are_distinct_per_adapter(model):
    arith = LoRAArithmetic(operands=GSEFormat(bits=5, group_size=4), gradient_rounding="stochastic")
    adapted = add_lora(model, LoRAConfig(rank=4, arithmetic=arith), key=jax.random.key(7))
    set_rounding_keys(adapted, jax.random.key(8))
    keys = {tuple(np.asarray(jax.random.key_data(lora.rounding_key.get_value())).tolist())
            for _, lora in adapters(adapted)}
    assert len(keys) == len(adapters(adapted))


def test_memory_accounting(model):
    tokens, mask = _tokens(9), jnp.ones((4, 16), bool)
    rank = 8

    def measure(base, arithmetic):
        adapted = add_lora(base, LoRAConfig(rank=rank, arithmetic=arithmetic), key=jax.random.key(0))
        opt = nnx.Optimizer(adapted, optax.adamw(1e-3), wrt=LoRAParam)
        return training_memory(adapted, opt, lambda m: batch_loss(m, tokens, mask))

    dense = measure(model, F32)
    nf4 = measure(jq.quantize(model, NF4, progress=False), F32)
    gse = measure(jq.quantize(model, NF4, progress=False),
                  LoRAArithmetic(operands=GSEFormat(bits=5, group_size=8), saved="quantized"))
    shapes = [s.weight.get_value().shape for s in lora_sites(model, LoRAConfig(rank=rank))]
    assert dense.adapters == 4 * rank * sum(i + o for i, o in shapes)
    assert 2 * dense.adapters <= dense.optimizer <= 2 * dense.adapters + 64  # two moments + the step count
    assert nf4.frozen_weights < dense.frozen_weights
    assert gse.saved_activations < nf4.saved_activations == dense.saved_activations
    # FP8 keeps x and H of every adapted linear as 1-byte float8 codes plus a float32 scale: the same bytes as
    # per-tensor int8 codes with a float32 scale, and less than float32 (saved="float" keeps the float arrays)
    base = jq.quantize(model, NF4, progress=False)
    fp8 = measure(base, FP8Arithmetic(saved="quantized"))
    int8 = measure(base, LoRAArithmetic(operands=IntFormat(bits=8, granularity="tensor", scale_dtype="float32"),
                                        saved="quantized"))
    assert fp8.saved_activations == int8.saved_activations < nf4.saved_activations
    assert measure(base, FP8Arithmetic(saved="float")).saved_activations == nf4.saved_activations
    assert dense.total == dense.frozen_weights + dense.adapters + dense.optimizer + dense.saved_activations


def test_bad_input(model):
    with pytest.raises(ValueError, match="matches no adaptable linear site"):
        add_lora(model, LoRAConfig(targets=(r".*not_a_layer",)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(TypeError, match="tuples of regexes"):
        LoRAConfig(targets=r".*")
    with pytest.raises(ValueError, match="rank=8 is not a multiple of the operand group size 32"):
        add_lora(model, LoRAConfig(rank=8, arithmetic=LoRAArithmetic(operands=GSEFormat(bits=8))),
                 key=jax.random.key(0))
    with pytest.raises(ValueError, match="down_proj: out_features=64 is not a multiple of the operand group size 48"):
        add_lora(model, LoRAConfig(rank=48, arithmetic=LoRAArithmetic(operands=GSEFormat(bits=8, group_size=48))),
                 key=jax.random.key(0))
    adapted = add_lora(model, LoRAConfig(rank=4), key=jax.random.key(0))
    with pytest.raises(ValueError, match="already has an adapter"):
        add_lora(adapted, LoRAConfig(rank=4), key=jax.random.key(0))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        finetune(model, lambda s: None, FinetuneConfig(steps=1))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(model)
    w8a8 = jq.quantize(model, Recipe(name="w8a8", rules=(Rule(pattern=".*", weight="int8", activation="int8"),)),
                       progress=False)
    with pytest.raises(ValueError, match="quantizes its inputs"):
        add_lora(w8a8, LoRAConfig(rank=4), key=jax.random.key(0))


@pytest.mark.parametrize("targets", [(r".*",), (r".*mlp/up_proj",)])
def test_merged_quantized_model_saves_and_loads(model, targets, tmp_path):
    base = jq.quantize(model, NF4, progress=False)
    adapted = add_lora(base, LoRAConfig(rank=8, targets=targets, arithmetic=F32), key=jax.random.key(10))
    for _, lora in adapters(adapted):
        lora.b.set_value(0.05 * jax.random.normal(jax.random.key(11), lora.b.get_value().shape))
    merged = merge_lora(adapted)
    if targets == (r".*",):
        assert merged.quantization is None  # every NF4 site became dense
    else:
        assert merged.quantization.site("layers/0/mlp/up_proj") == "float"
        assert merged.quantization.site("layers/0/mlp/down_proj") != "float"
    jq.save(merged, tmp_path / "merged")
    tokens = _tokens(12)
    np.testing.assert_array_equal(np.asarray(jq.load(tmp_path / "merged")(tokens)), np.asarray(merged(tokens)))


def test_finetune_evaluates_the_model_in_training(model):
    adapted = add_lora(model, LoRAConfig(rank=4, arithmetic=F32), key=jax.random.key(13))
    tokens, mask = np.asarray(_tokens(14)), np.ones((4, 16), bool)

    def b_norm(m):
        return {"b_norm": float(sum(jnp.sum(lora.b.get_value() ** 2) for _, lora in adapters(m)))}

    tuned, history = finetune(adapted, lambda step: (tokens, mask), FinetuneConfig(steps=5, lr=1e-2),
                              evaluate=b_norm, eval_every=2, progress=False)
    assert [("b_norm" in row) for row in history] == [False, True, False, True, True]  # every 2 steps and the last
    assert 0 < history[1]["b_norm"] < history[3]["b_norm"]
    assert history[-1]["b_norm"] == b_norm(tuned)["b_norm"]
