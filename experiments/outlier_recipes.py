"""Which training recipe grows activation outliers in a small Llama -> experiments/results/outlier_recipes.md (+ .json).

    python experiments/outlier_recipes.py --preset jq-llama-tiny --steps 300            # the pilot (~20 min CPU)
    python experiments/outlier_recipes.py --report-only
    python experiments/outlier_recipes.py --quick --out /tmp/o                          # smoke run

The bundled reference models show almost none of the outliers the rotation and smoothing methods target
(``reference_models.md``). Outlier features grow with training length and learning rate, and weight decay holds
them back (He et al. 2024, "Understanding and minimising outlier features in transformer training"; Bondarenko et
al. 2023). Each recipe here trains ``--preset`` from the same seed for the same ``--steps`` on the bundled corpus
(``jquant.train``, resumable work folders under ``--workdir``), then measures the outlier statistics of
``reference_models_report.py`` (``jquant.eval.outliers``) on the same random train windows: the largest over sites
of the max/median channel absmax and RMS ratios and the channel kurtosis, and the largest max/median of the
residual stream (massive activations). The recipe that grows them most trains the outlier-bearing reference model.
"""

import argparse
import math
from pathlib import Path
from typing import Any

import harness
from harness import Column, Results

# jquant is imported where it is used: --help and --report-only do not need it.
RECIPES: dict[str, dict[str, float]] = {
    "reference": {"peak_lr": 2e-3, "weight_decay": 0.1},  # jq-llama-tiny/-small's own recipe
    "no-decay": {"peak_lr": 2e-3, "weight_decay": 0.0},
    "hot": {"peak_lr": 6e-3, "weight_decay": 0.0},
}
OUTLIER_SEQUENCES = 16
OUTLIER_LENGTH = 256


def train_and_measure(preset: str, recipe: str, steps: int, workdir: Path, progress: bool) -> dict[str, Any]:
    """Train ``preset`` with ``RECIPES[recipe]`` for ``steps`` updates, then one row of outlier maxima."""
    import jax
    import numpy as np

    from jquant.data import load_split, load_tokenizer, random_windows
    from jquant.data.windows import token_stream
    from jquant.eval.outliers import model_outliers
    from jquant.models.registry import preset as find_preset
    from jquant.train import TrainConfig
    from jquant.train.reference import recast
    from jquant.train.trainer import train

    family, cfg = find_preset(preset)
    tokenizer = load_tokenizer()
    train_cfg = TrainConfig(steps=steps, warmup_steps=min(100, steps // 5), checkpoint_every=50,
                            eval_every=max(1, steps // 4), **RECIPES[recipe])
    model = family.init_model(cfg.replace(dtype="bfloat16", param_dtype="float32"), jax.random.key(train_cfg.seed))
    result = train(model, token_stream(load_split("train"), tokenizer), token_stream(load_split("validation"),
                   tokenizer), train_cfg, workdir / f"{preset}-{recipe}", progress=progress)
    measured = recast(result.model, "float32")
    tokens = random_windows(load_split("train"), tokenizer, OUTLIER_SEQUENCES, OUTLIER_LENGTH, jax.random.key(0))
    report = model_outliers(measured, tokens, batch_size=8)
    top = lambda key: max(report.sites.items(), key=lambda kv: getattr(kv[1], key))  # noqa: E731
    hidden = max(report.blocks, key=lambda b: b[1].top_over_median)
    val = [h["val_loss"] for h in result.history if h.get("val_loss") is not None]
    return {
        "preset": preset, "recipe": recipe, "steps": steps, **RECIPES[recipe],
        "train_seconds": round(result.seconds, 1), "val_ppl": math.exp(val[-1]) if val else None,
        "absmax_ratio": top("absmax_ratio")[1].absmax_ratio, "absmax_site": top("absmax_ratio")[0],
        "rms_ratio": top("rms_ratio")[1].rms_ratio, "rms_site": top("rms_ratio")[0],
        "channel_kurtosis": top("channel_kurtosis")[1].channel_kurtosis,
        "kurtosis_site": top("channel_kurtosis")[0],
        "hidden_top_over_median": hidden[1].top_over_median, "hidden_top": hidden[1].top,
        "hidden_block": hidden[0], "hidden_kurtosis": float(np.max([b.kurtosis for _, b in report.blocks])),
    }


def run(args: argparse.Namespace, results: Results) -> None:
    for recipe in args.recipes:
        if results.has(preset=args.preset, recipe=recipe, steps=args.steps):
            continue
        results.add(train_and_measure(args.preset, recipe, args.steps, args.workdir, progress=not args.quiet))


def report(runs: list[Results], base: Path) -> None:
    rows = [r for res in runs for r in res.rows]
    columns = [Column("model", "preset"), Column("recipe", "recipe"), Column("steps", "steps"),
               Column("peak lr", "peak_lr", "g"), Column("weight decay", "weight_decay", "g"),
               Column("val ppl", "val_ppl", ".2f"),
               Column("max absmax ratio", "absmax_ratio", ".1f"), Column("site", "absmax_site"),
               Column("max RMS ratio", "rms_ratio", ".1f"), Column("max channel kurtosis", "channel_kurtosis", ".1f"),
               Column("max hidden max/median", "hidden_top_over_median", ".0f"),
               Column("max hidden kurtosis", "hidden_kurtosis", ".1f")]
    lines = [f"# Training recipes and activation outliers ({', '.join(sorted({r['preset'] for r in rows}))})", "",
             harness.reproduce(runs[0].command), "",
             f"Outlier statistics on {OUTLIER_SEQUENCES} random train windows of {OUTLIER_LENGTH} tokens (definitions: "
             "`reference_models.md`); each column is the largest over sites or blocks.", "",
             *harness.table(rows, columns), ""]
    if rows:
        verdict, *notes = reading(rows) or [None]
        lines += ["## Reading", "", *([verdict, ""] if verdict else []), *harness.bullets(notes), ""]
    harness.write_text_atomic(base.with_suffix(".md"), "\n".join(lines))


GROWN = 1.2  # a statistic counts as grown when the recipe's is at least this many times the reference recipe's
STATISTICS = {"absmax_ratio": "the largest channel absmax ratio", "rms_ratio": "the largest channel RMS ratio",
              "hidden_kurtosis": "the residual stream's largest kurtosis"}


def reading(rows: list[dict[str, Any]]) -> list[str]:
    """The verdict line (He et al. 2024: a higher learning rate grows outlier features; weight decay holds them back)
    and one note per recipe against the reference recipe at the same model and steps, from the rows."""
    notes = []
    grown_by: dict[str, list[str]] = {}
    for row in rows:
        ref = next((r for r in rows if r["recipe"] == "reference" and r["preset"] == row["preset"]
                    and r["steps"] == row["steps"]), None)
        if ref is None or row is ref:
            continue
        changes = [f"{what} {ref[k]:.1f} → {row[k]:.1f}" for k, what in STATISTICS.items()]
        grown_by[row["recipe"]] = [k for k in STATISTICS if row[k] >= GROWN * ref[k]]
        notes.append(f"`{row['recipe']}` (peak lr {row['peak_lr']:g}, weight decay {row['weight_decay']:g}) against "
                     f"`reference` on {row['preset']} at {row['steps']} steps: {'; '.join(changes)}; validation "
                     f"perplexity {ref['val_ppl']:.1f} → {row['val_ppl']:.1f}.")
    hot, no_decay = grown_by.get("hot"), grown_by.get("no-decay")
    if hot is None:
        return [None, *notes] if notes else []
    category = ("reproduced" if len(hot) == len(STATISTICS) else "partly reproduced" if hot else "not reproduced")
    text = (f"{category}: the higher learning rate grows {len(hot)} of {len(STATISTICS)} outlier statistics by at "
            f"least {GROWN:g}× ({', '.join(STATISTICS[k] for k in hot) or 'none'})")
    if no_decay is not None:
        text += (f"; dropping weight decay alone grows {len(no_decay)} of them at this length (He et al. 2024 "
                 "report both effects over far longer training)")
    return [harness.verdict(text + "."), *notes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="jq-llama-tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--workdir", type=Path, default=Path("runs") / "outlier_recipes")
    parser.add_argument("--quiet", action="store_true")
    harness.add_arguments(parser)
    harness.run_experiment(parser, stem=lambda a: "outlier_recipes", key=("preset", "recipe", "steps"), run=run,
                           report=report, quick={"steps": 6}, volatile=("recipes", "workdir", "quiet"))


if __name__ == "__main__":
    main()
