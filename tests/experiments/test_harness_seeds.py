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


def test_paired_lead_and_decision_follow_the_standard_error():
    rng = np.random.default_rng()
    ours = {s: float(v) for s, v in enumerate(rng.normal(50, 1, 4))}
    base = {s: ours[s] + float(d) for s, d in enumerate(rng.normal(0.5, 0.1, 4))}
    diffs = np.array([base[s] - ours[s] for s in ours])
    lead = harness.paired_lead(ours, base, "ppl")
    np.testing.assert_allclose([lead.mean, lead.se], [diffs.mean(), diffs.std(ddof=1) / 2], rtol=1e-12)
    assert lead.n == 4 and lead.beyond_noise == (abs(diffs.mean()) > diffs.std(ddof=1))
    # a baseline run once (no calibration) pairs with every seed
    once = harness.paired_lead(ours, {None: 60.0}, "kl")
    np.testing.assert_allclose(once.mean, np.mean([60.0 - v for v in ours.values()]), rtol=1e-12)
    assert once.text().startswith("KL ") and "e-3 ±" in once.text()
    assert harness.paired_lead({0: 1.0, 1: 2.0}, {2: 2.0, 3: 1.0}, "ppl") is None
    noisy = harness.Lead("ppl", 0.1, 0.2, 3)
    sure_kl = harness.Lead("kl", -0.001, 0.0001, 3)
    assert harness.decide(noisy, sure_kl) == ("behind", sure_kl)
    assert harness.decide(noisy, harness.Lead("kl", 0.001, 0.001, 3)) == ("within noise", noisy)
    assert harness.decide(harness.Lead("ppl", 0.5, 0.1, 3), sure_kl)[0] == "ahead"
    assert harness.decide(None, sure_kl) is None
