"""compressed-tensors checkpoints in and out, checked against the compressed-tensors package and transformers.

Out: compressed-tensors' own decompression of jquant's export equals jquant's dequantized weights (in the
scale's dtype, as compressed-tensors computes; NVFP4 to an ulp of its tensor-scale division). In: a tiny
transformers model quantized by compressed-tensors' quantize + compress (RTN scales from its
``calculate_qparams``) loads with ``jquant.load`` and gives transformers' logits of the decompressed model.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import BaseCompressor, ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,  # noqa: E402
                                             apply_quantization_config)
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import jquant as jq  # noqa: E402
from jquant.cli import main  # noqa: E402
from jquant.formats import QArray, dequantize  # noqa: E402
from jquant.interop import export_compressed_tensors  # noqa: E402
from jquant.models import llama, moe  # noqa: E402
from jquant.recipes import Recipe, Rule  # noqa: E402
from jquant.testing.hf_reference import build_llama_family, torch_logits  # noqa: E402

TINY = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=2,
                         num_kv_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
# (weight format, activation format, static activation, compressed-tensors format)
EXPORTS = [("int4-g32-full", None, False, "pack-quantized"), ("int4-g16-asym", None, False, "pack-quantized"),
           ("int3-g32-asym", None, False, "pack-quantized"), ("int8", "int8", False, "int-quantized"),
           ("int8", "int8-tensor", True, "int-quantized"), ("fp8-e4m3", "fp8-e4m3", False, "float-quantized"),
           ("nvfp4", None, False, "nvfp4-pack-quantized")]


def _quantized(model, weight, activation=None, static=False):
    recipe = Recipe(name="t", rules=(Rule(pattern=".*", weight=weight, activation=activation,
                                          static_activation=static),))
    calib = jax.random.randint(jax.random.key(1), (4, 16), 0, model.config.vocab_size) if static else None
    return jq.quantize(model, recipe, calib, progress=False)


def _decompressed(folder) -> dict[str, torch.Tensor]:
    """compressed-tensors' decompression of every quantized module of a folder (module name -> weight)."""
    config = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for key in tensors:
        if not key.endswith(".weight_scale"):
            continue
        name = key.removesuffix(".weight_scale")
        scheme = next(g for g in config.config_groups.values() if name in g.targets or g.targets == ["Linear"])
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
        out[name] = compressor.decompress(local, scheme)["weight"]
    return out


def _jquant_weight(q: QArray, expert: int | None, dtype: torch.dtype) -> np.ndarray:
    w = np.asarray(dequantize(q), np.float32)
    w = w[expert] if expert is not None else w
    return torch.from_numpy(np.ascontiguousarray(w.T)).to(dtype).float().numpy()


@pytest.mark.parametrize("weight,activation,static,form", EXPORTS)
def test_export_decompresses_to_jquant_weights(tmp_path, weight, activation, static, form):
    model = _quantized(llama.init_model(TINY, jax.random.key(np.random.SeedSequence().entropy % 2**31)),
                       weight, activation, static)
    export_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == form
    assert config["ignore"] == ["lm_head"]
    weights = _decompressed(tmp_path / "ct")
    assert len(weights) == 7  # q, k, v, o, gate, up, down
    for name, got in weights.items():
        path = name.removeprefix("model.").replace(".", "/")
        q = model
        for part in path.split("/"):
            q = q[int(part)] if part.isdigit() else getattr(q, part)
        want = _jquant_weight(q.kernel.get_value(), None, got.dtype)
        if form == "nvfp4-pack-quantized":  # s / g (compressed-tensors) vs s * (1 / g) (jquant): an ulp apart
            np.testing.assert_allclose(got.float().numpy(), want, rtol=2 ** -7, atol=0)
        else:
            np.testing.assert_array_equal(got.float().numpy(), want)


def test_moe_export_and_round_trip(tmp_path):
    cfg = moe.MoEConfig(family="qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                        moe_intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, num_experts=4, top_k=2,
                        shared_expert_size=32, shared_expert_gate=True, max_position_embeddings=64, bos_token_id=0,
                        eos_token_id=1)
    model = _quantized(moe.init_model(cfg, jax.random.key(3)), "int4-g16-full")
    export_compressed_tensors(model, tmp_path / "ct")
    weights = _decompressed(tmp_path / "ct")
    for e in range(4):
        got = weights[f"model.layers.0.mlp.experts.{e}.up_proj"]
        want = _jquant_weight(model.layers[0].mlp.experts.up_proj.kernel.get_value(), e, got.dtype)
        np.testing.assert_array_equal(got.float().numpy(), want)
    back = jq.load(tmp_path / "ct")
    tokens = np.random.default_rng(0).integers(0, 64, (2, 8))
    np.testing.assert_array_equal(np.asarray(back(tokens)), np.asarray(model(tokens)))
    assert dict(back.quantization.sites)["layers/0/mlp/experts/up_proj"].startswith("int4-g16-full")


@pytest.mark.parametrize("weight", ["int4-g16-asym", "fp8-e4m3", "nvfp4"])
def test_export_round_trip_and_save(tmp_path, weight):
    model = _quantized(llama.init_model(TINY, jax.random.key(5)), weight)
    export_compressed_tensors(model, tmp_path / "ct")
    back = jq.load(tmp_path / "ct")
    tokens = np.random.default_rng(1).integers(0, 64, (2, 8))
    np.testing.assert_allclose(np.asarray(back(tokens)), np.asarray(model(tokens)), rtol=1e-5, atol=1e-6)
    jq.save(back, tmp_path / "jq")
    np.testing.assert_array_equal(np.asarray(jq.load(tmp_path / "jq")(tokens)), np.asarray(back(tokens)))


def _ct_quantize(model, scheme_args: dict):
    """Quantize every Linear but lm_head with compressed-tensors' own RTN qparams, in place."""
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**scheme_args))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        s = getattr(module, "quantization_scheme", None)
        if s is None:
            continue
        w, group = module.weight.data, s.weights.group_size
        blocks = w.reshape(w.shape[0], -1, group) if group else w
        dims = -1 if group or s.weights.strategy == "channel" else None
        lo, hi = (blocks.amin(-1), blocks.amax(-1)) if dims else (w.min().reshape(1), w.max().reshape(1))
        if s.weights.strategy == "channel":
            lo, hi = lo[:, None], hi[:, None]
        gscale = None
        if hasattr(module, "weight_global_scale"):
            gscale = generate_gparam(w.min(), w.max())
            module.weight_global_scale.data.copy_(gscale)
        scale, zp = calculate_qparams(lo, hi, s.weights, global_scale=gscale)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zp.reshape(module.weight_zero_point.shape))


CT_SCHEMES = {
    "w4a16-sym-g16": dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16),
    "w4a16-asym-g16": dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=16),
    "w8a16-channel": dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
    "fp8-channel": dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
    "nvfp4": dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                  scale_dtype=torch.float8_e4m3fn),
}


@pytest.mark.parametrize("case,scheme", [("qwen2-qkv-bias", "w4a16-sym-g16"), ("llama3-gqa-untied", "w4a16-asym-g16"),
                                         ("qwen2-qkv-bias", "w8a16-channel"), ("llama3-gqa-untied", "fp8-channel"),
                                         ("qwen2-qkv-bias", "nvfp4")])
def test_compressed_tensors_checkpoint_loads_with_transformers_logits(tmp_path, case, scheme):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    seed = int(np.random.SeedSequence().entropy % 2**31)
    model = build_llama_family(case, tmp_path / "float", seed=seed)
    _ct_quantize(model, CT_SCHEMES[scheme])
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "ct")
    compressor.update_config(tmp_path / "ct")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ct",
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
    if scheme == "nvfp4":  # transformers decompresses NVFP4 through bfloat16; take compressed-tensors' float32 maths
        _float32_nvfp4(reference, load_file(tmp_path / "ct" / "model.safetensors"))
    tokens = np.random.default_rng(seed).integers(0, 96, (2, 12))
    loaded = jq.load(tmp_path / "ct")
    assert all(isinstance(loaded.layers[i].self_attn.q_proj.kernel.get_value(), QArray) for i in range(2))
    want = torch_logits(reference, tokens)
    np.testing.assert_allclose(np.asarray(loaded(tokens)), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _float32_nvfp4(model, tensors: dict) -> None:
    """Set every NVFP4 linear of ``model`` to compressed-tensors' dequantization computed in float32."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    args = QuantizationArgs(**CT_SCHEMES["nvfp4"])
    for name, module in model.named_modules():
        if f"{name}.weight_packed" in tensors:
            packed = tensors[f"{name}.weight_packed"]
            codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
            weight = ct_dequantize(codes, tensors[f"{name}.weight_scale"].float(), args=args, dtype=torch.float32,
                                   global_scale=tensors[f"{name}.weight_global_scale"])
            with torch.no_grad():
                module.weight.copy_(weight)


def test_cli_export(tmp_path):
    model = _quantized(llama.init_model(TINY, jax.random.key(7)), "int4-g32-full")
    jq.save(model, tmp_path / "q")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert main(["export", str(tmp_path / "q"), "--format", "compressed-tensors", "--out", str(tmp_path / "busy")]) == 2
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert main(["export", str(tmp_path / "q"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    tokens = np.arange(8)[None]
    np.testing.assert_array_equal(np.asarray(jq.load(tmp_path / "ct")(tokens)), np.asarray(model(tokens)))


def test_export_refuses_unsupported(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        export_compressed_tensors(llama.init_model(TINY, jax.random.key(0)), tmp_path / "a")
    model = _quantized(llama.init_model(TINY, jax.random.key(0)), "nf4")
    with pytest.raises(ValueError, match="no compressed-tensors / GPTQ representation"):
        export_compressed_tensors(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()
