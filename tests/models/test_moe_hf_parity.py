"""Parity of jquant's MoE family with transformers' Mixtral, Qwen2-MoE and Qwen3-MoE, through files on disk.

Each case builds a tiny random transformers model with every tensor perturbed (router weights included,
which transformers initialises to zero), writes it with ``save_pretrained`` (the per-expert on-disk layout)
and loads it with ``moe.from_hf``. DeepSeek-MoE routing (no renormalisation, scaling factor, ungated shared
experts) is compared at the level of the MoE block, since DeepSeek-V2's attention (MLA) is not implemented.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from jquant.models import moe  # noqa: E402
from jquant.models.layers import SparseMoE, SparseMoEConfig  # noqa: E402
from jquant.testing.hf_reference import relative_error, torch_logits  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=128,
            attn_implementation="eager", experts_implementation="eager")
CASES = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  dict(intermediate_size=80, moe_intermediate_size=40, shared_expert_intermediate_size=56, num_experts=6,
                       num_experts_per_tok=2, mlp_only_layers=[0])),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  dict(intermediate_size=80, moe_intermediate_size=40, num_experts=6, num_experts_per_tok=3,
                       norm_topk_prob=True, head_dim=24)),
}


def _build(case: str, folder, seed: int):
    cls_name, cfg_name, extra = CASES[case]
    cfg = getattr(transformers, cfg_name)(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, _build(request.param, folder, sorted(CASES).index(request.param)), folder


def _tokens(seed: int, batch=2, length=10):
    return np.random.default_rng(seed).integers(3, BASE["vocab_size"], size=(batch, length)).astype(np.int32)


def test_config_and_structure(pair):
    case, hf, folder = pair
    model = moe.from_hf(folder)
    cfg = model.config
    assert cfg.family == case and len(model.moe_layers()) == cfg.num_layers - len(cfg.dense_layers)
    if case == "qwen2_moe":
        assert cfg.dense_layers == (0,) and cfg.shared_expert_gate and not cfg.norm_topk_prob
    assert model.moe_layers()[0].experts.gate_proj.kernel.shape == (cfg.num_experts, 64, cfg.moe_intermediate_size)


def test_prefill_and_decode_float32(pair):
    case, hf, folder = pair
    ours = moe.from_hf(folder)
    tokens = _tokens(1)
    ref = torch_logits(hf, tokens)
    assert relative_error(ours(tokens), ref) < 1e-5, case
    cache = ours.init_cache(tokens.shape[0], tokens.shape[1])
    logits, cache = ours.step(jnp.asarray(tokens[:, :4]), cache)
    steps = [logits]
    for t in range(4, tokens.shape[1]):
        logits, cache = ours.step(jnp.asarray(tokens[:, t : t + 1]), cache)
        steps.append(logits)
    assert relative_error(jnp.concatenate(steps, axis=1), ref) < 1e-5, case


def test_float64(pair):
    case, hf, folder = pair
    jax.config.update("jax_enable_x64", True)
    try:
        ours = moe.from_hf(folder, dtype="float64")
        tokens = _tokens(2)
        ref = torch_logits(hf.double(), tokens)
        hf.float()
        assert relative_error(ours(tokens), ref) < 2e-6, case
    finally:
        jax.config.update("jax_enable_x64", False)


def test_export_round_trip_loads_in_transformers(pair, tmp_path):
    case, hf, folder = pair
    ours = moe.from_hf(folder)
    moe.to_hf(ours, tmp_path / "out")
    reloaded = getattr(transformers, CASES[case][0]).from_pretrained(tmp_path / "out")
    expected = hf.state_dict()
    got = reloaded.state_dict()
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name].numpy(), value.numpy(), err_msg=name)


def test_deepseek_moe_block_matches_transformers():
    """DeepSeek routing: softmax top-k without renormalisation, times routed_scaling_factor, plus ungated shared
    experts (DeepseekV2Moe) equals jquant's SparseMoE with the same weights."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    hf_cfg = transformers.DeepseekV2Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=6,
                                           num_experts_per_tok=3, n_shared_experts=2, routed_scaling_factor=2.5,
                                           topk_method="greedy", norm_topk_prob=False, experts_implementation="eager")
    torch.manual_seed(0)
    block = DeepseekV2Moe(hf_cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    ours = SparseMoE(SparseMoEConfig(hidden_size=64, intermediate_size=32, num_experts=6, top_k=3, normalize=False,
                                     scale=2.5, shared_size=64), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    t = lambda x: jnp.asarray(x.detach().numpy())  # noqa: E731
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    ours.gate.kernel.set_value(t(block.gate.weight).T)
    ours.experts.gate_proj.kernel.set_value(jnp.swapaxes(t(gate_up[:, :32]), 1, 2))
    ours.experts.up_proj.kernel.set_value(jnp.swapaxes(t(gate_up[:, 32:]), 1, 2))
    ours.experts.down_proj.kernel.set_value(jnp.swapaxes(t(down), 1, 2))
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(ours.shared_expert, name).kernel.set_value(t(getattr(block.shared_experts, name).weight).T)
    x = np.random.default_rng(0).normal(size=(2, 7, 64)).astype(np.float32)
    with torch.no_grad():
        ref = block(torch.tensor(x)).numpy()
    assert relative_error(ours(jnp.asarray(x)), ref) < 1e-5


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        moe.PRESETS["jq-moe-small"].replace(top_k=9)
    with pytest.raises(ValueError, match="sliding-window"):
        moe.config_from_hf({"model_type": "mixtral", "sliding_window": 4096, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="not a mixture-of-experts family"):
        moe.config_from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match="cannot be written as a mixtral"):
        moe.config_to_hf(moe.PRESETS["jq-moe-small"].replace(shared_expert_size=64))


def test_inconsistent_expert_shapes_are_refused(pair, tmp_path):
    case, hf, folder = pair
    tensors = moe.to_tensors(moe.from_hf(folder))
    name = next(k for k in tensors if ".experts.1." in k)
    tensors[name] = tensors[name][:, :-1]
    with pytest.raises(ValueError, match="every expert of a layer must have the same shape"):
        moe.from_tensors(moe.from_hf(folder).config, tensors)
