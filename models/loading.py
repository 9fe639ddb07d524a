"""Loading models by name (bundled reference models) or by checkpoint folder.

A name resolves to a folder of the ``jquant_models`` data package (``packages/jquant-models`` in the
repository: a Hugging Face folder, or a ``jquant.checkpoint`` folder for families without a Hugging Face
export), installed beside the library so its wheel stays small; anything else must be a
path to such a folder or to a single-file BlinkDL RWKV-6 checkpoint (``.pth`` / ``.safetensors``).
The family of a Hugging Face folder is picked from ``config.json``'s ``model_type`` (diffusers folders:
``_class_name``) through ``jquant.models.registry``. This module sits above ``jquant.checkpoint`` (it
loads jquant folders with it); the registry sits below it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from flax import nnx

from jquant.models.registry import family_for_diffusers_class, family_for_model_type

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_MODEL = "jq-llama-tiny"
DTypeName = Literal["float32", "bfloat16", "float16", "float64"]


INSTALL_MODELS = "pip install ./packages/jquant-models (from the jquant repository)"


def _bundled_dir() -> Path | None:
    """The folder of the installed ``jquant_models`` data package (None when it is not installed)."""
    spec = importlib.util.find_spec("jquant_models")
    return None if spec is None or spec.origin is None else Path(spec.origin).resolve().parent


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A bundled model: its name, folder and the facts recorded when it was trained."""

    name: str
    path: Path
    info: dict


def list_models() -> list[ModelInfo]:
    """The reference models shipped with jquant (folders of the ``jquant_models`` data package: model folders and
    text-to-image pipeline folders; none when the package is not installed)."""
    root = _bundled_dir()
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root is not None else []:
        if any((folder / marker).is_file() for marker in ("config.json", "jquant.json", "pipeline.json")):
            info_file = folder / "reference_info.json"
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
            found.append(ModelInfo(name=folder.name, path=folder, info=info))
    return found


def bundled_model(name: str) -> bool:
    """Whether ``name`` is the name of a bundled model (a folder of the installed models package)."""
    root = _bundled_dir()
    return root is not None and isinstance(name, str) and "/" not in name and (root / name).is_dir()


def resolve(name_or_path: str | Path) -> Path:
    """Folder of a bundled model name or an existing checkpoint path; a clear error otherwise."""
    root = _bundled_dir()
    if root is not None and isinstance(name_or_path, str) and "/" not in name_or_path and (root / name_or_path).is_dir():
        return root / name_or_path
    path = Path(name_or_path)
    if path.is_dir() or path.is_file() and path.suffix in (".pth", ".safetensors"):
        return path
    names = [m.name for m in list_models()]
    bundled = ", ".join(names) if names else f"none installed: {INSTALL_MODELS}"
    raise ValueError(
        f"unknown model {str(name_or_path)!r}: not a bundled model ({bundled}) "
        "and not a checkpoint folder or BlinkDL .pth/.safetensors file. "
        "Run `jquant list models` to see the bundled ones."
    )


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A loaded model, its tokenizer (None when the folder has none) and where it came from."""

    model: nnx.Module
    tokenizer: PreTrainedTokenizerFast | None
    path: Path


def load(name_or_path: str | Path, *, dtype: DTypeName = "float32", param_dtype: DTypeName | None = None) -> LoadedModel:
    """Load a model (and its tokenizer when the folder has one) by bundled name or path.

    A folder written by ``jquant.checkpoint.save`` (it has ``jquant.json``) is
    restored as saved, quantized or not; ``dtype`` options apply to Hugging
    Face folders.
    """
    from transformers import PreTrainedTokenizerFast

    from jquant.models import hf_io

    path = resolve(name_or_path)
    if path.is_file():  # a BlinkDL RWKV-6 checkpoint: one file, no tokenizer
        from jquant.models import rwkv6

        model = rwkv6.from_blinkdl(path, dtype=dtype, param_dtype=param_dtype)
        return LoadedModel(model=model, tokenizer=None, path=path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path) if (path / "tokenizer.json").is_file() else None
    if (path / "pipeline.json").is_file():
        raise ValueError(f"{path} is a text-to-image pipeline (text encoder, transformer and VAE), not one model; "
                         "load it with jquant.text_to_image.load_pipeline, or load one part, e.g. "
                         f"jquant.models.load('{path}/transformer').")
    if (path / "jquant.json").is_file():  # a checkpoint written by jquant.checkpoint.save (possibly quantized)
        from jquant.checkpoint import load as load_checkpoint

        return LoadedModel(model=load_checkpoint(path), tokenizer=tokenizer, path=path)
    from jquant.interop import load_quantized, quantized_checkpoint_kind

    if quantized_checkpoint_kind(path):  # a compressed-tensors or GPTQ checkpoint: QArrays from its packed codes
        return LoadedModel(model=load_quantized(path, dtype=dtype), tokenizer=tokenizer, path=path)
    config = hf_io.read_config(path)
    diffusers = "_class_name" in config  # diffusers folders name their class, transformers folders their model_type
    try:
        found = (family_for_diffusers_class(config["_class_name"]) if diffusers
                 else family_for_model_type(config.get("model_type")))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    read = found.from_diffusers if diffusers else found.from_hf
    model = read(path, dtype=dtype, param_dtype=param_dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path)
