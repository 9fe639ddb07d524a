"""Image metrics: PSNR and SSIM against scikit-image, the Fréchet distance against closed forms and scipy's sqrtm,
prompt accuracy against a numpy count."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from jquant.eval.image import frechet_distance, prompt_accuracy, psnr, ssim


def _rng():
    return np.random.default_rng()


def _smooth(rng, shape):
    """Images [B, H, W, C] in [0, 255]: random low-frequency waves (a structured image, unlike white noise)."""
    b, h, w, c = shape
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    out = np.zeros(shape)
    for _ in range(4):
        fy, fx = rng.uniform(0.5, 3, size=(2, b, 1, 1, c))
        phase = rng.uniform(0, 6, size=(b, 1, 1, c))
        out += np.sin(2 * np.pi * (fy * y[None, :, :, None] + fx * x[None, :, :, None]) + phase)
    return 127.5 + 127.5 * out / 4


def _skimage_ssim(a, b, data_range):
    return np.array([structural_similarity(a[i], b[i], data_range=data_range, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, channel_axis=-1) for i in range(len(a))])


def test_ssim_and_psnr_of_random_images_match_skimage():
    rng = _rng()
    a, b = rng.uniform(size=(3, 32, 32, 3)), rng.uniform(size=(3, 32, 32, 3))
    b[0] = np.clip(a[0] + rng.normal(scale=0.05, size=a[0].shape), 0, 1)  # one similar pair
    ours = np.asarray(ssim(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), data_range=1.0, reduction="none"))
    np.testing.assert_allclose(ours, _skimage_ssim(a, b, 1.0), atol=2e-5)
    reference = [peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(3)]
    np.testing.assert_allclose(np.asarray(psnr(a, b, data_range=1.0, reduction="none")), reference, rtol=1e-5)
    assert float(ssim(a, b, data_range=1.0)) == pytest.approx(np.mean(_skimage_ssim(a, b, 1.0)), abs=2e-5)
    assert float(psnr(a, b, data_range=1.0)) == pytest.approx(np.mean(reference), rel=1e-5)


@pytest.mark.parametrize("noise,shape", [(2.0, (2, 40, 29, 1)), (20.0, (2, 33, 48, 3)), (60.0, (1, 11, 11, 3))])
def test_smooth_image_plus_noise_matches_skimage(noise, shape):
    rng = _rng()
    clean = _smooth(rng, shape)
    noisy = np.clip(clean + rng.normal(scale=noise, size=shape), 0, 255)
    ours = np.asarray(ssim(clean, noisy, data_range=255, reduction="none"))
    np.testing.assert_allclose(ours, _skimage_ssim(clean, noisy, 255), atol=2e-5)
    reference = [peak_signal_noise_ratio(clean[i], noisy[i], data_range=255) for i in range(shape[0])]
    np.testing.assert_allclose(np.asarray(psnr(clean, noisy, data_range=255, reduction="none")), reference, rtol=1e-5)


def test_float64_ssim_equals_skimage_to_rounding(x64):
    rng = _rng()
    clean = _smooth(rng, (2, 24, 20, 3)) / 255
    noisy = clean + rng.normal(scale=0.1, size=clean.shape)
    np.testing.assert_allclose(np.asarray(ssim(clean, noisy, data_range=1.0, reduction="none")),
                               _skimage_ssim(clean, noisy, 1.0), rtol=1e-10)


def test_identical_images():
    a = _smooth(_rng(), (2, 16, 16, 3))
    assert float(ssim(a, a, data_range=255)) == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.isinf(np.asarray(psnr(a, a, data_range=255, reduction="none"))))


def test_image_metric_refusals():
    a = np.zeros((2, 16, 16, 3))
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, a[:, :, :15], data_range=1.0)
    with pytest.raises(ValueError, match="channels"):
        psnr(a[..., 0], a[..., 0], data_range=1.0)
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(a[:, :10], a[:, :10], data_range=1.0)
    with pytest.raises(ValueError, match="data_range must be a finite number > 0"):
        psnr(a, a, data_range=0)
    with pytest.raises(ValueError, match="win_size must be an odd integer"):
        ssim(a, a, data_range=1.0, win_size=4)
    with pytest.raises(ValueError, match="reduction must be"):
        ssim(a, a, data_range=1.0, reduction="sum")


def _exact_gaussian_features(rng, n, mean, variances):
    """``n`` samples whose sample mean is ``mean`` and sample covariance (ddof 1) is ``diag(variances)`` exactly."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z * np.sqrt(variances) + mean


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = _rng()
    d = 12
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    var_a, var_b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    a = _exact_gaussian_features(rng, 300, mu_a, var_a)
    b = _exact_gaussian_features(rng, 200, mu_b, var_b)
    closed = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-9)
    rotation = np.linalg.qr(rng.normal(size=(d, d)))[0]  # the same rotation of both: covariances no longer diagonal
    assert frechet_distance(a @ rotation, b @ rotation) == pytest.approx(closed, rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9


@pytest.mark.parametrize("n_a, n_b, dim", [(400, 300, 16), (9, 7, 40)], ids=["many-samples", "few-samples"])
def test_frechet_distance_matches_the_sqrtm_formula(n_a, n_b, dim):
    rng = _rng()
    a = rng.normal(size=(n_a, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(size=(n_b, dim)) @ rng.normal(size=(dim, dim)) + 0.5
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a) + np.trace(s_b)
                 - 2 * np.trace(scipy.linalg.sqrtm(s_a @ s_b).real))
    # sqrtm of the singular S_a S_b (fewer samples than dimensions) is itself only good to about 1e-7
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-8 if n_a + n_b > dim else 1e-6)


def test_frechet_distance_refusals():
    with pytest.raises(ValueError, match="same dim"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((4, 3), np.nan), np.zeros((5, 3)))


def test_prompt_accuracy_counts_argmax_hits_in_batches():
    rng = _rng()
    images = rng.uniform(size=(10, 8, 8, 3)).astype(np.float32)
    w = rng.normal(size=(3, 5)).astype(np.float32)

    def classifier(x):  # a test double: a linear read-out of the mean colour
        return jnp.mean(x, axis=(1, 2)) @ w

    labels = rng.integers(0, 5, size=10)
    predicted = np.argmax(images.mean(axis=(1, 2)) @ w, axis=1)
    labels[:4] = predicted[:4]  # a known number of hits at least
    expected = np.mean(predicted == labels)
    assert prompt_accuracy(classifier, images, labels, batch_size=3) == pytest.approx(expected)
    assert prompt_accuracy(classifier, images, labels) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"class ids in \[0, 5\)"):
        prompt_accuracy(classifier, images, np.full(10, 5))
    with pytest.raises(ValueError, match="labels N integer class ids"):
        prompt_accuracy(classifier, images, labels[:9])
    with pytest.raises(ValueError, match=r"logits \[batch, classes\]"):
        prompt_accuracy(lambda x: jnp.zeros((len(x),)), images, labels)
