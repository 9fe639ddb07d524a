"""experiments/train_video_models.py --stage cogvideox --quick: the smoke run exports a CogVideoX-style text-to-video
pipeline folder that ``load_pipeline`` reads back and that redraws the exported sample sheet."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

import train_video_models as tvm  # noqa: E402


def test_quick_cogvideox_stage_exports_a_pipeline_that_loads_and_redraws_its_samples(tmp_path, monkeypatch):
    from jquant.media import to_uint8, video_frames_grid
    from jquant.models import cogvideox
    from jquant.text_to_image import load_pipeline
    from jquant.text_to_video import TextToVideo

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "jq-video-vae-tiny").symlink_to(tvm.BUNDLE / "jq-video-vae-tiny", target_is_directory=True)
    monkeypatch.setattr(sys, "argv", ["train_video_models.py", "--stage", "cogvideox", "--quick",
                                      "--workdir", str(tmp_path / "work"), "--bundle", str(bundle)])
    tvm.main()

    folder = bundle / "jq-cogvideox-tiny"
    info = json.loads((folder / "reference_info.json").read_text())
    pipe = load_pipeline(folder)
    assert isinstance(pipe, TextToVideo) and isinstance(pipe.transformer, cogvideox.CogVideoXTransformer)
    assert pipe.transformer.config == cogvideox.FAMILY.presets["jq-cogvideox-tiny"]  # the preset fits the latents
    assert info["family"] == "cogvideox" and info["steps"] == tvm.QUICK["dit_steps"] and "objective" in info
    assert info["parameters"] == sum(v.size for v in jax.tree.leaves(nnx.state(pipe.transformer, nnx.Param)))
    assert np.isfinite(info["validation_flow_loss"]) and 0.0 <= info["prompt_accuracy"] <= 1.0
    assert (folder / "samples.gif").is_file() and (folder / "loss_curve.png").is_file()

    # The sample sheet was drawn by the trained pipeline in memory; the folder read back draws the same clips.
    clips = to_uint8(pipe.generate(info["sample_prompts"], seed=0))
    assert clips.shape == (len(info["sample_prompts"]), 17, 32, 32, 3)
    sheet = np.asarray(Image.open(folder / "samples.png"))
    assert sheet.shape == video_frames_grid(clips, scale=2).shape
    assert np.abs(sheet.astype(int) - video_frames_grid(clips, scale=2).astype(int)).max() <= 1
