"""Post-training quantization of the text-to-image transformer jq-mmdit-tiny -> experiments/results/dit_ptq.md (+ .json,
.png: a sample grid per recipe).

    python experiments/dit_ptq.py                     # every recipe, calibration seeds 0 1
    python experiments/dit_ptq.py --quick --out /tmp  # smoke run: two recipes, few prompts

Calibration follows PTQ4DiT / Q-DiT / ViDiT-Q: the transformer's inputs at every step of guided sampler
trajectories (``TextToImage.trajectory_calibration``) for ``--calib-prompts`` training captions, so statistics
cover every noise level; the joint blocks' linears receive the step's timestep bucket (σ split at 0.25 / 0.5 /
0.75) as their activation group. Recipes (weights / activations):

- ``w8a8-dynamic``: int8 per-channel weights (RTN), int8 per-token dynamic activations;
- ``w8a8-static``: int8 weights, int8 activations with ONE calibrated scale per layer (all timesteps);
- ``w8a8-static-timestep``: the same with one scale per layer and timestep bucket (the timestep-aware static
  scales of PTQ4DiT / ViDiT-Q, as a table picked at run time by the step's bucket);
- ``smoothquant-w8a8-static`` / ``smoothquant-w8a8-static-timestep``: the same after SmoothQuant (α = 0.5)
  folded into the blocks' adaLN modulation (``adaln_smoothquant`` transform step);
- ``w4a16-rtn`` / ``w4a16-gptq``: int4 weights in groups of 64 (asymmetric), round to nearest or GPTQ with the
  Hessian balanced over timestep buckets (``group_weighting="balanced"``, Q-DiT's concern that late steps
  dominate the token count);
- ``w4a8-gptq-dynamic``: GPTQ int4 weights with int8 per-token dynamic activations;
- ``w4a8-gptq-static-timestep``: GPTQ int4 weights with per-timestep static int8 activations;
- ``nvfp4-w4a16``: NVFP4 weights (E2M1 in blocks of 16 with E4M3 scales).

Each quantized pipeline samples single-glyph prompts (``--seeds-per-prompt`` images per glyph of the 32-glyph
vocabulary, the same seeds as the float pipeline) and is scored by PSNR / SSIM against the float pipeline's images,
prompt accuracy (the bundled judge, next to the random-label baseline), FD-emoji (judge features against real
validation scenes), transformer bytes and CPU sampling time per image. The patch embedding, time / text embedders,
context embedder and output layers stay float (the family's keep_float, as these papers do).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import harness
import numpy as np
from harness import Column, Results

RECIPES = ("float", "w8a8-dynamic", "w8a8-static", "w8a8-static-timestep", "smoothquant-w8a8-static",
           "smoothquant-w8a8-static-timestep", "w4a16-rtn", "w4a16-gptq", "w4a8-gptq-dynamic",
           "w4a8-gptq-static-timestep", "nvfp4-w4a16")
# Recipes whose numbers do not depend on the calibration set (run once, not per calibration seed).
CALIBRATION_FREE = ("float", "w8a8-dynamic", "w4a16-rtn", "nvfp4-w4a16")
# 'Keeps quality': prompt accuracy at most KEEP_ACCURACY below float's and PSNR >= KEEP_PSNR dB against its images.
KEEP_ACCURACY, KEEP_PSNR = 0.05, 20.0
# The recipes with per-timestep static scales and their one-scale twins (PTQ4DiT / ViDiT-Q's timestep-aware claim).
TIMESTEP_PAIRS = (("w8a8-static-timestep", "w8a8-static"),
                  ("smoothquant-w8a8-static-timestep", "smoothquant-w8a8-static"))


def recipe(name: str):
    """The ``jquant.recipes.Recipe`` of a row name (see the module docstring)."""
    from jquant.recipes import Recipe, Rule, TransformStep

    w4 = dict(weight="int4-g64-asym")
    gptq = dict(algorithm="gptq", options=(("group_weighting", "balanced"),))
    rules = {
        "w8a8-dynamic": Rule(pattern=".*", weight="int8", activation="int8", algorithm="rtn"),
        "w8a8-static": Rule(pattern=".*", weight="int8", activation="int8-tensor", algorithm="rtn",
                            static_activation=True),
        "w4a16-rtn": Rule(pattern=".*", algorithm="rtn", **w4),
        "w4a16-gptq": Rule(pattern=".*", **w4, **gptq),
        "w4a8-gptq-dynamic": Rule(pattern=".*", activation="int8", **w4, **gptq),
        "w4a8-gptq-static": Rule(pattern=".*", activation="int8-tensor", static_activation=True, **w4, **gptq),
        "nvfp4-w4a16": Rule(pattern=".*", weight="nvfp4", algorithm="rtn"),
    }
    base = name.removeprefix("smoothquant-").removesuffix("-timestep")
    rule = rules["w8a8-static" if base == "w8a8-static" else base]
    steps = ((TransformStep(kind="adaln_smoothquant", options=(("alpha", 0.5),)),) if name.startswith("smoothquant-")
             else ())
    return Recipe(name=name, rules=(rule,), transforms=steps), name.endswith("-timestep")


def _transformer_bytes(model) -> int:
    from jquant.eval.size import size_report

    return int(size_report(model).bytes)


def run(args: argparse.Namespace, results: Results) -> None:
    import jax

    from jquant.data.scenes import emoji_scenes
    from jquant.models.loading import resolve
    from jquant.quantization import quantize
    from jquant.media import to_uint8
    from jquant.text_to_image import TextToImage, load_pipeline

    import jquant.cli_image as cli_image

    pipe = load_pipeline(resolve(args.model))
    results.set_meta(platform=jax.devices()[0].platform, jax=jax.__version__, steps=pipe.defaults.steps,
                     guidance=pipe.defaults.guidance, bucket_edges=list(pipe.transformer.config.bucket_edges))
    grids = {}
    float_images = cli_image.single_glyph_images(pipe, seeds=args.seeds_per_prompt, steps=None,
                                                 guidance=pipe.defaults.guidance)[0]
    for name in args.recipes:
        seeds = [None] if name in CALIBRATION_FREE else args.seeds
        for seed in seeds:
            if results.has(recipe=name, calib_seed=seed):
                continue
            start = time.perf_counter()
            if name == "float":
                model, calib_inputs = pipe.transformer, 0
            else:
                rcp, per_timestep = recipe(name)
                captions = emoji_scenes("train", args.calib_prompts, 32, 100 + (seed or 0), vocabulary="reference-32",
                                        objects=(1, 2)).captions
                calib = pipe.trajectory_calibration(captions, seed=seed or 0)
                target = pipe.transformer
                if not per_timestep and "static" in name:  # one static scale for every timestep: a single bucket
                    target = _single_bucket(target)
                model = quantize(target, rcp, calib, progress=False)
                calib_inputs = len(calib["sigmas"])
            quantize_seconds = time.perf_counter() - start
            qpipe = TextToImage(text_encoder=pipe.text_encoder, transformer=model, vae=pipe.vae,
                                defaults=pipe.defaults, text_encoder_name=pipe.text_encoder_name)
            report = cli_image.evaluate_pipeline(qpipe, None, seeds=args.seeds_per_prompt, steps=None,
                                                 guidance=pipe.defaults.guidance,
                                                 reference_images=None if name == "float" else float_images)
            grids[name] = to_uint8(qpipe.generate(GRID_PROMPTS, seed=0))
            results.add({"recipe": name, "calib_seed": seed, "calibration_inputs": calib_inputs,
                         "quantize_seconds": quantize_seconds, "transformer_bytes": _transformer_bytes(model),
                         **{k: v for k, v in report.items() if not isinstance(v, (list, dict))}})
            print(f"{name} (calibration seed {seed}): {results.rows[-1]}", flush=True)
    _save_grids(args.out, results, grids)


def _save_grids(out: Path, results: Results, grids: dict) -> None:
    """Each recipe's sample row goes to ``<stem>_grids/<recipe>.png`` (kept across resumed runs); the figure stacks
    the rows of every recipe that has one, in ``RECIPES`` order."""
    from PIL import Image

    from jquant.media import image_grid

    folder = out / (results.path.stem + "_grids")
    folder.mkdir(exist_ok=True)
    for name, images in grids.items():
        Image.fromarray(image_grid(images, columns=len(GRID_PROMPTS))).save(folder / f"{name}.png")
    present = [name for name in RECIPES if (folder / f"{name}.png").is_file()]
    if present:
        rows = np.concatenate([np.asarray(Image.open(folder / f"{name}.png")) for name in present])
        Image.fromarray(rows.repeat(3, 0).repeat(3, 1)).save(out / (results.path.stem + ".png"))
        results.set_meta(grid_recipes=present, grid_prompts=GRID_PROMPTS)


GRID_PROMPTS = ["a red apple on a blue background", "a dog face on a yellow background", "a rocket on a white background",
                "a frog on a pink background", "a banana above a cat face on a gray background",
                "a soccer ball to the left of a house on a green background"]


def _single_bucket(model):
    """A copy of the transformer whose activation groups collapse to one bucket (static scales shared by all
    timesteps): the baseline the per-timestep tables are compared with."""
    from flax import nnx

    copy = nnx.clone(model)
    copy.config = copy.config.replace(bucket_edges=())
    return copy


def _mean_std(rows: list[dict], field: str) -> str:
    values = [r[field] for r in rows if r.get(field) is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{np.mean(values):.3g} ± {np.std(values):.2g}"


def _fastest(rows: list[dict], field: str) -> str:
    """A time over the rows of one recipe: the fastest run (times on a shared machine only vary upwards)."""
    values = [r[field] for r in rows if r.get(field) is not None]
    return f"{min(values):.3g}" if values else "–"


def _calibration_seeds(results: Results) -> list[int]:
    """The calibration seeds the rows were run with (``--seeds`` only chooses which rows run, so a resumed run can
    add seeds to a results file)."""
    return sorted({r["calib_seed"] for r in results.rows if r["calib_seed"] is not None})


def paired_gain(by_recipe: dict[str, list[dict]], better: str, base: str,
                field: str = "psnr_db") -> tuple[float, float, int]:
    """Mean and standard error of ``better`` minus ``base`` in ``field`` over the calibration seeds both ran (SE
    infinite below two seeds, NaN mean with none)."""
    base_by_seed = {r["calib_seed"]: r[field] for r in by_recipe.get(base, [])}
    diffs = [r[field] - base_by_seed[r["calib_seed"]] for r in by_recipe.get(better, [])
             if r["calib_seed"] in base_by_seed]
    se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("inf")
    return (float(np.mean(diffs)) if diffs else float("nan")), se, len(diffs)


def timestep_gains(by_recipe: dict[str, list[dict]]) -> tuple[list[bool], str]:
    """For each of ``TIMESTEP_PAIRS`` that ran: whether the per-timestep scales' PSNR exceeds the one-scale twin's by
    more than twice the paired standard error, and a clause with the gains (empty without pairs)."""
    pairs = [(a, *paired_gain(by_recipe, a, b)) for a, b in TIMESTEP_PAIRS if a in by_recipe and b in by_recipe]
    wins = [g > 2 * se for _, g, se, _ in pairs]
    text = ", ".join(f"{g:+.2f} dB {'with' if a.startswith('smoothquant') else 'without'} SmoothQuant "
                     f"({'beyond' if win else 'within'} 2 paired SE = {2 * se:.2f})"
                     for (a, g, se, _), win in zip(pairs, wins))
    seeds = max((n for *_, n in pairs), default=0)
    return wins, (f"per-timestep static scales raise PSNR over one static scale by {text} over {seeds} calibration "
                  "seeds" if pairs else "")


def verdict_inputs(by_recipe: dict[str, list[dict]]) -> tuple[dict, list[str], list[str], list[bool], str] | None:
    """What a PTQ verdict reads: the float row, the W8A8 and W4A8 recipe names and ``timestep_gains``' per-pair wins
    and sentence; None when the run lacks any of them."""
    flt = by_recipe.get("float", [{}])[0]
    w8 = [n for n in by_recipe if "w8a8" in n]
    w4a8 = [n for n in by_recipe if n.startswith("w4a8")]
    wins, gains = timestep_gains(by_recipe)
    if "prompt_accuracy" not in flt or not w8 or not w4a8 or not wins:
        return None
    return flt, w8, w4a8, wins, gains


def _verdict(by_recipe: dict[str, list[dict]]) -> str | None:
    """The PTQ4DiT / Q-DiT / ViDiT-Q claims on this model: W8A8 and W4A8 (GPTQ weights) keep quality (the reading's
    rule) and per-timestep static scales beat one static scale. ``reproduced`` when every W8A8 / W4A8 recipe keeps
    quality and each timestep-aware recipe's PSNR exceeds its one-scale twin's by more than twice the paired standard
    error over calibration seeds, ``partly reproduced`` when some of these checks hold, ``not reproduced`` when none."""
    inputs = verdict_inputs(by_recipe)
    if inputs is None:
        return None
    flt, w8, w4a8, wins, gains = inputs

    def quality(names: list[str]) -> tuple[int, float, float]:
        drops = [flt["prompt_accuracy"] - np.mean([r["prompt_accuracy"] for r in by_recipe[n]]) for n in names]
        psnrs = [np.mean([r["psnr_db"] for r in by_recipe[n]]) for n in names]
        kept = sum(d <= KEEP_ACCURACY and p >= KEEP_PSNR for d, p in zip(drops, psnrs))
        return kept, max(drops), min(psnrs)

    (k8, d8, p8), (k4, d4, p4) = quality(w8), quality(w4a8)
    checks = [k8 == len(w8), k4 == len(w4a8), *wins]
    category = "reproduced" if all(checks) else "partly reproduced" if any(checks) else "not reproduced"
    return (f"{category}: {k8} of {len(w8)} W8A8 recipes keep quality (prompt accuracy at most {d8:.3f} below "
            f"float's {flt['prompt_accuracy']:.3f}, PSNR at least {p8:.1f} dB against the float images) and {k4} of "
            f"{len(w4a8)} W4A8 GPTQ recipes do (at most {d4:.3f} below, at least {p4:.1f} dB); {gains} (PTQ4DiT / "
            "Q-DiT / ViDiT-Q: W8A8 and W4A8 close to float, timestep-aware scales better than one).")


def report(runs: list[Results], base: Path) -> None:
    results = runs[0]
    by_recipe: dict[str, list[dict]] = {}
    for row in results.rows:
        by_recipe.setdefault(row["recipe"], []).append(row)
    fields = {"PSNR vs float (dB)": "psnr_db", "SSIM vs float": "ssim", "prompt accuracy": "prompt_accuracy",
              "random-label acc.": "random_label_accuracy", "FD-emoji": "fd_emoji"}
    summary = [{"recipe": name, **{title: _mean_std(rows, field) for title, field in fields.items()},
                "s / image (CPU)": _fastest(rows, "seconds_per_image"),
                "MB": f"{rows[0]['transformer_bytes'] / 1e6:.2f}", "seeds": str(len(rows))}
               for name, rows in by_recipe.items()]
    table = harness.table(summary, [Column("recipe", "recipe"), *(Column(t, t) for t in fields),
                                    Column("s / image (CPU)", "s / image (CPU)"), Column("transformer MB", "MB"),
                                    Column("calib seeds", "seeds")])
    float_row = by_recipe.get("float", [{}])[0]
    meta = results.meta
    notes = []
    for name, rows in by_recipe.items():
        if name == "float" or "prompt_accuracy" not in float_row:
            continue
        drop = float_row["prompt_accuracy"] - np.mean([r["prompt_accuracy"] for r in rows])
        psnr = np.mean([r["psnr_db"] for r in rows])
        verdict = "keeps quality" if drop <= KEEP_ACCURACY and psnr >= KEEP_PSNR else "loses quality"
        notes.append(f"`{name}` {verdict}: prompt accuracy {drop:+.3f} below float, PSNR {psnr:.1f} dB against the "
                     "float images.")
    lines = ["# PTQ of the text-to-image transformer (jq-mmdit-tiny)", "",
             f"Sampling: {meta.get('steps')} Euler steps, guidance {meta.get('guidance')}, single-glyph prompts "
             f"({results.args.get('seeds_per_prompt')} seed(s) per glyph of 32); calibration: trajectories of "
             f"{results.args.get('calib_prompts')} training captions (all steps, conditional and unconditional "
             f"inputs), timestep buckets at σ = {meta.get('bucket_edges')}; {meta.get('platform', '?').upper()}, "
             f"jax {meta.get('jax')}. Mean ± std over calibration seeds {_calibration_seeds(results)} (times: the fastest run). "
             f"{harness.reproduce(results.command)}", "", *table, "",
             *([harness.verdict(v), ""] if (v := _verdict(by_recipe)) else []),
             f"Reading (formatted from the run's numbers; 'keeps quality' = prompt accuracy within {KEEP_ACCURACY:g} "
             f"of float and PSNR >= {KEEP_PSNR:g} dB):", "", *harness.bullets(notes), "",
             f"Samples (rows: {', '.join(meta.get('grid_recipes', []))}; seed 0):", "",
             f"![samples]({base.name}.png)", ""]
    harness.write_text_atomic(base.with_name(base.name + ".md"), "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--calib-prompts", type=int, default=32, help="captions whose trajectories calibrate")
    parser.add_argument("--seeds-per-prompt", type=int, default=2, help="images per glyph prompt (default: 2)")
    harness.add_arguments(parser, model="jq-mmdit-tiny", seeds=(0, 1))
    harness.run_experiment(parser, stem=lambda a: "dit_ptq", key=("recipe", "calib_seed"), run=run, report=report,
                           quick={"recipes": ["float", "w4a16-gptq"], "calib_prompts": 4, "seeds_per_prompt": 1,
                                  "seeds": [0]}, volatile=("recipes", "seeds"))


if __name__ == "__main__":
    main()
