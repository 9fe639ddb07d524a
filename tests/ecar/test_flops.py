"""FLOP accounting: the models' analytical sampling counts (mar.sampling_flops, ecar.sampling_flops) against the
matmuls of the traced samplers (jquant.ecar.flops, which counts every dot_general of the jaxpr), and the counter
against hand counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jquant.ecar.flops import matmul_flops
from jquant.models import ecar, mar

TEXT_LEN, TEXT_DIM = 5, 12


def test_counter_on_hand_counted_matmuls():
    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
    assert matmul_flops(lambda x, y: x @ y, a, b) == 2 * 3 * 4 * 5
    batched = jnp.ones((2, 3, 4))
    assert matmul_flops(lambda x: jnp.einsum("bij,bjk->bik", x, jnp.ones((2, 4, 6))), batched) == 2 * 2 * 3 * 4 * 6

    def scanned(x):
        return jax.lax.scan(lambda c, _: (c @ jnp.ones((4, 4)), None), x, None, length=7)[0]

    assert matmul_flops(jax.jit(scanned), jnp.ones((3, 4))) == 7 * 2 * 3 * 4 * 4


def _text(batch):
    return (jnp.ones((batch, TEXT_LEN, TEXT_DIM)), jnp.ones((batch, TEXT_DIM)))


@pytest.mark.parametrize("guidance", [None, 2.0])
def test_mar_sampling_flops_match_the_traced_sampler(guidance):
    cfg = mar.MARConfig(latent_size=4, latent_channels=3, width=16, depth=2, heads=2, mlp_ratio=3, text_dim=TEXT_DIM,
                        head_width=8, head_depth=2, ar_steps=5)
    graphdef, state = nnx.split(mar.init_model(cfg, jax.random.key(0)))
    cond = _text(1)
    uncond = None if guidance is None else _text(1)
    counts = tuple(int(c) for c in mar.mask_schedule(cfg.num_tokens, cfg.ar_steps))
    g = None if guidance is None else jnp.float32(guidance)
    traced = matmul_flops(lambda st, key: mar._sample(graphdef, st, cond, uncond, key, g, counts=counts, head_steps=3,
                                                      batch=1), state, jax.random.key(1))
    assert traced == mar.sampling_flops(cfg, text_len=TEXT_LEN, head_steps=3, guidance=guidance is not None)


@pytest.mark.parametrize("guidance", [None, 2.0])
def test_ecar_sampling_flops_match_the_traced_sampler(guidance):
    cfg = ecar.ECARConfig(latent_size=4, latent_channels=3, resolutions=(1, 2, 4), edges=(1.0, 0.5, 0.2, 0.0),
                          stage_steps=(2, 3, 1), width=16, depth=2, heads=2, mlp_ratio=3, text_dim=TEXT_DIM,
                          head_width=8, head_depth=2)
    graphdef, state = nnx.split(ecar.init_model(cfg, jax.random.key(0)))
    cond = _text(1)
    uncond = None if guidance is None else _text(1)
    g = None if guidance is None else jnp.float32(guidance)
    traced = matmul_flops(lambda st, key: ecar._sample(graphdef, st, cond, uncond, key, g, schedule=cfg.schedule(),
                                                       batch=1), state, jax.random.key(1))
    assert traced == ecar.sampling_flops(cfg, text_len=TEXT_LEN, guidance=guidance is not None)


def test_multistage_head_cost_follows_the_resolutions():
    """Spec §5.5: with the same total Euler steps, S stages cost the head ≈ (1/S) Σ_s (r_s / h)² of one stage at full
    resolution (exactly, with equal steps per stage)."""
    common = dict(latent_size=8, latent_channels=4, width=16, depth=1, heads=2, text_dim=TEXT_DIM, head_width=8,
                  head_depth=2)
    one = ecar.ECARConfig(resolutions=(8,), edges=(1.0, 0.0), stage_steps=(6,), **common)
    three = ecar.ECARConfig(resolutions=(2, 4, 8), edges=(1.0, 0.6, 0.3, 0.0), stage_steps=(2, 2, 2), **common)
    head = lambda cfg: ecar.sampling_flops(cfg, text_len=TEXT_LEN, guidance=False) - ecar.sampling_flops(  # noqa: E731
        cfg.replace(head_depth=1), text_len=TEXT_LEN, guidance=False)  # one head block's share, proportional
    assert head(three) / head(one) == pytest.approx(sum((r / 8) ** 2 for r in (2, 4, 8)) / 3)
