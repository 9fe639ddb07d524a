"""Evaluate every bundled reference model and write experiments/results/reference_models.md.

    python experiments/reference_models_report.py

Columns: parameters, training tokens and CPU time (from each model's
reference_info.json, written at training time), then validation perplexity
and zero-shot accuracy measured now on the shipped weights.
"""

import json
from pathlib import Path

from jquant.data import load_split, token_windows
from jquant.eval import perplexity, zero_shot
from jquant.models import list_models, load

RESULTS = Path(__file__).resolve().parent / "results" / "reference_models.md"
TASKS = ("next_line", "same_source")
CHANCE = {"next_line": 1 / 4, "same_source": 1 / 3}


def main() -> None:
    rows = []
    for info in list_models():
        loaded = load(info.name)
        seq_len = info.info.get("validation_seq_len", 256)
        ppl = perplexity(loaded.model, token_windows(load_split("validation"), loaded.tokenizer, seq_len), batch_size=16)
        zs = zero_shot(loaded.model, loaded.tokenizer, TASKS, n_items=200)
        rows.append({"name": info.name, **info.info, "measured_validation_ppl": ppl.ppl,
                     **{f"zero_shot_{t}": zs[t].accuracy for t in TASKS}})
    lines = [
        "# Bundled reference models",
        "",
        "Validation perplexity over non-overlapping 256-token windows of the validation split (bf16 weights,",
        f"float32 compute); zero-shot accuracy on 200 items per task (the most the Milton part of the test split allows) from the test split (chance: "
        + ", ".join(f"{t} {c:.2f}" for t, c in CHANCE.items()) + ").",
        "",
        "| model | params | train tokens | CPU train time | val ppl | " + " | ".join(TASKS) + " |",
        "|---|---|---|---|---|" + "---|" * len(TASKS),
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['parameters'] / 1e6:.2f}M | {r['train_tokens'] / 1e6:.1f}M | {r['train_seconds'] / 60:.0f} min | "
            f"{r['measured_validation_ppl']:.2f} | " + " | ".join(f"{r[f'zero_shot_{t}']:.3f}" for t in TASKS) + " |"
        )
    lines += ["", "Raw numbers:", "", "```json", json.dumps(rows, indent=1, default=str), "```"]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8 + len(rows)]))


if __name__ == "__main__":
    main()
