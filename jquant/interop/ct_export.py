"""Export a quantized Llama-family / MoE model as a compressed-tensors checkpoint (transformers, vLLM).

The folder is a Hugging Face checkpoint (``config.json`` + safetensors + tokenizer) whose quantized linears
hold compressed tensors and whose ``config.json`` has the ``quantization_config`` compressed-tensors reads
(``quant_method: "compressed-tensors"``, ``config_groups``, ``format``, ``ignore``). Per linear ``W [out, in]``
(``s``: scales ``[out, in / G]``, ``[out, 1]`` or ``[1]``; codes ``q``):

  ``pack-quantized``        integer weights, no activation quantization: ``weight_packed`` int32
                            ``[out, ceil(in b / 32)]`` (codes + 2^(b-1) packed densely, ``interop.packing``),
                            ``weight_scale``, ``weight_shape``, and for asymmetric formats ``weight_zero_point``
                            (zero point - 2^(b-1), packed along ``out``); ``W = (q - z) s``
  ``int-quantized``         integer weights with integer activations (W8A8): ``weight`` int8 codes,
                            ``weight_scale`` (+ ``weight_zero_point`` int8); ``input_scale`` when static
  ``float-quantized``       FP8 E4M3 weights: ``weight`` float8_e4m3fn, ``weight_scale`` float32
  ``nvfp4-pack-quantized``  NVFP4: ``weight_packed`` uint8 ``[out, in / 2]`` (E2M1, element 2i in the low
                            nibble), ``weight_scale`` float8_e4m3fn ``[out, in / 16]``, ``weight_global_scale``
                            ``1 / t`` (jquant's tensor scale ``t``; compressed-tensors divides by it)

Scales keep their stored dtype (jquant's integer formats: float16), so compressed-tensors' decompression
(which computes in the scale's dtype) reproduces jquant's dequantized weights exactly in that dtype.
Symmetric formats of either range export (restricted-range codes are a subset of the full range).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx

from jquant.formats import FP8Format, IntFormat, NVFP4Format, QArray
from jquant.formats.qarray import Format
from jquant.interop.codes import LinearCodes, check_supported, linear_codes
from jquant.interop.hf_model import family_module, float_tensors, site_names
from jquant.interop.packing import pack_int32

E4M3_MAX, E2M1_MAX = 448.0, 6.0
_STRATEGY = {"group": "group", "channel": "channel", "token": "channel", "tensor": "tensor"}


def _args(num_bits: int, kind: str, symmetric: bool, strategy: str, group_size: int | None = None,
          dynamic: bool | str = False, scale_dtype: str | None = None, zp_dtype: str | None = None) -> dict:
    """A ``QuantizationArgs`` dict as compressed-tensors serialises it."""
    return {"num_bits": num_bits, "type": kind, "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "block_structure": None, "dynamic": dynamic, "actorder": None,
            "scale_dtype": scale_dtype, "zp_dtype": zp_dtype, "observer": None if dynamic else "minmax",
            "observer_kwargs": {}}


def weight_args(fmt: Format) -> dict:
    """The ``weights`` quantization args of a jquant weight format."""
    if isinstance(fmt, IntFormat):
        return _args(fmt.bits, "int", fmt.symmetric, _STRATEGY[fmt.granularity], fmt.group_size,
                     zp_dtype=None if fmt.symmetric else "torch.int8")
    if isinstance(fmt, FP8Format):
        return _args(8, "float", True, _STRATEGY[fmt.granularity], fmt.group_size)
    return _args(4, "float", True, "tensor_group", 16, scale_dtype="torch.float8_e4m3fn")


def activation_args(fmt: Format, static: bool, where: str) -> dict:
    """The ``input_activations`` args of a jquant activation format (dynamic per token, or static per tensor)."""
    if isinstance(fmt, IntFormat) and fmt.granularity in ("channel", "token") and not static:
        return _args(fmt.bits, "int", fmt.symmetric, "token", dynamic=True)
    if isinstance(fmt, IntFormat) and fmt.granularity == "tensor" and static and fmt.symmetric:
        return _args(fmt.bits, "int", True, "tensor")
    if isinstance(fmt, FP8Format) and fmt.element == "e4m3" and fmt.granularity in ("channel", "token"):
        return _args(8, "float", True, "token", dynamic=True)
    if isinstance(fmt, NVFP4Format) and fmt.tensor_amax is not None:
        return _args(4, "float", True, "tensor_group", 16, dynamic="local", scale_dtype="torch.float8_e4m3fn")
    raise ValueError(f"{where}: inputs quantized with {fmt.name}{' (static)' if static else ''} have no "
                     "compressed-tensors scheme; exportable: int per token (dynamic), symmetric int per tensor "
                     "(static), fp8-e4m3 per token, nvfp4 with a calibrated tensor_amax.")


def checkpoint_format(fmt: Format, act: Format | None) -> str:
    """The compressed-tensors format name of a (weight, activation) pair."""
    if isinstance(fmt, NVFP4Format):
        return "nvfp4-pack-quantized"
    if isinstance(fmt, FP8Format):
        return "float-quantized"
    return "pack-quantized" if act is None else "int-quantized"


def compress(codes: LinearCodes, form: str) -> dict[str, np.ndarray]:
    """The compressed tensors of one linear (local names: ``weight_packed``, ``weight_scale`` ...)."""
    fmt, out = codes.format, {}
    if isinstance(fmt, IntFormat):
        offset = 1 << (fmt.bits - 1)
        signed = codes.codes if fmt.symmetric else codes.codes - offset  # compressed-tensors' codes are signed
        if form == "pack-quantized":
            out["weight_packed"] = pack_int32(signed + offset, fmt.bits, axis=1)
            out["weight_shape"] = np.asarray(codes.shape, np.int64)
        else:
            out["weight"] = signed.astype(np.int8)
        out["weight_scale"] = codes.scales
        if not fmt.symmetric:
            packed_zp = form == "pack-quantized" and fmt.granularity != "tensor"
            out["weight_zero_point"] = (pack_int32(codes.zeros, fmt.bits, axis=0) if packed_zp
                                        else (codes.zeros.astype(np.int32) - offset).astype(np.int8))
        return out
    if isinstance(fmt, FP8Format):
        return {"weight": codes.codes.astype(ml_dtypes.float8_e4m3fn), "weight_scale": codes.scales}
    pairs = codes.codes.astype(np.uint8).reshape(codes.shape[0], -1, 2)
    t = np.float32(1.0) if codes.tensor_scale is None else codes.tensor_scale
    return {"weight_packed": pairs[..., 0] | (pairs[..., 1] << 4),
            "weight_scale": codes.scales.view(ml_dtypes.float8_e4m3fn),
            "weight_global_scale": np.reshape(np.float32(1.0) / t, (1,)).astype(np.float32)}


def _module_activation(site, expert: int | None) -> Format | None:
    act = getattr(site.module, "activation", None)
    return act[expert] if isinstance(act, tuple) else act


def quantized_tensors(model: nnx.Module) -> tuple[dict[str, np.ndarray], dict]:
    """Hugging Face-named tensors of ``model`` (compressed where quantized) and its ``quantization_config``."""
    from jquant.models.registry import family_of

    family = family_of(model, purpose="export").name
    family_module(family)
    report = getattr(model, "quantization", None)
    if report is None:
        raise ValueError("export: the model is not quantized (no `quantization` report); quantize it with "
                         "jquant.quantize first, or export the float model with its family's to_hf.")
    if report.recipe.online_rotations or report.recipe.kv_cache is not None:
        raise ValueError(f"export: recipe {report.recipe.name!r} uses online rotations or a quantized KV cache, "
                         "which compressed-tensors checkpoints cannot carry; export a model quantized without them.")
    tensors = float_tensors(model, family)
    groups: dict[str, dict] = {}
    ignore = []
    for site, name in site_names(model, family):
        value = site.weight.get_value()
        experts = range(value.shape[0]) if "{e}" in name else [None]
        for e in experts:
            module = name if e is None else name.format(e=e)
            if not isinstance(value, QArray):
                if site.spec.kind in ("linear", "experts"):
                    ignore.append(module)
                continue
            check_supported(value.format, site.path)
            act = _module_activation(site, e)
            static = getattr(site.module, "activation_scale", None) is not None
            form = checkpoint_format(value.format, act)
            scheme = {"targets": [], "weights": weight_args(value.format), "format": form, "output_activations": None,
                      "input_activations": None if act is None else activation_args(act, static, site.path)}
            del tensors[module + ".weight"]
            compressed = compress(linear_codes(value, e), form)
            if static:
                compressed["input_scale"] = np.asarray(site.module.activation_scale.get_value(), np.float32).reshape(1)
            if isinstance(act, NVFP4Format):
                compressed["input_global_scale"] = np.full((1,), E4M3_MAX * E2M1_MAX / act.tensor_amax, np.float32)
            tensors.update({f"{module}.{k}": v for k, v in compressed.items()})
            key = json.dumps(scheme, sort_keys=True)
            groups.setdefault(key, scheme)["targets"].append(module)
    schemes = list(groups.values())
    if len(schemes) == 1:
        schemes[0]["targets"] = ["Linear"]  # every linear not in `ignore`
    formats = {s["format"] for s in schemes}
    config = {"quant_method": "compressed-tensors", "quantization_status": "compressed",
              "format": formats.pop() if len(formats) == 1 else "mixed-precision",
              "config_groups": {f"group_{i}": s for i, s in enumerate(schemes)}, "ignore": sorted(ignore),
              "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
              "transform_config": {}}
    return tensors, config


def export_compressed_tensors(model: nnx.Module, path: str | os.PathLike, *, tokenizer=None, overwrite: bool = False,
                              max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write quantized ``model`` (Llama family or MoE) to ``path`` as a compressed-tensors checkpoint folder.

    ``path`` must be new or an empty folder; ``overwrite=True`` replaces a folder jquant wrote
    (``jquant.atomic``). The tokenizer, when given, is saved beside the weights.
    """
    from jquant.models import hf_io
    from jquant.models.registry import family_of

    tensors, quantization_config = quantized_tensors(model)
    config = {**family_of(model).config_to_json(model.config), "quantization_config": quantization_config}
    extra = None if tokenizer is None else tokenizer.save_pretrained
    return hf_io.write_checkpoint(path, config, tensors, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                                  extra_files=extra)
