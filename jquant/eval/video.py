"""Video quality: per-frame PSNR / SSIM, temporal consistency, per-frame prompt accuracy, VAE reconstruction.

Videos are ``[B, F, H, W, C]`` (frames, height, width, channels; channels last), ``data_range`` the span of
valid values (2 for [-1, 1], 1 for [0, 1], 255 for uint8).

- ``frame_psnr`` / ``frame_ssim``: :func:`jquant.eval.image.psnr` / :func:`~jquant.eval.image.ssim` of every
  frame against the same frame of a reference video (the float model's output for the same prompt and seed),
  ``[B, F]``.
- ``temporal_error`` (the warping error of Lai et al. 2018, "Learning blind video temporal consistency",
  in L1): for each transition ``t -> t + 1``, the TV-L1 flow ``w`` (:mod:`jquant.eval.optical_flow`) with
  ``frame_{t+1}(x) ~ frame_t(x + w(x))`` is estimated on grey frames (the channel mean divided by
  ``data_range``) of ``flow_videos`` (the videos themselves by default), and the error is
  ``mean_{x, c} |frame_{t+1}(x) - frame_t(x + w(x))| / data_range`` (bilinear, edge-clamped warp), ``[B, F - 1]``.
  Flicker, and changes that no motion explains, raise it; smooth motion does not.
- ``frame_prompt_accuracy``: :func:`~jquant.eval.image.prompt_accuracy` of each frame index over the batch,
  ``[F]``; labels per video ``[B]`` or per frame ``[B, F]`` (videos with scene cuts).
- ``reconstruction_psnr``: per-frame PSNR ``[B, F]`` of ``reconstruct(videos)`` (e.g. a video VAE's
  encode-decode) against the videos.

:func:`video_report` gathers them into a dict of floats and per-frame lists.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jquant.eval.image import prompt_accuracy, psnr, ssim
from jquant.eval.optical_flow import tvl1_flow, warp

DATA_RANGE = 2.0  # videos in [-1, 1]


def _check_video(videos, name: str, fn: str, min_frames: int = 1) -> jax.Array:
    videos = jnp.asarray(videos)
    if videos.ndim != 5:
        raise ValueError(f"{fn}: {name} must be [batch, frames, height, width, channels], got shape {videos.shape}.")
    if videos.shape[1] < min_frames:
        raise ValueError(f"{fn}: {name} has {videos.shape[1]} frames; this metric compares consecutive frames and "
                         f"needs at least {min_frames}.")
    return videos


def _check_pair(videos, reference, fn: str, reference_name: str = "reference") -> tuple[jax.Array, jax.Array]:
    videos, reference = _check_video(videos, "videos", fn), _check_video(reference, reference_name, fn)
    if videos.shape != reference.shape:
        raise ValueError(f"{fn}: {reference_name} {reference.shape} must have the shape of videos {videos.shape} (the "
                         "same prompts, seeds and frames).")
    return videos, reference


def _frames(videos: jax.Array) -> jax.Array:
    return videos.reshape((-1,) + videos.shape[2:])


def frame_psnr(videos: jax.Array, reference: jax.Array, *, data_range: float) -> jax.Array:
    """PSNR in dB of every frame of ``videos [B, F, H, W, C]`` against ``reference``: ``[B, F]``."""
    videos, reference = _check_pair(videos, reference, "frame_psnr")
    values = psnr(_frames(videos), _frames(reference), data_range=data_range, reduction="none")
    return values.reshape(videos.shape[:2])


def frame_ssim(videos: jax.Array, reference: jax.Array, *, data_range: float, win_size: int = 11) -> jax.Array:
    """SSIM (:func:`jquant.eval.image.ssim`) of every frame of ``videos [B, F, H, W, C]`` against ``reference``:
    ``[B, F]``."""
    videos, reference = _check_pair(videos, reference, "frame_ssim")
    values = ssim(_frames(videos), _frames(reference), data_range=data_range, win_size=win_size, reduction="none")
    return values.reshape(videos.shape[:2])


def _check_range(data_range: float, fn: str) -> None:
    if not (isinstance(data_range, (int, float)) and np.isfinite(data_range) and data_range > 0):
        raise ValueError(f"{fn}: data_range must be a finite number > 0 (2 for [-1, 1] videos, 1 for [0, 1], 255 for "
                         f"uint8), got {data_range!r}.")


def transition_flows(videos: jax.Array, *, data_range: float, **tvl1) -> jax.Array:
    """TV-L1 flows ``[B, F - 1, H, W, 2]`` of every transition ``t -> t + 1`` of ``videos [B, F, H, W, C]``:
    ``frame_{t+1}(x) ~ frame_t(x + w(x))``, estimated on grey frames ``mean_c(frame) / data_range``.
    ``tvl1`` passes on to :func:`jquant.eval.optical_flow.tvl1_flow`."""
    videos = _check_video(videos, "videos", "transition_flows", min_frames=2)
    _check_range(data_range, "transition_flows")
    grey = jnp.mean(videos.astype(jnp.promote_types(videos.dtype, jnp.float32)), axis=-1) / data_range
    b, f, h, w = grey.shape
    flows = tvl1_flow(grey[:, 1:].reshape(-1, h, w), grey[:, :-1].reshape(-1, h, w), **tvl1)
    return flows.reshape(b, f - 1, h, w, 2)


def temporal_error(videos: jax.Array, *, data_range: float, flow_videos: jax.Array | None = None,
                   **tvl1) -> jax.Array:
    """Warping error ``[B, F - 1]`` of ``videos [B, F, H, W, C]`` (module docstring), with flows from
    ``flow_videos`` (same shape; default ``videos``)."""
    videos = _check_video(videos, "videos", "temporal_error", min_frames=2)
    _check_range(data_range, "temporal_error")
    if flow_videos is None:
        flow_videos = videos
    else:
        videos, flow_videos = _check_pair(videos, flow_videos, "temporal_error", "flow_videos")
    flows = transition_flows(flow_videos, data_range=data_range, **tvl1)
    x = videos.astype(jnp.promote_types(videos.dtype, jnp.float32))
    warped = warp(_frames(x[:, :-1]), flows.reshape((-1,) + flows.shape[2:])).reshape(x[:, 1:].shape)
    return jnp.mean(jnp.abs(x[:, 1:] - warped), axis=(2, 3, 4)) / data_range


def frame_prompt_accuracy(classifier_fn: Callable[[jax.Array], jax.Array], videos: jax.Array, labels: np.ndarray, *,
                          batch_size: int = 256) -> np.ndarray:
    """Per-frame prompt accuracy ``[F]``: entry ``f`` is :func:`jquant.eval.image.prompt_accuracy` of frame ``f``
    of every video, with ``labels [B]`` (one prompt class per video) or ``[B, F]`` (per frame)."""
    videos = _check_video(videos, "videos", "frame_prompt_accuracy")
    labels = np.asarray(labels)
    b, f = videos.shape[:2]
    if labels.shape == (b,):
        labels = np.repeat(labels[:, None], f, axis=1)
    if labels.shape != (b, f):
        raise ValueError(f"frame_prompt_accuracy: labels must be [B] or [B, F] = [{b}, {f}] class ids, got "
                         f"{labels.shape}.")
    return np.array([prompt_accuracy(classifier_fn, videos[:, t], labels[:, t], batch_size=batch_size)
                     for t in range(f)])


def reconstruction_psnr(videos: jax.Array, reconstruct: Callable[[jax.Array], jax.Array], *, data_range: float,
                        batch_size: int = 8) -> jax.Array:
    """Per-frame PSNR ``[B, F]`` of ``reconstruct(videos[i : i + batch_size])`` (a video autoencoder's
    encode-decode, ``[b, F, H, W, C]`` in and out) against the videos."""
    videos = _check_video(videos, "videos", "reconstruction_psnr")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"reconstruction_psnr: batch_size must be a positive integer, got {batch_size!r}.")
    outputs = []
    for start in range(0, videos.shape[0], batch_size):
        chunk = videos[start : start + batch_size]
        out = jnp.asarray(reconstruct(chunk))
        if out.shape != chunk.shape:
            raise ValueError(f"reconstruction_psnr: reconstruct must return videos of the input's shape {chunk.shape}, "
                             f"got {out.shape}.")
        outputs.append(out)
    return frame_psnr(jnp.concatenate(outputs), videos, data_range=data_range)


def _summary(report: dict, name: str, values: jax.Array, per: str = "frame") -> None:
    """``report[name]``: the mean of ``values [B, F]`` over videos and frames; ``report[f"{name}_per_{per}"]``:
    the batch mean per frame (or transition)."""
    values = np.asarray(values, np.float64)
    report[name] = float(np.mean(values))
    report[f"{name}_per_{per}"] = [float(v) for v in np.mean(values, axis=0)]


def video_report(videos: np.ndarray, *, data_range: float = DATA_RANGE, reference: np.ndarray | None = None,
                 labels: np.ndarray | None = None, classifier_fn: Callable[[jax.Array], jax.Array] | None = None,
                 reconstruct: Callable[[jax.Array], jax.Array] | None = None, temporal: bool = True,
                 batch_size: int = 256) -> dict:
    """The module docstring's numbers for ``videos [B, F, H, W, C]`` (in ``[-1, 1]`` by default).

    Always ``videos`` and ``frames``; with ``temporal`` (and at least 2 frames) ``temporal_error`` (its own
    flow) and, with a reference, ``temporal_error_reference`` (the reference's); with ``reference``
    ``psnr_db`` and ``ssim``; with ``classifier_fn`` and ``labels`` ``prompt_accuracy``; with ``reconstruct``
    ``reconstruction_psnr_db``. Each comes as the mean and a ``*_per_frame`` list of batch means
    (``*_per_transition``, ``F - 1`` of them, for the temporal errors).
    """
    videos = _check_video(videos, "videos", "video_report")
    _check_range(data_range, "video_report")
    if (classifier_fn is None) != (labels is None):
        raise ValueError("video_report: pass classifier_fn and labels together (prompt accuracy needs both).")
    report = {"videos": int(videos.shape[0]), "frames": int(videos.shape[1])}
    if reference is not None:
        videos, reference = _check_pair(videos, reference, "video_report")
        _summary(report, "psnr_db", frame_psnr(videos, reference, data_range=data_range))
        _summary(report, "ssim", frame_ssim(videos, reference, data_range=data_range))
    if temporal and videos.shape[1] >= 2:
        _summary(report, "temporal_error", temporal_error(videos, data_range=data_range), "transition")
        if reference is not None:
            _summary(report, "temporal_error_reference", temporal_error(reference, data_range=data_range),
                     "transition")
    if classifier_fn is not None:
        accuracy = frame_prompt_accuracy(classifier_fn, videos, labels, batch_size=batch_size)
        report["prompt_accuracy"] = float(np.mean(accuracy))
        report["prompt_accuracy_per_frame"] = [float(a) for a in accuracy]
    if reconstruct is not None:
        _summary(report, "reconstruction_psnr_db", reconstruction_psnr(videos, reconstruct, data_range=data_range))
    return report
