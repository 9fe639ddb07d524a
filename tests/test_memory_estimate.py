"""The largest intermediate of a traced computation, against the sizes worked out by hand on fresh random shapes."""

import jax
import jax.numpy as jnp
import numpy as np

from jquant.memory_estimate import largest_intermediate_bytes


def test_attention_scores_inside_jit_are_found():
    n, d = (int(v) for v in np.random.default_rng().integers(64, 512, 2))

    @jax.jit
    def attention(q):
        return jax.nn.softmax(q @ q.T, axis=-1) @ q

    assert largest_intermediate_bytes(attention, jax.ShapeDtypeStruct((n, d), jnp.float32)) == max(n * n, n * d) * 4


def test_scan_and_cond_bodies_are_looked_into_with_their_dtypes():
    n = int(np.random.default_rng().integers(100, 400))

    def body(c, _):
        outer = jnp.outer(c, c).astype(jnp.bfloat16)  # [n, n] float32, then bf16
        return c + outer.sum(0).astype(c.dtype), None

    def scanned(x):
        return jax.lax.scan(body, x, None, length=3)[0]

    assert largest_intermediate_bytes(scanned, jax.ShapeDtypeStruct((n,), jnp.float32)) == n * n * 4

    def branches(x):
        return jax.lax.cond(x.sum() > 0, lambda v: jnp.tile(v, (7,)).sum() * v, lambda v: v, x)

    assert largest_intermediate_bytes(branches, jax.ShapeDtypeStruct((n,), jnp.float32)) == 7 * n * 4
