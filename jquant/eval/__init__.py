"""Evaluation: perplexity, agreement with the float model (KL divergence, top-1), zero-shot multiple choice, size and latency, expert usage of MoE models, image quality
(PSNR, SSIM, Fréchet distance of features, prompt accuracy: ``jquant.eval.image``).

The language-model scorers take a causal logits function ``model(tokens int32[B, T]) -> [B, T, V]``
(an ``nnx.Module`` or any callable).
"""

from jquant.eval.agreement import AgreementResult, distribution_agreement
from jquant.eval.experts import ExpertUsage, expert_usage
from jquant.eval.image import frechet_distance, prompt_accuracy, psnr, ssim
from jquant.eval.perplexity import PerplexityResult, perplexity, split_perplexity, target_logprobs
from jquant.eval.report import LatencyResult, measure_latency, param_bytes, param_count
from jquant.eval.zeroshot import (
    TASKS,
    MultipleChoiceItem,
    MultipleChoiceResult,
    evaluate_multiple_choice,
    zero_shot,
)

__all__ = [
    "TASKS", "AgreementResult", "ExpertUsage", "LatencyResult", "MultipleChoiceItem", "MultipleChoiceResult", "PerplexityResult",
    "distribution_agreement", "evaluate_multiple_choice", "expert_usage", "frechet_distance", "measure_latency", "param_bytes", "param_count",
    "perplexity", "prompt_accuracy", "psnr", "split_perplexity", "ssim", "target_logprobs", "zero_shot",
]
