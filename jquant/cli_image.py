"""The ``jquant`` commands on text-to-image pipelines (``generate``, ``eval``, ``quantize`` of e.g. jq-mmdit-tiny).

``jquant.cli`` hands a command here when ``--model`` names a pipeline folder (``pipeline.json``):

- ``generate``: ``--prompt`` -> a PNG at ``--out`` (a grid of ``--num-images`` seeds from ``--seed``);
- ``eval``: prompt accuracy of single-glyph prompts (the bundled judge, jq-emoji-classifier), next to the
  random-label baseline, FD-emoji against real scenes, PSNR/SSIM against ``--reference`` (default: the
  bundled float pipeline) for the same prompts and seeds, and sampling time per image; with ``--fid-weights`` FID
  against real scenes of the image set's test split, with ``--lpips-weights`` LPIPS against the reference images
  (local weights files: ``jquant.eval.fid`` / ``jquant.eval.lpips``);
- ``quantize``: calibration along sampler trajectories of training captions, ``jquant.quantize`` of the
  transformer with the recipe, and the quantized pipeline saved to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

JUDGE = "jq-emoji-classifier"
REFERENCE_PIPELINE = "jq-mmdit-tiny"


def pipeline_kind(name_or_path: str) -> str | None:
    """The kind of pipeline ``--model`` names ("text-to-image" or "text-to-video"; bundled name or folder), None
    when it names no pipeline."""
    from jquant.models.loading import resolve
    from jquant.text_to_image import is_pipeline, read_pipeline_kind

    try:
        path = resolve(name_or_path)
    except ValueError:
        return None
    return read_pipeline_kind(path) if is_pipeline(path) else None


def is_pipeline_model(name_or_path: str) -> bool:
    """Whether ``--model`` names a text-to-image or text-to-video pipeline (bundled name or folder)."""
    return pipeline_kind(name_or_path) is not None


def add_image_generate_options(parser: argparse.ArgumentParser, positive_int) -> None:
    group = parser.add_argument_group("text-to-image and text-to-video models")
    group.add_argument("--steps", type=positive_int, default=None, help="Euler steps (default: the pipeline's)")
    group.add_argument("--guidance", type=float, default=None,
                       help="classifier-free guidance scale (default: the pipeline's; 0 turns guidance off)")
    group.add_argument("--num-images", type=positive_int, default=1,
                       help="images (or clips) from seeds SEED, SEED+1, ...; more than one writes a grid (clips side "
                            "by side) (default: 1)")
    group.add_argument("--out", default=None,
                       help="the PNG (text-to-image) or GIF / MP4 (text-to-video) to write (required for these models)")
    group.add_argument("--frames", type=positive_int, default=None,
                       help="text-to-video: frames per clip, 1 + 4k for a 4x temporal VAE (default: the pipeline's)")
    group.add_argument("--fps", type=positive_int, default=8, help="text-to-video: frames per second (default: 8)")
    group.add_argument("--scale", type=positive_int, default=4,
                       help="text-to-video: pixel enlargement of the written clip (default: 4)")


def add_image_eval_options(group: argparse._ArgumentGroup) -> None:
    """``eval``'s FID / LPIPS options for text-to-image models (local weights files; nothing is downloaded)."""
    group.add_argument("--fid-weights", default=None, metavar="PATH",
                       help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or .safetensors / .npz with its "
                            "tensors): adds FID against real scenes of the image set's test split")
    group.add_argument("--lpips-weights", nargs=2, default=None, metavar=("BACKBONE", "LINEAR"),
                       help="torchvision's alexnet-owt-7be5be79.pth or vgg16-397923af.pth and the lpips package's "
                            "weights/v0.1/alex.pth or vgg.pth: adds LPIPS against the reference images")


def reference_metrics(images: np.ndarray, reference_images: np.ndarray | None, *, fid_net=None,
                      lpips_net=None) -> dict:
    """FID of ``images [N, H, W, 3]`` (in ``[-1, 1]``) against ``N`` real single-glyph scenes of the test split
    (drawn at 64 px, brought to ``H`` by ``resize_to``; ``fid_net``: a ``jquant.eval.fid.load_inception``
    network), and the mean LPIPS against ``reference_images`` (``lpips_net``: ``jquant.eval.lpips.load_lpips``;
    images smaller than the network's smallest input are enlarged by pixel repetition first). Each only when its
    network is given."""
    from jquant.data.scenes import emoji_scenes
    from jquant.eval.fid import fid
    from jquant.eval.lpips import lpips
    from jquant.models.lpips_net import MIN_SIZE

    report = {}
    if fid_net is not None:
        real = emoji_scenes("test", len(images), 64, 0, vocabulary="reference-32", objects=(1,)).images
        real = resize_to(real.astype(np.float32) / 127.5 - 1, images.shape[1])
        report["fid"] = fid(images, real, weights=fid_net)
    if lpips_net is not None and reference_images is not None:
        side = images.shape[1] * math.ceil(MIN_SIZE[lpips_net.net] / images.shape[1])
        report["lpips"] = float(np.mean(lpips(resize_to(images, side), resize_to(reference_images, side), lpips_net)))
    return report


def _guidance(value: float | None, default: float | None) -> float | None:
    if value is None:
        return default
    if not math.isfinite(value):
        raise ValueError(f"--guidance must be a finite number, got {value}.")
    return None if value == 0 else value


def _check_png(out: str | None) -> Path:
    from jquant.atomic import check_output_file

    if out is None:
        raise ValueError("--out is required for a text-to-image model: the PNG file to write, e.g. --out apple.png.")
    return check_output_file(out, (".png",))


def generate(args, console: Console) -> dict:
    from PIL import Image

    from jquant.atomic import write_file_atomically
    from jquant.models.loading import resolve
    from jquant.media import image_grid, to_uint8
    from jquant.text_to_image import load_pipeline

    if getattr(args, "frames", None) is not None:
        raise ValueError(f"--frames applies to text-to-video models; {args.model} is a text-to-image pipeline.")
    path = _check_png(args.out)
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative int, got {args.seed}.")
    pipe = load_pipeline(resolve(args.model))
    guidance = _guidance(args.guidance, pipe.defaults.guidance)
    steps = args.steps or pipe.defaults.steps
    prompts = [args.prompt] * args.num_images
    start = time.perf_counter()
    images = np.concatenate([np.asarray(pipe.generate([args.prompt], seed=args.seed + i, steps=steps,
                                                      guidance=guidance, progress=not args.json))
                             for i in range(len(prompts))])
    seconds = time.perf_counter() - start
    pixels = to_uint8(images)
    picture = pixels[0] if len(pixels) == 1 else image_grid(pixels)
    write_file_atomically(path, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))
    result = {"prompt": args.prompt, "out": str(path), "seeds": [args.seed + i for i in range(len(prompts))],
              "steps": steps, "guidance": guidance, "seconds": round(seconds, 2)}
    if not args.json:
        console.print(f"wrote {path} ({len(prompts)} image(s), {steps} steps, guidance {guidance}, {seconds:.1f} s)")
    return result


def _prompts(seeds: int) -> tuple[list[str], np.ndarray]:
    from jquant.data.emoji import load_glyphs
    from jquant.data.scenes import COLORS, vocabulary_ids

    glyphs = load_glyphs()
    colours = list(COLORS)
    prompts, labels = [], []
    for label, gid in enumerate(vocabulary_ids("reference-32", glyphs)):
        for k in range(seeds):
            prompts.append(f"{glyphs.phrases[gid]} on a {colours[(label + 3 * k) % len(colours)]} background")
            labels.append(label)
    return prompts, np.asarray(labels)


def single_glyph_images(pipe, *, seeds: int, steps: int | None, guidance, batch: int = 64
                        ) -> tuple[np.ndarray, np.ndarray, float]:
    """``(images [N, H, W, 3], labels [N], seconds per image)`` of ``pipe`` for the single-glyph prompts (``seeds``
    images per glyph, prompt ``i`` sampled from seed ``i``)."""
    prompts, labels = _prompts(seeds)
    start = time.perf_counter()
    images = np.concatenate([np.asarray(pipe.generate(prompts[i:i + batch], seed=i, steps=steps, guidance=guidance))
                             for i in range(0, len(prompts), batch)])
    return images, labels, (time.perf_counter() - start) / len(prompts)


def evaluate_pipeline(pipe, reference, *, seeds: int, steps: int | None, guidance, batch: int = 64,
                      reference_images: np.ndarray | None = None, fid_net=None, lpips_net=None) -> dict:
    """``image_report`` of ``pipe`` on single-glyph prompts (``seeds`` per glyph), against ``reference``'s images for
    the same prompts and seeds (or the given ``reference_images``). Images are resized to the judge's resolution
    for the judge's numbers (``resize_to``); PSNR / SSIM compare them at their own size; FID / LPIPS as
    ``reference_metrics`` when their networks are given."""
    from jquant.checkpoint import load as load_checkpoint
    from jquant.data.scenes import emoji_scenes
    from jquant.eval.generation import DATA_RANGE, image_report
    from jquant.eval.image import psnr, ssim
    from jquant.models.loading import resolve

    images, labels, per_image = single_glyph_images(pipe, seeds=seeds, steps=steps, guidance=guidance, batch=batch)
    if reference_images is None and reference is not None:
        reference_images = single_glyph_images(reference, seeds=seeds, steps=steps, guidance=guidance, batch=batch)[0]
    judge = load_checkpoint(resolve(JUDGE))
    size = judge.config.image_size
    real = emoji_scenes("validation", 1024, size, 0, vocabulary="reference-32", objects=(1,)).images
    report = image_report(resize_to(images, size), labels, judge, real_images=real.astype(np.float32) / 127.5 - 1)
    if reference_images is not None:
        if np.shape(reference_images) != images.shape:
            raise ValueError(f"reference images {np.shape(reference_images)} must match the images {images.shape} "
                             "(the same prompts, seeds and image size).")
        report["psnr_db"] = float(psnr(images, reference_images, data_range=DATA_RANGE))
        report["ssim"] = float(ssim(images, reference_images, data_range=DATA_RANGE))
    report.update(reference_metrics(images, reference_images, fid_net=fid_net, lpips_net=lpips_net))
    return {**report, "seconds_per_image": per_image, "steps": steps or pipe.defaults.steps, "guidance": guidance}


def resize_to(images: np.ndarray, size: int) -> np.ndarray:
    """Square ``[N, H, H, C]`` to ``[N, size, size, C]``: mean-pooled when ``H`` is a multiple of ``size``, repeated
    (nearest neighbour) when ``size`` is a multiple of ``H``."""
    n, h, w, c = images.shape
    if h != w or (h % size and size % h):
        raise ValueError(f"images of {h}x{w} cannot be resized to the judge's {size}x{size}; use square images whose "
                         "side divides or is a multiple of it.")
    if h >= size:
        return images.reshape(n, size, h // size, size, w // size, c).mean(axis=(2, 4))
    return images.repeat(size // h, axis=1).repeat(size // w, axis=2)


def evaluate(args, console: Console) -> dict:
    from jquant.eval.fid import load_inception
    from jquant.eval.lpips import load_lpips
    from jquant.models.loading import resolve
    from jquant.text_to_image import load_pipeline

    # the weights files are read (and checked) before any image is generated
    fid_weights, lpips_weights = getattr(args, "fid_weights", None), getattr(args, "lpips_weights", None)
    fid_net = None if fid_weights is None else load_inception(fid_weights)
    lpips_net = None if lpips_weights is None else load_lpips(*lpips_weights)
    pipe = load_pipeline(resolve(args.model))
    reference_name = args.reference or REFERENCE_PIPELINE
    reference = None if Path(resolve(reference_name)) == Path(resolve(args.model)) else load_pipeline(
        resolve(reference_name))
    guidance = _guidance(args.guidance, pipe.defaults.guidance)
    result = {"model": args.model, "reference": None if reference is None else reference_name,
              **evaluate_pipeline(pipe, reference, seeds=args.seeds_per_prompt, steps=args.steps, guidance=guidance,
                                  fid_net=fid_net, lpips_net=lpips_net)}
    if not args.json:
        table = Table(title=f"eval: {args.model}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in ("prompt_accuracy", "random_label_accuracy", "chance", "fd_emoji", "psnr_db", "ssim", "fid",
                    "lpips", "seconds_per_image"):
            if key in result:
                table.add_row(key, f"{result[key]:.4g}")
        console.print(table)
    return result


def quantize(args, console: Console) -> dict:
    from jquant.atomic import check_output_folder
    from jquant.data.scenes import emoji_scenes
    from jquant.models.loading import resolve
    from jquant.quantization import quantize as quantize_model
    from jquant.recipes import Recipe, get
    from jquant.text_to_image import TextToImage, load_pipeline, save_pipeline

    if args.out:
        check_output_folder(args.out, overwrite=args.overwrite, argument="--out", overwrite_hint="--overwrite")
    recipe = Recipe.from_file(args.recipe) if args.recipe.endswith((".json", ".yaml", ".yml")) else get(args.recipe)
    pipe = load_pipeline(resolve(args.model))
    captions = emoji_scenes("train", args.calib_samples, 32, args.seed, vocabulary="reference-32",
                            objects=(1, 2)).captions
    calib = pipe.trajectory_calibration(captions, seed=args.seed)
    start = time.perf_counter()
    qtransformer = quantize_model(pipe.transformer, recipe, calib, progress=not args.json)
    quantized = TextToImage(text_encoder=pipe.text_encoder, transformer=qtransformer, vae=pipe.vae,
                            defaults=pipe.defaults, text_encoder_name=pipe.text_encoder_name)
    result = {"model": args.model, "recipe": recipe.to_dict(), "quantize_seconds": time.perf_counter() - start,
              "calibration_inputs": int(len(calib["sigmas"])), "sites": dict(qtransformer.quantization.sites)}
    if args.out:
        result["saved_to"] = str(save_pipeline(quantized, args.out, overwrite=args.overwrite))
    if not args.no_eval:
        result["quantized"] = evaluate_pipeline(quantized, pipe, seeds=1, steps=None, guidance=pipe.defaults.guidance)
    if not args.json:
        table = Table(title=f"{args.model} quantized with {recipe.name}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("calibration inputs (trajectory steps)", str(result["calibration_inputs"]))
        table.add_row("quantization time (s)", f"{result['quantize_seconds']:.1f}")
        for key, value in result.get("quantized", {}).items():
            if isinstance(value, float):
                table.add_row(key, f"{value:.4g}")
        console.print(table)
        if args.out:
            console.print(f"saved to {result['saved_to']}")
    return result
