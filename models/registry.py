"""Finding and loading models by name (bundled reference models) or by checkpoint folder.

A name resolves to ``jquant/assets/models/<name>`` (a Hugging Face folder, or a
``jquant.checkpoint`` folder for families without a Hugging Face export, shipped
with the package); anything else must be a path to such a folder
or to a single-file BlinkDL RWKV-6 checkpoint (``.pth`` / ``.safetensors``).
The family is picked from ``config.json``'s ``model_type``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flax import nnx
from transformers import PreTrainedTokenizerFast

from jquant.models import hf_io, llama, mamba, mamba2, moe
from jquant.models import rwkv6

DEFAULT_MODEL = "jq-llama-tiny"

_FAMILIES = {"llama": llama, "mistral": llama, "qwen2": llama, "qwen3": llama, "mamba": mamba, "mamba2": mamba2,
             "mixtral": moe, "qwen2_moe": moe, "qwen3_moe": moe}
# The families jquant.checkpoint saves and loads. Each module declares CHECKPOINT_FAMILY (the manifest's
# "family"), CHECKPOINT_MODEL (its model class), config_to_json(cfg) -> dict,
# config_from_json(dict, *, dtype, param_dtype) -> config and abstract_model(config).
CHECKPOINT_FAMILIES = (llama, rwkv6, mamba, mamba2, moe)
# The families with reference-model presets (each module has PRESETS: name -> config, and init_model(config, key)).
PRESET_FAMILIES = (llama, mamba, rwkv6, moe)


def preset(name: str):
    """``(family module, config)`` of a reference-model preset such as ``"jq-mamba-small"``."""
    for family in PRESET_FAMILIES:
        if name in family.PRESETS:
            return family, family.PRESETS[name]
    known = sorted(n for family in PRESET_FAMILIES for n in family.PRESETS)
    raise ValueError(f"unknown preset {name!r}; choose one of {known}.")


def family_of(model: nnx.Module, *, purpose: str = "handle"):
    """The ``CHECKPOINT_FAMILIES`` module whose model class ``model`` is (``purpose`` words the error)."""
    for family in CHECKPOINT_FAMILIES:
        if isinstance(model, family.CHECKPOINT_MODEL):
            return family
    known = ", ".join(f"{f.CHECKPOINT_MODEL.__name__} ({f.CHECKPOINT_FAMILY})" for f in CHECKPOINT_FAMILIES)
    raise TypeError(f"{purpose}: {type(model).__name__} is not a model family jquant knows how to {purpose}; "
                    f"known: {known}.")


def _bundled_dir() -> Path:
    import jquant

    return Path(jquant.__file__).resolve().parent / "assets" / "models"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A bundled model: its name, folder and the facts recorded when it was trained."""

    name: str
    path: Path
    info: dict


def list_models() -> list[ModelInfo]:
    """The reference models shipped with jquant (folders under ``jquant/assets/models``)."""
    root = _bundled_dir()
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if (folder / "config.json").is_file() or (folder / "jquant.json").is_file():
            info_file = folder / "reference_info.json"
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
            found.append(ModelInfo(name=folder.name, path=folder, info=info))
    return found


def resolve(name_or_path: str | Path) -> Path:
    """Folder of a bundled model name or an existing checkpoint path; a clear error otherwise."""
    candidate = _bundled_dir() / str(name_or_path)
    if isinstance(name_or_path, str) and "/" not in name_or_path and candidate.is_dir():
        return candidate
    path = Path(name_or_path)
    if path.is_dir() or path.is_file() and path.suffix in (".pth", ".safetensors"):
        return path
    names = [m.name for m in list_models()]
    raise ValueError(
        f"unknown model {str(name_or_path)!r}: not a bundled model ({', '.join(names) or 'none installed'}) "
        "and not a checkpoint folder or BlinkDL .pth/.safetensors file. "
        "Run `jquant list models` to see the bundled ones."
    )


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model: nnx.Module
    tokenizer: PreTrainedTokenizerFast | None
    path: Path


def load(name_or_path: str | Path, *, dtype: llama.DTypeName = "float32", param_dtype: llama.DTypeName | None = None) -> LoadedModel:
    """Load a model (and its tokenizer when the folder has one) by bundled name or path.

    A folder written by ``jquant.checkpoint.save`` (it has ``jquant.json``) is
    restored as saved, quantized or not; ``dtype`` options apply to Hugging
    Face folders.
    """
    path = resolve(name_or_path)
    if path.is_file():  # a BlinkDL RWKV-6 checkpoint: one file, no tokenizer
        model = rwkv6.from_blinkdl(path, dtype=dtype, param_dtype=param_dtype)
        return LoadedModel(model=model, tokenizer=None, path=path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path) if (path / "tokenizer.json").is_file() else None
    if (path / "jquant.json").is_file():  # a checkpoint written by jquant.checkpoint.save (possibly quantized)
        from jquant.checkpoint import load as load_checkpoint

        return LoadedModel(model=load_checkpoint(path), tokenizer=tokenizer, path=path)
    model_type = hf_io.read_config(path).get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported: {sorted(_FAMILIES)}.")
    model = _FAMILIES[model_type].from_hf(path, dtype=dtype, param_dtype=param_dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path)
