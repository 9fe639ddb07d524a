"""Video metrics: TV-L1 flow against scikit-image, the warp against scipy and exact translations, the temporal
error, per-frame PSNR / SSIM / prompt accuracy and reconstruction PSNR against float64 numpy and scikit-image."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.metrics import structural_similarity
from skimage.registration import optical_flow_tvl1

from jquant.eval.optical_flow import pyramid_shapes, tvl1_flow, warp
from jquant.eval.video import (
    frame_prompt_accuracy,
    frame_psnr,
    frame_ssim,
    reconstruction_psnr,
    temporal_error,
    video_report,
)


def _rng():
    return np.random.default_rng()


def _waves(rng, n, h, w, shift=None, channels=None):
    """Smooth random images ``[n, h, w]`` (or ``[..., channels]``) in [0, 1]: sums of 6 plane waves of at most 4
    cycles per image, evaluated at ``(y - dy, x - dx)`` when ``shift [n, 2]`` is given (the content moved by
    ``shift``; the same ``rng`` state gives the same waves)."""
    c = channels or 1
    y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    out = np.zeros((n, h, w, c))
    for _ in range(6):
        fy, fx = rng.uniform(-4, 4, size=(n, 1, 1, c)) / h, rng.uniform(-4, 4, size=(n, 1, 1, c)) / w
        phase = rng.uniform(0, 6, size=(n, 1, 1, c))
        dy, dx = np.zeros((2, n, 1, 1, 1)) if shift is None else np.asarray(shift, float).T[:, :, None, None, None]
        out += np.sin(2 * np.pi * (fy * (y[None, ..., None] - dy) + fx * (x[None, ..., None] - dx)) + phase)
    out = 0.5 + out / 12
    return out if channels else out[..., 0]


def _skimage_flow(reference, moving, dtype=np.float32):
    """``[N, H, W, 2]`` from skimage's ``[2, H, W]`` per pair."""
    return np.stack([np.moveaxis(optical_flow_tvl1(r.astype(dtype), m.astype(dtype), dtype=dtype), 0, -1)
                     for r, m in zip(reference, moving)])


def _scipy_warp(image, flow):
    """``image [H, W]`` float64 sampled at ``(y + dy, x + dx)``: bilinear, edge values beyond the border."""
    h, w = image.shape
    grid = np.mgrid[:h, :w].astype(np.float64)
    return ndi.map_coordinates(image, grid + np.moveaxis(flow, -1, 0), order=1, mode="nearest")


# ------------------------------------------------------------------ optical flow


@pytest.mark.parametrize("shape", [(32, 32), (40, 48)])  # one pyramid level; two, of odd-sized reduction
def test_tvl1_matches_skimage_on_shifted_smooth_images(shape):
    rng = _rng()
    assert len(pyramid_shapes(*shape)) == (1 if shape == (32, 32) else 2)
    shift, seed = rng.uniform(-1.5, 1.5, size=(3, 2)), int(rng.integers(1 << 30))
    first = _waves(np.random.default_rng(seed), 3, *shape)
    moved = _waves(np.random.default_rng(seed), 3, *shape, shift=shift)
    ours = np.asarray(tvl1_flow(moved, first))
    # float32 in both, summed in different orders: almost every element agrees to ~1e-6, and an iterative solver can
    # carry a rare pixel a little further (one element of 11520 was 2.1e-3 off in one draw)
    diff = np.abs(ours - _skimage_flow(moved, first))
    assert diff.max() < 5e-3 and diff.mean() < 1e-4, (diff.max(), diff.mean())
    # the content moved by s, so moved(x) = first(x - s): the backward flow is -s away from the borders
    np.testing.assert_allclose(np.median(ours[:, 6:-6, 6:-6], axis=(1, 2)), -shift, atol=0.15)


def test_tvl1_float64_equals_skimage_to_rounding(x64):
    rng = _rng()
    seed = int(rng.integers(1 << 30))
    first = _waves(np.random.default_rng(seed), 2, 36, 34)
    moved = _waves(np.random.default_rng(seed), 2, 36, 34, shift=rng.uniform(-1.5, 1.5, size=(2, 2)))
    ours = np.asarray(tvl1_flow(jnp.asarray(moved), jnp.asarray(first)))
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, _skimage_flow(moved, first, np.float64), atol=1e-9)


def test_tvl1_recovers_a_smooth_flow_field_made_by_warp():
    rng = _rng()
    image = _waves(rng, 2, 32, 32)
    y, x = np.mgrid[:32, :32] / 32
    mean, amplitude, fy, fx, phase = (rng.uniform(lo, hi, size=(5, 2, 1, 1, 2))[i] for i, (lo, hi) in
                                      enumerate([(-0.6, 0.6), (0.2, 0.4), (-1, 1), (-1, 1), (0, 6)]))
    field = mean + amplitude * np.sin(2 * np.pi * (fy * y[..., None] + fx * x[..., None]) + phase)  # |w| < 1 px
    warped = np.asarray(warp(image, field))  # warped(x) = image(x + field(x))
    ours = np.asarray(tvl1_flow(warped, image))
    np.testing.assert_allclose(ours, _skimage_flow(warped, image), atol=2e-3)
    error = np.abs(ours - field)[:, 4:-4, 4:-4]
    assert error.mean() < 0.15


def test_warp_matches_translations_and_scipy():
    rng = _rng()
    images = rng.uniform(size=(2, 12, 15, 3))
    dy, dx = 2, -3
    out = np.asarray(warp(images, np.broadcast_to(np.array([dy, dx], np.float32), (2, 12, 15, 2))))
    np.testing.assert_allclose(out[:, : 12 - dy, -dx:], images[:, dy:, : 15 + dx], atol=1e-6)
    # a linear image is reproduced exactly by bilinear sampling away from the clamped borders
    a, b, c = rng.normal(size=3)
    y, x = np.mgrid[:12, :15].astype(np.float64)
    shift = rng.uniform(-1, 1, size=2)
    ramp = (a * y + b * x + c)[None]
    moved = np.asarray(warp(ramp, np.broadcast_to(shift, (1, 12, 15, 2))))
    np.testing.assert_allclose(moved[0, 1:-1, 1:-1], (a * (y + shift[0]) + b * (x + shift[1]) + c)[1:-1, 1:-1],
                               atol=1e-5)
    flow = rng.uniform(-4, 4, size=(2, 12, 15, 2))
    grey = images[..., 0]
    reference = np.stack([_scipy_warp(g, f) for g, f in zip(grey, flow)])
    np.testing.assert_allclose(np.asarray(warp(grey, flow)), reference, atol=1e-5)


# ------------------------------------------------------------------ video metrics


def _video(rng, b=2, f=4, h=32, w=32):
    """Videos ``[b, f, h, w, 3]`` in [-1, 1] of smooth content moving 0.8-1.5 pixels per frame along each axis,
    plus noise."""
    steps = np.cumsum(rng.uniform(0.8, 1.5, size=(f, b, 2)) * rng.choice([-1, 1], size=(f, b, 2)), axis=0)
    frames = [_waves(np.random.default_rng(seed), b, h, w, shift=s, channels=3)
              for seed, s in zip([int(rng.integers(1 << 30))] * f, steps)]
    video = np.stack(frames, axis=1) * 2 - 1
    return video + rng.normal(scale=0.01, size=video.shape)


def test_temporal_error_matches_skimage_flow_and_scipy_warp():
    rng = _rng()
    video = _video(rng, b=2, f=3)
    ours = np.asarray(temporal_error(video, data_range=2.0))
    b, f = video.shape[:2]
    grey = video.mean(-1) / 2.0
    expected = np.zeros((b, f - 1))
    for i in range(b):
        for t in range(f - 1):
            flow = _skimage_flow(grey[i, t + 1][None], grey[i, t][None])[0].astype(np.float64)
            warped = np.stack([_scipy_warp(video[i, t, ..., c], flow) for c in range(3)], axis=-1)
            expected[i, t] = np.mean(np.abs(video[i, t + 1] - warped)) / 2.0
    np.testing.assert_allclose(ours, expected, rtol=2e-3, atol=1e-5)
    plain = np.mean(np.abs(video[:, 1:] - video[:, :-1]), axis=(2, 3, 4)) / 2.0
    assert np.all(ours < 0.5 * plain)  # the flow explains the motion; what is left is mostly the noise
    still = np.repeat(video[:, :1], 3, axis=1)
    assert np.all(np.asarray(temporal_error(still, data_range=2.0)) == 0)
    # flows taken from flow_videos: a brightness offset of every frame cancels in the error, not in the flow
    offset = np.asarray(temporal_error(video + 0.3, data_range=2.0, flow_videos=video))
    np.testing.assert_allclose(offset, ours, rtol=1e-4, atol=1e-6)


def test_frame_psnr_and_ssim_match_numpy_and_skimage():
    rng = _rng()
    reference = rng.uniform(-1, 1, size=(2, 3, 16, 16, 3))
    videos = np.clip(reference + rng.normal(scale=rng.uniform(0.01, 0.3, size=(2, 3, 1, 1, 1)), size=reference.shape),
                     -1, 1)
    mse = np.mean((videos - reference) ** 2, axis=(2, 3, 4))
    np.testing.assert_allclose(np.asarray(frame_psnr(videos, reference, data_range=2.0)), 10 * np.log10(4 / mse),
                               rtol=1e-5)
    expected = [[structural_similarity(videos[i, t], reference[i, t], data_range=2.0, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False, channel_axis=-1) for t in range(3)]
                for i in range(2)]
    np.testing.assert_allclose(np.asarray(frame_ssim(videos, reference, data_range=2.0)), expected, atol=5e-5)


def _colour_classifier(images):
    """Logits ``[n, 3]``: each channel's mean (the class is the dominant colour)."""
    return jnp.mean(images, axis=(1, 2))


def test_frame_prompt_accuracy_and_reconstruction_psnr_match_numpy():
    rng = _rng()
    videos = rng.uniform(size=(5, 4, 8, 8, 3))
    predicted = videos.mean(axis=(2, 3)).argmax(-1)  # [5, 4]
    labels = rng.integers(0, 3, size=(5, 4))
    np.testing.assert_allclose(frame_prompt_accuracy(_colour_classifier, videos, labels, batch_size=2),
                               np.mean(predicted == labels, axis=0))
    np.testing.assert_allclose(frame_prompt_accuracy(_colour_classifier, videos, labels[:, 0]),
                               np.mean(predicted == labels[:, :1], axis=0))
    noise = rng.normal(scale=0.05, size=videos.shape)
    calls = []

    def reconstruct(chunk):
        calls.append(chunk.shape[0])
        start = sum(calls[:-1])
        return chunk + noise[start : start + chunk.shape[0]]

    expected = 10 * np.log10(1.0 / np.mean(noise**2, axis=(2, 3, 4)))
    np.testing.assert_allclose(np.asarray(reconstruction_psnr(videos, reconstruct, data_range=1.0, batch_size=2)),
                               expected, rtol=1e-4)
    assert calls == [2, 2, 1]


def test_video_report_gathers_the_metrics():
    rng = _rng()
    reference = _video(rng, b=2, f=3)
    videos = reference + rng.normal(scale=0.05, size=reference.shape)
    labels = rng.integers(0, 3, size=2)
    report = video_report(videos, reference=reference, labels=labels, classifier_fn=_colour_classifier,
                          reconstruct=lambda v: v * 0.9)
    assert report["videos"] == 2 and report["frames"] == 3
    psnr_frames = np.asarray(frame_psnr(videos, reference, data_range=2.0))
    assert report["psnr_db"] == pytest.approx(psnr_frames.mean(), rel=1e-6)
    np.testing.assert_allclose(report["psnr_db_per_frame"], psnr_frames.mean(0), rtol=1e-6)
    assert report["ssim"] == pytest.approx(np.asarray(frame_ssim(videos, reference, data_range=2.0)).mean(), rel=1e-6)
    errors = np.asarray(temporal_error(videos, data_range=2.0))
    assert len(report["temporal_error_per_transition"]) == 2 and report["temporal_error"] == pytest.approx(errors.mean())
    # the noise added to the reference is flicker: it raises the temporal error
    assert report["temporal_error"] > report["temporal_error_reference"]
    accuracy = frame_prompt_accuracy(_colour_classifier, videos, labels)
    assert report["prompt_accuracy_per_frame"] == pytest.approx(list(accuracy))
    expected = np.mean(10 * np.log10(4.0 / np.mean((0.1 * videos) ** 2, axis=(2, 3, 4))))
    assert report["reconstruction_psnr_db"] == pytest.approx(expected, rel=1e-5)
    assert set(video_report(videos, temporal=False)) == {"videos", "frames"}


def test_bad_input_names_the_argument():
    video = np.zeros((2, 3, 16, 16, 3))
    with pytest.raises(ValueError, match="reference .* must have the shape of videos"):
        frame_psnr(video, video[:, :2], data_range=2.0)
    with pytest.raises(ValueError, match=r"videos must be \[batch, frames"):
        frame_ssim(video[0], video[0], data_range=2.0)
    with pytest.raises(ValueError, match="needs at least 2"):
        temporal_error(video[:, :1], data_range=2.0)
    with pytest.raises(ValueError, match="flow_videos .* must have the shape"):
        temporal_error(video, data_range=2.0, flow_videos=video[:1])
    with pytest.raises(ValueError, match="data_range"):
        temporal_error(video, data_range=0)
    with pytest.raises(ValueError, match=r"labels must be \[B\] or \[B, F\]"):
        frame_prompt_accuracy(_colour_classifier, video, np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="reconstruct must return"):
        reconstruction_psnr(video, lambda v: v[:, :2], data_range=2.0)
    with pytest.raises(ValueError, match="classifier_fn and labels together"):
        video_report(video, labels=np.zeros(2, int))
    with pytest.raises(ValueError, match="reference and moving"):
        tvl1_flow(np.zeros((1, 8, 8)), np.zeros((1, 8, 9)))
    with pytest.raises(ValueError, match="num_warp"):
        tvl1_flow(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), num_warp=0)
    with pytest.raises(ValueError, match=r"flow \[N, H, W, 2\]"):
        warp(np.zeros((1, 8, 8)), np.zeros((1, 8, 8, 3)))
