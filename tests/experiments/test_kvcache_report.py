"""experiments/kvcache.py's report: rows of several calibration draws become mean ± std rows, and the verdict's
comparisons (SKVQ vs KIVI at equal exact tokens, WKVQuant vs RTN at equal bits) are paired per draw and judged at
two standard errors; rows that do not calibrate run once and pair with every draw."""

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

import harness
import kvcache

SEEDS = (0, 1, 2)
CALIBRATES = ("SKVQ", "WKVQuant", "ablation K2V2: + smoothing")


def _row(name: str, seed, ppl: float, kl: float) -> dict:
    return {"name": name, "seed": seed, "calibrates": seed is not None, "ppl": ppl, "kl": kl, "top1": 0.9,
            "ppl_tokens": 100, "calibration_seconds": 1.0, "eval_seconds": 2.0, "kv": "K:x V:y",
            "cache_mb_1024": 1.0, "cache_mb_8192": 8.0, "cache_mb_32768": 32.0, "cache_gb_llama2_7b_32k": 1.0,
            "bits_per_element": 2.5}


def _rows(rng, skvq_lead: float, wkv_lead: float) -> list[dict]:
    """Every row of the script; calibrating rows per seed (a little noise), SKVQ ``skvq_lead`` below the KIVI rows
    it is compared with, WKVQuant ``wkv_lead`` below equal-bits RTN."""
    base = {n: 40.0 + rng.uniform(0, 5) for n in kvcache.NAMES}
    base[kvcache.FP] = 30.0
    for s in kvcache.SETTINGS:
        base[f"SKVQ {s}"] = base[f"{kvcache.KIVI_WINDOW} {s}"] - skvq_lead
        base[f"{kvcache.SKVQ_NO_WINDOW} {s}"] = base[f"{kvcache.KIVI_SINK} {s}"] - skvq_lead
        base[f"WKVQuant {s}"] = base[f"{kvcache.RTN_HEAD} {s}"] - wkv_lead
    base[kvcache.W4] = 31.0
    base[kvcache.W4_RTN_HEAD] = 33.0
    base[kvcache.W4_WKV] = 33.0 - wkv_lead
    out = []
    for name, ppl in base.items():
        seeds = SEEDS if name.startswith(CALIBRATES) else (None,)
        for seed in seeds:
            noise = 0.0 if seed is None else float(rng.normal(0, 0.01))
            out.append(_row(name, seed, ppl + noise, 1e-3 * (ppl - 30.0) + 1e-4 * noise))
    return out


def _report(tmp_path: Path, rows: list[dict]) -> str:
    results = harness.Results(path=tmp_path / "kvcache.json", script="kvcache", command="python experiments/kvcache.py",
                              args={"ppl_len": 1024}, key=("name", "seed"), rows=rows,
                              meta={"model": "m", "context": 4096, "kv_channels": 128, "kv_heads": 2, "head_dim": 64,
                                    "wkv_epochs": 2, "calib": "c", "ppl": "p",
                                    "commands": ["python experiments/kvcache.py"]})
    kvcache.report([results], tmp_path / "kvcache")
    return (tmp_path / "kvcache.md").read_text()


def test_rows_merge_over_draws_and_the_verdict_follows_the_paired_comparisons(tmp_path):
    rng = np.random.default_rng(0)
    rows = _rows(rng, skvq_lead=1.0, wkv_lead=1.5)
    text = _report(tmp_path, rows)
    verdict = next(line for line in text.splitlines() if line.startswith(harness.VERDICT))
    assert verdict.startswith(f"{harness.VERDICT} reproduced")
    assert "3 calibration draws" in verdict and "→ ahead by perplexity" in verdict
    table = [line for line in text.splitlines() if line.startswith("| SKVQ K2V2 |")]
    runs = [r["ppl"] for r in rows if r["name"] == "SKVQ K2V2"]
    assert len(table) == 1 and f"{np.mean(runs):.3f} ± {np.std(runs, ddof=1):.3f}" in table[0]
    assert "| KIVI K2V2 | once |" in text  # a row that does not calibrate: one run
    # the paired difference of SKVQ against KIVI run once: mean and SE over the draws
    kivi = next(r["ppl"] for r in rows if r["name"] == f"{kvcache.KIVI_WINDOW} K2V2")
    diffs = np.array(runs) - kivi
    assert f"ppl {diffs.mean():+.3f} ± {diffs.std(ddof=1) / np.sqrt(3):.3f}" in text


def test_no_lead_is_not_reproduced_and_missing_rows_are_named(tmp_path):
    rng = np.random.default_rng(1)
    rows = _rows(rng, skvq_lead=-1.0, wkv_lead=-1.0)
    verdict = kvcache._verdict(rows)
    assert verdict.startswith("not reproduced") and "behind by perplexity" in verdict
    only_k2v2 = [r for r in rows if r["name"] == kvcache.FP or r["name"].endswith(" K2V2")]
    partial = kvcache._verdict(only_k2v2)
    assert "Not run: SKVQ − KIVI K2V1.5, WKVQuant W4KV4." in partial
    assert kvcache._verdict([r for r in rows if r["name"] == kvcache.FP]) is None


def _with_retrieval(rows: list[dict], task: str, accuracy: dict[str, float]) -> list[dict]:
    """``rows`` with retrieval results (``task`` prompts) on the rows ``accuracy`` names."""
    return [{**r, "retrieval": accuracy[r["name"]], "retrieval_tokens": accuracy[r["name"]], "retrieval_n": 4,
             "retrieval_context": 512, "retrieval_by_depth": {"0.0": accuracy[r["name"]]}, "retrieval_task": task}
            if r["name"] in accuracy else r for r in rows]


def test_retrieval_reading_ranks_methods_only_when_the_float_model_retrieves(tmp_path):
    rows = _rows(np.random.default_rng(1), skvq_lead=1.0, wkv_lead=1.5)
    weak = _report(tmp_path, _with_retrieval(rows, "recall", {kvcache.FP: 0.25, "RTN K2V2": 0.0}))
    assert "associative recall at 512 tokens, 4 prompts" in weak
    assert "answers 0.25 of the prompts exactly" in weak and "cannot rank the KV methods" in weak
    strong = _report(tmp_path, _with_retrieval(rows, "recall", {kvcache.FP: 0.75, "RTN K2V2": 0.5}))
    assert "cannot rank" not in strong and "the others, exact / tokens: RTN K2V2 0.50 / 0.50" in strong
    passage = _report(tmp_path, _with_retrieval(rows, "passage", {kvcache.FP: 0.0}))
    assert "passage recall at 512 tokens" in passage
