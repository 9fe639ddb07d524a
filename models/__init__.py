"""Flax NNX model families (imported as ``jquant.models``).

``jquant.models.load(name_or_path)`` loads a bundled reference model or any
supported Hugging Face checkpoint folder; ``jquant.models.llama`` is the
Llama/Mistral/Qwen2/Qwen3 family, ``jquant.models.rwkv6`` RWKV-6 (Finch),
``jquant.models.mamba`` / ``mamba2`` the Mamba-1 / Mamba-2 state-space families, ``jquant.models.moe`` the
mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-MoE routing). Each family module
declares one ``FAMILY`` (``jquant.models.family.Family``); ``jquant.models.registry`` finds them. Family
modules are imported on first attribute access (``jquant.models.mamba``), not with this package.
"""

import importlib

from jquant.models.loading import DEFAULT_MODEL as DEFAULT_MODEL
from jquant.models.loading import LoadedModel as LoadedModel
from jquant.models.loading import ModelInfo as ModelInfo
from jquant.models.loading import list_models as list_models
from jquant.models.loading import load as load
from jquant.models.loading import resolve as resolve

_LAZY_FAMILIES = ("llama", "mamba", "mamba2", "moe", "rwkv6")
__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelInfo", "list_models", "load", "resolve", *_LAZY_FAMILIES]


def __getattr__(name: str):
    if name in _LAZY_FAMILIES:
        return importlib.import_module(f"jquant.models.{name}")
    raise AttributeError(f"module 'jquant.models' has no attribute {name!r}")
