"""Where equivalence transforms may act in a selective state-space (Mamba) language model.

The Mamba families declare this structure with ``model.equivalence_layout() -> SSMLayout``
(transforms never import a model family; cf. ``jquant.transforms.layout`` for decoders).
Conventions are jquant's: ``Linear`` modules hold ``kernel [in, out]`` (and ``bias [out]``),
RMSNorms ``weight [d]``, the embedding ``embedding [V, d]``.

The residual stream ``x [.., d]`` is read by each block's RMSNorm, whose output feeds
``in_proj`` only, and written by ``out_proj`` and the embedding; the final RMSNorm feeds
the head. A Mamba-1 mixer also declares its inner linears (``x_proj``, ``dt_proj``), the
depthwise ``conv1d`` and the column ranges of ``in_proj`` (``u`` = conv input, ``z`` = gate)
and of ``x_proj`` (``δ``, ``B``, ``C``); a Mamba-2 mixer declares its gated RMSNorm.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class SSMMixerLayout:
    """One block: its RMSNorm ``norm``, the mixer module ``path`` and the mixer's sites.

    ``inner``: ``Di``; ``gate``: the ``(start, stop)`` columns of ``in_proj`` holding ``z``.
    Mamba-1 (``kind="mamba1"``): ``conv`` (weight ``[K, Di]``) reads ``in_proj`` columns
    ``[0, Di)``; ``x_proj`` columns are ``δ [0, R)``, ``B [R, R+N)``, ``C [R+N, R+2N)``
    with ``R = dt_rank``, ``N = state_size``; ``dt_proj [R, Di]``; the gate is
    ``z ⊙ σ(gate_scale ⊙ z)`` (S-SiLU, ``gate_scale`` an optional mixer attribute).
    Mamba-2 (``kind="mamba2"``): ``gated_norm`` (weight ``[Di]``) computes
    ``w ⊙ GroupRMSNorm(y ⊙ SiLU(z))`` right before ``out_proj``.
    """

    kind: Literal["mamba1", "mamba2"]
    path: str
    norm: str
    in_proj: str
    out_proj: str
    inner: int
    gate: tuple[int, int]
    conv: str | None = None
    x_proj: str | None = None
    dt_proj: str | None = None
    dt_rank: int = 0
    state_size: int = 0
    gated_norm: str | None = None


@dataclasses.dataclass(frozen=True)
class SSMLayout:
    """A pre-norm SSM language model: embedding, blocks, final norm and head (None when tied)."""

    hidden_size: int
    embedding: str
    blocks: tuple[SSMMixerLayout, ...]
    final_norm: str
    head: str | None


def ssm_layout_of(model) -> SSMLayout:
    """``model.equivalence_layout()`` when it is an :class:`SSMLayout`, else a clear error."""
    fn = getattr(model, "equivalence_layout", None)
    layout = None if fn is None else fn()
    if not isinstance(layout, SSMLayout):
        raise ValueError(f"{type(model).__name__} does not declare a state-space equivalence layout "
                         "(equivalence_layout() -> SSMLayout); MambaQuant's transforms need a Mamba-family model.")
    return layout
