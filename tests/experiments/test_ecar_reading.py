"""experiments/ecar.py's stage-count reading: rows of one step setting at several stage counts are compared at
twice the standard error of the accuracy difference, and the FLOP ratio is the rows' own."""

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

import ecar  # noqa: E402


def _row(stages: int, accuracy: float, gflops: float, setting: int = 20, images: int = 256) -> dict:
    return {"model": f"ecar-{stages}", "stages": stages, "setting": setting, "prompt_accuracy": accuracy,
            "images": images, "fd_emoji": 1000.0 + stages, "gflops_per_image": gflops}


def test_stage_count_verdict_follows_the_standard_error():
    rng = np.random.default_rng()
    few, many = rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6)
    se = np.hypot(np.sqrt(few * (1 - few) / 256), np.sqrt(many * (1 - many) / 256))
    (note,) = ecar._stage_count_reading([_row(2, few, 2.0), _row(3, many, 1.5), _row(3, 0.1, 1.0, setting=9)])
    assert f"{many - few:+.3f}" in note and f"{1.5 / 2.0:.2f}x the FLOPs of 2" in note
    assert ("beyond" if abs(many - few) > 2 * se else "within") + " twice" in note
    assert "at 20 Euler steps" in note  # the 9-step setting has one stage count: no comparison


def test_no_reading_without_two_stage_counts():
    assert ecar._stage_count_reading([_row(3, 0.4, 1.5), _row(3, 0.4, 1.0, setting=9)]) == []
