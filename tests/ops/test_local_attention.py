"""Head-wise windows and arrows (jquant.ops.local_attention) against jquant.ops.attention with the Mask types."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jquant import ops
from jquant.ops.mask import Arrow, Band, Full


def _inputs(seed: int, n_text: int, n_image: int, heads: int = 5, dim: int = 8):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(2, n_text + n_image, heads, dim)), jnp.float32) for _ in range(3))


def _per_head_oracle(q, k, v, windows, n_text, text_start, pattern):
    """Each head alone through ops.attention with its Mask; zeros for window 0."""
    outs = []
    for h, w in enumerate(windows):
        sl = slice(h, h + 1)
        if w == 0:
            outs.append(jnp.zeros_like(q[:, :, sl]))
            continue
        mask = Full() if w == -1 else Arrow(n_text, w, text_start) if pattern == "arrow" else Band(w)
        outs.append(ops.attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], mask))
    return np.asarray(jnp.concatenate(outs, axis=2))


@pytest.mark.parametrize("pattern", ["arrow", "band"])
@pytest.mark.parametrize("text_first", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_computed_and_reference_paths_equal_masked_attention(pattern, text_first, seed):
    n_text, n_image = 5, 13
    rng = np.random.default_rng(100 + seed)
    windows = [int(x) for x in rng.choice([-1, 0, 1, 2, 3, 6, 40], size=5)]
    text_start = 0 if text_first else n_image
    q, k, v = _inputs(seed, n_text, n_image)
    oracle = _per_head_oracle(q, k, v, windows, n_text, text_start, pattern)
    options = dict(n_text=n_text, text_start=text_start, pattern=pattern)
    np.testing.assert_allclose(np.asarray(ops.local_attention(q, k, v, windows, **options)), oracle, atol=2e-6)
    reference = ops.local_attention_reference(q, k, v, jnp.asarray(windows), **options)
    np.testing.assert_allclose(np.asarray(reference), oracle, atol=2e-6)


def test_arrow_text_rows_and_wide_windows_equal_full_attention():
    n_text, n_image = 4, 11
    q, k, v = _inputs(3, n_text, n_image, heads=3)
    full = np.asarray(ops.attention(q, k, v, Full()))
    arrow = np.asarray(ops.local_attention(q, k, v, [1, 2, n_image], n_text=n_text, text_start=n_image))
    np.testing.assert_allclose(arrow[:, n_image:], full[:, n_image:], atol=2e-6)  # text rows see everything
    np.testing.assert_allclose(arrow[:, :, 2], full[:, :, 2], atol=2e-6)  # w >= n_image: the whole image
    assert not np.allclose(arrow[:, :n_image, 0], full[:, :n_image, 0], atol=1e-3)


def test_bad_windows_and_layouts_are_refused():
    q, k, v = _inputs(0, 3, 6, heads=2)
    with pytest.raises(ValueError, match="one window per head"):
        ops.local_attention(q, k, v, [1], n_text=3, text_start=6)
    with pytest.raises(ValueError, match="text first"):
        ops.local_attention(q, k, v, [1, 1], n_text=3, text_start=2)
    with pytest.raises(ValueError, match="pattern"):
        ops.local_attention(q, k, v, [1, 1], n_text=3, text_start=6, pattern="diagonal")
