"""RWKVQuant's codebook pieces: Mahalanobis k-means start, SVD / int8 codebook compression and its bit count,
the codebook branch against GPTVQ, and the driver's default 10% VQ share."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jquant.models import rwkv6

from jquant.algorithms.gptvq import GPTVQConfig, gptvq_quantize
from jquant.algorithms.rwkvquant import mix_codebook
from jquant.formats import dequantize, get_format
from jquant.methods.rwkvquant import RWKVQuantConfig, rwkvquant, rwkvquant_recipe
from jquant.methods.rwkvquant_codebook import (
    CodebookCompression,
    codebook_storage,
    compress_codebooks,
    fit_codebook,
    mahalanobis_init,
    storage_bits,
)
from jquant.methods.rwkvquant_vq import (
    ALGORITHM,
    CodebookOptions,
    mix_codebook_compressed,
    rwkvquant_vq,
)
from jquant.sites import find_sites

FMT = get_format("vq-d1-k3-cb32x16")


def _reference_init(x: np.ndarray, k: int) -> np.ndarray:
    """The paper code's Mahalanobis start written out point by point in float64: D_i = (x_i − μ)ᵀ Σ⁻¹ (x_i − μ),
    Σ = Σ_i (x_i − μ)(x_i − μ)ᵀ; the points at ranks round(i (N − 1) / (k − 1)) of D (ties by index)."""
    n = len(x)
    mu = sum(x) / n
    sigma = sum(np.outer(p - mu, p - mu) for p in x)
    dist = [float((p - mu) @ np.linalg.solve(sigma, p - mu)) for p in x]
    order = sorted(range(n), key=lambda i: (dist[i], i))
    return np.stack([x[order[round(i * (n - 1) / (k - 1))]] for i in range(k)])


def _reference_lloyd_step(x, w, c):
    """One weighted assignment + update, then the assignment to the updated centroids."""
    assign = lambda c: np.array([min(range(len(c)), key=lambda j: float(np.sum(wi * (xi - c[j]) ** 2)))
                                 for xi, wi in zip(x, w)])
    labels = assign(c)
    new = np.stack([(w[labels == j] * x[labels == j]).sum(0) / w[labels == j].sum(0) if np.any(labels == j) else c[j]
                    for j in range(len(c))])
    return new, assign(new)


@pytest.mark.parametrize("d", [1, 2])
def test_mahalanobis_start_and_first_lloyd_step_match_a_float64_reference(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((67, d)) * rng.uniform(0.5, 3.0, d) + rng.standard_normal(d)
    w = rng.uniform(0.2, 2.0, (67, d))
    init = _reference_init(x, 8)
    np.testing.assert_allclose(mahalanobis_init(x, 8), init, rtol=0, atol=0)
    centroids, labels = _reference_lloyd_step(x, w, init)
    fit = fit_codebook(x, 8, weights=w, init="mahalanobis", iters=1)
    np.testing.assert_allclose(fit.centroids, centroids, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(fit.labels, labels)


def _layer(seed=0, n=64, m=128):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((512, n)) * rng.uniform(0.3, 2.0, n)
    w = 0.05 * rng.standard_normal((n, m))
    return jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32), w, x.T @ x


def test_the_codebook_branch_with_kmeanspp_and_no_compression_is_gptvq():
    w, h, *_ = _layer()
    config = GPTVQConfig(finetune_steps=5, kmeans_iters=10)
    ours = rwkvquant_vq(w, h, FMT, config=config, options=CodebookOptions(init="kmeans++"))
    ref = gptvq_quantize(w, h, FMT, config=config)
    np.testing.assert_array_equal(np.asarray(ours.codes), np.asarray(ref.codes))
    np.testing.assert_array_equal(np.asarray(ours.codebooks), np.asarray(ref.codebooks))
    mu = jnp.asarray(np.random.default_rng(1).uniform(0, 1, 256), jnp.float32)
    s = np.random.default_rng(2).uniform(0.1, 3, 256)
    fmt = get_format("vq-d1-k3-cb64xall")
    np.testing.assert_array_equal(
        np.asarray(dequantize(mix_codebook_compressed(mu, fmt, s, options=CodebookOptions(init="kmeans++")))),
        np.asarray(dequantize(mix_codebook(mu, fmt, s))))


def test_svd_and_int8_codebooks_reconstruct_as_numpy_does():
    rng = np.random.default_rng(3)
    books = rng.standard_normal((40, 8, 1)) * rng.uniform(0.5, 2, (40, 1, 1))
    sorted_books = np.sort(books[..., 0], axis=1)
    # int8 only: s = fp16(max|C| / 127), C ≈ s · round(C / s)
    int8 = compress_codebooks(books, CodebookCompression(bits=8))
    s = np.float64(np.float16(np.abs(sorted_books).max() / 127))
    np.testing.assert_allclose(int8.decompress()[..., 0], s * np.round(sorted_books / s), rtol=1e-6, atol=1e-7)
    # SVD only: the rank-4 truncation of the sorted codebooks (float16 basis)
    u, sig, vt = np.linalg.svd(sorted_books, full_matrices=False)
    rank4 = (u[:, :4] * sig[:4]) @ vt[:4]
    svd = compress_codebooks(books, CodebookCompression(svd_rank=4, bits=None))
    np.testing.assert_allclose(svd.decompress()[..., 0], rank4, atol=3e-3 * np.abs(rank4).max())
    assert np.linalg.norm(svd.decompress()[..., 0] - sorted_books) < 1.01 * np.linalg.norm(rank4 - sorted_books)
    # both: within one int8 step of the rank-4 truncation, coefficients int8 with one scale
    both = compress_codebooks(books, CodebookCompression(svd_rank=4, bits=8))
    assert both.coeffs.dtype == np.int8 and both.scale.shape == (1,)
    step = float(both.scale[0]) * np.abs(both.basis.astype(np.float64)).sum(0).max()
    np.testing.assert_allclose(both.decompress()[..., 0], rank4, atol=step / 2 + 3e-3 * np.abs(rank4).max())


@pytest.mark.parametrize("svd_rank, bits", [(None, 8), (4, 8), (4, None), (None, None)])
def test_compressed_bits_per_weight_match_the_hand_formula(svd_rank, bits):
    w, h, *_ = _layer(n=64, m=128)
    options = CodebookOptions(init="mahalanobis", svd_rank=svd_rank, codebook_bits=bits)
    q = rwkvquant_vq(w, h, FMT, config=GPTVQConfig(finetune_steps=0, kmeans_iters=5), options=options)
    from jquant.methods.rwkvquant_vq import stored_bits_per_weight
    n, m, K = 64, 128, 8
    row_groups, col_groups = n // 32, m // 16
    coeff = (svd_rank or K) * (8 if bits else 16)
    per_step = col_groups * coeff + (svd_rank * K * 16 if svd_rank else 0) + (16 if bits else 0)
    assert stored_bits_per_weight(q, options) == pytest.approx(3 + row_groups * per_step / (n * m), abs=1e-12)
    packed = compress_codebooks(np.asarray(q.codebooks[0, :, 0], np.float64), options.compression)
    assert 8 * packed.nbytes == storage_bits(codebook_storage(col_groups, K, 1, options.compression)) == per_step


def test_stored_codebooks_are_the_compressed_ones_and_the_error_stays_close():
    w, h, w64, h64 = _layer(seed=4)
    config = GPTVQConfig(finetune_steps=0, kmeans_iters=20)
    err = {}
    for name, opts in {"float": CodebookOptions(), "int8": CodebookOptions(codebook_bits=8),
                       "svd+int8": CodebookOptions(svd_rank=4, codebook_bits=8)}.items():
        q = rwkvquant_vq(w, h, FMT, config=config, options=opts)
        if opts.compression.active:
            for r in range(q.codebooks.shape[0]):  # each row group's stored codebooks survive a second compression
                stored = np.asarray(q.codebooks[r, :, 0], np.float64)
                again = compress_codebooks(stored, opts.compression).decompress()
                np.testing.assert_allclose(stored, again, atol=float(np.abs(stored).max()) * 2e-2)
        e = np.asarray(dequantize(q, np.float32), np.float64) - w64
        err[name] = np.trace(e.T @ h64 @ e) / np.trace(w64.T @ h64 @ w64)
    assert err["int8"] < 1.1 * err["float"] and err["svd+int8"] < 1.25 * err["float"], err


@pytest.mark.parametrize("svd_rank, bits", [(4, 8), (None, 8)])
def test_m_step_on_compressed_codebooks_lowers_the_output_error_at_the_same_storage(svd_rank, bits):
    w, h, w64, h64 = _layer(seed=5)
    options = CodebookOptions(svd_rank=svd_rank, codebook_bits=bits)
    err, qs = {}, {}
    for steps in (0, 100):  # the M-step: Adam on A and V (GPTVQConfig's default steps)
        q = rwkvquant_vq(w, h, FMT, config=GPTVQConfig(finetune_steps=steps, kmeans_iters=20), options=options)
        e = np.asarray(dequantize(q, np.float32), np.float64) - w64
        err[steps], qs[steps] = np.trace(e.T @ h64 @ e) / np.trace(w64.T @ h64 @ w64), q
    # k-means centroids leave little to gain for fixed assignments (the uncompressed update gains ~0.5% here too)
    assert err[100] < 0.997 * err[0], err
    np.testing.assert_array_equal(np.asarray(qs[100].codes), np.asarray(qs[0].codes))  # assignments fixed
    for r in range(qs[100].codebooks.shape[0]):  # still codebooks the compressed storage holds
        stored = np.asarray(qs[100].codebooks[r, :, 0], np.float64)
        again = compress_codebooks(stored, options.compression).decompress()
        np.testing.assert_allclose(stored, again, atol=float(np.abs(stored).max()) * 2e-2)


@pytest.mark.parametrize("changes, match", [
    ({"svd_rank": 0}, "svd_rank"), ({"codebook_bits": 4}, "bits must be 8"), ({"init": "random"}, "init"),
])
def test_bad_codebook_options_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        CodebookOptions(**changes)
    key = {"init": "kmeans_init"}.get(next(iter(changes)), next(iter(changes)))
    with pytest.raises(ValueError, match=match):
        RWKVQuantConfig(**{key: next(iter(changes.values()))})


CFG = rwkv6.RWKV6Config(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=2, head_size=64,
                        mix_rank=32, decay_rank=64, chunk_size=4)


def _model():
    model = rwkv6.init_model(CFG, jax.random.key(0))
    rng = np.random.default_rng(1)
    for site in find_sites(model):
        v = site.weight.get_value()
        if site.spec.kind == "linear" and not np.any(np.asarray(v)):
            site.weight.set_value(jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype))
    return model


def test_default_sends_the_papers_tenth_of_the_matrices_to_vq_and_fixed_thresholds_stay_available():
    model = _model()
    _, report = rwkvquant_recipe(model)
    explicit = rwkvquant_recipe(model, RWKVQuantConfig(vq_fraction=0.1))[1]
    assert [(s.path, s.method) for s in report.sites] == [(s.path, s.method) for s in explicit.sites]
    linear = [s for s in report.sites if s.method != "mix"]
    k = round(0.1 * len(linear))  # percentile_thresholds: about k matrices (ties between the two proxies' ranks)
    assert k <= sum(s.method == "vq" for s in linear) <= k + 1
    _, fixed = rwkvquant_recipe(model, RWKVQuantConfig(tau_c=float("inf"), tau_f=float("inf")))
    assert {s.method for s in fixed.sites} == {"sq", "mix"}


def test_paper_codebooks_end_to_end_report_the_compressed_bits():
    model = _model()
    tokens = np.random.default_rng(0).integers(0, 64, size=(4, 16)).astype(np.int32)
    config = RWKVQuantConfig(vq_fraction=0.25, kmeans_init="mahalanobis", svd_rank=4, codebook_bits=8,
                             vq_options={"finetune_steps": 0, "kmeans_iters": 10}, mix_options={"kmeans_iters": 10})
    recipe, _ = rwkvquant_recipe(model, config)
    assert {r.algorithm for r in recipe.rules} == {"rwkvquant", ALGORITHM}
    qmodel, report = rwkvquant(model, tokens, config, progress=False)
    stored = {s.path: s.weight.get_value() for s in find_sites(qmodel)}
    for site in report.sites:
        q = stored[site.path]
        if site.method == "sq":
            assert site.bits_per_weight == q.bits_per_element
            continue
        # int8 coefficients [groups, r] + float16 basis [r, K] + one float16 scale per fitting step replace the
        # float16 codebooks (a row group of a matrix, the whole vector for a mix); small matrices may pay more
        grid = q.codebooks.shape[:q.ndim]
        steps = grid[0] if q.ndim > 1 else 1
        groups = int(np.prod(grid)) // steps
        r = min(4, groups, 8)
        assert site.bits_per_weight == pytest.approx(3 + steps * (groups * r * 8 + r * 8 * 16 + 16) / q.size)
    logits, ref = np.asarray(qmodel(tokens)), np.asarray(model(tokens))
    assert np.linalg.norm(logits - ref) < 0.5 * np.linalg.norm(ref)


def test_the_codebook_algorithm_is_found_in_a_fresh_process():
    """A checkpoint naming ``rwkvquant-codebook`` re-plans its recipe at load: the algorithm must be found without
    importing ``jquant.methods`` first."""
    import subprocess
    import sys

    code = ("import sys; from jquant.algorithms.weights import algorithm, algorithm_names; "
            "assert 'jquant.methods.rwkvquant_vq' not in sys.modules; "
            "assert algorithm('rwkvquant-codebook').name == 'rwkvquant-codebook'; "
            "assert 'rwkvquant-codebook' in algorithm_names()")
    subprocess.run([sys.executable, "-c", code], check=True)
