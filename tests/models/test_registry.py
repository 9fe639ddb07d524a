"""The family registry: lazy imports, look-ups by name / model_type / diffusers class / instance / preset, and
the ``Family`` declaration's own checks."""

import json
import subprocess
import sys

import pytest

from jquant.models import llama, load, mamba, moe, registry
from jquant.models.family import LM_KEEP_FLOAT, Family


def test_importing_the_registry_imports_no_family():
    code = "import sys, jquant.models.registry; print(sorted(m for m in sys.modules if m.startswith('jquant.models.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['jquant.models.loading', 'jquant.models.registry']"  # the package's load, no family


def test_every_family_is_declared_once_under_its_registry_name():
    found = registry.families()
    assert [f.name for f in found] == list(registry._FAMILY_MODULES)
    assert {"llama", "moe", "mamba", "mamba2", "rwkv6"} <= set(registry._FAMILY_MODULES)
    assert registry.family("mamba") is mamba.FAMILY and registry.family("moe") is moe.FAMILY
    model_types = [t for f in found for t in f.hf_model_types]
    assert len(model_types) == len(set(model_types))  # one family per model_type


@pytest.mark.parametrize("model_type, name", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "llama"),
                                              ("qwen3", "llama"), ("mixtral", "moe"), ("qwen2_moe", "moe"),
                                              ("qwen3_moe", "moe"), ("mamba", "mamba"), ("mamba2", "mamba2")])
def test_family_for_model_type(model_type, name):
    assert registry.family_for_model_type(model_type).name == name


def test_unknown_keys_are_named_with_the_known_ones():
    known = ", ".join(sorted(registry._FAMILY_MODULES))
    with pytest.raises(ValueError, match=rf"unknown model family 'gpt2'; known: {known} \("):
        registry.family("gpt2")
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported: \[.*'qwen3_moe'"):
        registry.family_for_model_type("gpt2")
    with pytest.raises(ValueError, match=r"_class_name 'UNet2DConditionModel' is not supported; supported: "):
        registry.family_for_diffusers_class("UNet2DConditionModel")
    with pytest.raises(ValueError, match=r"unknown preset 'jq-mamba-huge'; choose one of \[.*'jq-mamba-small'"):
        registry.preset("jq-mamba-huge")


def test_family_of_a_model():
    cfg = moe.MoEConfig(vocab_size=32, hidden_size=16, intermediate_size=16, moe_intermediate_size=8, num_layers=1,
                        num_heads=2, num_kv_heads=1, num_experts=2, top_k=1)
    assert registry.family_of(moe.abstract_model(cfg)) is moe.FAMILY
    with pytest.raises(TypeError, match=r"quantize: int is not a model family jquant knows how to quantize; "
                                        r"known: Llama \(llama\), MoE \(moe\)"):
        registry.family_of(3, purpose="quantize")


def test_preset_gives_the_family_and_its_config():
    family, cfg = registry.preset("jq-llama-tiny")
    assert family is llama.FAMILY and cfg is llama.FAMILY.presets["jq-llama-tiny"]
    with pytest.raises(TypeError):
        family.presets["jq-llama-tiny"] = cfg  # read-only


def test_load_refuses_an_unknown_diffusers_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                      "_diffusers_version": "0.30"}))
    with pytest.raises(ValueError, match=rf"{tmp_path}: diffusers _class_name 'UNet2DConditionModel' is not supported"):
        load(tmp_path)


def _declare(**changes) -> Family:
    fields = dict(name="tiny", config_class=llama.LlamaConfig, model_class=llama.Llama, init_model=llama.init_model,
                  abstract_model=llama.abstract_model, config_to_json=llama.config_to_hf,
                  config_from_json=llama.config_from_hf, checkpoint_protocol="the config.json dict",
                  keep_float=LM_KEEP_FLOAT)
    return Family(**(fields | changes))


def test_family_declarations_are_checked():
    assert _declare().name == "tiny"
    with pytest.raises(ValueError, match="Family name 'Tiny-LM' must be lower-case"):
        _declare(name="Tiny-LM")
    with pytest.raises(ValueError, match=r"hf_model_types \['llama'\] but no from_hf"):
        _declare(hf_model_types=("llama",))
    with pytest.raises(ValueError, match=r"diffusers_class_names \['AutoencoderKL'\] but no from_diffusers"):
        _declare(diffusers_class_names=("AutoencoderKL",))
    with pytest.raises(TypeError, match="preset 'x' is a MambaConfig, not a LlamaConfig"):
        _declare(presets={"x": mamba.MambaConfig(vocab_size=8, hidden_size=8, num_layers=1)})
    with pytest.raises(ValueError, match=r"keep_float pattern '\(' is invalid"):
        _declare(keep_float=("(",))
