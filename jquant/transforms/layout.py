"""Where equivalence transforms may act: a model family's declaration of its residual-stream structure.

Transforms never import a model family. A pre-norm decoder declares its structure
with ``model.equivalence_layout() -> DecoderLayout``, naming modules by path
(``layers/3/self_attn/q_proj``). Conventions (jquant's ``[in, out]`` kernels):

- ``Linear`` modules hold ``kernel [in, out]`` and optionally ``bias [out]``;
- RMSNorm modules hold ``weight [d]`` (the gain γ);
- the embedding module holds ``embedding [V, d]``.

The residual stream ``x [.., d]`` is *read* through RMSNorms (each feeding a group
of linears: q/k/v, up/gate, the output head) and *written* by the linears whose
outputs are added to it (o_proj, down_proj) and by the embedding. A multimodal model may
name further *input writers*: linears whose outputs enter the stream beside the token
embedding (a vision merger writing image features over placeholder tokens). Attention declares
its heads so per-head transforms (value/output rotations, q/k scalings) know their
blocks; a gated MLP declares its up/gate/down projections.

A mixture-of-experts block declares a :class:`SparseMLPLayout` instead: its readers
(router, expert stacks ``kernel [E, in, out]``, shared expert and its gate) are the
post-attention norm group's consumers, and its writers are the down projections
(``[E, hidden, d]`` stacks and the shared expert's). Residual rotations and norm-group
scalings act on stacks expert by expert; per-MLP transforms (``ud_scale``, the online
Hadamard before down_proj) are defined for dense MLPs only.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NormGroup:
    """An RMSNorm (path of the module holding ``weight``) and the linears that read its output."""

    norm: str
    consumers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """One grouped-query attention layer.

    ``q, k, v, o``: Linear paths; ``path``: the attention module (it holds the run-time
    flags ``qk_rotation`` and ``kv_cache``). Query head ``h`` uses KV head
    ``h // (num_heads // num_kv_heads)``. ``rope_pairs="half"``: RoPE rotates feature
    ``i`` with ``i + head_dim/2`` (Hugging Face's rotate-half). ``qk_norm``: queries
    and keys pass through a per-head RMSNorm before RoPE (Qwen3), which rules out
    scaling q/k rows.
    """

    path: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_pairs: str = "half"
    qk_norm: bool = False

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class MLPLayout:
    """A gated MLP ``down(act(gate(x)) * up(x))``: Linear paths and the hidden width."""

    up: str
    gate: str
    down: str
    hidden: int


@dataclasses.dataclass(frozen=True)
class SparseMLPLayout:
    """A mixture-of-experts feed-forward block (``path``); ``writers``: the linears/stacks whose outputs reach the
    residual stream (the experts' down stack, the shared expert's down_proj)."""

    path: str
    writers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DecoderLayer:
    """One block: its input norm group (feeding q/k/v), attention, post-attention norm group and MLP."""

    attn_norm: NormGroup
    attention: AttentionLayout
    mlp_norm: NormGroup
    mlp: MLPLayout | SparseMLPLayout

    @property
    def mlp_writers(self) -> tuple[str, ...]:
        """The MLP's residual writers: ``(down,)`` for a dense MLP, every down projection for a sparse one."""
        return self.mlp.writers if isinstance(self.mlp, SparseMLPLayout) else (self.mlp.down,)

    @property
    def dense_mlp(self) -> MLPLayout | None:
        """The dense MLP layout, or None for a mixture-of-experts block."""
        return self.mlp if isinstance(self.mlp, MLPLayout) else None


@dataclasses.dataclass(frozen=True)
class DecoderLayout:
    """A pre-norm decoder: embedding, blocks, final norm feeding the output head.

    ``head`` is the output Linear path, or None when the head is tied to the
    embedding (transforms then ask for ``model.untie_embeddings()``). ``input_writers``:
    Linear paths whose outputs replace token embeddings (an MLLM's vision merger, spec
    MQuant §3.1: ``merger.fc2 W ← W R``, ``b ← b R``); a residual rotation folds into
    them as into the embedding.
    """

    hidden_size: int
    embedding: str
    layers: tuple[DecoderLayer, ...]
    final_norm: NormGroup
    head: str | None
    input_writers: tuple[str, ...] = ()

    @property
    def norm_groups(self) -> tuple[NormGroup, ...]:
        """Every norm group, in model order (the final norm last)."""
        return tuple(g for layer in self.layers for g in (layer.attn_norm, layer.mlp_norm)) + (self.final_norm,)

    @property
    def block_linears(self) -> tuple[str, ...]:
        """Every linear inside the blocks (q/k/v, o, up/gate or router/experts, down), in model order; not the head."""
        return tuple(p for layer in self.layers for p in (*layer.attn_norm.consumers, layer.attention.o,
                                                           *layer.mlp_norm.consumers, *layer.mlp_writers))

    @property
    def residual_writers(self) -> tuple[str, ...]:
        """Linears whose outputs are added to the residual stream (o_proj, the down projections of each block)."""
        return tuple(p for layer in self.layers for p in (layer.attention.o, *layer.mlp_writers))

    @property
    def has_experts(self) -> bool:
        """Whether any block is a mixture of experts (per-MLP transforms then do not apply to it)."""
        return any(layer.dense_mlp is None for layer in self.layers)


def layout_of(model) -> DecoderLayout:
    """``model.equivalence_layout()``, or a clear error for models that do not declare one."""
    fn = getattr(model, "equivalence_layout", None)
    if fn is None:
        raise ValueError(
            f"{type(model).__name__} does not declare an equivalence layout (equivalence_layout()); rotations, "
            "smoothing and OSTQuant need a pre-norm decoder that does."
        )
    layout = fn()
    if not isinstance(layout, DecoderLayout):
        raise ValueError(
            f"{type(model).__name__} declares a {type(layout).__name__}, not a DecoderLayout: QuaRot, SmoothQuant "
            "and OSTQuant need attention + MLP blocks. For Mamba models use jquant.transforms.mamba_rotation "
            "(MambaQuant).")
    return layout
