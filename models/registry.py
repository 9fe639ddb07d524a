"""The model families jquant knows, declared once each (``jquant.models.family.Family``).

Families are looked up lazily: ``_FAMILY_MODULES`` maps each family's name to the module that declares
its ``FAMILY``, and a module is imported on first use, so importing this registry imports no family.
A new family is one line there; a family declared elsewhere (a user's model, a test fixture) is added
with ``register``. Loading models by name or folder is ``jquant.models.loading``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flax import nnx

if TYPE_CHECKING:
    from jquant.models.family import Family

# Family name (as written in checkpoint manifests) -> the module whose ``FAMILY`` declares it.
_FAMILY_MODULES: dict[str, str] = {
    "llama": "jquant.models.llama",
    "moe": "jquant.models.moe",
    "mamba": "jquant.models.mamba",
    "mamba2": "jquant.models.mamba2",
    "rwkv6": "jquant.models.rwkv6",
    "image_classifier": "jquant.models.image_classifier",
    "sd3": "jquant.models.sd3",
    "flux": "jquant.models.flux",
    "vae": "jquant.models.vae",
    "hunyuan_video_vae": "jquant.models.hunyuan_video_vae",
    "hunyuan_video": "jquant.models.hunyuan_video",
    "cogvideox_vae": "jquant.models.cogvideox_vae",
    "cogvideox": "jquant.models.cogvideox",
    "wan": "jquant.models.wan",
    "wan_vae": "jquant.models.wan_vae",
    "qwen2_vl": "jquant.models.qwen2_vl",
    "mar": "jquant.models.mar",
    "ecar": "jquant.models.ecar",
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
