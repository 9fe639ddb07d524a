"""Post-training quantization of the text-to-video transformer of jq-video-tiny -> experiments/results/video_ptq.md
(+ .json, .png: a row of frames per recipe).

    python experiments/video_ptq.py                     # every recipe, calibration seeds 0 1
    python experiments/video_ptq.py --quick --out /tmp  # smoke run: two recipes, few clips

The recipes are ``dit_ptq.py``'s (the image transformer's baselines), on the HunyuanVideo-style DiT: W8A8 (int8
weights, int8 activations per token, or static per timestep bucket), W4A8 (GPTQ int4 weights with the Hessian
balanced over timestep buckets, int8 per-token activations), W4A16 GPTQ and NVFP4 weights. Calibration is the
transformer's inputs at every step of guided sampler trajectories (``TextToVideo.trajectory_calibration``) for
``--calib-prompts`` training captions; the blocks' linears receive the step's timestep bucket as their activation
group. Each quantized pipeline samples ``--clips`` single-emoji validation captions without cuts (the seeds of the
float pipeline) and is scored by ``jquant.cli_video.evaluate_pipeline``: per-frame PSNR / SSIM against the float
pipeline's clips, the TV-L1 warping error (temporal consistency; the float clips' next to it), per-frame prompt
accuracy by the bundled judge (and against shuffled labels), transformer bytes and CPU sampling time per clip. The
patch embedding, token refiner, time / text embedders and output layers stay float (the family's keep_float).
"""

from __future__ import annotations

import argparse
import time

import harness
import numpy as np
from dit_ptq import (CALIBRATION_FREE, KEEP_ACCURACY, KEEP_PSNR, _calibration_seeds, _mean_std,
                     _single_bucket, _transformer_bytes, recipe, verdict_inputs)
from harness import Column, Results

RECIPES = ("float", "w8a8-dynamic", "w8a8-static", "w8a8-static-timestep", "w4a16-gptq", "w4a8-gptq-dynamic",
           "nvfp4-w4a16")
SAMPLE_PROMPT = "a rocket on a blue background darts up, then stops"


def _calibration_captions(pipe, n: int, seed: int) -> list[str]:
    """``n`` training captions that fit the pipeline's text length (the long multi-cut ones are skipped)."""
    from jquant.data.video_scenes import video_scenes

    limit = pipe.defaults.max_length
    scenes = video_scenes("train", 4 * n, pipe.defaults.size, 100 + seed, frames=pipe.defaults.frames,
                          vocabulary="reference-32")
    tokenizer = pipe.text_encoder.tokenizer
    fits = [c for c in scenes.captions if 1 + len(tokenizer(c, add_special_tokens=False)["input_ids"]) <= limit]
    if len(fits) < n:
        raise ValueError(f"only {len(fits)} of {4 * n} drawn captions fit {limit} tokens; lower --calib-prompts.")
    return fits[:n]


def run(args: argparse.Namespace, results: Results) -> None:
    import jax

    from jquant.cli_video import evaluate_pipeline, sample_clips, validation_prompts
    from jquant.media import to_uint8
    from jquant.models.loading import resolve
    from jquant.quantization import quantize
    from jquant.text_to_image import load_pipeline
    from jquant.text_to_video import TextToVideo

    pipe = load_pipeline(resolve(args.model))
    guidance = pipe.defaults.guidance
    results.set_meta(platform=jax.devices()[0].platform, jax=jax.__version__, steps=pipe.defaults.steps,
                     guidance=guidance, frames=pipe.defaults.frames,
                     bucket_edges=list(pipe.transformer.config.bucket_edges))
    prompts = validation_prompts(args.clips, pipe.defaults.frames, pipe.defaults.size)[0]
    float_clips = sample_clips(pipe, prompts, steps=None, guidance=guidance)[0]
    samples = {}
    for name in args.recipes:
        for seed in [None] if name in CALIBRATION_FREE else args.seeds:
            if results.has(recipe=name, calib_seed=seed):
                continue
            start = time.perf_counter()
            if name == "float":
                model, calib_inputs = pipe.transformer, 0
            else:
                rcp, per_timestep = recipe(name)
                calib = pipe.trajectory_calibration(_calibration_captions(pipe, args.calib_prompts, seed or 0),
                                                    seed=seed or 0)
                target = pipe.transformer if per_timestep or "static" not in name else _single_bucket(pipe.transformer)
                model = quantize(target, rcp, calib, progress=False)
                calib_inputs = len(calib["sigmas"])
            quantize_seconds = time.perf_counter() - start
            qpipe = TextToVideo(text_encoder=pipe.text_encoder, transformer=model, vae=pipe.vae,
                                defaults=pipe.defaults, text_encoder_name=pipe.text_encoder_name)
            report = evaluate_pipeline(qpipe, None, clips=args.clips, steps=None, guidance=guidance,
                                       reference_clips=None if name == "float" else float_clips)
            samples[name] = to_uint8(qpipe.generate([SAMPLE_PROMPT], seed=0))[0]
            results.add({"recipe": name, "calib_seed": seed, "calibration_inputs": calib_inputs,
                         "quantize_seconds": quantize_seconds, "transformer_bytes": _transformer_bytes(model),
                         **{k: v for k, v in report.items() if not isinstance(v, (list, dict))}})
            print(f"{name} (calibration seed {seed}): {results.rows[-1]}", flush=True)
    _save_samples(args.out, results, samples)


def _save_samples(out, results: Results, samples: dict) -> None:
    """Each recipe's clip of ``SAMPLE_PROMPT`` as a row of frames in ``<stem>_rows/<recipe>.png``; the figure stacks
    the rows of every recipe that has one, in ``RECIPES`` order."""
    from PIL import Image

    from jquant.media import video_frames_grid

    folder = out / (results.path.stem + "_rows")
    folder.mkdir(exist_ok=True)
    for name, clip in samples.items():
        Image.fromarray(video_frames_grid(clip[None])).save(folder / f"{name}.png")
    present = [name for name in RECIPES if (folder / f"{name}.png").is_file()]
    if present:
        rows = np.concatenate([np.asarray(Image.open(folder / f"{name}.png")) for name in present])
        Image.fromarray(rows.repeat(3, 0).repeat(3, 1)).save(out / (results.path.stem + ".png"))
        results.set_meta(sample_recipes=present, sample_prompt=SAMPLE_PROMPT)


def _verdict(by_recipe: dict[str, list[dict]]) -> str | None:
    """ViDiT-Q's claims on this model: W8A8 and W4A8 (GPTQ weights) keep quality (the reading's rule) and per-timestep
    static scales beat one static scale. ``reproduced`` when every W8A8 / W4A8 recipe keeps quality and each
    timestep-aware recipe's PSNR exceeds its one-scale twin's by more than twice the paired standard error over
    calibration seeds, ``partly reproduced`` when some of these checks hold, ``not reproduced`` when none."""
    inputs = verdict_inputs(by_recipe)
    if inputs is None:
        return None
    flt, w8, w4a8, wins, gains = inputs
    drop = {n: flt["prompt_accuracy"] - np.mean([r["prompt_accuracy"] for r in by_recipe[n]]) for n in w8 + w4a8}
    psnr = {n: np.mean([r["psnr_db"] for r in by_recipe[n]]) for n in w8 + w4a8}
    warp = max(abs(np.mean([r["temporal_error"] for r in by_recipe[n]]) - flt["temporal_error"]) for n in w8 + w4a8)
    keeps = {n: drop[n] <= KEEP_ACCURACY and psnr[n] >= KEEP_PSNR for n in w8 + w4a8}
    k8, k4 = sum(keeps[n] for n in w8), sum(keeps[n] for n in w4a8)
    checks = [k8 == len(w8), k4 == len(w4a8), *wins]
    category = "reproduced" if all(checks) else "partly reproduced" if any(checks) else "not reproduced"
    judge = ("" if flt["prompt_accuracy"] > 2 * flt.get("chance", 0.0) else
             f" The judge reads the float clips near chance ({flt['prompt_accuracy']:.3f}, chance "
             f"{flt['chance']:.3f}), so quality here is fidelity to the float clips.")
    return (f"{category}: {k8} of {len(w8)} W8A8 and {k4} of {len(w4a8)} W4A8 GPTQ recipes keep quality (PSNR at "
            f"least {min(psnr[n] for n in w8):.1f} / {min(psnr[n] for n in w4a8):.1f} dB against the float clips, "
            f"warping error within {warp:.1e} of the float clips' {flt['temporal_error']:.4f}); {gains} (ViDiT-Q: "
            f"W8A8 and W4A8 close to float, timestep-aware scales better than one).{judge}")


def report(runs: list[Results], base) -> None:
    results = runs[0]
    by_recipe: dict[str, list[dict]] = {}
    for row in results.rows:
        by_recipe.setdefault(row["recipe"], []).append(row)
    fields = {"PSNR vs float (dB)": "psnr_db", "SSIM vs float": "ssim", "warping error": "temporal_error",
              "prompt accuracy": "prompt_accuracy", "random-label acc.": "random_label_accuracy",
              "s / clip (CPU)": "seconds_per_clip"}
    summary = [{"recipe": name, **{title: _mean_std(rows, field) for title, field in fields.items()},
                "MB": f"{rows[0]['transformer_bytes'] / 1e6:.2f}", "seeds": str(len(rows))}
               for name, rows in by_recipe.items()]
    table = harness.table(summary, [Column("recipe", "recipe"), *(Column(t, t) for t in fields),
                                    Column("transformer MB", "MB"), Column("calib seeds", "seeds")])
    float_row = by_recipe.get("float", [{}])[0]
    notes = []
    for name, rows in by_recipe.items():
        if name == "float" or "prompt_accuracy" not in float_row:
            continue
        drop = float_row["prompt_accuracy"] - np.mean([r["prompt_accuracy"] for r in rows])
        psnr = np.mean([r["psnr_db"] for r in rows])
        warp = np.mean([r["temporal_error"] for r in rows]) - float_row["temporal_error"]
        verdict = "keeps quality" if drop <= KEEP_ACCURACY and psnr >= KEEP_PSNR else "loses quality"
        notes.append(f"`{name}` {verdict}: prompt accuracy {drop:.3f} below float, PSNR {psnr:.1f} dB against the "
                     f"float clips, warping error {warp:+.2e} against the float clips' own.")
    if float_row and float_row.get("prompt_accuracy", 1.0) <= 2 * float_row.get("chance", 0.0):
        notes.append(f"The float model's own prompt accuracy ({float_row['prompt_accuracy']:.3f}, chance "
                     f"{float_row['chance']:.3f}) is near chance, so the prompt-accuracy half of each verdict says "
                     "nothing here; the verdicts rest on PSNR / SSIM and the warping error against the float clips.")
    meta = results.meta
    lines = ["# PTQ of the text-to-video transformer (jq-video-tiny)", "",
             f"Sampling: {meta.get('steps')} Euler steps, guidance {meta.get('guidance')}, {meta.get('frames')} "
             f"frames; {results.args.get('clips')} single-emoji validation captions without cuts; calibration: "
             f"trajectories of {results.args.get('calib_prompts')} training captions (all steps, conditional and "
             f"unconditional inputs), timestep buckets at σ = {meta.get('bucket_edges')}; "
             f"{meta.get('platform', '?').upper()}, jax {meta.get('jax')}. Mean ± std over calibration seeds "
             f"{_calibration_seeds(results)}. The warping error is the mean |frame t+1 - frame t warped by the TV-L1 "
             f"flow| over [-1, 1] pixels (`jquant.eval.video.temporal_error`). {harness.reproduce(results.command)}",
             "", *table, "", *([harness.verdict(v), ""] if (v := _verdict(by_recipe)) else []),
             f"Reading (formatted from the run's numbers; 'keeps quality' = prompt accuracy within {KEEP_ACCURACY:g} "
             f"of float and PSNR >= {KEEP_PSNR:g} dB):", "", *harness.bullets(notes), "",
             f"Frames of \"{meta.get('sample_prompt')}\" (seed 0; rows: {', '.join(meta.get('sample_recipes', []))}):",
             "", f"![samples]({base.name}.png)", ""]
    harness.write_text_atomic(base.with_name(base.name + ".md"), "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--calib-prompts", type=int, default=16, help="captions whose trajectories calibrate")
    parser.add_argument("--clips", type=int, default=32, help="validation captions sampled per recipe")
    harness.add_arguments(parser, model="jq-video-tiny", seeds=(0, 1))
    harness.run_experiment(parser, stem=lambda a: "video_ptq", key=("recipe", "calib_seed"), run=run, report=report,
                           quick={"recipes": ["float", "w8a8-dynamic"], "calib_prompts": 2, "clips": 2, "seeds": [0]},
                           volatile=("recipes", "seeds"))


if __name__ == "__main__":
    main()
