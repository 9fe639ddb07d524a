"""``load_quantized(folder)``: a compressed-tensors or GPTQ checkpoint folder as a quantized jquant model.

A folder is recognised by ``config.json``'s ``quantization_config.quant_method`` ("compressed-tensors" or
"gptq"), or by a ``quantize_config.json`` beside it (older AutoGPTQ folders). ``jquant.load`` comes here for
folders without a ``jquant.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flax import nnx

from jquant.interop import ct_import, gptq_import
from jquant.interop.hf_model import build_quantized
from jquant.interop.packing import read_folder_tensors

AUTOGPTQ_CONFIG = "quantize_config.json"


def _config(folder: Path) -> dict | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or re-download the file.") from None


def quantized_checkpoint_kind(path: str | os.PathLike) -> str | None:
    """``"compressed-tensors"``, ``"gptq"`` or None (not a quantized checkpoint folder jquant reads)."""
    folder = Path(path)
    config = _config(folder) if folder.is_dir() else None
    if config is None:
        return None
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method is None and (folder / AUTOGPTQ_CONFIG).is_file():
        return "gptq"
    return method if method in ("compressed-tensors", "gptq") else None


def load_quantized(path: str | os.PathLike, *, dtype: str = "float32") -> nnx.Module:
    """The quantized model of a compressed-tensors or GPTQ folder (``dtype``: the compute dtype)."""
    folder = Path(path).absolute()
    kind = quantized_checkpoint_kind(folder)
    if kind is None:
        raise ValueError(f"{folder} is not a compressed-tensors or GPTQ checkpoint (config.json has no "
                         "quantization_config with quant_method 'compressed-tensors' or 'gptq').")
    config = _config(folder)
    tensors = read_folder_tensors(folder)
    source = str(folder)
    if kind == "compressed-tensors":
        floats, linears, activations = ct_import.read(config, tensors, source)
    else:
        qc = config.get("quantization_config") or json.loads((folder / AUTOGPTQ_CONFIG).read_text())
        floats, linears = gptq_import.read(qc, tensors, source)
        activations = {}
    hf_config = {k: v for k, v in config.items() if k != "quantization_config"}
    return build_quantized(hf_config, floats, linears, activations, source=source, recipe_name=f"{kind} import",
                           dtype=dtype)
