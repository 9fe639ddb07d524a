"""experiments/vq.py's fine-tuning reading: the tuned rows against their untuned models and each other, paired per
calibration seed, judged at two standard errors."""

import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

import harness
import vq


def _rows(rng, tuned_gain: float) -> list[dict]:
    """w2 rows for PCDVQ and GPTQ with and without fine-tuning over seeds 0-2; tuning lowers ppl by ``tuned_gain``."""
    out = []
    for method, ppl, bits in (("PCDVQ", 53.6, 2.267), ("GPTQ", 54.1, 2.188)):
        for seed in (0, 1, 2):
            noise = float(rng.normal(0, 0.01))
            base = {"bits": "w2", "seed": seed, "linear_bits": bits, "recipe": method.lower()}
            out.append({**base, "method": method, "ppl": ppl + noise, "kl": 0.02 + noise / 100})
            out.append({**base, "method": method + vq.TUNED, "ppl": ppl + noise - tuned_gain,
                        "kl": 0.02 + noise / 100 - tuned_gain / 100, "tuned_parameters": 5000})
    return harness.over_seeds(out, by=("bits", "method"), values=("ppl", "kl"))


def test_tuning_lines_state_the_paired_changes_and_their_judgement():
    rows = _rows(np.random.default_rng(0), tuned_gain=0.2)
    lines = vq.tuning(rows)
    assert len(lines) == 3
    assert lines[0].startswith("- PCDVQ w2 + fine-tuning (5000 tuned values) − PCDVQ: ppl -0.200 ± 0.000 (beyond 2 SE), "
                               "KL -2.00e-3 ± 0.00e-3 (beyond 2 SE).")
    assert lines[1].startswith("- GPTQ w2 + fine-tuning")
    same = vq.tuning(_rows(np.random.default_rng(0), tuned_gain=0.0))
    assert "± 0.000 (within 2 SE), KL" in same[0]  # no change: not counted
    assert re.match(r"- Both tuned, PCDVQ − GPTQ at w2: ppl -0\.(4|5)\d\d ± 0\.\d{3} \(beyond 2 SE\)", lines[2])
    assert lines[2].endswith("(2.267 vs 2.188 bits/weight).")
    none = vq.tuning([r for r in rows if not r["method"].endswith(vq.TUNED)])
    assert none == []  # no tuned rows, nothing claimed


def test_plot_puts_every_method_against_bits(tmp_path):
    rows = _rows(np.random.default_rng(1), tuned_gain=0.1)
    vq._plot(rows, tmp_path / "vq.png")
    assert (tmp_path / "vq.png").stat().st_size > 10_000
