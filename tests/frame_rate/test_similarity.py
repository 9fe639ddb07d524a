"""``jquant.frame_rate.similarity`` against scikit-image's SSIM frame by frame, on fresh random clips."""

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from jquant.frame_rate.similarity import content_complexity, neighbour_ssim


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, channel_axis=-1)


@pytest.mark.parametrize("distance", [1, 3])
def test_neighbour_ssim_matches_skimage_pair_by_pair(distance):
    rng = np.random.default_rng()
    base = rng.uniform(size=(2, 1, 16, 16, 3))
    frames = np.clip(base + 0.1 * rng.normal(size=(2, 6, 16, 16, 3)).cumsum(axis=1), 0.0, 1.0)
    got = np.asarray(neighbour_ssim(frames.astype(np.float32), distance))
    want = [[_skimage_ssim(frames[b, i], frames[b, i + distance]) for i in range(6 - distance)] for b in range(2)]
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_complexity_is_zero_for_a_still_clip_and_grows_with_change():
    rng = np.random.default_rng()
    still = np.repeat(rng.uniform(size=(1, 1, 16, 16, 3)), 5, axis=1).astype(np.float32)
    noisy = [np.clip(still + s * rng.normal(size=still.shape), 0, 1).astype(np.float32) for s in (0.05, 0.3)]
    c = [float(content_complexity(x)[0]) for x in (still, *noisy)]
    assert abs(c[0]) < 1e-6 and c[0] < c[1] < c[2], c


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="distance"):
        neighbour_ssim(np.zeros((1, 3, 16, 16, 3), np.float32), 3)
    with pytest.raises(ValueError, match="frames must be"):
        neighbour_ssim(np.zeros((3, 16, 16, 3), np.float32))
