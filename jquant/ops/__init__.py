"""The compute boundary of jquant.

Every matmul and attention a model performs goes through this package, so that
quantized weights (QArrays), quantized activations and Pallas kernels plug in
here without touching model code. ``dispatch`` picks the implementation of each
quantized matmul (a Pallas kernel where the measured table says it wins, else XLA).
``lora_linear`` is the adapted linear of integer LoRA fine-tuning (``quantized_matmul``:
quantize-compute-dequantize GEMMs in group-shared-exponent integers). ``ssm`` and ``wkv``
hold the recurrences of the Mamba and RWKV families (their counterpart of attention); ``experts``
the routing and grouped matmuls of mixture-of-experts layers. ``conv`` is the 1-D/2-D/3-D
convolution on a ``[K C_in, C_out]`` matrix weight (``conv_patches``: its im2col rows), ``mask`` the
static attention-mask descriptions ``attention`` accepts besides dense arrays (with block layouts
for block-sparse kernels), ``local_attention`` DiTFastAttn's head-wise windows and arrows over joint text +
image sequences (computing only the allowed pairs), and ``rope`` rotary embeddings over position tuples (1-D, M-RoPE, 3-D, Flux).
``dispatch`` is keyed by op (linear, grouped_matmul, conv, attention).
"""

from jquant.ops.attention import attention as attention
from jquant.ops.attention import attention_quantized_past as attention_quantized_past
from jquant.ops.attention import causal_mask as causal_mask
from jquant.ops.attention import quantize_kv as quantize_kv
from jquant.ops.conv import conv as conv
from jquant.ops.conv import conv_patches as conv_patches
from jquant.ops.conv import conv_weight_matrix as conv_weight_matrix
from jquant.ops.dispatch import explain as explain
from jquant.ops.dispatch import force_path as force_path
from jquant.ops.dispatch import record_dispatch as record_dispatch
from jquant.ops.experts import grouped_matmul as grouped_matmul
from jquant.ops.experts import quantize_expert_activations as quantize_expert_activations
from jquant.ops.linear import as_array as as_array
from jquant.ops.linear import dot_general as dot_general
from jquant.ops.linear import embedding_lookup as embedding_lookup
from jquant.ops.linear import linear as linear
from jquant.ops.local_attention import local_attention as local_attention
from jquant.ops.local_attention import local_attention_reference as local_attention_reference
from jquant.ops.local_attention import local_attention_table as local_attention_table
from jquant.ops.lora import LoRAArithmetic as LoRAArithmetic
from jquant.ops.mask import And as And
from jquant.ops.mask import Arrow as Arrow
from jquant.ops.mask import Band as Band
from jquant.ops.mask import Causal as Causal
from jquant.ops.mask import Full as Full
from jquant.ops.mask import Mask as Mask
from jquant.ops.mask import Padding as Padding
from jquant.ops.mask import SlidingWindow as SlidingWindow
from jquant.ops.lora import lora_linear as lora_linear
from jquant.ops.quantized_gemm import quantized_matmul as quantized_matmul
from jquant.ops.rope import apply_rope as apply_rope
from jquant.ops.rope import inverse_frequencies as inverse_frequencies
from jquant.ops.rope import rope_angles as rope_angles
from jquant.ops.rope import rope_cos_sin as rope_cos_sin
from jquant.ops.rotation import block_hadamard as block_hadamard
from jquant.ops.rotation import online_hadamard as online_hadamard
from jquant.ops.ssm import causal_conv1d as causal_conv1d
from jquant.ops.ssm import selective_scan as selective_scan
from jquant.ops.ssm import selective_scan_quantized as selective_scan_quantized
from jquant.ops.ssm import selective_scan_recurrent as selective_scan_recurrent
from jquant.ops.ssm import selective_scan_state_absmax as selective_scan_state_absmax
from jquant.ops.ssm import ssm_matmul as ssm_matmul
from jquant.ops.ssm import ssd_chunked as ssd_chunked
from jquant.ops.ssm import ssd_recurrent as ssd_recurrent
from jquant.ops.vector import polar_linear as polar_linear
from jquant.ops.wkv import wkv6_chunked as wkv6_chunked
from jquant.ops.wkv import wkv6_recurrent as wkv6_recurrent

__all__ = ["And", "apply_rope", "Arrow", "as_array", "attention", "attention_quantized_past", "Band", "Causal",
           "causal_conv1d", "causal_mask", "conv", "conv_patches", "conv_weight_matrix", "dot_general",
           "embedding_lookup", "explain", "force_path", "Full", "grouped_matmul", "inverse_frequencies", "linear",
           "local_attention", "local_attention_reference", "local_attention_table",
           "lora_linear", "LoRAArithmetic", "Mask", "online_hadamard", "block_hadamard", "Padding", "polar_linear",
           "quantize_expert_activations", "quantize_kv", "quantized_matmul", "record_dispatch", "rope_angles",
           "rope_cos_sin", "selective_scan", "selective_scan_quantized", "selective_scan_recurrent",
           "selective_scan_state_absmax", "SlidingWindow",
           "ssd_chunked", "ssd_recurrent", "ssm_matmul", "wkv6_chunked", "wkv6_recurrent"]
