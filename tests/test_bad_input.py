"""Issue 33's bad-input matrix: every bad file, argument or config gives a clear error naming it and the fix.

CLI probes go through ``jquant.cli.main`` (exit code 2 and a message on stderr); API probes expect a
ValueError/FileNotFoundError naming the argument or file. Damaged files are built in ``tmp_path``.
"""

import json
import math
import shutil

import jax
import numpy as np
import pytest

from jquant import cli
from jquant.checkpoint import load as load_checkpoint
from jquant.checkpoint import save
from jquant.data.tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer
from jquant.generate import SamplingConfig, generate
from jquant.models import DEFAULT_MODEL, llama, load
from jquant.quantization import quantize
from jquant.recipes import Recipe, Rule

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                        max_position_embeddings=32)


@pytest.fixture(scope="module")
def tiny():
    return llama.init_model(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def quantized_checkpoint(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "w8"
    save(quantize(tiny, "rtn-w8", progress=False), path)
    return path


@pytest.fixture()
def hf_folder(tiny, tmp_path):
    llama.to_hf(tiny, tmp_path / "hf")
    return tmp_path / "hf"


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def _argparse_error(capsys, *argv) -> str:
    """argparse refuses bad option values with exit code 2 and a message naming the flag."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


# --- raw tracebacks become clear errors -------------------------------------------------------------------------


def test_damaged_checkpoint_chunk_names_the_state_folder(quantized_checkpoint, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(quantized_checkpoint, damaged)
    chunks = [p for p in (damaged / "state").rglob("*") if p.is_file() and p.parent.name == "d"
              and p.parent.parent.name.startswith("ocdbt")]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"state could not be read .*damaged or truncated; save the model again"):
        load_checkpoint(damaged)


def test_unreadable_checkpoint_metadata_says_damaged(quantized_checkpoint, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(quantized_checkpoint, damaged)
    for chunk in (damaged / "state" / "d").iterdir():
        chunk.write_bytes(b"")
    with pytest.raises(ValueError, match=r"state holds no readable arrays: the checkpoint is damaged"):
        load_checkpoint(damaged)


def test_truncated_safetensors_names_the_file(hf_folder):
    weights = hf_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file .*re-download"):
        load(hf_folder)


def test_broken_config_json_names_the_file(hf_folder):
    (hf_folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*fix or re-download the file"):
        load(hf_folder)


@pytest.mark.parametrize("name, text, kind", [("broken.yaml", "rules: [unclosed", "YAML"),
                                                ("broken.json", '{"rules": [', "JSON")])
def test_broken_recipe_file_names_the_file(capsys, tmp_path, name, text, kind):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"recipe file .*{name} is not valid {kind}"):
        Recipe.from_file(path)
    code, err = _cli(capsys, "quantize", "--recipe", str(path), "--no-eval")
    assert code == 2 and name in err and f"not valid {kind}" in err


def test_recipe_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=r"list\.yaml must hold a mapping of recipe fields .*got list"):
        Recipe.from_file(path)


def test_rule_pattern_must_be_a_string():
    with pytest.raises(ValueError, match=r"Rule\.pattern must be a regular expression string .*got int 5"):
        Rule(pattern=5)


@pytest.mark.parametrize("seq_len", ["100000", "2048"])
def test_eval_seq_len_beyond_the_context_is_refused(capsys, seq_len):
    code, err = _cli(capsys, "eval", "--model", DEFAULT_MODEL, "--tasks", "ppl", "--seq-len", seq_len, "--no-latency")
    assert code == 2
    assert f"--seq-len {seq_len} exceeds the model's context of 1024 tokens; pass --seq-len 1024 or less" in err


# --- silent wrong results are refused ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_temperature_must_be_finite_and_non_negative(capsys, value):
    err = _argparse_error(capsys, "generate", "--prompt", "x", "--temperature", value)
    assert "argument --temperature: must be a finite number >= 0" in err


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -0.5])
def test_sampling_config_refuses_non_finite_or_negative_temperature(temperature):
    with pytest.raises(ValueError, match=r"SamplingConfig\.temperature must be a finite number >= 0"):
        SamplingConfig(temperature=temperature)


@pytest.mark.parametrize("eps", [-1, 0, math.nan])
def test_hf_config_with_invalid_rms_norm_eps_is_refused(hf_folder, eps):
    config = json.loads((hf_folder / "config.json").read_text())
    config["rms_norm_eps"] = eps
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"rms_norm_eps \(config\.json rms_norm_eps\) must be a finite number > 0"):
        load(hf_folder)


def test_config_refuses_non_positive_context():
    with pytest.raises(ValueError, match=r"LlamaConfig\.max_position_embeddings must be positive, got 0"):
        llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                          num_kv_heads=2, max_position_embeddings=0)


def test_generate_beyond_the_context_is_refused(capsys, tiny):
    with pytest.raises(ValueError, match=r"prompt \(30 tokens\) plus max_new_tokens \(3\) exceeds the model's context "
                                         r"of 32 tokens"):
        generate(tiny, np.zeros((1, 30), np.int32), 3)
    code, err = _cli(capsys, "generate", "--model", DEFAULT_MODEL, "--prompt", "And God said", "--max-new-tokens", "1024")
    assert code == 2
    assert "plus --max-new-tokens 1024 exceeds the model's context of 1024 tokens; pass --max-new-tokens" in err


def test_generate_top_k_beyond_the_vocabulary_is_refused(capsys, tiny):
    with pytest.raises(ValueError, match=r"top_k=65 exceeds the model's vocabulary of 64 tokens"):
        generate(tiny, np.zeros((1, 4), np.int32), 2, sampling=SamplingConfig(temperature=1.0, top_k=65),
                 key=jax.random.key(0))
    code, err = _cli(capsys, "generate", "--model", DEFAULT_MODEL, "--prompt", "x", "--temperature", "1",
                     "--top-k", "100000")
    assert code == 2 and "--top-k 100000 exceeds the model's vocabulary of 4096 tokens" in err


def test_empty_task_list_is_refused(capsys):
    code, err = _cli(capsys, "eval", "--model", DEFAULT_MODEL, "--tasks", "", "--no-latency")
    assert code == 2 and "--tasks '' names no task; pass e.g. --tasks ppl" in err


def test_model_folder_without_tokenizer_needs_tokenizer_option(capsys, tmp_path):
    cfg = llama.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=64)
    llama.to_hf(llama.init_model(cfg, jax.random.key(0)), tmp_path / "hf")
    argv = ["eval", "--model", str(tmp_path / "hf"), "--tasks", "ppl", "--seq-len", "16", "--max-windows", "1",
            "--no-latency", "--json"]
    code, err = _cli(capsys, *argv)
    assert code == 2 and "has no tokenizer files (tokenizer.json); pass --tokenizer PATH" in err
    assert cli.main([*argv, "--tokenizer", str(DEFAULT_TOKENIZER_DIR)]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"]["tokens"] > 0


# --- misleading messages are fixed ------------------------------------------------------------------------------


def test_checkpoint_without_recipe_says_recipe_is_missing(quantized_checkpoint, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(quantized_checkpoint, incomplete)
    (incomplete / "recipe.json").unlink()
    with pytest.raises(ValueError, match=r"recipe\.json is missing but the state holds quantized arrays .*incomplete"):
        load_checkpoint(incomplete)


def test_folder_with_state_but_no_manifest_is_an_incomplete_checkpoint(quantized_checkpoint, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(quantized_checkpoint, incomplete)
    (incomplete / "jquant.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"looks like an incomplete jquant checkpoint: .*no jquant\.json"):
        load(incomplete)


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--batch-size", "0"], "--batch-size"),
    (["eval", "--batch-size", "-1"], "--batch-size"),
    (["eval", "--seq-len", "0"], "--seq-len"),
    (["eval", "--max-windows", "0"], "--max-windows"),
    (["quantize", "--recipe", "rtn-w8", "--calib-samples", "0"], "--calib-samples"),
    (["qsur", "--recipe", "quarot-w4a4kv4", "--calib-seq-len", "-3"], "--calib-seq-len"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["train", "--steps", "0", "--out", "x"], "--steps"),
])
def test_non_positive_integer_options_name_the_flag(capsys, argv, flag):
    assert f"argument {flag}: must be a positive integer (1 or more)" in _argparse_error(capsys, *argv)


@pytest.mark.parametrize("value, message", [("0", "must be a positive size"), ("-1M", "must be a positive size"),
                                            ("lots", "expected a size such as 512M or 2G")])
def test_capture_budget_must_be_a_positive_size(capsys, value, message):
    error = _argparse_error(capsys, "quantize", "--recipe", "gptq-w4g128", f"--capture-budget={value}")
    assert f"argument --capture-budget: {message}" in error


def test_generate_of_a_missing_folder_says_it_does_not_exist(capsys, tmp_path):
    # --out is an image/video option: the missing folder, not "is a language model", is the error
    assert cli.main(["generate", "--model", str(tmp_path / "gone"), "--prompt", "x", "--out", "x.gif"]) != 0
    err = capsys.readouterr().err
    assert "unknown model" in err and "gone" in err and "language model" not in err


def test_broken_tokenizer_file_names_the_folder(capsys, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(DEFAULT_TOKENIZER_DIR, folder)
    (folder / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"the tokenizer in .*tok could not be read .*damaged"):
        load_tokenizer(folder)
    code, err = _cli(capsys, "generate", "--model", DEFAULT_MODEL, "--prompt", "x", "--tokenizer", str(folder))
    assert code == 2 and "could not be read" in err


# --- usability --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["recipes", "models", "presets"])
def test_list_never_truncates_names(capsys, monkeypatch, what):
    from jquant.models import list_models
    from jquant.models.registry import families
    from jquant.recipes import list_recipes

    monkeypatch.setenv("COLUMNS", "60")
    names = {"recipes": lambda: [r.name for r in list_recipes()], "models": lambda: [m.name for m in list_models()],
             "presets": lambda: [n for f in families() for n in f.presets]}[what]()
    assert cli.main(["list", what]) == 0
    out = capsys.readouterr().out
    for name in names:
        assert f" {name} " in out, name


def test_every_generate_option_has_help():
    parser = cli._parser()
    generate_parser = next(a for a in parser._actions if a.dest == "command").choices["generate"]
    undocumented = [a.option_strings for a in generate_parser._actions if not a.help]
    assert undocumented == []
