"""The ``jquant`` commands on text-to-video pipelines (``generate``, ``eval``, ``quantize`` of e.g. jq-video-tiny).

``jquant.cli`` hands a command here when ``--model`` names a pipeline folder whose ``pipeline.json`` says
``"kind": "text-to-video"``:

- ``generate``: ``--prompt`` -> an animated GIF (or an MP4 where ``imageio`` with its bundled ffmpeg is
  installed) at ``--out``: ``--num-images`` clips of ``--frames`` frames from seeds ``--seed``, ``--seed + 1``, ...
  side by side;
  with ``--dynamic-frame-rate`` (``--keep-ratio r`` or ``--threshold τ``, ``--compress-after K``,
  ``--half-resolution-compression``) the clips are sampled with VGDFR (``jquant.frame_rate.vgdfr``);
- ``eval``: per-frame prompt accuracy of single-emoji validation captions (the bundled judge), next to the
  random-label baseline; per-frame PSNR / SSIM against ``--reference`` (default: the bundled float pipeline) for
  the same prompts and seeds; the TV-L1 warping error of the clips and of the reference's; the VAE's
  reconstruction PSNR on real validation clips; sampling time per clip;
- ``quantize``: calibration along sampler trajectories of training captions, ``jquant.quantize`` of the
  transformer with the recipe, and the quantized pipeline saved to ``--out``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from jquant import cli_video_mixed
from jquant.atomic import check_output_file, write_file_atomically
from jquant.cli_image import JUDGE, _guidance

REFERENCE_PIPELINE = "jq-video-tiny"
VIDEO_SUFFIXES = (".gif", ".mp4")
CLEAN_MOTIONS = ("still", "drift", "fast")


def _check_video_out(out: str | None) -> Path:
    if out is None:
        raise ValueError("--out is required for a text-to-video model: the GIF (or MP4) to write, e.g. --out clip.gif.")
    path = check_output_file(out, VIDEO_SUFFIXES)
    if path.suffix.lower() == ".mp4":
        try:
            import imageio.v3  # noqa: F401
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ValueError(f"--out {out!r}: writing MP4 needs imageio and its bundled ffmpeg (pip install imageio "
                             "imageio-ffmpeg); or write a .gif.") from None
    return path


def _write_mp4(clips: np.ndarray, path: Path, fps: int, scale: int) -> None:
    """uint8 clips ``[N, F, H, W, 3]`` side by side as one MP4 (written to a temporary name, then moved)."""
    import imageio.v3 as iio

    frames = np.concatenate(list(clips), axis=2).repeat(scale, axis=1).repeat(scale, axis=2)
    write_file_atomically(path, lambda tmp: iio.imwrite(tmp, frames, fps=fps, codec="libx264", macro_block_size=1))


def add_frame_rate_options(parser) -> None:
    """``jquant generate``'s VGDFR options (text-to-video pipelines whose transformer takes DyRoPE positions)."""
    group = parser.add_argument_group("dynamic frame rate (VGDFR; text-to-video models)")
    group.add_argument("--dynamic-frame-rate", action="store_true",
                       help="merge similar frames after a few steps and sample the rest on fewer latent frames")
    group.add_argument("--keep-ratio", type=float, default=None,
                       help="fraction of video frames to keep, in (0, 1] (default with --dynamic-frame-rate: 0.8)")
    group.add_argument("--threshold", type=float, default=None,
                       help="merge frames whose neighbour SSIM exceeds this, in [0, 1] (instead of --keep-ratio)")
    group.add_argument("--compress-after", type=int, default=None,
                       help="full-length steps before the merge, K (default: 0.2 x steps)")
    group.add_argument("--half-resolution-compression", action="store_true",
                       help="plan and merge on the VAE's half-resolution compression variant (the paper's)")


def frame_rate_config(args, pipe, frames: int, steps: int):
    """The ``FrameRateConfig`` of ``generate``'s options (None without ``--dynamic-frame-rate``), checked against the
    pipeline, the clip length and the step count before any sampling."""
    from jquant.frame_rate.vgdfr import FrameRateConfig, _check_dyrope

    given = [f"--{n}" for n, v in (("keep-ratio", args.keep_ratio), ("threshold", args.threshold),
                                   ("compress-after", args.compress_after)) if v is not None]
    if not args.dynamic_frame_rate:
        if given or args.half_resolution_compression:
            raise ValueError(f"{', '.join(given) or '--half-resolution-compression'} only applies with "
                             "--dynamic-frame-rate; add it or drop the option.")
        return None
    if args.keep_ratio is not None and args.threshold is not None:
        raise ValueError("give --keep-ratio or --threshold, not both.")
    ratio = 0.8 if args.keep_ratio is None and args.threshold is None else args.keep_ratio
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold must be in [0, 1] (SSIM above it merges), got {args.threshold}.")
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"--keep-ratio must be in (0, 1] (the fraction of video frames kept), got {ratio}.")
    if args.compress_after is not None and args.compress_after < 1:
        raise ValueError(f"--compress-after must be a positive number of steps, got {args.compress_after}.")
    try:
        _check_dyrope(pipe.transformer)
    except TypeError as error:
        raise ValueError(f"--dynamic-frame-rate: {error}") from None
    cvae = pipe.vae.compression_variant() if args.half_resolution_compression else None
    config = FrameRateConfig(keep_ratio=ratio, threshold=args.threshold, compress_after=args.compress_after,
                             compression_vae=cvae)
    try:
        config.steps_before(steps)
    except ValueError as error:
        raise ValueError(f"--compress-after: {error}") from None
    try:
        config.check_clip(frames, pipe.vae.config.temporal_compression_ratio)
    except ValueError as error:
        raise ValueError(f"--frames / --keep-ratio: {error}") from None
    return config


def generate(args, console: Console) -> dict:
    from jquant.media import save_gif, to_uint8
    from jquant.models.loading import resolve
    from jquant.text_to_image import load_pipeline

    path = _check_video_out(args.out)
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative int, got {args.seed}.")
    pipe = load_pipeline(resolve(args.model))
    frames = args.frames or pipe.defaults.frames
    pipe.latent_shape(frames)  # refuses a frame count the VAE cannot take, before any sampling
    guidance = _guidance(args.guidance, pipe.defaults.guidance)
    steps = args.steps or pipe.defaults.steps
    frame_rate = frame_rate_config(args, pipe, frames, steps)
    six_bit = cli_video_mixed.saved_config(args.model)
    if six_bit is not None and frame_rate is not None:
        raise ValueError(f"{args.model} samples with 6Bit-Diffusion (six_bit_diffusion.json); --dynamic-frame-rate "
                         "does not combine with it.")
    start = time.perf_counter()
    if six_bit is not None:
        clips, six_bit_summary = cli_video_mixed.generate(pipe, six_bit, args.prompt, steps=steps, guidance=guidance,
                                                          frames=frames,
                                                          seeds=[args.seed + i for i in range(args.num_images)])
    elif frame_rate is None:
        clips = np.concatenate([np.asarray(pipe.generate([args.prompt], seed=args.seed + i, steps=steps,
                                                         guidance=guidance, frames=frames, progress=not args.json))
                                for i in range(args.num_images)])
    else:
        clips, plans = _generate_dynamic(pipe, args, frame_rate, steps=steps, guidance=guidance, frames=frames)
    seconds = time.perf_counter() - start
    pixels = to_uint8(clips)
    if path.suffix.lower() == ".gif":
        save_gif(pixels, path, fps=args.fps, scale=args.scale)
    else:
        _write_mp4(pixels, path, args.fps, args.scale)
    result = {"prompt": args.prompt, "out": str(path), "seeds": [args.seed + i for i in range(args.num_images)],
              "frames": int(clips.shape[1]), "steps": steps, "guidance": guidance, "seconds": round(seconds, 2)}
    if six_bit is not None:
        result["six_bit_diffusion"] = six_bit_summary
    if frame_rate is not None:
        result["dynamic_frame_rate"] = {
            "compress_after": frame_rate.steps_before(steps),
            "kept_frames": [len(p.kept_frames) for p in plans], "kept_latent_frames": [len(p.kept_latents) for p in plans],
            "merges": [[list(m) for m in p.merges] for p in plans]}
    if not args.json:
        console.print(f"wrote {path} ({args.num_images} clip(s) of {clips.shape[1]} frames, {steps} steps, guidance "
                      f"{guidance}, {seconds:.1f} s)")
    return result


def _generate_dynamic(pipe, args, frame_rate, **options) -> tuple[np.ndarray, list]:
    """``(clips [N, F, H, W, 3], plans)`` of ``--num-images`` VGDFR samples from seeds ``--seed``, ``--seed + 1``, .."""
    from jquant.frame_rate.vgdfr import sample_dynamic_frame_rate

    samples = [sample_dynamic_frame_rate(pipe, [args.prompt], frame_rate, seed=args.seed + i, **options)
               for i in range(args.num_images)]
    return np.concatenate([np.asarray(s.videos) for s in samples]), [s.plans[0] for s in samples]


def validation_prompts(n: int, frames: int, resolution: int = 32) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(captions, labels [n], clips [n, F, R, R, 3] in [-1, 1])`` of ``n`` single-emoji validation clips without
    cuts (the glyph is visible in every frame, so every frame can be judged against the caption's glyph)."""
    from jquant.data.video_scenes import video_scenes

    scenes = video_scenes("validation", n, resolution, 5, frames=frames, vocabulary="reference-32", objects=(1,),
                          motions=CLEAN_MOTIONS)
    labels = np.array([truth.labels[0, 0] for truth in scenes.truths])
    return scenes.captions, labels, scenes.videos.astype(np.float32) / 127.5 - 1.0


def sample_clips(pipe, prompts: list[str], *, steps: int | None, guidance, batch: int = 16) -> tuple[np.ndarray, float]:
    """``(clips [N, F, H, W, 3], seconds per clip)``: prompt ``i`` sampled from seed ``i``, in batches. The time is
    of sampling and decoding only: the first batch is run once untimed first, so compilation is not counted."""
    def run(i: int) -> np.ndarray:
        return np.asarray(pipe.generate(prompts[i:i + batch], seed=i, steps=steps, guidance=guidance))

    run(0)
    start = time.perf_counter()
    clips = np.concatenate([run(i) for i in range(0, len(prompts), batch)])
    return clips, (time.perf_counter() - start) / len(prompts)


def evaluate_pipeline(pipe, reference, *, clips: int, steps: int | None, guidance,
                      reference_clips: np.ndarray | None = None) -> dict:
    """``jquant.eval.video.video_report`` of ``pipe`` on ``clips`` single-emoji validation captions: per-frame prompt
    accuracy by the bundled judge (and against shuffled labels), per-frame PSNR / SSIM and the warping error against
    ``reference``'s clips for the same prompts and seeds (or ``reference_clips``), the VAE's reconstruction PSNR on
    the real clips, and seconds per clip."""
    from jquant.checkpoint import load as load_checkpoint
    from jquant.eval.video import frame_prompt_accuracy, video_report
    from jquant.models.loading import resolve

    prompts, labels, real = validation_prompts(clips, pipe.defaults.frames, pipe.defaults.size)
    videos, per_clip = sample_clips(pipe, prompts, steps=steps, guidance=guidance)
    if reference_clips is None and reference is not None:
        reference_clips = sample_clips(reference, prompts, steps=steps, guidance=guidance)[0]
    judge = load_checkpoint(resolve(JUDGE))
    if judge.config.image_size != videos.shape[2]:
        raise ValueError(f"the judge takes {judge.config.image_size}px frames; this pipeline draws {videos.shape[2]}px.")
    report = video_report(videos, reference=reference_clips, labels=labels, classifier_fn=judge)
    shuffled = frame_prompt_accuracy(judge, videos, np.random.default_rng(0).permutation(labels))
    return {**report, "random_label_accuracy": float(shuffled.mean()), "chance": 1.0 / 32,
            **vae_legibility(pipe.vae, real, labels, judge), "seconds_per_clip": per_clip,
            "steps": steps or pipe.defaults.steps, "guidance": guidance}


def vae_legibility(vae, real: np.ndarray, labels: np.ndarray, judge=None, batch: int = 8) -> dict:
    """What a video VAE lets through of the prompt, on real clips ``real [N, F, H, W, 3]`` in ``[-1, 1]`` of the
    single emoji ``labels [N]`` (``validation_prompts``): the judge's per-frame prompt accuracy on the clips and on
    the VAE's reconstructions ``vae(clip)`` (clipped to ``[-1, 1]``; a ceiling for any transformer sampling the
    VAE's latents), and the reconstruction PSNR (dB)."""
    import jax.numpy as jnp

    from jquant.checkpoint import load as load_checkpoint
    from jquant.eval.video import DATA_RANGE, frame_prompt_accuracy, frame_psnr
    from jquant.models.loading import resolve

    judge = judge if judge is not None else load_checkpoint(resolve(JUDGE))
    recon = np.concatenate([np.asarray(vae(jnp.asarray(real[i:i + batch])), np.float32)
                            for i in range(0, len(real), batch)])
    return {"vae_reconstruction_psnr_db": float(np.mean(frame_psnr(recon, real, data_range=DATA_RANGE))),
            "prompt_accuracy_real_clips": float(frame_prompt_accuracy(judge, real, labels).mean()),
            "prompt_accuracy_vae_reconstructions": float(
                frame_prompt_accuracy(judge, np.clip(recon, -1.0, 1.0), labels).mean())}


def evaluate(args, console: Console) -> dict:
    from jquant.models.loading import resolve
    from jquant.text_to_image import load_pipeline

    pipe = load_pipeline(resolve(args.model))
    reference_name = args.reference or REFERENCE_PIPELINE
    reference = None if Path(resolve(reference_name)) == Path(resolve(args.model)) else load_pipeline(
        resolve(reference_name))
    guidance = _guidance(args.guidance, pipe.defaults.guidance)
    result = {"model": args.model, "reference": None if reference is None else reference_name,
              **evaluate_pipeline(pipe, reference, clips=args.clips, steps=args.steps, guidance=guidance)}
    if not args.json:
        _print(console, f"eval: {args.model}", result)
    return result


def _print(console: Console, title: str, result: dict) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("prompt_accuracy", "random_label_accuracy", "chance", "psnr_db", "ssim", "temporal_error",
                "temporal_error_reference", "vae_reconstruction_psnr_db", "prompt_accuracy_real_clips",
                "prompt_accuracy_vae_reconstructions", "seconds_per_clip"):
        if key in result:
            table.add_row(key, f"{result[key]:.4g}")
    console.print(table)


def calibration_captions(pipe, n: int, seed: int) -> list[str]:
    """``n`` training captions (``video_scenes`` with ``seed``) that fit the pipeline's text length; longer ones are
    skipped, as the DiT training stages skip them."""
    from jquant.data.video_scenes import video_scenes

    drawn = video_scenes("train", 4 * n, pipe.defaults.size, seed, frames=pipe.defaults.frames,
                         vocabulary="reference-32").captions
    kept = [c for c in drawn if pipe.text_encoder.fits(c, pipe.defaults.max_length)]
    if len(kept) < n:
        raise ValueError(f"only {len(kept)} of {len(drawn)} training captions fit the pipeline's "
                         f"{pipe.defaults.max_length} text tokens; lower --calib-samples to {len(kept)} or less.")
    return kept[:n]


def quantize(args, console: Console) -> dict:
    from jquant.atomic import check_output_folder
    from jquant.models.loading import resolve
    from jquant.quantization import quantize as quantize_model
    from jquant.recipes import Recipe, get
    from jquant.text_to_image import load_pipeline, save_pipeline
    from jquant.text_to_video import TextToVideo

    if args.out:
        check_output_folder(args.out, overwrite=args.overwrite, argument="--out", overwrite_hint="--overwrite")
    recipe = Recipe.from_file(args.recipe) if args.recipe.endswith((".json", ".yaml", ".yml")) else get(args.recipe)
    pipe = load_pipeline(resolve(args.model))
    captions = calibration_captions(pipe, args.calib_samples, args.seed)
    calib = pipe.trajectory_calibration(captions, seed=args.seed)
    start = time.perf_counter()
    qtransformer = quantize_model(pipe.transformer, recipe, calib, progress=not args.json)
    quantized = TextToVideo(text_encoder=pipe.text_encoder, transformer=qtransformer, vae=pipe.vae,
                            defaults=pipe.defaults, text_encoder_name=pipe.text_encoder_name)
    six_bit = cli_video_mixed.calibrate(quantized, recipe.name, captions, args.seed)
    result = {"model": args.model, "recipe": recipe.to_dict(), "quantize_seconds": time.perf_counter() - start,
              "calibration_inputs": int(len(calib["sigmas"])), "sites": dict(qtransformer.quantization.sites)}
    if six_bit is not None:
        result["six_bit_diffusion"] = six_bit[1]
    if args.out:
        result["saved_to"] = str(save_pipeline(quantized, args.out, overwrite=args.overwrite))
        if six_bit is not None:
            six_bit[0].save(result["saved_to"])
    if not args.no_eval:
        result["quantized"] = evaluate_pipeline(quantized, pipe, clips=8, steps=None, guidance=pipe.defaults.guidance)
    if not args.json:
        if "quantized" in result:
            _print(console, f"{args.model} quantized with {recipe.name}", result["quantized"])
        if args.out:
            console.print(f"saved to {result['saved_to']}")
    return result
