"""Sharded forward on a Mesh of 8 CPU devices equals the single-device forward.

The 8 fake devices need XLA_FLAGS before JAX starts, so the check runs in its
own process.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jquant import sharding
from jquant.models import llama

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import Mesh
    from jquant import sharding
    from jquant.models import llama

    assert jax.device_count() == 8, jax.devices()
    cfg = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=2, qkv_bias=True)
    model = llama.init_model(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 128, size=(4, 16)).astype(np.int32)
    expected = np.asarray(model(tokens))

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    sharded = sharding.shard_model(model, mesh)
    q = sharded.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model"), q.sharding
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (64, 16)
    got = jax.jit(lambda m, t: m(t))(sharded, sharding.shard_batch(tokens, mesh))
    assert len(got.sharding.device_set) == 8
    err = np.max(np.abs(np.asarray(got) - expected)) / np.max(np.abs(expected))
    assert err < 1e-5, err
    # the unsharded model is untouched
    assert len(model.layers[0].self_attn.q_proj.kernel[...].sharding.device_set) == 1
    print("OK", err)
    """
)


def test_forward_on_8_device_mesh_matches_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK")


def test_rule_naming_a_missing_mesh_axis_is_rejected():
    cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    model = llama.init_model(cfg, jax.random.key(0))
    mesh = Mesh(jax.devices()[:1], ("data",))
    with pytest.raises(ValueError, match="'model'"):
        sharding.partition_specs(model, mesh)


def test_restore_uncommitted_keeps_values_and_commits_only_where_the_live_array_is_committed():
    rng = np.random.default_rng()
    device = jax.devices()[0]
    live = {"built": jnp.asarray(rng.standard_normal(3)),  # uncommitted, as a freshly built model's
            "placed": jax.device_put(rng.standard_normal(4), device)}  # committed, as a sharded model's
    restored = {k: jax.device_put(rng.standard_normal(v.shape), device) for k, v in live.items()}  # orbax: committed
    expected = {k: np.asarray(v) for k, v in restored.items()}
    out = sharding.restore_uncommitted(lambda: restored, like=live)
    assert not out["built"].committed and out["placed"].committed
    assert out["placed"] is restored["placed"]
    for k in live:
        np.testing.assert_array_equal(np.asarray(out[k]), expected[k])
    host = sharding.restore_uncommitted(lambda: {"a": rng.standard_normal(2)})  # NumPy leaves, no `like`
    assert isinstance(host["a"], jax.Array) and not host["a"].committed
