"""Expert usage of a mixture-of-experts model: how many tokens each routed expert receives.

Counts come from the stacked expert sites' input statistics (``jquant.calib.capture``), so any family whose
experts are ``experts`` sites is covered without knowing it. ``expert_balance`` is MoEQuant's σ (Eq. 4).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from jquant.calib.capture import model_input_statistics
from jquant.sites import find_sites


@dataclasses.dataclass(frozen=True)
class ExpertUsage:
    """``counts [L, E]``: top-k assignments per MoE layer (``layers``, the expert-stack paths) and expert."""

    layers: tuple[str, ...]
    counts: np.ndarray

    @property
    def shares(self) -> np.ndarray:
        """``[L, E]`` fraction of each layer's assignments going to each expert."""
        return self.counts / np.maximum(self.counts.sum(axis=1, keepdims=True), 1)

    @property
    def sigma(self) -> float:
        """MoEQuant's expert-balance σ: mean over layers of ``sqrt(Σ_e (u_e − ū)² / (E − 1))``."""
        u = self.shares
        return float(np.mean(np.sqrt(np.sum((u - u.mean(axis=1, keepdims=True)) ** 2, axis=1) / (u.shape[1] - 1))))

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "counts": self.counts.astype(int).tolist(), "sigma": self.sigma,
                "max_over_min_share": float(self.counts.max() / max(self.counts.min(), 1))}


def _layer_key(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in path.split("/"))


def expert_usage(model: nnx.Module, tokens: np.ndarray, *, batch_size: int = 8) -> ExpertUsage:
    """Routed tokens per expert over a forward of ``tokens [N, T]`` (the first projection of each expert stack)."""
    firsts = {}
    for site in find_sites(model):
        if site.spec.kind == "experts":
            firsts.setdefault(site.path.rsplit("/", 1)[0], site.path)
    if not firsts:
        raise ValueError(f"{type(model).__name__} has no routed experts.")
    stats = model_input_statistics(model, tokens, set(firsts.values()), batch_size=batch_size)
    layers = tuple(sorted(firsts, key=_layer_key))
    return ExpertUsage(layers=layers, counts=np.stack([np.asarray(stats[firsts[p]].count) for p in layers]))
