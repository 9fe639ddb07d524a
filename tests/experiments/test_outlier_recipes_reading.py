"""experiments/outlier_recipes.py's reading: each recipe against the reference recipe of the same model and length,
and a verdict that follows the statistics (grown = at least GROWN times the reference's)."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

import outlier_recipes


def _row(recipe: str, stats: dict[str, float], ppl: float) -> dict:
    return {"preset": "m", "recipe": recipe, "steps": 10, **outlier_recipes.RECIPES[recipe], "val_ppl": ppl, **stats}


def _stats(rng) -> dict[str, float]:
    return {k: float(rng.uniform(2.0, 20.0)) for k in outlier_recipes.STATISTICS}


@pytest.mark.parametrize("grown", [0, 1, 3])
def test_verdict_counts_the_statistics_the_hot_recipe_grew(grown):
    rng = np.random.default_rng(grown)
    ref = _stats(rng)
    keys = list(outlier_recipes.STATISTICS)
    hot = {k: ref[k] * (outlier_recipes.GROWN * 1.5 if i < grown else 1.0) for i, k in enumerate(keys)}
    rows = [_row("reference", ref, 100.0), _row("no-decay", ref, 99.0), _row("hot", hot, 110.0)]
    verdict, *notes = outlier_recipes.reading(rows)
    expected = {0: "not reproduced", 1: "partly reproduced", 3: "reproduced"}[grown]
    assert verdict.startswith(f"**Verdict:** {expected}:")
    assert f"grows {grown} of {len(keys)}" in verdict
    assert "weight decay alone grows 0 of them" in verdict
    hot_note = next(n for n in notes if n.startswith("`hot`"))
    for k in keys:  # every number of the note comes from the rows
        assert f"{ref[k]:.1f} → {hot[k]:.1f}" in hot_note
    assert "100.0 → 110.0" in hot_note


def test_rows_without_a_reference_recipe_give_no_verdict():
    rng = np.random.default_rng(0)
    assert outlier_recipes.reading([_row("hot", _stats(rng), 100.0)]) == []
