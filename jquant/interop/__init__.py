"""Quantized checkpoints of the PyTorch ecosystem, in and out.

    export_compressed_tensors(qmodel, "out/")   # compressed-tensors folder: transformers / vLLM serve it
    model = load_quantized("folder/")          # compressed-tensors or GPTQ (qweight/qzeros/scales/g_idx) folder

Modules: ``packing`` (dense int32 packing, a safetensors reader that knows FP8), ``codes`` (one quantized
linear in PyTorch layout <-> QArray), ``hf_model`` (Hugging Face names of a model's linears; building the
quantized model), ``ct_export`` / ``ct_import`` (compressed-tensors), ``gptq_import`` (GPTQ checkpoints).
``jquant.load`` reads such folders through ``load_quantized``.
"""

import importlib

_LAZY = {"export_compressed_tensors": "jquant.interop.ct_export", "load_quantized": "jquant.interop.loading",
         "quantized_checkpoint_kind": "jquant.interop.loading"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    """The public functions, imported on first use (the CLI imports ``interop.command`` without JAX)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jquant.interop' has no attribute {name!r}")
