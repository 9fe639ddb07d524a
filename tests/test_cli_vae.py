"""``jquant encode`` / ``jquant decode`` on a tiny random-weight HunyuanVideo VAE saved as a diffusers folder: the files
hold what the library computes (``model.encode`` / ``jquant.frame_rate.dlfr``) and decode back to it; outputs are
never replaced without ``--overwrite`` and nothing is written on a refusal."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from jquant.cli import main
from jquant.frame_rate import dlfr
from jquant.media import save_gif, to_uint8
from jquant.models import hunyuan_video_vae as hv

CONFIG = hv.HunyuanVideoVAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4, spatial_compression_ratio=4)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    model = hv.init_model(CONFIG, jax.random.key(np.random.default_rng().integers(1 << 30)))
    hv.to_diffusers(model, folder)
    return str(folder), hv.from_diffusers(folder)


def _clip() -> np.ndarray:
    """33 frames of 12 x 12 in [-1, 1]: a first chunk of noise, a nearly still second one (slightly noisy, so a GIF
    keeps every frame)."""
    rng = np.random.default_rng()
    clip = rng.uniform(-1, 1, (33, 12, 12, 3))
    clip[17:] = 0.97 * clip[16] + 0.03 * clip[17:]
    return clip.astype(np.float32)


def _run(capsys, *argv) -> tuple[int, dict | str]:
    code = main([*argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and "--json" in argv else err)


def test_fixed_rate_round_trip_through_npy(vae, tmp_path, capsys):
    folder, model = vae
    clip = _clip()
    np.save(tmp_path / "clip.npy", clip)
    code, result = _run(capsys, "encode", "--model", folder, "--input", str(tmp_path / "clip.npy"),
                        "--out", str(tmp_path / "z.npz"), "--json")
    assert code == 0 and result["latent_frames"] == 9
    want = np.asarray(model.encode(clip[None]).mean)
    np.testing.assert_allclose(np.load(tmp_path / "z.npz")["latents"], want, rtol=1e-5, atol=1e-6)
    code, result = _run(capsys, "decode", "--model", folder, "--input", str(tmp_path / "z.npz"),
                        "--out", str(tmp_path / "back.npy"), "--json")
    assert code == 0 and result["frames"] == 33
    np.testing.assert_allclose(np.load(tmp_path / "back.npy"), np.asarray(model.decode(want))[0], rtol=1e-4,
                               atol=1e-5)


def test_dynamic_rate_from_a_gif_stores_the_schedule_and_decodes_to_a_gif(vae, tmp_path, capsys):
    folder, model = vae
    gif = save_gif(to_uint8(_clip())[None], tmp_path / "clip.gif")
    code, result = _run(capsys, "encode", "--model", folder, "--input", str(gif), "--out", str(tmp_path / "z.npz"),
                        "--dynamic-frame-rate", "--target-compression", "8", "--json")
    assert code == 0
    from jquant.cli_vae import read_clip

    clip = read_clip(str(gif))
    rates = dlfr.schedule(clip, target_compression=8)[0]
    assert rates.factors[1] == 4 and rates.compression >= 8  # the still chunk takes the largest factor
    stored = np.load(tmp_path / "z.npz")
    assert tuple(stored["factors"]) == rates.factors and int(stored["chunk"]) == 16
    assert result["latent_frames"] == rates.latent_frames
    np.testing.assert_allclose(stored["latents"], np.asarray(dlfr.encode(model, clip, rates).latents), rtol=1e-5,
                               atol=1e-6)
    code, result = _run(capsys, "decode", "--model", folder, "--input", str(tmp_path / "z.npz"),
                        "--out", str(tmp_path / "back.gif"), "--fps", "10", "--json")
    assert code == 0 and result["frames"] == 33
    frames = dlfr.decode(model, dlfr.VariableRateLatent(stored["latents"], rates))  # [1, 33, 12, 12, 3]
    want = to_uint8(frames).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(read_clip(str(tmp_path / "back.gif")), want, atol=1.01 / 127.5)  # 33 frames back


def test_refusals_write_nothing_and_outputs_are_never_replaced_silently(vae, tmp_path, capsys):
    folder, _ = vae
    np.save(tmp_path / "clip.npy", _clip())
    base = ["encode", "--model", folder, "--input", str(tmp_path / "clip.npy")]
    out = tmp_path / "z.npz"
    for extra, match in [
        (["--dynamic-frame-rate", "--thresholds", "0.1,1.5"], "each in \\[0, 1\\]"),
        (["--dynamic-frame-rate", "--target-compression", "20"], "target_compression=20.0 must be in \\[4, 16\\]"),
        (["--dynamic-frame-rate"], "needs exactly one of --target-compression"),
        (["--target-compression", "8"], "need --dynamic-frame-rate"),
        (["--dynamic-frame-rate", "--target-compression", "8", "--chunk", "12"],
         "chunk=12 must be a positive multiple"),
    ]:
        code, err = _run(capsys, *base, "--out", str(out), *extra)
        assert code == 2 and re.search(match, " ".join(err.split())), (extra, err)
        assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    code, err = _run(capsys, *base, "--out", str(tmp_path / "z.txt"))
    assert code == 2 and "must end in .npz" in err
    assert _run(capsys, *base, "--out", str(out))[0] == 0
    before = out.read_bytes()
    code, err = _run(capsys, *base, "--out", str(out))
    assert code == 2 and "exists; pass --overwrite" in err and out.read_bytes() == before
    assert _run(capsys, *base, "--out", str(out), "--overwrite", "--dynamic-frame-rate", "--thresholds",
                "0.5,0.9")[0] == 0
    assert tuple(np.load(out)["factors"]) == (1, 4)  # noise: 1 - SSIM near 1; still: 0
    code, err = _run(capsys, "decode", "--model", folder, "--input", str(tmp_path / "clip.npy"),
                     "--out", str(tmp_path / "x.gif"))
    assert code == 2 and "must be an existing .npz" in err and not (tmp_path / "x.gif").exists()
