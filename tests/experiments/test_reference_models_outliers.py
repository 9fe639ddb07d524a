"""experiments/reference_models_report.py: each model's largest outliers in words (the sentence the methods'
readings quote) against the thresholds, and the commands that regenerate a file that several runs added to."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

import reference_models_report as report
from harness import Results


def _stats(rng, absmax: float, rms: float, top: float, ratio: float) -> dict:
    """Outlier statistics of a two-layer model: q/k/v (shared input) and down_proj sites, the largest ratios at
    layer 1's down_proj; the residual stream's largest entry ``top`` at ``ratio`` times the median."""
    sites, blocks = {}, []
    for layer in range(2):
        shared = {"absmax_ratio": float(rng.uniform(1, 3)), "rms_ratio": float(rng.uniform(1, 3)),
                  "channel_kurtosis": 4.0, "top_channel": 3, "tokens": 64.0, "group_tokens": None}
        for name in ("q_proj", "k_proj", "v_proj"):
            sites[f"layers/{layer}/self_attn/{name}"] = shared
        big = layer == 1
        sites[f"layers/{layer}/mlp/down_proj"] = {
            "absmax_ratio": absmax if big else 2.0, "rms_ratio": rms if big else 2.0, "channel_kurtosis": 9.0,
            "top_channel": 7, "tokens": 64.0, "group_tokens": None}
        blocks.append({"block": f"layers/{layer}", "kurtosis": 3.0, "top": top / (2 - layer),
                       "median": top / ratio, "top_over_median": ratio / (2 - layer), "top_channel": 5,
                       "top_token": 0})
    output = {"kurtosis": 3.0, "top": 1.0, "median": 0.5, "top_over_median": 2.0, "top_channel": 1, "top_token": 0}
    return {"sequences": 2, "length": 32, "sites": sites, "blocks": blocks, "output": output, "experts": None}


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_presence_sentence_states_each_phenomenon_against_its_threshold(scale):
    rng = np.random.default_rng()
    absmax, rms = report.OUTLIER_FACTOR * scale * rng.uniform(0.9, 1.1), report.OUTLIER_FACTOR * scale
    top, ratio = report.MASSIVE_TOP * scale * 2, report.MASSIVE_RATIO * scale * 1.5
    sentence = report.presence_sentence("m", _stats(rng, absmax, rms, top, ratio))
    word = "present" if scale > 1 else "absent"
    assert sentence.startswith(f"m: channel absmax ratio up to {absmax:.1f}× (mlp/down_proj; {word} at ≥ 10×)")
    assert f"channel RMS ratio up to {rms:.1f}× ({word})" in sentence
    assert f"residual-stream max/median up to {ratio:.0f}× (massive activations {word})" in sentence


def test_the_regenerating_commands_name_every_model_of_each_part(tmp_path):
    results = Results(path=tmp_path / "r.json", script="reference_models_report", command="python x --models c",
                      args={"items": 200, "windows": None}, key=("name",))
    results.add_rows([{"name": "a"}, {"name": "c"}])
    results.set_meta(outliers={"a": {}, "b": {}, "c": {}})
    command = report.regenerate_command(results)
    assert command == ("python experiments/reference_models_report.py --part evaluation --models a c`, then "
                       "`python experiments/reference_models_report.py --resume --part outliers --models a b c")
    results.set_meta(outliers={"a": {}, "c": {}})
    assert report.regenerate_command(results) == "python experiments/reference_models_report.py --models a c"
