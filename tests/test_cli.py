"""The `jquant` command against direct library calls on the bundled default model."""

import json

import jax
import numpy as np
import pytest

from jquant import cli
from jquant.data import load_split, token_windows
from jquant.eval import distribution_agreement, perplexity, zero_shot
from jquant.generate import generate
from jquant.models import DEFAULT_MODEL, load


def _run(capsys, *argv) -> tuple[int, dict | None, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in argv and code == 0 else None), err


@pytest.fixture(scope="module")
def default():
    return load(DEFAULT_MODEL)


def test_list_models_reports_the_bundled_models(capsys):
    code, data, _ = _run(capsys, "list", "models", "--json")
    assert code == 0
    assert DEFAULT_MODEL in data and data[DEFAULT_MODEL]["validation_ppl"] > 1


def test_eval_perplexity_and_zero_shot_match_the_library(capsys, default):
    code, data, _ = _run(capsys, "eval", "--model", DEFAULT_MODEL, "--tasks", "ppl,next_line", "--max-windows", "3",
                         "--n-items", "12", "--no-latency", "--json")
    assert code == 0
    windows = token_windows(load_split("validation"), default.tokenizer, 256, max_windows=3)
    expected = perplexity(default.model, windows, progress=False)
    assert data["perplexity"]["tokens"] == expected.n_tokens
    np.testing.assert_allclose(data["perplexity"]["ppl"], expected.ppl, rtol=1e-6)
    zs = zero_shot(default.model, default.tokenizer, ["next_line"], n_items=12, progress=False)
    assert data["zero_shot"]["next_line"]["accuracy"] == zs["next_line"].accuracy
    assert data["parameters"] == sum(x.size for x in jax.tree.leaves(default.model))


def test_generate_matches_the_library(capsys, default):
    code, data, _ = _run(capsys, "generate", "--model", DEFAULT_MODEL, "--prompt", "And God said", "--max-new-tokens", "7", "--json")
    assert code == 0
    tok = default.tokenizer
    ids = [tok.eos_token_id] + tok("And God said", add_special_tokens=False)["input_ids"]
    expected = generate(default.model, np.array([ids]), 7)[0, len(ids):]
    assert data["tokens"] == expected.tolist()
    assert data["continuation"] == tok.decode(expected.tolist())


def test_unknown_model_exits_2_with_a_message(capsys):
    code, _, err = _run(capsys, "eval", "--model", "no-such-model", "--tasks", "ppl")
    assert code == 2
    assert "unknown model 'no-such-model'" in err


@pytest.mark.parametrize("command", ["list", "eval", "generate", "train", "bench", "qsur", "quantize"])
def test_help_works(command):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0


def test_quantize_saves_a_model_that_eval_reloads(capsys, tmp_path, default):
    out = tmp_path / "tiny-w8"
    code, data, _ = _run(capsys, "quantize", "--model", DEFAULT_MODEL, "--recipe", "rtn-w8a8", "--out", str(out),
                         "--tasks", "ppl", "--max-windows", "2", "--no-latency", "--calib-samples", "2", "--json")
    assert code == 0
    assert data["sites"]["layers/0/mlp/up_proj"] == "int8 (rtn), activations int8"
    assert data["quantized"]["bits_per_parameter"] < data["float"]["bits_per_parameter"]
    code, reloaded, _ = _run(capsys, "eval", "--model", str(out), "--tasks", "ppl", "--max-windows", "2", "--no-latency", "--json")
    assert code == 0
    assert reloaded["perplexity"]["ppl"] == data["quantized"]["perplexity"]["ppl"]
    assert reloaded["perplexity"]["ppl"] != data["float"]["perplexity"]["ppl"]
    windows = token_windows(load_split("validation"), default.tokenizer, 256, max_windows=2)
    direct = distribution_agreement(load(out).model, default.model, windows)
    assert data["agreement"]["kl"] == pytest.approx(direct.kl, rel=1e-5) and data["agreement"]["kl"] > 0
    assert data["agreement"]["top1"] == pytest.approx(direct.top1) and data["agreement"]["positions"] == 2 * 255


def test_quantize_with_a_recipe_file_and_a_bad_recipe(capsys, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("rules:\n  - pattern: '.*mlp.*'\n    weight: int4-g64\n  - pattern: '.*'\n    weight: int8\n")
    code, data, _ = _run(capsys, "quantize", "--model", DEFAULT_MODEL, "--recipe", str(recipe), "--no-eval", "--json")
    assert code == 0 and data["sites"]["layers/1/mlp/down_proj"] == "int4-g64 (rtn)"
    code, _, err = _run(capsys, "quantize", "--model", DEFAULT_MODEL, "--recipe", "gptq-w4g128", "--no-eval")
    assert code == 2 and "group_size=128 does not divide" in err


def test_bench_refuses_cpu_without_flag_and_runs_tiny_with_it(capsys, tmp_path):
    assert cli.main(["bench"]) == 2
    assert "GPU" in capsys.readouterr().err
    assert cli.main(["bench", "--allow-cpu", "--cases", "w8a16-int8", "--shapes", "128x64", "--m", "1",
                     "--reps", "1", "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    paths = {(r["path"], r["m"]) for r in result["rows"]}
    assert paths == {("bf16", 1), ("xla", 1), ("pallas", 1)}
    assert (tmp_path / "kernels_cpu.md").exists()


def test_qsur_reports_every_layer_before_and_after_and_matches_the_library(capsys, default):
    from jquant.data import random_windows
    from jquant.transforms import qsur_report, quarot

    code, data, _ = _run(capsys, "qsur", "--model", DEFAULT_MODEL, "--recipe", "quarot-w4a16", "--calib-samples", "6",
                         "--calib-seq-len", "128", "--json")
    assert code == 0
    calib = random_windows(load_split("train"), default.tokenizer, 6, 128, jax.random.key(0))
    before, after = qsur_report(default.model, calib), qsur_report(quarot(default.model, jax.random.key(0),
                                                                           online=("down",)), calib)
    assert len(data["layers"]) == default.model.config.num_layers
    np.testing.assert_allclose(data["mean_before"], before.mean(), rtol=1e-6)
    np.testing.assert_allclose(data["mean_after"], after.mean(), rtol=1e-6)
    assert data["layers"][0]["qkv before"] == pytest.approx(before.rows()[0]["qkv"], rel=1e-6)
    code, _, err = _run(capsys, "qsur", "--model", DEFAULT_MODEL, "--recipe", "gptq-w4g64")
    assert code == 2 and "no transform steps" in err


def test_quantize_moe_with_ebss_calibration_and_the_moequant_recipe(capsys, tmp_path):
    from jquant.models import moe

    cfg = moe.MoEConfig(family="mixtral", vocab_size=96, hidden_size=64, intermediate_size=64, moe_intermediate_size=48,
                        num_layers=1, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2)
    folder = moe.to_hf(moe.init_model(cfg, jax.random.key(0)), tmp_path / "tiny-moe")
    code, data, _ = _run(capsys, "quantize", "--model", str(folder), "--recipe", "moequant-w4", "--calib-source", "ebss",
                         "--calib-samples", "2", "--calib-seq-len", "8", "--no-eval", "--json")
    assert code == 0
    assert data["recipe"]["transforms"][0]["kind"] == "quarot"
    assert data["sites"]["layers/0/mlp/experts/down_proj"].startswith("int4")
    code, _, err = _run(capsys, "quantize", "--model", DEFAULT_MODEL, "--recipe", "gptq-moe-w4", "--calib-source", "ebss",
                        "--calib-samples", "2", "--calib-seq-len", "8", "--no-eval")
    assert code == 2 and "EBSS needs a mixture-of-experts model" in err


def test_compile_cache_keeps_the_programs_for_the_next_run(tmp_path):
    """``--compile-cache`` writes the run's slower-compiling programs into the folder (a fresh process: JAX fixes
    its cache folder at the first compile, and this test process has compiled long before)."""
    import subprocess
    import sys

    folder = tmp_path / "xla"
    cmd = [sys.executable, "-m", "jquant.cli", "--compile-cache", str(folder), "eval", "--model", DEFAULT_MODEL,
           "--tasks", "ppl", "--max-windows", "1", "--seq-len", "32", "--batch-size", "1", "--no-latency", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    assert json.loads(out)["perplexity"]["tokens"] == 31
    assert any("next_token_logprobs" in p.name for p in folder.iterdir())


def test_compile_cache_that_is_a_file_is_refused(tmp_path, capsys):
    file = tmp_path / "cache"
    file.write_text("mine")
    assert cli.main(["--compile-cache", str(file), "list", "recipes"]) == 2
    assert "--compile-cache" in capsys.readouterr().err and file.read_text() == "mine"
