"""image_report: the judge's prompt accuracy, FD-emoji and PSNR/SSIM against references, on a toy judge."""

import jax
import numpy as np
import pytest

from jquant.eval.generation import image_report
from jquant.eval.image import frechet_distance, psnr, ssim
from jquant.models import image_classifier as ic


@pytest.fixture(scope="module")
def judge():
    return ic.init_model(ic.ImageClassifierConfig(num_classes=4, image_size=16, widths=(4, 8), feature_dim=6),
                         jax.random.key(0))


def test_report_matches_its_parts(judge):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (10, 16, 16, 3)).astype(np.float32)
    predicted = np.argmax(np.asarray(judge(images)), axis=1)
    labels = predicted.copy()
    labels[:3] = (labels[:3] + 1) % 4  # three wrong on purpose
    real = rng.uniform(-1, 1, (12, 16, 16, 3)).astype(np.float32)
    reference = np.clip(images + rng.normal(0, 0.05, images.shape), -1, 1).astype(np.float32)
    report = image_report(images, labels, judge, real_images=real, reference_images=reference)
    assert report["prompt_accuracy"] == pytest.approx(0.7)
    shuffled = np.random.default_rng(0).permutation(labels)
    assert report["random_label_accuracy"] == pytest.approx(np.mean(predicted == shuffled))
    assert report["chance"] == pytest.approx(1 / np.unique(labels).size)
    fd = frechet_distance(np.asarray(judge.features(images), np.float64), np.asarray(judge.features(real), np.float64))
    assert report["fd_emoji"] == pytest.approx(fd, rel=1e-6)
    assert report["psnr_db"] == pytest.approx(float(psnr(images, reference, data_range=2.0)), rel=1e-6)
    assert report["ssim"] == pytest.approx(float(ssim(images, reference, data_range=2.0)), rel=1e-6)


def test_report_refuses_mismatched_inputs(judge):
    images = np.zeros((4, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match="one label each"):
        image_report(images, np.zeros(3, int), judge)
    with pytest.raises(ValueError, match="same prompts and seeds"):
        image_report(images, np.zeros(4, int), judge, reference_images=images[:2])
