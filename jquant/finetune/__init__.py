"""Integer LoRA fine-tuning (GSQ-Tuning) and its 16-bit / QLoRA baselines; tuning of quantized scales.

    base = jq.quantize(model, nf4_recipe)                      # frozen NF4 base (QLoRA)
    arith = LoRAArithmetic(operands=GSEFormat(bits=8))          # every GEMM in GSE-INT8
    # or FP8Arithmetic(saved="quantized"): per-tensor E4M3 forward / E5M2 gradients (the FP8 baseline)
    model = add_lora(base, LoRAConfig(rank=64, arithmetic=arith), key=key)
    tuned, history = finetune(model, batches, FinetuneConfig(steps=300))

and end-to-end tuning of a quantized model's scales and norm gains, codes frozen (QuIP# / PCDVQ §3.6):

    tuned = tune_continuous(quantized, float_model, calib_windows, ContinuousTuneConfig(steps=100)).model
"""

from jquant.finetune.continuous import ContinuousTuneConfig as ContinuousTuneConfig
from jquant.finetune.continuous import ContinuousTuneResult as ContinuousTuneResult
from jquant.finetune.continuous import tunable_paths as tunable_paths
from jquant.finetune.continuous import tune_continuous as tune_continuous
from jquant.finetune.fp8 import FP8Arithmetic as FP8Arithmetic
from jquant.finetune.fp8 import fp8_lora_linear as fp8_lora_linear
from jquant.finetune.lora import LoRA as LoRA
from jquant.finetune.lora import LoRAConfig as LoRAConfig
from jquant.finetune.lora import LoRAParam as LoRAParam
from jquant.finetune.lora import adapters as adapters
from jquant.finetune.lora import add_lora as add_lora
from jquant.finetune.lora import lora_sites as lora_sites
from jquant.finetune.lora import merge_lora as merge_lora
from jquant.finetune.lora import set_rounding_keys as set_rounding_keys
from jquant.finetune.train import FinetuneConfig as FinetuneConfig
from jquant.finetune.train import evaluate_loss as evaluate_loss
from jquant.finetune.train import finetune as finetune
from jquant.finetune.train import masked_cross_entropy as masked_cross_entropy
from jquant.ops.lora import LoRAArithmetic as LoRAArithmetic

__all__ = ["ContinuousTuneConfig", "ContinuousTuneResult", "FP8Arithmetic", "FinetuneConfig", "LoRA", "LoRAArithmetic", "LoRAConfig", "LoRAParam", "adapters",
           "add_lora", "evaluate_loss", "finetune", "fp8_lora_linear", "lora_sites", "masked_cross_entropy",
           "merge_lora", "set_rounding_keys", "tunable_paths", "tune_continuous"]
