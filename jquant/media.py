"""Generated media as pixels and files: float images in ``[-1, 1]`` to uint8, image grids, rows of video frames,
animated GIFs (Pillow). Writers never replace an existing file and write a file whole or not at all."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

from jquant.atomic import write_file_atomically


def to_uint8(images: jax.Array) -> np.ndarray:
    """Images ``[..., H, W, 3]`` (or clips) in ``[-1, 1]`` -> uint8 of the same shape."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None, scale: int = 1) -> np.ndarray:
    """uint8 images ``[N, H, W, 3]`` -> one grid image (row-major, ``columns`` wide), each enlarged ``scale``
    times (nearest neighbour); empty cells are white."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * h, columns * w, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def video_frames_grid(videos: np.ndarray, *, scale: int = 1) -> np.ndarray:
    """uint8 clips ``[N, F, H, W, 3]`` -> one image with a row of frames per clip (each enlarged ``scale`` times)."""
    n, f, h, w, c = videos.shape
    grid = videos.transpose(0, 2, 1, 3, 4).reshape(n * h, f * w, c)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def save_gif(videos: np.ndarray, path: str | Path, *, fps: int = 8, scale: int = 1, columns: int | None = None) -> Path:
    """Write uint8 clips ``[N, F, H, W, 3]`` as one animated GIF (clips side by side, ``columns`` per row, each
    enlarged ``scale`` times), ``fps`` frames per second; the file is written whole or not at all, and an existing
    ``path`` is refused."""
    from PIL import Image

    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.dtype != np.uint8 or videos.shape[-1] != 3:
        raise ValueError(f"save_gif: videos must be uint8 [N, F, H, W, 3], got {videos.dtype} {videos.shape}.")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"save_gif: fps must be a positive int, got {fps!r}.")
    path = Path(path)
    if path.exists():
        raise ValueError(f"save_gif: {path} exists; jquant never replaces a file it did not create. Pick a new name.")
    frames = [Image.fromarray(image_grid(videos[:, t], columns, scale)) for t in range(videos.shape[1])]
    return write_file_atomically(path, lambda tmp: frames[0].save(
        tmp, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0))
