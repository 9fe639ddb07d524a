"""``jquant encode`` / ``jquant decode``: a video VAE (HunyuanVideo layout) between clips and latent files, with an
optional dynamic latent frame rate (DLFR-VAE, ``jquant.frame_rate.dlfr``).

- ``encode --model M --input clip.gif|clip.npy --out latent.npz [--dynamic-frame-rate (--target-compression 8 |
  --thresholds 0.05,0.2)]``: the clip's posterior mean (unscaled ``z [1, f, h, w, L]``); with a dynamic rate the
  per-chunk factors, the chunk length and the path are stored next to it, so ``decode`` needs nothing else.
- ``decode --model M --input latent.npz --out clip.gif|clip.npy``: the frames (``.npy``: float32 ``[F, H, W, 3]``
  in ``[-1, 1]``; ``.gif``: uint8).

Input clips: ``.gif`` (RGB frames; Pillow stores a run of identical frames as one frame of the run's duration, so
runs are expanded by duration, exact where the frame time is a whole number of centiseconds, e.g. 10 fps) or
``.npy`` (``[F, H, W, 3]`` or ``[1, F, H, W, 3]``, uint8 or floats in
``[-1, 1]``). An existing output is replaced only with ``--overwrite``; outputs are written whole or not at all.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from rich.console import Console

from jquant.atomic import check_output_file, write_file_atomically

_CLIP_SUFFIXES = (".gif", ".npy")


def _number_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.05,0.2; got {text!r}") from None


def add_parsers(sub, positive_int) -> None:
    en = sub.add_parser("encode", help="encode a clip to a latent file with a video VAE (optionally at a dynamic "
                        "latent frame rate: DLFR-VAE)")
    en.add_argument("--model", default="jq-video-vae-tiny", help="a video VAE (default: %(default)s)")
    en.add_argument("--input", required=True, help="the clip: .gif or .npy ([F, H, W, 3], uint8 or [-1, 1] floats)")
    en.add_argument("--out", required=True, help="the latent file to write (.npz)")
    en.add_argument("--dynamic-frame-rate", action="store_true",
                    help="pool simple chunks in time inside the VAE (needs 1 + chunk k frames)")
    en.add_argument("--target-compression", type=float, default=None,
                    help="budget mode: average temporal compression, e.g. 6, 8 or 12 (the VAE's own is 4)")
    en.add_argument("--thresholds", type=_number_list, default=None,
                    help="threshold mode: increasing 1 - SSIM levels, one fewer than --factors, e.g. 0.05,0.2")
    en.add_argument("--chunk", type=positive_int, default=16, help="frames per chunk (default: %(default)s)")
    en.add_argument("--factors", default="1,2,4", help="temporal down-sampling factors per chunk (default: "
                    "%(default)s)")
    en.add_argument("--downsample", type=positive_int, default=1,
                    help="spatial down-sampling of the copy the complexity is measured on (default: %(default)s)")
    en.add_argument("--pixel-baseline", action="store_true",
                    help="average frames before encoding instead of pooling the VAE's features")
    en.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    en.add_argument("--json", action="store_true", help="print JSON instead of a table")

    de = sub.add_parser("decode", help="decode a latent file written by jquant encode to a clip")
    de.add_argument("--model", default="jq-video-vae-tiny", help="the video VAE that encoded it (default: "
                    "%(default)s)")
    de.add_argument("--input", required=True, help="the latent file (.npz from jquant encode)")
    de.add_argument("--out", required=True, help="the clip to write: .gif or .npy")
    de.add_argument("--fps", type=positive_int, default=8, help="GIF frames per second (default: %(default)s)")
    de.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    de.add_argument("--json", action="store_true", help="print JSON instead of a table")


def read_clip(path: str) -> np.ndarray:
    """A clip file -> float32 ``[1, F, H, W, 3]`` in ``[-1, 1]`` (module docstring)."""
    source = Path(path)
    if source.suffix.lower() not in _CLIP_SUFFIXES:
        raise ValueError(f"--input {path!r} must be a .gif or .npy clip.")
    if not source.is_file():
        raise FileNotFoundError(f"--input {path}: no such file.")
    if source.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(source) as image:  # Pillow writes a run of identical frames as one longer frame
            frames = [(np.asarray(f.convert("RGB")), f.info.get("duration") or 1)
                      for f in ImageSequence.Iterator(image)]
        base = min(d for _, d in frames)
        clip = np.stack([f for f, d in frames for _ in range(max(1, round(d / base)))])
    else:
        clip = np.load(source, allow_pickle=False)
    clip = clip[None] if clip.ndim == 4 else clip
    if clip.ndim != 5 or clip.shape[0] != 1 or clip.shape[-1] != 3:
        raise ValueError(f"--input {path}: expected one RGB clip [F, H, W, 3], got shape {clip.shape}.")
    if clip.dtype == np.uint8:
        return clip.astype(np.float32) / 127.5 - 1.0
    clip = clip.astype(np.float32)
    if not np.all(np.isfinite(clip)) or clip.min() < -1.0 - 1e-3 or clip.max() > 1.0 + 1e-3:
        raise ValueError(f"--input {path}: float clips must be finite and in [-1, 1] (or pass uint8 frames).")
    return clip


def _load_vae(name: str):
    from jquant.models import load
    from jquant.models.hunyuan_video_vae import AutoencoderKLHunyuanVideo

    model = load(name).model
    if not isinstance(model, AutoencoderKLHunyuanVideo):
        raise ValueError(f"--model {name!r} is a {type(model).__name__}, not a video VAE (AutoencoderKLHunyuanVideo).")
    return model


def run_encode(args: argparse.Namespace, console: Console) -> dict:
    from jquant.frame_rate import dlfr

    out = check_output_file(args.out, (".npz",), overwrite=args.overwrite, overwrite_flag="--overwrite")
    modes = (args.target_compression is not None) + (args.thresholds is not None)
    if args.dynamic_frame_rate and modes != 1:
        raise ValueError("--dynamic-frame-rate needs exactly one of --target-compression (e.g. 8) or --thresholds "
                         "(e.g. 0.05,0.2).")
    if not args.dynamic_frame_rate and (modes or args.pixel_baseline):
        raise ValueError("--target-compression, --thresholds and --pixel-baseline need --dynamic-frame-rate.")
    try:
        factors = tuple(int(v) for v in args.factors.split(","))
    except ValueError:
        raise ValueError(f"--factors must be comma-separated ints, e.g. 1,2,4; got {args.factors!r}.") from None
    if args.target_compression is not None and not math.isfinite(args.target_compression):
        raise ValueError(f"--target-compression must be a finite number, got {args.target_compression}.")
    clip = read_clip(args.input)
    model = _load_vae(args.model)
    if args.dynamic_frame_rate:
        rates = dlfr.schedule(clip, chunk=args.chunk, target_compression=args.target_compression,
                              thresholds=args.thresholds, factors=factors, downsample=args.downsample,
                              temporal_ratio=model.config.temporal_compression_ratio)[0]
        latent = dlfr.encode(model, clip, rates, path="pixel" if args.pixel_baseline else "feature")
        latents, stored = np.asarray(latent.latents), {"factors": np.asarray(rates.factors), "chunk": rates.chunk,
                                                           "path": latent.path}
    else:
        latents, stored = np.asarray(model.encode(clip).mean), {"factors": np.zeros(0, np.int64), "chunk": 0,
                                                                    "path": "fixed"}
    write_file_atomically(out, lambda tmp: np.savez(tmp, latents=latents.astype(np.float32), **stored))
    result = {"out": str(out), "frames": clip.shape[1], "latent_shape": list(latents.shape),
              "latent_frames": latents.shape[1], "factors": [int(m) for m in stored["factors"]],
              "temporal_compression": (clip.shape[1] - 1) / max(latents.shape[1] - 1, 1), "path": stored["path"]}
    if not args.json:
        console.print(f"wrote {out}: {clip.shape[1]} frames -> latents {tuple(latents.shape)} "
                      f"(factors {result['factors'] or 'fixed'}, {result['temporal_compression']:.1f}x in time)")
    return result


def run_decode(args: argparse.Namespace, console: Console) -> dict:
    from jquant.frame_rate import dlfr
    from jquant.media import save_gif, to_uint8

    out = check_output_file(args.out, _CLIP_SUFFIXES, overwrite=args.overwrite, overwrite_flag="--overwrite")
    source = Path(args.input)
    if source.suffix.lower() != ".npz" or not source.is_file():
        raise ValueError(f"--input {args.input!r} must be an existing .npz written by jquant encode.")
    with np.load(source, allow_pickle=False) as data:
        missing = {"latents", "factors", "chunk", "path"} - set(data.files)
        if missing:
            raise ValueError(f"--input {args.input}: not a jquant encode file (missing {sorted(missing)}).")
        latents, factors = data["latents"], tuple(int(m) for m in data["factors"])
        chunk, path = int(data["chunk"]), str(data["path"])
    model = _load_vae(args.model)
    if path == "fixed":
        frames = model.decode(latents)
    else:
        rates = dlfr.ChunkRates(factors, chunk, model.config.temporal_compression_ratio)
        frames = dlfr.decode(model, dlfr.VariableRateLatent(latents, rates, path))
    frames = np.asarray(frames, np.float32)[0]
    if out.suffix.lower() == ".gif":
        write_file_atomically(out, lambda tmp: save_gif(to_uint8(frames)[None], tmp, fps=args.fps))
    else:
        write_file_atomically(out, lambda tmp: np.save(tmp, frames))
    result = {"out": str(out), "latent_frames": int(latents.shape[1]), "frames": int(frames.shape[0]),
              "shape": list(frames.shape), "factors": list(factors)}
    if not args.json:
        console.print(f"wrote {out}: latents {tuple(latents.shape)} -> {frames.shape[0]} frames of "
                      f"{frames.shape[1]}x{frames.shape[2]}")
    return result
