"""experiments/mambaquant.py's verdict and report with the `-ssm` settings, which run only RTN, the Hadamard baseline
and MambaQuant: the verdict compares MambaQuant with the baselines each setting has."""

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

import harness
import mambaquant


def _results(tmp_path: Path, lead: float) -> harness.Results:
    """Every setting's rows over seeds 0-2 (RTN once), MambaQuant ``lead`` below each baseline."""
    rng = np.random.default_rng(0)
    zero_shot = {t: 0.3 for t in mambaquant.TASKS}
    snr = {k: 30.0 + i for i, k in enumerate(mambaquant.SITES)}
    rows = [{"setting": "w16a16", "method": "FP", "seed": None, "ppl": 50.0, "kl": 0.0, "top1": 1.0, "seconds": 0.0,
             **zero_shot}]
    for setting in mambaquant.SETTINGS:
        methods = mambaquant.SSM_METHODS if setting.endswith("-ssm") else tuple(mambaquant.METHODS)
        for method in methods:
            ppl = 52.0 - (lead if method == mambaquant.OURS else 0.0)
            for seed in (None,) if method == "RTN" else (0, 1, 2):
                noise = float(rng.normal(0, 0.005))
                rows.append({"setting": setting, "method": method, "seed": seed, "ppl": ppl + noise,
                             "kl": 0.01 * (ppl - 50.0) + noise / 100, "top1": 0.9, "seconds": 1.0, **zero_shot,
                             "snr_db": snr, "options": mambaquant.METHODS[method]})
    return harness.Results(path=tmp_path / "mambaquant.json", script="mambaquant", command="python x.py",
                           args={"model": "m", "calib": 4, "windows": 2, "items": 200, "snr_windows": 2,
                                 "seeds": [0, 1, 2]},
                           key=("setting", "method", "seed"), rows=rows, meta={"windows": 2, "jax": "0"})


def test_verdict_covers_the_ssm_settings_with_their_baselines(tmp_path):
    results = _results(tmp_path, lead=0.5)
    merged = mambaquant._merged(results)
    text = mambaquant._verdict(results, merged)
    assert text.startswith("reproduced:")
    assert "Hadamard (QuaRot-style) w8a8-ssm: ahead" in text and "RTN w4a8-ssm: ahead" in text
    assert "SmoothQuant w8a8-ssm" not in text  # not run at the -ssm settings, so not compared
    mambaquant.report([results], tmp_path / "mambaquant")
    md = (tmp_path / "mambaquant.md").read_text()
    assert "| w8a8-ssm | +smooth-fused (MambaQuant) |" in md and "the SSM matmul's state h and C" in md
