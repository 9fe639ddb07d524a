"""6Bit-Diffusion (Su et al. 2026, arXiv 2603.18742; spec ``video_dit_mixed_precision_tdc.md``) for video DiTs:
inference-time NVFP4 / INT8 activation routing by a predictor of each linear's quantization sensitivity (DMPQ),
the Temporal Delta Cache of block residuals (TDC) with Purified Delta Refresh (PDR), and their baselines.

- ``config``: ``PrecisionConfig``, ``CacheConfig``, ``SixBitConfig`` (checks; ``six_bit_diffusion.json``);
- ``rules``: the per-step decisions as pure functions (Γ, ρ, the predictor's routes, the TDC skip test);
- ``protocol``: the block protocol a DiT offers (``flow_embed`` / ``blocks`` / ``flow_head``, routed linears);
- ``runtime``: ``sample_six_bit`` (one jitted scan; choices are data) and ``SixBitSample`` (skip fraction, bits);
- ``calibrate``: the measurement (Γ vs NVFP4 sensitivity), the predictor fit, τ_q for a bit budget, the static
  timestep-aware schedule (ViDiT-Q-style baseline);
- ``pipeline``: calibrate a text-to-video pipeline, generate clips with a config.
"""

from jquant.video_mixed.config import (CACHE_MODES, CONFIG_FILE, FLOAT, INT8, NVFP4, PRECISION_MODES, ROUTES,
                                       CacheConfig, PrecisionConfig, SixBitConfig)
from jquant.video_mixed.protocol import check_block_dit
from jquant.video_mixed.runtime import SixBitSample, StepLog, compiled_programs, sample_six_bit

__all__ = [
    "CACHE_MODES", "CONFIG_FILE", "FLOAT", "INT8", "NVFP4", "PRECISION_MODES", "ROUTES", "CacheConfig",
    "PrecisionConfig", "SixBitConfig", "SixBitSample", "StepLog", "check_block_dit", "compiled_programs",
    "sample_six_bit",
]
