"""experiments/recall_probe.py: its rows put the loss exactly on the queries' values, and its verdict follows the
recorded curves."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

import recall_probe

from jquant.data.recall import recall_alphabet


@pytest.mark.parametrize("pairs", [3, 8])
def test_rows_mask_marks_each_query_key_and_its_block_value(pairs):
    rng = np.random.default_rng(pairs)
    alphabet = recall_alphabet(recall_probe.VOCAB, exclude=(0, 1), n_keys=32, n_values=32, seed=pairs)
    tokens, mask = recall_probe._rows(rng, alphabet, 5, 48, pairs)
    assert tokens.shape == (5, 49) and mask.shape == (5, 48)
    for row, m in zip(tokens, mask):
        block = dict(zip(row[0:2 * pairs:2].tolist(), row[1:2 * pairs:2].tolist()))
        assert len(block) == pairs and set(block) <= set(alphabet.keys.tolist())
        positions = np.flatnonzero(m)
        assert len(positions) == pairs
        for p in positions:  # the input token at p is a queried key, the target (token p + 1) its value
            assert row[p] in block and row[p + 1] == block[row[p]]
        rest = np.setdiff1d(np.arange(2 * pairs, 48), np.concatenate([positions, positions + 1]))
        filler = row[rest]
        assert not np.isin(filler, alphabet.keys).any() and not np.isin(filler, alphabet.values).any()


def _row(layers: int, lr: float, accuracies: list[float]) -> dict:
    curve = [(100 * (i + 1), 1.0, a) for i, a in enumerate(accuracies)]
    return {"layers": layers, "lr": lr, "steps": curve[-1][0], "plateau": 0.125, "accuracy": accuracies[-1],
            "best_accuracy": max(accuracies), "curve": curve,
            "learned_at": next((s for s, _, a in curve if a >= recall_probe.LEARNED), None)}


def test_reading_names_the_fastest_configuration_that_learned():
    rows = [_row(2, 3e-3, [0.1, 0.5, 0.95]), _row(4, 1e-2, [0.2, 0.92, 0.99]), _row(2, 1e-3, [0.1, 0.2, 0.3])]
    text = recall_probe.reading(rows)
    assert text.startswith("learned: 2 of 3") and "4 layers, lr 0.01) at step 200" in text


def test_reading_reports_the_best_accuracy_when_nothing_learned():
    rng = np.random.default_rng(0)
    accuracies = [rng.uniform(0.1, 0.8, size=4).tolist() for _ in range(3)]
    rows = [_row(2 + i, 1e-3 * (i + 1), a) for i, a in enumerate(accuracies)]
    best = max(rows, key=lambda r: r["best_accuracy"])
    text = recall_probe.reading(rows)
    assert text.startswith("not learned") and f"reaches {best['best_accuracy']:.3f} in {best['steps']} steps" in text
