"""DiTFastAttnV2 (Zhang et al. 2025, spec ``ditfastattn_v2.md``): head-wise arrow attention and output reuse for
MMDiT text-to-image transformers, chosen per step, layer and head under an error budget.

- ``plan``: ``AttentionPlan`` (the pytree of per-step, per-layer, per-head choices, its FLOP count, its file);
- ``runtime``: ``StepAttention``, the hook a family's joint attention calls, and ``HeadCache``;
- ``sampling``: ``sample_with_plan`` (the plan and cache threaded through the Euler sampler);
- ``search``: ``search_plan`` (progressive calibration, RSE, exact ILP or greedy choice);
- ``pipeline``: ``compress_pipeline`` (search and attach a plan to a ``TextToImage`` pipeline);
- ``baselines``: V1-style plans (window attention for all heads, residual sharing and output reuse of whole
  layers).
"""

from jquant.ditfastattn.baselines import layer_reuse_plan, residual_window_plan, window_half_width, window_plan
from jquant.ditfastattn.pipeline import compress_pipeline
from jquant.ditfastattn.plan import FULL, REUSE, AttentionPlan, JointLayout, arrow_pairs, band_pairs
from jquant.ditfastattn.runtime import HeadCache, StepAttention
from jquant.ditfastattn.sampling import model_layout, sample_with_plan
from jquant.ditfastattn.search import candidate_windows, choose_greedy, choose_ilp, search_plan

__all__ = [
    "FULL", "REUSE", "AttentionPlan", "HeadCache", "JointLayout", "StepAttention", "arrow_pairs", "band_pairs",
    "candidate_windows", "choose_greedy", "compress_pipeline", "choose_ilp", "layer_reuse_plan", "model_layout", "residual_window_plan",
    "sample_with_plan", "search_plan", "window_half_width", "window_plan",
]
