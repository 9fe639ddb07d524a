"""Quantized checkpoints of the PyTorch ecosystem, in and out.

    export_compressed_tensors(qmodel, "out/")   # compressed-tensors folder: transformers / vLLM serve it
    model = load_quantized("folder/")          # compressed-tensors or GPTQ (qweight/qzeros/scales/g_idx) folder

Modules: ``packing`` (dense int32 packing, a safetensors reader that knows FP8), ``codes`` (one quantized
linear in PyTorch layout <-> QArray), ``hf_model`` (Hugging Face names of a model's linears; building the
quantized model), ``ct_export`` / ``ct_import`` (compressed-tensors), ``gptq_import`` (GPTQ checkpoints).
``jquant.load`` reads such folders through ``load_quantized``.
"""

from jquant.interop.ct_export import export_compressed_tensors as export_compressed_tensors
from jquant.interop.loading import load_quantized as load_quantized, quantized_checkpoint_kind as quantized_checkpoint_kind

__all__ = ["export_compressed_tensors", "load_quantized", "quantized_checkpoint_kind"]
