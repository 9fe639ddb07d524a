"""The model families jquant knows, and finding and loading models by name or checkpoint folder.

Families are looked up lazily: ``_FAMILY_MODULES`` maps each family's name to the module that declares
its ``FAMILY`` (``jquant.models.family.Family``), and a module is imported on first use, so importing this
registry imports no family. A new family is one line there.

A model name resolves to ``jquant/assets/models/<name>`` (a Hugging Face folder, or a
``jquant.checkpoint`` folder for families without a Hugging Face export, shipped
with the package); anything else must be a path to such a folder
or to a single-file BlinkDL RWKV-6 checkpoint (``.pth`` / ``.safetensors``).
The family of a Hugging Face folder is picked from ``config.json``'s ``model_type``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flax import nnx

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from jquant.models.family import Family

DEFAULT_MODEL = "jq-llama-tiny"
DTypeName = Literal["float32", "bfloat16", "float16", "float64"]

# Family name (as written in checkpoint manifests) -> the module whose ``FAMILY`` declares it.
_FAMILY_MODULES: dict[str, str] = {
    "llama": "jquant.models.llama",
    "moe": "jquant.models.moe",
    "mamba": "jquant.models.mamba",
    "mamba2": "jquant.models.mamba2",
    "rwkv6": "jquant.models.rwkv6",
}


# Families declared outside jquant's own modules (a user's model, a test fixture), added with ``register``.
_REGISTERED: dict[str, Family] = {}


def register(declared: Family) -> Family:
    """Make a family declared outside jquant known to ``jquant.save`` / ``load`` and the lookups below.

    Registering the same declaration again is a no-op; another family under a taken name is refused.
    """
    taken = _REGISTERED.get(declared.name) or (family(declared.name) if declared.name in _FAMILY_MODULES else None)
    if taken is not None and taken is not declared:
        raise ValueError(f"a model family named {declared.name!r} is already registered ({taken!r}); "
                         "give yours another name.")
    _REGISTERED[declared.name] = declared
    return declared


def family(name: str) -> Family:
    """The family called ``name`` (a checkpoint manifest's ``family``); imports its module on first use."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _FAMILY_MODULES:
        known = sorted({*_FAMILY_MODULES, *_REGISTERED})
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(known)} (families of your own are "
                         "added with jquant.models.registry.register).")
    declared = importlib.import_module(_FAMILY_MODULES[name]).FAMILY
    if declared.name != name:
        raise RuntimeError(f"{_FAMILY_MODULES[name]}.FAMILY is named {declared.name!r}, but the registry lists it as "
                           f"{name!r}; make the two agree.")
    return declared


def families() -> tuple[Family, ...]:
    """Every family: jquant's in registry order (imports all family modules), then registered ones."""
    return tuple(family(name) for name in _FAMILY_MODULES) + tuple(_REGISTERED.values())


def family_for_model_type(model_type: str | None) -> Family:
    """The family that reads Hugging Face folders whose ``config.json`` has ``model_type``."""
    known = {t: f for f in families() for t in f.hf_model_types}
    if model_type not in known:
        raise ValueError(f"Hugging Face model_type {model_type!r} is not supported; supported: {sorted(known)}.")
    return known[model_type]


def family_for_diffusers_class(class_name: str | None) -> Family:
    """The family that reads diffusers folders whose ``config.json`` has ``_class_name``."""
    known = {c: f for f in families() for c in f.diffusers_class_names}
    if class_name not in known:
        raise ValueError(f"diffusers _class_name {class_name!r} is not supported; supported: "
                         f"{sorted(known) or 'none yet'}.")
    return known[class_name]


def family_of(model: nnx.Module, *, purpose: str = "handle") -> Family:
    """The family whose ``model_class`` ``model`` is an instance of (``purpose`` words the error: "save")."""
    for candidate in families():
        if isinstance(model, candidate.model_class):
            return candidate
    known = ", ".join(f"{f.model_class.__name__} ({f.name})" for f in families())
    raise TypeError(f"{purpose}: {type(model).__name__} is not a model family jquant knows how to {purpose}; "
                    f"known: {known}.")


def preset(name: str) -> tuple[Family, Any]:
    """``(family, config)`` of a reference-model preset such as ``"jq-mamba-small"``."""
    for candidate in families():
        if name in candidate.presets:
            return candidate, candidate.presets[name]
    known = sorted(n for f in families() for n in f.presets)
    raise ValueError(f"unknown preset {name!r}; choose one of {known}.")


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
    if (path / "jquant.json").is_file():  # a checkpoint written by jquant.checkpoint.save (possibly quantized)
        from jquant.checkpoint import load as load_checkpoint

        return LoadedModel(model=load_checkpoint(path), tokenizer=tokenizer, path=path)
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
