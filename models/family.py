"""``Family``: everything jquant needs to know about a model family, declared once.

A family module (``llama.py``, ``mamba.py``, ...) ends with one ``FAMILY = Family(...)``;
``jquant.models.registry`` finds it by name (``family("llama")``), by Hugging Face
``model_type`` (``"qwen3"``), by diffusers ``_class_name`` (``"AutoencoderKL"``) or by
model instance (``family_of(model)``), and ``jquant.checkpoint`` saves and loads through it.

The checkpoint protocol every family implements:

- ``model.config`` is a ``config_class`` instance with ``dtype`` and ``param_dtype`` fields
  (compute and storage dtype names);
- ``config_to_json(config) -> dict`` is what ``jquant.save`` writes into ``jquant.json``
  (strict JSON), and ``config_from_json(dict, *, dtype, param_dtype) -> config`` reads it back;
- ``abstract_model(config)`` is the model's structure with ``jax.ShapeDtypeStruct`` leaves
  (``jquant.load`` restores the orbax state into it), ``init_model(config, key)`` a random one.

Import and export are optional: ``from_hf(path, *, dtype, param_dtype)`` reads a Hugging Face
folder of one of ``hf_model_types``; ``to_hf(model, path, *, extra_files=None, overwrite=False)``
writes one (atomically; ``extra_files(folder)`` adds files first); ``from_diffusers(path, *, dtype,
param_dtype)`` reads a diffusers folder whose ``config.json`` names one of ``diffusers_class_names``, and
``to_diffusers(model, path, *, overwrite=False)`` writes one (atomically, ``config.json`` +
``diffusion_pytorch_model.safetensors``, readable by diffusers' ``from_pretrained``).
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

# The token embedding and the output head: the sites a language model's recipes leave in floating point.
LM_KEEP_FLOAT: tuple[str, ...] = ("embed_tokens", "lm_head")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Family:
    """The declaration of one model family (see the module docstring for the protocol of each callable).

    ``name`` is the family's name in checkpoint manifests; ``presets`` maps reference-model names to
    configs; ``keep_float`` holds regexes (matched against whole site paths) of the sites this family's
    models keep in floating point under a recipe; ``checkpoint_protocol`` says in a sentence what the
    manifest's ``config`` holds. Families compare by identity: each is declared once.
    """

    name: str
    config_class: type
    model_class: type[nnx.Module]
    init_model: Callable[..., nnx.Module]
    abstract_model: Callable[[Any], nnx.Module]
    config_to_json: Callable[[Any], dict]
    config_from_json: Callable[..., Any]
    checkpoint_protocol: str
    hf_model_types: tuple[str, ...] = ()
    diffusers_class_names: tuple[str, ...] = ()
    presets: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    from_hf: Callable[..., nnx.Module] | None = None
    to_hf: Callable[..., Any] | None = None
    from_diffusers: Callable[..., nnx.Module] | None = None
    to_diffusers: Callable[..., Any] | None = None
    keep_float: tuple[str, ...] = ()

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"Family name {self.name!r} must be lower-case letters, digits and '_' (it is written "
                             "into checkpoint manifests).")
        for field in ("hf_model_types", "diffusers_class_names", "keep_float"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        if self.hf_model_types and self.from_hf is None:
            raise ValueError(f"Family {self.name!r} declares hf_model_types {list(self.hf_model_types)} but no from_hf "
                             "to read them; pass from_hf or drop hf_model_types.")
        if self.diffusers_class_names and self.from_diffusers is None:
            raise ValueError(f"Family {self.name!r} declares diffusers_class_names {list(self.diffusers_class_names)} "
                             "but no from_diffusers to read them; pass from_diffusers or drop diffusers_class_names.")
        if self.to_diffusers is not None and not self.diffusers_class_names:
            raise ValueError(f"Family {self.name!r} has to_diffusers but declares no diffusers_class_names; name the "
                             "diffusers classes it writes.")
        for name, cfg in self.presets.items():
            if not isinstance(cfg, self.config_class):
                raise TypeError(f"Family {self.name!r}: preset {name!r} is a {type(cfg).__name__}, not a "
                                f"{self.config_class.__name__}.")
        object.__setattr__(self, "presets", types.MappingProxyType(dict(self.presets)))
        for pattern in self.keep_float:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"Family {self.name!r}: keep_float pattern {pattern!r} is invalid: {err}.") from None

    def __repr__(self) -> str:
        return f"Family({self.name!r}, {self.model_class.__name__})"
