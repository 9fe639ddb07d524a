"""jquant.ops.mask against numpy constructions, and attention with a Mask against attention with its dense array."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import ops


def _reference(kind, q_len, k_len, q_offset, lengths=None, **kw):
    """Pair by pair, from the definitions."""
    out = np.zeros((q_len, k_len), bool)
    for r, j in itertools.product(range(q_len), range(k_len)):
        i = q_offset + r
        if kind == "full":
            out[r, j] = True
        elif kind == "causal":
            out[r, j] = j <= i
        elif kind == "sliding":
            out[r, j] = i - kw["window"] < j <= i
        elif kind == "band":
            out[r, j] = abs(i - j) <= kw["half_width"]
        elif kind == "arrow":
            text = range(kw.get("text_start", 0), kw.get("text_start", 0) + kw["n_text"])
            out[r, j] = i in text or j in text or abs(i - j) <= kw["half_width"]
    if lengths is not None:
        out = out[None] & (np.arange(k_len)[None, None, :] < np.asarray(lengths)[:, None, None])
    return out


MASKS = [
    (ops.Full(), "full", {}),
    (ops.Causal(), "causal", {}),
    (ops.SlidingWindow(3), "sliding", dict(window=3)),
    (ops.Band(2), "band", dict(half_width=2)),
    (ops.Arrow(n_text=3, half_width=2), "arrow", dict(n_text=3, half_width=2)),
    (ops.Arrow(n_text=4, half_width=1, text_start=9), "arrow", dict(n_text=4, half_width=1, text_start=9)),
    (ops.Arrow(n_text=0, half_width=0), "arrow", dict(n_text=0, half_width=0)),
]


@pytest.mark.parametrize("mask, kind, kw", MASKS)
@pytest.mark.parametrize("q_len, k_len, q_offset", [(13, 13, 0), (4, 13, 9), (1, 11, 6)])
def test_dense_matches_the_definition(mask, kind, kw, q_len, k_len, q_offset):
    np.testing.assert_array_equal(mask.dense(q_len, k_len, q_offset), _reference(kind, q_len, k_len, q_offset, **kw))


def test_padding_and_combinations():
    lengths = np.array([5, 9, 1])
    got = (ops.Causal() & ops.Padding(jnp.asarray(lengths))).dense(6, 9, 2)
    np.testing.assert_array_equal(np.asarray(got), _reference("causal", 6, 9, 2, lengths))
    arrow_window = ops.Arrow(2, 3) & ops.SlidingWindow(4)
    np.testing.assert_array_equal(arrow_window.dense(10, 10),
                                  _reference("arrow", 10, 10, 0, n_text=2, half_width=3)
                                  & _reference("sliding", 10, 10, 0, window=4))


def test_sliding_window_equals_causal_mask():
    pos = np.broadcast_to(np.arange(9), (2, 9))
    np.testing.assert_array_equal(np.asarray(ops.causal_mask(pos, pos, sliding_window=4)),
                                  np.broadcast_to(ops.SlidingWindow(4).dense(9, 9), (2, 9, 9)))


def _tiles(dense, block_q, block_k):
    """Tiles holding an allowed pair, one tile at a time."""
    nq, nk = -(-dense.shape[-2] // block_q), -(-dense.shape[-1] // block_k)
    out = np.zeros(dense.shape[:-2] + (nq, nk), bool)
    for a, c in itertools.product(range(nq), range(nk)):
        out[..., a, c] = dense[..., a * block_q:(a + 1) * block_q, c * block_k:(c + 1) * block_k].any(axis=(-2, -1))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_block_layout_is_exactly_the_tiles_with_allowed_pairs(seed):
    rng = np.random.default_rng(seed)
    for mask, kind, kw in MASKS:
        q_len, k_len = (int(n) for n in rng.integers(1, 70, 2))
        block_q, block_k = (int(n) for n in rng.choice([1, 3, 8, 16], 2))
        q_offset = int(rng.integers(0, 20))
        layout = mask.block_layout(q_len, k_len, block_q, block_k, q_offset)
        assert isinstance(layout, np.ndarray)
        want = _tiles(_reference(kind, q_len, k_len, q_offset, **kw), block_q, block_k)
        np.testing.assert_array_equal(layout, want, err_msg=f"{mask} {q_len}x{k_len} tiles {block_q}x{block_k}")
    lengths = rng.integers(1, 40, 3)
    padded = (ops.Causal() & ops.Padding(jnp.asarray(lengths))).block_layout(40, 40, 16, 8)
    np.testing.assert_array_equal(np.asarray(padded), _tiles(_reference("causal", 40, 40, 0, lengths), 16, 8))


def test_arrow_layout_skips_the_far_image_tiles():
    layout = ops.Arrow(n_text=64, half_width=32).block_layout(1024, 1024, 64, 64)
    assert layout[0].all() and layout[:, 0].all()  # the text tile row and column
    assert layout.sum() == 31 + 15 + 2 * 14  # 16 x 16 tiles: text row + column, the image diagonal and its neighbours
    np.testing.assert_array_equal(layout, _tiles(_reference("arrow", 1024, 1024, 0, n_text=64, half_width=32), 64, 64))


@pytest.mark.parametrize("mask", [ops.Causal(), ops.Arrow(n_text=3, half_width=2), ops.Band(1),
                                  ops.SlidingWindow(2) & ops.Padding(jnp.array([7, 4]))])
def test_attention_with_a_mask_equals_attention_with_its_dense_array(mask):
    rng = np.random.default_rng(11)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, h, 8)), jnp.float32) for n, h in ((7, 4), (7, 2), (7, 2)))
    dense = np.broadcast_to(mask.dense(7, 7), (2, 7, 7))
    np.testing.assert_array_equal(np.asarray(ops.attention(q, k, v, mask)),
                                  np.asarray(ops.attention(q, k, v, jnp.asarray(dense))))


def test_traced_offset_and_lengths_under_jit():
    rng = np.random.default_rng(12)
    q = jnp.asarray(rng.standard_normal((2, 1, 2, 4)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 6, 2, 4)), jnp.float32) for _ in range(2))

    @jax.jit
    def step(offset, lengths):
        return ops.attention(q, k, v, ops.Causal() & ops.Padding(lengths), q_offset=offset)

    got = step(jnp.int32(3), jnp.array([6, 2]))
    dense = _reference("causal", 1, 6, 3, np.array([6, 2]))  # compiled vs eager: equal up to rounding
    np.testing.assert_allclose(np.asarray(got), np.asarray(ops.attention(q, k, v, jnp.asarray(dense))), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("build, match", [
    (lambda: ops.SlidingWindow(0), r"SlidingWindow: window=0 must be an int >= 1"),
    (lambda: ops.Band(-1), r"Band: half_width=-1 must be an int >= 0"),
    (lambda: ops.Arrow(n_text=2.5, half_width=1), r"Arrow: n_text=2.5"),
    (lambda: ops.Padding(jnp.ones((2, 3), jnp.int32)), r"Padding: lengths must be a \[B\] integer array"),
    (lambda: ops.Causal().block_layout(8, 8, 0, 4), r"block_q=0 must be an int >= 1"),
    (lambda: ops.attention(jnp.ones((1, 3, 2, 4)), jnp.ones((1, 5, 2, 4)), jnp.ones((1, 5, 2, 4)),
                           jnp.ones((1, 3, 4), bool)), r"mask shape \(1, 3, 4\) does not broadcast to \[B, T, S\]"),
])
def test_bad_masks_raise_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()
