"""Evaluation: perplexity, agreement with the float model (KL divergence, top-1), zero-shot multiple choice, size and latency, expert usage of MoE models, image quality
(PSNR, SSIM, Fréchet distance of features, prompt accuracy: ``jquant.eval.image``; FID / LPIPS from local weights:
``jquant.eval.fid`` / ``lpips``), video quality (per-frame PSNR / SSIM / prompt accuracy, TV-L1 warping error,
VAE reconstruction: ``jquant.eval.video``).

The language-model scorers take a causal logits function ``model(tokens int32[B, T]) -> [B, T, V]``
(an ``nnx.Module`` or any callable).
"""

from jquant.eval.agreement import AgreementResult, distribution_agreement
from jquant.eval.experts import ExpertUsage, expert_usage
from jquant.eval.image import frechet_distance, prompt_accuracy, psnr, ssim
from jquant.eval.optical_flow import tvl1_flow, warp
from jquant.eval.outliers import HiddenOutliers, OutlierReport, SiteOutliers, hidden_outliers, model_outliers, site_outliers
from jquant.eval.perplexity import PerplexityResult, perplexity, split_perplexity, target_logprobs
from jquant.eval.report import LatencyResult, measure_latency, param_bytes, param_count
from jquant.eval.video import (
    frame_prompt_accuracy,
    frame_psnr,
    frame_ssim,
    reconstruction_psnr,
    temporal_error,
    video_report,
)
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
    "frame_prompt_accuracy", "frame_psnr", "frame_ssim", "perplexity", "prompt_accuracy", "psnr",
    "reconstruction_psnr", "split_perplexity", "ssim", "target_logprobs", "temporal_error", "tvl1_flow",
    "video_report", "warp", "zero_shot",
    "HiddenOutliers", "OutlierReport", "SiteOutliers", "hidden_outliers", "model_outliers", "site_outliers",
]
