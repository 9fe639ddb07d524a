"""experiments/train_ar_models.py --stage ecar --preset jq-ecar-tiny-2stage --quick: a stage-count variant trains in
its own folder and exports a pipeline whose transformer has the preset's stages; an unknown preset is refused."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

import train_ar_models as tam  # noqa: E402


def test_quick_two_stage_ecar_exports_the_preset(tmp_path, monkeypatch):
    from jquant.models import ecar
    from jquant.text_to_image import load_pipeline

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["train_ar_models.py", "--stage", "ecar", "--preset", "jq-ecar-tiny-2stage",
                                      "--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    tam.main()
    assert (tmp_path / "work" / "jq-ecar-tiny-2stage").is_dir() and not (tmp_path / "work" / "ecar").exists()
    info = json.loads((out / "reference_info.json").read_text())
    pipe = load_pipeline(out)
    preset = ecar.FAMILY.presets["jq-ecar-tiny-2stage"]
    assert info["name"] == "jq-ecar-tiny-2stage" and pipe.transformer.config.resolutions == preset.resolutions
    assert pipe.defaults.steps == sum(preset.stage_steps)


def test_unknown_preset_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_ar_models.py", "--stage", "ecar", "--preset", "jq-ecar-huge"])
    with pytest.raises(SystemExit):
        tam.main()
    assert "--preset 'jq-ecar-huge' is not a ecar preset" in capsys.readouterr().err
