"""Evaluate the bundled reference models -> experiments/results/reference_models.md (+ .json).

    python experiments/reference_models_report.py                               # every bundled model
    python experiments/reference_models_report.py --models jq-llama-small jq-llama-tiny
    python experiments/reference_models_report.py --report-only                 # rebuild the .md from the .json
    python experiments/reference_models_report.py --quick --out /tmp/r         # smoke run: jq-llama-tiny, a few items

Columns: parameters, training tokens and CPU time (from each model's
reference_info.json, written at training time), then validation perplexity
and zero-shot accuracy measured now on the shipped weights. ``--models`` only
chooses which models run, so ``--resume`` adds models to an existing JSON.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import harness
from harness import Column, Results

# jquant is imported where it is used: --help and --report-only do not need it.
TASKS = ("next_line", "same_source")
CHANCE = {"next_line": 1 / 4, "same_source": 1 / 3}
MAX_ITEMS = 200  # the most zero-shot items per task the Milton part of the test split allows


def evaluate(name: str, items: int, windows: int | None) -> dict[str, Any]:
    """One model's row: its reference_info.json, then the perplexity and zero-shot accuracy measured now."""
    from jquant.data import load_split, token_windows
    from jquant.eval import perplexity, zero_shot
    from jquant.models import list_models, load

    info = next(i for i in list_models() if i.name == name)
    loaded = load(name)
    seq_len = info.info.get("validation_seq_len", 256)
    ppl = perplexity(loaded.model, token_windows(load_split("validation"), loaded.tokenizer, seq_len,
                                                 max_windows=windows), batch_size=16)
    zs = zero_shot(loaded.model, loaded.tokenizer, TASKS, n_items=items)
    return {"name": name, **info.info, "measured_validation_ppl": ppl.ppl,
            **{f"zero_shot_{t}": zs[t].accuracy for t in TASKS}}


def run(args: argparse.Namespace, results: Results) -> None:
    """One row per model of ``args.models`` (default: every bundled model) not already in ``results``."""
    from jquant.models import list_models

    bundled = [i.name for i in list_models()]
    unknown = sorted(set(args.models or ()) - set(bundled))
    if unknown:
        raise SystemExit(f"--models: {', '.join(unknown)} not bundled; choose from {', '.join(bundled)}")
    for name in args.models or bundled:
        if not results.has(name=name):
            results.add(evaluate(name, args.items, args.windows))


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base>.md``: the table, then every row's numbers as JSON."""
    results = runs[0]
    items, windows = results.args["items"], results.args["windows"]
    columns = [Column("model", "name"), Column("params", lambda r: f"{r['parameters'] / 1e6:.2f}M"),
               Column("train tokens", lambda r: f"{r['train_tokens'] / 1e6:.1f}M"),
               Column("CPU train time", lambda r: f"{r['train_seconds'] / 60:.0f} min"),
               Column("val ppl", "measured_validation_ppl", ".2f"),
               *(Column(t, f"zero_shot_{t}", ".3f") for t in TASKS)]
    which = "non-overlapping" if windows is None else f"the first {windows} non-overlapping"
    most = " (the most the Milton part of the test split allows)" if items == MAX_ITEMS else ""
    lines = [
        "# Bundled reference models",
        "",
        f"Validation perplexity over {which} 256-token windows of the validation split (bf16 weights,",
        f"float32 compute); zero-shot accuracy on {items} items per task{most} from the test split (chance: "
        + ", ".join(f"{t} {c:.2f}" for t, c in CHANCE.items()) + ").",
        "",
        *harness.table(results.rows, columns),
        "",
        harness.reproduce(results.command),
        "",
        "Raw numbers:", "", "```json", json.dumps(results.rows, indent=1, default=str), "```"]
    harness.write_text_atomic(base.with_name(base.name + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines[:8 + len(results.rows)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help="models to evaluate (default: every bundled model)")
    parser.add_argument("--items", type=int, default=MAX_ITEMS,
                        help="zero-shot items per task (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=None,
                        help="validation windows (default: the whole split)")
    harness.add_arguments(parser)
    harness.run_experiment(parser, stem=lambda a: "reference_models", key=("name",), run=run, report=report,
                           volatile=("models",), quick={"models": ["jq-llama-tiny"], "items": 8, "windows": 2})


if __name__ == "__main__":
    main()
