"""experiments/gptq_speed.py's verdict: met, met only with a warm compile cache (a cold first call slower), or not
met, from the ratios of the table's rows; and the report built from a run's rows."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

import gptq_speed
from harness import Results


def _table(ratios: dict[str, float]) -> list[dict]:
    return [{"model": "m", "call": call, "ratio": r, "jquant_rss": 1.0, "llmc_rss": 1.0} for call, r in ratios.items()]


@pytest.mark.parametrize("ratios, head", [
    ({"first": 0.9, "second": 0.5, gptq_speed.WARM: 0.7}, "met:"),
    ({"first": 1.2, "second": 0.5, gptq_speed.WARM: 0.7}, "met with a warm compile cache:"),
    ({"first": 1.2, "second": 1.1, gptq_speed.WARM: 0.7}, "not met:"),
    ({"first": 0.9, "second": 0.5, gptq_speed.WARM: 1.3}, "not met:"),
])
def test_verdict_follows_the_ratios(ratios, head):
    verdict = gptq_speed._verdict(_table(ratios))
    assert verdict.startswith(head), verdict
    if head.startswith("met with"):  # the slowest warm ratio and the cold one, both formatted from the rows
        assert "at most 0.70" in verdict and "1.20 on a cold first call" in verdict


def test_report_compares_the_warm_call_with_llm_compressors_first(tmp_path):
    rng = np.random.default_rng()
    seconds = {("llmc", "first"): 6.0, ("llmc", "second"): 5.0, ("jquant", "first"): 7.0,
               ("jquant", "second"): 3.0, ("jquant", gptq_speed.WARM): float(rng.uniform(4.0, 5.5))}
    rows = [{"model": "jq-llama-small", "tool": tool, "call": call, "seconds": s, "solve_seconds": s / 2,
             "peak_rss_gb": 1.0, "rss_before_gb": 0.5, "solves": [{"shapes": [[256, 256]], "seconds": s / 2}]}
            for (tool, call), s in seconds.items()]
    results = Results(path=tmp_path / "gptq_speed.json", script="gptq_speed", command="python experiments/gptq_speed.py",
                      args={"samples": 16, "seq": 256}, key=("model", "tool", "call"))
    results.add_rows(rows)
    gptq_speed.report([results], tmp_path / "gptq_speed")
    text = (tmp_path / "gptq_speed.md").read_text()
    warm = seconds[("jquant", gptq_speed.WARM)]
    assert f"| jq-llama-small | {gptq_speed.WARM} | 6.0 s | {warm:.1f} s | {warm / 6.0:.2f} |" in text
    assert "met with a warm compile cache" in text and "1.17 on a cold first call" in text
    assert "median over 1 repeat " in text  # rows recorded before --repeats (no "repeat" field): one repeat


def test_report_shows_medians_over_repeats_and_their_ratio(tmp_path):
    """Three repeats of each process: the table's times are the medians with their ranges, the ratio theirs."""
    rng = np.random.default_rng()
    rows = []
    for repeat in range(3):
        for tool, call in [("llmc", "first"), ("llmc", "second"), ("jquant", "first"), ("jquant", "second"),
                           ("jquant", gptq_speed.WARM)]:
            s = float(rng.uniform(2.0, 9.0))
            rows.append({"model": "jq-llama-small", "tool": tool, "call": call, "repeat": repeat, "seconds": s,
                         "solve_seconds": s / 2, "peak_rss_gb": 1.0, "rss_before_gb": 0.5,
                         "solves": [{"shapes": [[256, 256]], "seconds": s / 2}]})
    results = Results(path=tmp_path / "gptq_speed.json", script="gptq_speed", command="python experiments/gptq_speed.py",
                      args={"samples": 16, "seq": 256}, key=("model", "tool", "call", "repeat"))
    results.add_rows(rows)
    gptq_speed.report([results], tmp_path / "gptq_speed")
    text = (tmp_path / "gptq_speed.md").read_text()
    times = lambda tool, call: [r["seconds"] for r in rows if r["tool"] == tool and r["call"] == call]  # noqa: E731
    lc, jq = times("llmc", "first"), times("jquant", "first")
    cell = lambda t: f"{np.median(t):.1f} s ({min(t):.1f}–{max(t):.1f})"  # noqa: E731
    assert f"| jq-llama-small | first | {cell(lc)} | {cell(jq)} | {np.median(jq) / np.median(lc):.2f} |" in text
    assert "median over 3 repeats" in text
