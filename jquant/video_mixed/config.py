"""The settings of 6Bit-Diffusion (spec ``video_dit_mixed_precision_tdc.md``) and of its baselines, with checks.

``PrecisionConfig`` says how each routed linear's activations are quantized at each step:

- ``"dynamic"``: DMPQ (§3.2): NVFP4 when the predictor ``α_l Γ_{b,t-1} + β_l <= τ_q``, else INT8; INT8 at step 0;
  with ``purify`` (PDR, §3.4) a linear whose input has ``max|x| / mean|x| > outlier_ratio`` runs in float, and a
  block skipped at ``t - 1`` (no Γ) runs INT8;
- ``"nvfp4"`` / ``"int8"``: one format everywhere (the W4A4 / W4A8 baselines);
- ``"static"``: a fixed route per step, block and linear (``schedule [S, B, L]``; ViDiT-Q-style timestep-aware mixed
  precision);
- ``"off"``: float activations.

``CacheConfig`` says which block evaluations are replaced by a cached residual:

- ``"tdc"``: the Temporal Delta Cache (§3.3): skip block b iff ``E_acc + e < τ_c`` (strict) and fewer than
  ``max_skips`` consecutive skips, ``e`` the relative L1 change of its last two computed residuals;
- ``"fora"``: FORA-style fixed-interval reuse: every block computed at steps ``0, k, 2k, ..`` (``interval = k``);
- ``"teacache"``: TeaCache-style whole-model skipping: the blocks' summed residual is reused while the accumulated
  relative L1 change of the stack's input (video stream) stays below ``τ_c``;
- ``"off"``: every block computed.

Routes are group ids of the routed linears: ``NVFP4 = 0``, ``INT8 = 1``, ``FLOAT = 2``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

ROUTES = ("nvfp4", "int8", "float")
NVFP4, INT8, FLOAT = 0, 1, 2
ROUTE_BITS = (4, 8, 16)  # nominal activation widths of the routes (the paper's W4A6 accounting; skipped: 0)
PRECISION_MODES = ("off", "dynamic", "nvfp4", "int8", "static")
CACHE_MODES = ("off", "tdc", "fora", "teacache")
CONFIG_FILE = "six_bit_diffusion.json"


def _finite_non_negative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class PrecisionConfig:
    """Activation routing (module docstring). ``alpha`` / ``beta`` ``[blocks, linears]``: the fitted predictor;
    ``tau_q``: its threshold on the predicted relative error; ``schedule [steps, blocks, linears]``: static routes."""

    mode: str = "dynamic"
    alpha: np.ndarray | None = None
    beta: np.ndarray | None = None
    tau_q: float = 0.0
    purify: bool = True
    outlier_ratio: float = 25.0
    schedule: np.ndarray | None = None

    def __post_init__(self):
        if self.mode not in PRECISION_MODES:
            raise ValueError(f"PrecisionConfig.mode must be one of {PRECISION_MODES}, got {self.mode!r}.")
        _finite_non_negative(self.tau_q, "PrecisionConfig.tau_q (a relative error)")
        ratio = _finite_non_negative(self.outlier_ratio, "PrecisionConfig.outlier_ratio (max|x| / mean|x|)")
        if ratio < 1:
            raise ValueError(f"PrecisionConfig.outlier_ratio must be >= 1 (max|x| / mean|x| is never below 1), got "
                             f"{ratio}.")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, np.float32)
                if value.ndim != 2 or not np.all(np.isfinite(value)):
                    raise ValueError(f"PrecisionConfig.{name} must be a finite [blocks, linears] array, got shape "
                                     f"{value.shape}.")
                object.__setattr__(self, name, value)
        if self.mode == "dynamic":
            if self.alpha is None or self.beta is None or self.alpha.shape != self.beta.shape:
                raise ValueError("PrecisionConfig(mode='dynamic') needs the predictor: alpha and beta of one shape "
                                 "[blocks, linears] (jquant.video_mixed.fit_predictor on calibration runs).")
        if self.schedule is not None:
            schedule = np.asarray(self.schedule)
            if schedule.ndim != 3 or not np.isin(schedule, (NVFP4, INT8, FLOAT)).all():
                raise ValueError(f"PrecisionConfig.schedule must be [steps, blocks, linears] of route ids {NVFP4}, "
                                 f"{INT8}, {FLOAT}, got shape {schedule.shape}.")
            object.__setattr__(self, "schedule", schedule.astype(np.int32))
        if (self.mode == "static") != (self.schedule is not None):
            raise ValueError("PrecisionConfig: a schedule goes with mode='static' and only with it "
                             "(jquant.video_mixed.static_schedule).")

    @property
    def quantized(self) -> bool:
        return self.mode != "off"

    def to_dict(self) -> dict:
        out = {"mode": self.mode, "tau_q": self.tau_q, "purify": self.purify, "outlier_ratio": self.outlier_ratio}
        for name in ("alpha", "beta", "schedule"):
            value = getattr(self, name)
            out[name] = None if value is None else value.tolist()
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Block reuse (module docstring): ``tau_c`` the reuse threshold (TDC, TeaCache), ``max_skips`` TDC's cap on
    consecutive reuses of a block (the paper's N_max = 2), ``interval`` FORA's refresh period in steps."""

    mode: str = "tdc"
    tau_c: float = 0.1
    max_skips: int = 2
    interval: int = 2

    def __post_init__(self):
        if self.mode not in CACHE_MODES:
            raise ValueError(f"CacheConfig.mode must be one of {CACHE_MODES}, got {self.mode!r}.")
        _finite_non_negative(self.tau_c, "CacheConfig.tau_c (an accumulated relative L1 change)")
        for name in ("max_skips", "interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"CacheConfig.{name} must be an int >= 1, got {value!r}.")

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SixBitConfig:
    """Both parts: ``precision`` (DMPQ or a baseline) and ``cache`` (TDC or a baseline). Saved as
    ``six_bit_diffusion.json`` in a pipeline folder (``save`` / ``load``)."""

    precision: PrecisionConfig = dataclasses.field(default_factory=lambda: PrecisionConfig(mode="off"))
    cache: CacheConfig = dataclasses.field(default_factory=lambda: CacheConfig(mode="off"))

    def __post_init__(self):
        if not isinstance(self.precision, PrecisionConfig) or not isinstance(self.cache, CacheConfig):
            raise TypeError("SixBitConfig takes precision=PrecisionConfig(..) and cache=CacheConfig(..).")

    def to_dict(self) -> dict:
        return {"precision": self.precision.to_dict(), "cache": self.cache.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> SixBitConfig:
        if not isinstance(data, dict) or set(data) != {"precision", "cache"}:
            raise ValueError(f"a 6Bit-Diffusion config has the keys ['cache', 'precision'], got "
                             f"{sorted(data) if isinstance(data, dict) else type(data).__name__}.")
        return cls(precision=PrecisionConfig(**data["precision"]), cache=CacheConfig(**data["cache"]))

    def save(self, folder: str | Path) -> Path:
        """Write ``six_bit_diffusion.json`` into ``folder`` (through a temporary name, then renamed)."""
        path = Path(folder) / CONFIG_FILE
        tmp = path.with_name(f".{CONFIG_FILE}.partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> SixBitConfig | None:
        """The config saved in pipeline ``folder``, or None if it has none."""
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            return None
        return cls.from_dict(json.loads(path.read_text()))
