"""Flax NNX model families (imported as ``jquant.models``).

``jquant.models.load(name_or_path)`` loads a bundled reference model or any
supported Hugging Face checkpoint folder; ``jquant.models.llama`` is the
Llama/Mistral/Qwen2/Qwen3 family, ``jquant.models.rwkv6`` RWKV-6 (Finch),
``jquant.models.mamba`` / ``mamba2`` the Mamba-1 / Mamba-2 state-space families, ``jquant.models.moe`` the
mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-MoE routing).
"""

from jquant.models import llama as llama
from jquant.models import rwkv6 as rwkv6
from jquant.models import mamba as mamba
from jquant.models import mamba2 as mamba2
from jquant.models import moe as moe
from jquant.models.registry import DEFAULT_MODEL as DEFAULT_MODEL
from jquant.models.registry import LoadedModel as LoadedModel
from jquant.models.registry import ModelInfo as ModelInfo
from jquant.models.registry import list_models as list_models
from jquant.models.registry import load as load
from jquant.models.registry import resolve as resolve

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelInfo", "list_models", "llama", "load", "mamba", "mamba2", "moe", "resolve", "rwkv6"]
