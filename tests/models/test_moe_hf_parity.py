"""The MoE family through the shared family suite: parity with transformers' Mixtral, Qwen2-MoE and Qwen3-MoE.

Each case builds a tiny random transformers model with every tensor perturbed (router weights included,
which transformers initialises to zero), writes it with ``save_pretrained`` (the per-expert on-disk layout)
and loads it with ``moe.from_hf``. DeepSeek-MoE routing (no renormalisation, scaling factor, ungated shared
experts) is compared at the level of the MoE block, since DeepSeek-V2's attention (MLA) is not implemented.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from jquant.models import moe  # noqa: E402
from jquant.models.layers import SparseMoE, SparseMoEConfig  # noqa: E402
from jquant.testing.family_suite import FamilySpec, FamilySuite, torch_reference_logits  # noqa: E402
from jquant.testing.hf_reference import relative_error  # noqa: E402

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


def _reload(case: str, folder):
    return getattr(transformers, CASES[case][0]).from_pretrained(
        folder, attn_implementation="eager", experts_implementation="eager").eval()


class TestMoEFamily(FamilySuite):
    spec = FamilySpec(
        family=moe.FAMILY,
        # Qwen2-MoE-style: a dense first layer, a gated shared expert and q/k/v biases
        tiny_config=moe.MoEConfig(family="qwen2_moe", vocab_size=BASE["vocab_size"], hidden_size=32,
                                  intermediate_size=48, moe_intermediate_size=16, num_layers=2, num_heads=2,
                                  num_kv_heads=1, num_experts=4, top_k=2, shared_expert_size=24,
                                  shared_expert_gate=True, dense_layers=(0,), qkv_bias=True),
        vocab_size=BASE["vocab_size"],
        first_token=3,
        cases=tuple(sorted(CASES)),
        build_reference=_build,
        reference_logits=torch_reference_logits,
        reload_reference=_reload,
        parity_shape=(2, 10),
        decode_prefill=4,
        float64_tolerance=2e-6,
    )

    def test_config_and_structure(self, reference):
        case, hf, folder = reference
        model = moe.from_hf(folder)
        cfg = model.config
        assert cfg.family == case and len(model.moe_layers()) == cfg.num_layers - len(cfg.dense_layers)
        if case == "qwen2_moe":
            assert cfg.dense_layers == (0,) and cfg.shared_expert_gate and not cfg.norm_topk_prob
        assert model.moe_layers()[0].experts.gate_proj.kernel.shape == (cfg.num_experts, 64, cfg.moe_intermediate_size)

    def test_inconsistent_expert_shapes_are_refused(self, reference):
        case, hf, folder = reference
        model = moe.from_hf(folder)
        tensors = moe.to_tensors(model)
        name = next(k for k in tensors if ".experts.1." in k)
        tensors[name] = tensors[name][:, :-1]
        with pytest.raises(ValueError, match="every expert of a layer must have the same shape"):
            moe.from_tensors(model.config, tensors)


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
        moe.FAMILY.presets["jq-moe-small"].replace(top_k=9)
    with pytest.raises(ValueError, match="sliding-window"):
        moe.config_from_hf({"model_type": "mixtral", "sliding_window": 4096, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="not a mixture-of-experts family"):
        moe.config_from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match="cannot be written as a mixtral"):
        moe.config_to_hf(moe.FAMILY.presets["jq-moe-small"].replace(shared_expert_size=64))

