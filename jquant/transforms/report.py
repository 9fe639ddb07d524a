"""Per-layer QSUR of the activations entering each quantized linear (OSTQuant spec §3.2, item 2 of the issue).

For every decoder layer the four activation sites of a Llama-style block are
measured: the q/k/v input (after the input norm), the up/gate input, the o_proj
input and the down_proj input (after the online Hadamard when one is on). QSUR is
computed from the calibration mean and covariance of the tensor the activation
quantizer sees (``QSUR^{1/d}``, exact box of spec §7.8).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from jquant.calib.capture import model_input_statistics
from jquant.transforms.layout import layout_of
from jquant.transforms.qsur import qsur_from_covariance

SITE_KINDS = ("qkv", "up_gate", "o_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class QSURReport:
    """``values[(layer, kind)] = QSUR^{1/d}`` for ``kind`` in :data:`SITE_KINDS`."""

    values: dict[tuple[int, str], float]

    def mean(self, kind: str | None = None) -> float:
        """Mean over layers (and kinds, unless one is given)."""
        vals = [v for (_, k), v in self.values.items() if kind is None or k == kind]
        return float(np.mean(vals))

    def rows(self) -> list[dict]:
        """One dict per layer: ``{"layer": i, "qkv": ..., "up_gate": ..., "o_proj": ..., "down_proj": ...}``
        (no ``down_proj`` for a mixture-of-experts layer)."""
        layers = sorted({i for i, _ in self.values})
        return [{"layer": i, **{k: self.values[(i, k)] for k in SITE_KINDS if (i, k) in self.values}} for i in layers]


def qsur_report(model: nnx.Module, tokens: np.ndarray, *, batch_size: int = 8) -> QSURReport:
    """QSUR of each layer's four activation sites on calibration ``tokens [N, T]`` (model unchanged).

    Needs ``N·T`` well above the widths (the covariance of a ``d``-wide input is
    singular with fewer tokens; QSUR then is tiny but finite).
    """
    layout = layout_of(model)
    where = {}
    for i, layer in enumerate(layout.layers):
        where[layer.attn_norm.consumers[0]] = (i, "qkv")
        where[layer.mlp_norm.consumers[0]] = (i, "up_gate")
        where[layer.attention.o] = (i, "o_proj")
        if layer.dense_mlp is not None:  # an expert stack's input statistics are per expert, not one covariance
            where[layer.mlp.down] = (i, "down_proj")
    stats = model_input_statistics(model, tokens, set(where), batch_size=batch_size)
    return QSURReport({where[p]: qsur_from_covariance(s.covariance, s.mean) for p, s in stats.items()})
