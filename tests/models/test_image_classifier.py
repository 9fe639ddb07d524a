"""The emoji classifier (prompt accuracy, FD-emoji) against a PyTorch transcription, save/load, bad input."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jquant.checkpoint import load, save
from jquant.models import image_classifier as ic
from jquant.sites import find_sites

CFG = ic.ImageClassifierConfig(num_classes=5, image_size=16, widths=(4, 8, 8), feature_dim=12)


def _torch_logits(model: ic.ImageClassifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The module docstring's equations with torch.nn.functional, float64, NCHW."""
    def conv(layer, h, stride=1):
        k = np.asarray(layer.kernel[...], np.float64)  # [9 C_in, C_out], rows: offset (ky, kx) then channel
        c_in = k.shape[0] // 9
        w = torch.from_numpy(k.reshape(3, 3, c_in, -1).transpose(3, 2, 0, 1).copy())
        return torch.nn.functional.conv2d(h, w, torch.from_numpy(np.asarray(layer.bias[...], np.float64)),
                                          stride=stride, padding=1)

    def linear(layer, h):
        return h @ torch.from_numpy(np.asarray(layer.kernel[...], np.float64)) + torch.from_numpy(
            np.asarray(layer.bias[...], np.float64))

    h = torch.nn.functional.silu(conv(model.stem, torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float64))))
    for c, down in model.stages:
        h = torch.nn.functional.silu(conv(down, torch.nn.functional.silu(conv(c, h)), stride=2))
    f = torch.nn.functional.silu(linear(model.feature, h.mean(dim=(2, 3))))
    return linear(model.head, f).numpy(), f.numpy()


def test_classifier_matches_torch_transcription():
    model = ic.init_model(CFG, jax.random.key(0))
    # perturb the biases too (they start at zero), so every tensor is exercised
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(var.get_value() + 0.1 * jax.random.normal(jax.random.key(len(path)), var.get_value().shape))
    images = np.random.default_rng(1).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    logits, features = _torch_logits(model, images)
    np.testing.assert_allclose(np.asarray(model(images)), logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.features(images)), features, rtol=1e-4, atol=1e-5)


def test_classifier_saves_loads_and_keeps_float_sites(tmp_path):
    model = ic.init_model(CFG, jax.random.key(2))
    images = np.random.default_rng(3).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    save(model, tmp_path / "clf")
    restored = load(tmp_path / "clf")
    assert restored.config == CFG
    np.testing.assert_array_equal(np.asarray(restored(images)), np.asarray(model(images)))
    paths = [s.path for s in find_sites(model)]
    for pattern in ic.FAMILY.keep_float:
        assert pattern in paths, (pattern, paths)


@pytest.mark.parametrize("shape", [(2, 16, 16), (2, 32, 32, 3), (2, 16, 16, 4)])
def test_classifier_refuses_images_of_another_shape(shape):
    model = ic.init_model(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match=r"images must be \[B, 16, 16, 3\]"):
        model(np.zeros(shape, np.float32))


@pytest.mark.parametrize("kwargs, name", [(dict(num_classes=0), "num_classes"),
                                          (dict(num_classes=3, image_size=18), "image_size")])
def test_bad_config_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ic.ImageClassifierConfig(**kwargs)
