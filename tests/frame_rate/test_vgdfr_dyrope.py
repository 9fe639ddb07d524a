"""DyRoPE's G calibration (spec ``vgdfr.md`` §7.1) on a tiny random HunyuanVideo DiT with weights large enough that
RoPE moves the output: errors against a hand computation, the chosen set. (No merge = identical tables: in
``tests/models/test_hunyuan_video.py``.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.frame_rate.dyrope import choose_global_blocks, global_block_errors
from jquant.frame_rate.schedule import MergePlan
from jquant.models import hunyuan_video

DIT = hunyuan_video.HunyuanVideoConfig(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32,
                                       num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=8,
                                       pooled_projection_dim=8, rope_axes_dim=(8, 12, 12))


def _setup():
    model = hunyuan_video.init_model(DIT, jax.random.key(0))
    nnx.update(model, jax.tree.map(lambda p: p * 10 if p.ndim == 2 else p, nnx.state(model, nnx.Param)))
    keys = jax.random.split(jax.random.key(1), 4)
    clean = jax.random.normal(keys[0], (1, 7, 4, 4, 4))
    noise = jax.random.normal(keys[1], clean.shape)
    cond = (jax.random.normal(keys[2], (1, 5, 8)), jnp.ones((1, 5), jnp.int32), jax.random.normal(keys[3], (1, 8)))
    return model, clean, noise, cond


def test_errors_match_a_hand_computation_and_choose_the_helpful_blocks():
    model, clean, noise, cond = _setup()
    plan = MergePlan(25, 4, ((1, 4),))  # latents 2, 3, 4 dropped: positions 0 1 5 6 vs local 0 1 2 3
    local, per_block = global_block_errors(model, clean, noise, 0.6, plan, cond)
    x = 0.6 * noise + 0.4 * clean
    s = jnp.full((1,), 0.6)
    kept = [0, 1, 5, 6]
    ref = np.asarray(model.flow_velocity(x, s, *cond))[:, kept]
    v = np.asarray(model.flow_velocity(x[:, kept], s, *cond, global_frame_positions=jnp.asarray(kept, jnp.float32),
                                       global_blocks=(1,)))  # eager: not the module's jitted path
    np.testing.assert_allclose(per_block[1], np.linalg.norm(v - ref) / np.linalg.norm(ref), rtol=1e-4)
    assert per_block.shape == (2,) and len(set(np.round(per_block, 6))) > 1  # the blocks differ
    chosen = choose_global_blocks(model, clean, noise, 0.6, plan, cond)
    assert chosen == tuple(int(b) for b in np.flatnonzero(per_block < local))
