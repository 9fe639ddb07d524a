"""What a quantized tensor is: ``QArray`` and its formats.

Formats: uniform integers (``IntFormat``), scaled FP8 (``FP8Format``), NVFP4
(``NVFP4Format``), OCP MX (``MXFormat``: MXFP4/6/8, MXINT8), group-shared-exponent
integers (``GSEFormat``), QLoRA's NormalFloat (``NF4Format``), codebooks (``CodebookFormat`` + ``codebook_quantize``) and PCDVQ's
polar direction x magnitude vectors (``PolarVQFormat``).

    q = quantize(w, get_format("int4-g128"), axis=0)   # w: [in, out]
    w_hat = dequantize(q)                                # original dtype
    bits_per_element(q)                                  # 4.125 (codes + fp16 scales)
"""

from jquant.formats.api import (bits_per_element as bits_per_element,
                                check_finite as check_finite,
                                dequantize as dequantize,
                                fake_quantize as fake_quantize,
                                quantize as quantize,
                                unpack_codes as unpack_codes)
from jquant.formats.codebook import (CodebookFormat as CodebookFormat,
                                     codebook_quantize as codebook_quantize)
from jquant.formats.experts import ExpertPartition as ExpertPartition, stack_experts as stack_experts
from jquant.formats.fp8 import FP8Format as FP8Format
from jquant.formats.gse import GSEFormat as GSEFormat
from jquant.formats.integer import IntFormat as IntFormat
from jquant.formats.minmax import MinMaxFormat as MinMaxFormat
from jquant.formats.mx import MXFormat as MXFormat
from jquant.formats.nf4 import NF4Format as NF4Format
from jquant.formats.nvfp4 import NVFP4Format as NVFP4Format
from jquant.formats.polar import PolarVQFormat as PolarVQFormat
from jquant.formats.packing import (pack_bits as pack_bits,
                                    packed_length as packed_length,
                                    unpack_bits as unpack_bits)
from jquant.formats.qarray import Format as Format, QArray as QArray
from jquant.formats.registry import FORMATS as FORMATS, get_format as get_format

__all__ = [
    "QArray", "Format", "IntFormat", "FP8Format", "NVFP4Format", "MXFormat", "GSEFormat", "NF4Format",
    "CodebookFormat", "PolarVQFormat", "quantize", "dequantize", "fake_quantize", "codebook_quantize",
    "bits_per_element", "unpack_codes", "check_finite", "pack_bits", "unpack_bits",
    "packed_length", "FORMATS", "get_format", "ExpertPartition", "stack_experts",
]
