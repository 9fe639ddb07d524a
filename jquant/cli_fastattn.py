"""``jquant fastattn``: DiTFastAttnV2 attention compression of a text-to-image pipeline.

Searches a head-wise plan (``jquant.ditfastattn.compress_pipeline``) on ``--calib-prompts`` training captions at
threshold ``--budget``, writes the pipeline with its ``attention_plan.json`` to ``--out`` (``jquant generate
--model OUT`` then runs the plan), and compares it with the uncompressed pipeline (``jquant eval``'s numbers)
unless ``--no-eval``.
"""

from __future__ import annotations

import argparse
import math
import time

from rich.console import Console
from rich.table import Table


def add_parser(sub, positive_int) -> None:
    fa = sub.add_parser("fastattn", help="DiTFastAttnV2: search a head-wise attention plan for a text-to-image "
                        "pipeline and save the pipeline with it")
    fa.add_argument("--model", default="jq-mmdit-tiny", help="a text-to-image pipeline (default: %(default)s)")
    fa.add_argument("--budget", type=float, required=True,
                    help="δ: summed relative error allowed per layer and step, in (0, 1] (paper: 0.05-1.0)")
    fa.add_argument("--solver", choices=["ilp", "greedy"], default="ilp",
                    help="exact knapsack (scipy milp) or greedy (default: %(default)s)")
    fa.add_argument("--calib-prompts", type=positive_int, default=8,
                    help="training captions sampled as one calibration batch (default: %(default)s)")
    fa.add_argument("--seed", type=int, default=0, help="seed of the captions and the calibration noise")
    fa.add_argument("--steps", type=positive_int, default=None, help="Euler steps the plan is for (default: the "
                    "pipeline's)")
    fa.add_argument("--image-size", type=positive_int, default=None,
                    help="image side in pixels the plan is for (default: the pipeline's)")
    fa.add_argument("--out", required=True, help="the compressed pipeline folder to write (new or empty unless "
                    "--overwrite)")
    fa.add_argument("--overwrite", action="store_true", help="let --out replace a folder jquant wrote earlier")
    fa.add_argument("--no-eval", action="store_true", help="skip the comparison with the uncompressed pipeline")
    fa.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace, console: Console) -> dict:
    from jquant.atomic import check_output_folder
    from jquant.cli_image import evaluate_pipeline, is_pipeline_model
    from jquant.data.scenes import emoji_scenes
    from jquant.ditfastattn import compress_pipeline
    from jquant.models.loading import resolve
    from jquant.text_to_image import load_pipeline, save_pipeline

    if not (math.isfinite(args.budget) and 0.0 < args.budget <= 1.0):
        raise ValueError(f"--budget must be in (0, 1] (the summed relative error per layer and step), got "
                         f"{args.budget}.")
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative int, got {args.seed}.")
    if not is_pipeline_model(args.model):
        raise ValueError(f"--model {args.model!r} is not a text-to-image pipeline (a bundled one such as "
                         "jq-mmdit-tiny, or a folder with pipeline.json); DiTFastAttn compresses MMDiT attention.")
    check_output_folder(args.out, overwrite=args.overwrite, argument="--out", overwrite_hint="--overwrite")
    pipe = load_pipeline(resolve(args.model))
    if pipe.attention_plan is not None:
        raise ValueError(f"--model {args.model!r} already has an attention plan; compress the uncompressed pipeline.")
    captions = emoji_scenes("train", args.calib_prompts, 32, args.seed, vocabulary="reference-32",
                            objects=(1, 2)).captions
    start = time.perf_counter()
    compressed, _ = compress_pipeline(pipe, budget=args.budget, prompts=captions, seed=args.seed,
                                      solver=args.solver, steps=args.steps, image_size=args.image_size)
    plan = compressed.attention_plan
    result = {"model": args.model, "budget": args.budget, "solver": args.solver,
              "search_seconds": time.perf_counter() - start, "attention_fraction": plan.attention_fraction(),
              "heads": plan.counts(), "steps": plan.steps, "layout": vars(plan.layout),
              "saved_to": str(save_pipeline(compressed, args.out, overwrite=args.overwrite))}
    if not args.no_eval:
        reference = load_pipeline(resolve(args.model))
        reference.defaults = compressed.defaults
        result["compressed"] = evaluate_pipeline(compressed, reference, seeds=1, steps=None,
                                                 guidance=compressed.defaults.guidance)
    if not args.json:
        table = Table(title=f"{args.model}: DiTFastAttnV2 plan at budget {args.budget}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("attention FLOPs vs full", f"{result['attention_fraction']:.3f}")
        for key, value in result["heads"].items():
            table.add_row(f"(step, layer, head) entries: {key}", str(value))
        table.add_row("search time (s)", f"{result['search_seconds']:.1f}")
        for key, value in result.get("compressed", {}).items():
            if isinstance(value, float):
                table.add_row(key, f"{value:.4g}")
        console.print(table)
        console.print(f"saved to {result['saved_to']}")
    return result
