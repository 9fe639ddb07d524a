"""expert_usage counts equal the routing the MoE layers sow, and its σ equals EBSS's expert_balance."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.calib.ebss import expert_balance
from jquant.eval import expert_usage
from jquant.models import moe


def test_counts_match_sown_routing():
    cfg = moe.MoEConfig(family="qwen3_moe", vocab_size=50, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                        num_layers=3, num_heads=4, num_kv_heads=2, num_experts=5, top_k=2, qk_norm=True, dense_layers=(1,))
    model = moe.init_model(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 50, (3, 11)).astype(np.int32)
    usage = expert_usage(model, tokens, batch_size=2)
    assert usage.layers == ("layers/0/mlp/experts", "layers/2/mlp/experts")
    probe = nnx.clone(model)
    for layer in probe.moe_layers():
        layer.capture_routing = True
    _, captured = nnx.capture(lambda m, t: m(t), nnx.Intermediate)(probe, jnp.asarray(tokens))
    for i, layer in enumerate((0, 2)):
        chosen = np.asarray(captured["layers"][layer]["mlp"]["routed_experts"][0]).reshape(-1)
        np.testing.assert_array_equal(usage.counts[i], np.bincount(chosen, minlength=5))
    assert usage.counts.sum() == 2 * tokens.size * 2
    np.testing.assert_allclose(usage.sigma, float(expert_balance(jnp.asarray(usage.counts))), rtol=1e-6)
