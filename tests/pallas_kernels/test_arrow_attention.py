"""The head-wise arrow attention kernel (``pallas_kernels/arrow_attention.py``) in interpret mode.

Checked against the dense masked softmax of ``arrow_attention_reference`` (masks from ``jquant.ops.mask``) on
fresh random inputs and window tables; NaN-poisoned K/V in the tiles the mask rules out prove those tiles are
never read; the visited-tile count is checked against ``Arrow.block_layout``.
"""

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import ops
from jquant.ops import dispatch
from jquant.ops.mask import Arrow, Full
aa = importlib.import_module("jquant.pallas_kernels.arrow_attention")  # the package exports the function by this name

_seed = itertools.count(7100)
SMALL = aa.ArrowConfig(block_q=16, block_k=16)


def _qkv(b, s, h, d, kv_heads=None, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(next(_seed)), 3)
    shapes = ((b, s, h, d), (b, s, kv_heads or h, d), (b, s, kv_heads or h, d))
    return tuple((2.0 * jax.random.normal(kk, sh)).astype(dtype) for kk, sh in zip(keys, shapes))


def _windows(rng, h, n_image):
    """A random table holding -1, 0, a window >= n_image and narrow and mid-size arrows."""
    fixed = [-1, 0, n_image + int(rng.integers(0, 5))]
    rest = rng.integers(1, max(2, n_image // 2), size=h - len(fixed)).tolist()
    return np.asarray(rng.permutation(fixed + rest), np.int32)


def _layout(n_text, n_image, text_first):
    return n_text, 0 if text_first else n_image


@pytest.mark.parametrize("text_first", [True, False], ids=["text-first", "text-last"])
@pytest.mark.parametrize("b, n_image, n_text, d, kv_heads, cfg", [
    (2, 77, 10, 16, None, SMALL), (1, 96, 16, 32, 3, SMALL), (1, 90, 11, 16, None, aa.ArrowConfig(32, 16)),
    (1, 90, 11, 16, None, aa.ArrowConfig(16, 64))], ids=["ragged-d16", "aligned-d32-gqa", "q32-k16", "q16-k64"])
def test_matches_reference_on_random_window_tables(text_first, b, n_image, n_text, d, kv_heads, cfg):
    rng = np.random.default_rng(next(_seed))
    h = 6
    q, k, v = _qkv(b, n_image + n_text, h, d, kv_heads)
    windows = _windows(rng, h, n_image)
    n_text, start = _layout(n_text, n_image, text_first)
    out = aa.arrow_attention(q, k, v, windows, n_text=n_text, text_start=start, config=cfg)
    ref = aa.arrow_attention_reference(q, k, v, windows, n_text, start)
    assert out.shape == q.shape and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("text_first", [True, False], ids=["text-first", "text-last"])
def test_every_window_up_to_two_tiles_wide(text_first):
    """Windows 1 .. 2 * block + 3 put the band's edge at every offset within a tile (the boundary-tile test)."""
    n_image, n_text = 93, 7
    windows = np.arange(1, 2 * SMALL.block_k + 4, dtype=np.int32)
    q, k, v = _qkv(1, n_image + n_text, len(windows), 16)
    n_text, start = _layout(n_text, n_image, text_first)
    out = aa.arrow_attention(q, k, v, windows, n_text=n_text, text_start=start, config=SMALL)
    np.testing.assert_allclose(out, aa.arrow_attention_reference(q, k, v, windows, n_text, start), atol=2e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 3e-2), (jnp.float16, 5e-3)])
def test_low_precision_inputs_accumulate_in_float32(dtype, tol):
    rng = np.random.default_rng(next(_seed))
    n_image, n_text = 70, 9
    q, k, v = _qkv(1, n_image + n_text, 4, 64, dtype=dtype)
    windows = _windows(rng, 4, n_image)
    out = aa.arrow_attention(q, k, v, windows, n_text=n_text, text_start=n_image, config=SMALL)
    ref = aa.arrow_attention_reference(q, k, v, windows, n_text, n_image)
    assert out.dtype == dtype
    err = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32)).max()
    assert err < tol * np.abs(np.asarray(ref, np.float32)).max()


@pytest.mark.parametrize("text_first", [True, False], ids=["text-first", "text-last"])
def test_text_rows_equal_full_attention_and_wide_windows_equal_dense(text_first):
    n_image, n_text, h = 60, 12, 4
    q, k, v = _qkv(1, n_image + n_text, h, 16)
    n_text, start = _layout(n_text, n_image, text_first)
    arrow = aa.arrow_attention(q, k, v, np.array([2, 5, n_image, n_image + 100], np.int32), n_text=n_text,
                               text_start=start, config=SMALL)
    dense = aa.arrow_attention_reference(q, k, v, np.full(h, -1), n_text, start)
    text = slice(start, start + n_text)
    np.testing.assert_allclose(arrow[:, text], dense[:, text], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(arrow[:, :, 2:], dense[:, :, 2:], atol=2e-5, rtol=1e-5)
    image = np.setdiff1d(np.arange(n_image + n_text), np.arange(start, start + n_text))
    assert float(jnp.abs(arrow[:, image, :2] - dense[:, image, :2]).max()) > 1e-3  # the narrow heads differ


@pytest.mark.parametrize("text_first", [True, False], ids=["text-first", "text-last"])
def test_tiles_outside_the_arrow_are_never_read(text_first):
    """K/V are NaN in every tile no query of one query tile may attend (per head, from ``Arrow.block_layout``).

    A read of such a tile makes that tile's output rows NaN even where the element mask drops it (``0 * NaN``
    in ``p @ v``); the rows must instead equal the reference on the clean inputs. Heads with window 0 have
    all of K/V poisoned and must return zeros.
    """
    n_image, n_text, bq, bk = 128, 16, 16, 16
    s = n_image + n_text
    n_text, start = _layout(n_text, n_image, text_first)
    windows = np.array([3, 9, 17, 0], np.int32)
    q, k, v = _qkv(1, s, len(windows), 32)
    qt = (start + n_text) // bq + 3 if text_first else 4  # an image query tile away from the text
    rows = slice(qt * bq, (qt + 1) * bq)
    kp, vp = np.array(k), np.array(v)
    poisoned = 0
    for h, w in enumerate(windows):
        layout = Arrow(n_text, int(w), start).block_layout(s, s, bq, bk)[qt] if w else np.zeros(-(-s // bk), bool)
        for kt in np.flatnonzero(~layout):
            kp[:, kt * bk:(kt + 1) * bk, h] = np.nan
            vp[:, kt * bk:(kt + 1) * bk, h] = np.nan
            poisoned += 1
    assert poisoned > 2 * (-(-s // bk))  # most tiles of the arrow heads are poisoned
    out = aa.arrow_attention(q, jnp.asarray(kp), jnp.asarray(vp), windows, n_text=n_text, text_start=start,
                             config=aa.ArrowConfig(bq, bk))
    ref = aa.arrow_attention_reference(q, k, v, windows, n_text, start)
    assert bool(jnp.all(jnp.isfinite(out[:, rows])))
    np.testing.assert_allclose(out[:, rows], ref[:, rows], atol=2e-5, rtol=1e-5)
    assert not bool(jnp.any(out[..., 3, :]))  # the skipped head: zeros everywhere


@pytest.mark.parametrize("text_first", [True, False], ids=["text-first", "text-last"])
def test_tile_count_equals_the_masks_block_layout(text_first):
    rng = np.random.default_rng(next(_seed))
    for _ in range(6):
        n_image, n_text = int(rng.integers(20, 300)), int(rng.integers(0, 40))
        bq, bk = (int(x) for x in rng.choice([16, 32, 64], size=2))
        s = n_image + n_text
        n_text, start = _layout(n_text, n_image, text_first)
        windows = _windows(rng, 5, n_image)
        counts = aa.arrow_tile_count(windows, n_text, start, s, bq, bk)
        expected = [0 if w == 0 else int(Full().block_layout(s, s, bq, bk).sum()) if w < 0 else
                    int(Arrow(n_text, int(w), start).block_layout(s, s, bq, bk).sum()) for w in windows]
        np.testing.assert_array_equal(counts, expected)


def test_one_compiled_program_serves_every_window_table():
    rng = np.random.default_rng(next(_seed))
    n_image, n_text = 50, 6
    q, k, v = _qkv(1, n_image + n_text, 4, 16)
    run = jax.jit(lambda w: aa.arrow_attention(q, k, v, w, n_text=n_text, text_start=0, config=SMALL))
    for _ in range(2):
        windows = _windows(rng, 4, n_image)
        np.testing.assert_allclose(run(jnp.asarray(windows)), aa.arrow_attention_reference(q, k, v, windows, n_text, 0),
                                   atol=2e-5, rtol=1e-5)
    assert run._cache_size() == 1


def test_attention_dispatches_arrow_masks_to_the_kernel_once_registered():
    n_image, n_text = 40, 8
    q, k, v = _qkv(2, n_image + n_text, 4, 16)
    mask = Arrow(n_text, 5, n_image)
    aa.register()
    try:
        with dispatch.force_path("pallas"), dispatch.record_dispatch(("attention",)) as records:
            out = ops.attention(q, k, v, mask)
    finally:
        dispatch.unregister_kernel(aa.NAME)
    assert [r.path for r in records] == [aa.NAME]
    with dispatch.force_path("xla"):
        np.testing.assert_allclose(out, ops.attention(q, k, v, mask), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("change, match", [
    (dict(windows=np.array([1, 2, 3], np.int32)), "one window per head"),
    (dict(windows=np.array([1, -2, 3, 4], np.int32)), "below -1"),
    (dict(windows=np.array([1.0, 2, 3, 4])), "integer"),
    (dict(n_text=30, text_start=20), "do not fit"),
    (dict(config=aa.ArrowConfig(block_q=24)), "block_q=24 must be a power of two"),
    (dict(d=24), "head dim D=24"),
])
def test_bad_input_names_the_argument(change, match):
    d = change.pop("d", 16)
    q, k, v = _qkv(1, 40, 4, d)
    kwargs = dict(windows=np.array([1, 2, 3, 4], np.int32), n_text=8, text_start=32, config=SMALL) | change
    with pytest.raises(ValueError, match=match):
        aa.arrow_attention(q, k, v, kwargs.pop("windows"), **kwargs)
