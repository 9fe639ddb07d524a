"""experiments/harness.py's seed aggregation: one row per setting with numpy's mean and sample standard deviation
over the seeds it ran on, and its ``mean ± std`` table cell."""

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

import harness  # noqa: E402


def test_over_seeds_matches_numpy_per_setting():
    rng = np.random.default_rng()
    values = {(m, s): rng.normal(50, 2, 2) for m in ("rtn", "gptq") for s in (2, 0, 1)}
    rows = [{"method": m, "seed": s, "ppl": float(v[0]), "kl": float(v[1]), "bits": 4} for (m, s), v in values.items()]
    rows = [rows[i] for i in rng.permutation(len(rows))]  # any order in, seed order out
    rows.append({"method": "float", "seed": None, "ppl": 49.0, "bits": 16})  # one run, no kl
    merged = {r["method"]: r for r in harness.over_seeds(rows, by=("method",), values=("ppl", "kl"))}
    assert set(merged) == {"rtn", "gptq", "float"}
    for method in ("rtn", "gptq"):
        ppl = np.array([values[method, s][0] for s in (0, 1, 2)])
        row = merged[method]
        assert row["seeds"] == [0, 1, 2] and row["bits"] == 4
        np.testing.assert_allclose(row["ppl_runs"], ppl)
        np.testing.assert_allclose([row["ppl"], row["ppl_std"]], [ppl.mean(), ppl.std(ddof=1)], rtol=1e-12)
        assert harness.mean_std("ppl", ".3f")(row) == f"{ppl.mean():.3f} ± {ppl.std(ddof=1):.3f}"
    assert harness.mean_std("kl", ".1f", 1e3)(row) == f"{1e3 * row['kl']:.1f} ± {1e3 * row['kl_std']:.1f}"
    single = merged["float"]
    assert single["ppl_std"] == 0.0 and "kl" not in single
    assert harness.mean_std("ppl", "+.2f")(single) == "+49.00"
    assert harness.mean_std("kl", ".2f")(single) is None
