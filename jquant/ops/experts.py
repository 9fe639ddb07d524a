"""Mixture-of-experts compute: top-k routing, dropless token grouping and the grouped (per-expert) matmul.

Shapes: ``N`` tokens, ``D`` input features, ``E`` experts, ``k`` experts per token.

Routing follows the Hugging Face MoE families: ``p = softmax(logits)`` in at least float32,
the ``k`` largest probabilities, optionally renormalised to sum to one (Mixtral,
``norm_topk_prob``), times a scaling factor (DeepSeek's ``routed_scaling_factor``).

Dropless execution: the ``N k`` (token, expert) assignments are sorted by expert
(``sort_by_expert``), each expert multiplies its contiguous rows (``grouped_matmul``), and
the outputs are weighted and scattered back to their tokens (``combine``). Nothing is dropped
and no capacity factor exists; an expert with no tokens costs nothing.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jquant.formats import ExpertPartition, Format, QArray, dequantize


@dataclasses.dataclass(frozen=True)
class Routing:
    """The routing of ``N`` tokens to ``k`` of ``E`` experts.

    ``weights [N, k]`` (the affinities ``c`` that scale each expert's output), ``experts [N, k]`` int32
    (expert ids), ``probs [N, E]`` float32 (the full softmax, for load statistics).
    """

    weights: jax.Array
    experts: jax.Array
    probs: jax.Array


def route(logits: jax.Array, top_k: int, *, normalize: bool, scale: float = 1.0) -> Routing:
    """Top-``k`` softmax routing of router ``logits [N, E]``.

    ``c_j = s · p_j / (Σ_{i∈K} p_i)`` with ``normalize`` (Mixtral, Qwen3-MoE with ``norm_topk_prob``),
    ``c_j = s · p_j`` without (Qwen1.5/2-MoE, DeepSeek-MoE); ``p = softmax(logits)`` in at least float32.
    Ties between equal probabilities go to the lower expert id (as ``torch.topk``).
    """
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"route: top_k={top_k} must be between 1 and the number of experts {num_experts}.")
    probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights=weights * scale, experts=experts.astype(jnp.int32), probs=probs)


@dataclasses.dataclass(frozen=True)
class ExpertGrouping:
    """Assignments sorted by expert: row ``r`` of the grouped input is token ``token[r]``'s ``slot[r]``-th choice.

    ``order [N k]`` (flat assignment index of each sorted row), ``token [N k]``, ``group_sizes [E]`` int32
    (rows per expert, in expert order).
    """

    order: jax.Array
    token: jax.Array
    group_sizes: jax.Array


def sort_by_expert(experts: jax.Array, num_experts: int) -> ExpertGrouping:
    """Group the assignments ``experts [N, k]`` by expert (stable: tokens keep their order inside an expert)."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return ExpertGrouping(order=order, token=order // experts.shape[-1], group_sizes=sizes)


def expert_ids(group_sizes: jax.Array, rows: int) -> jax.Array:
    """The expert of each of ``rows`` grouped rows ``[rows]`` (rows past ``Σ group_sizes`` get the last id)."""
    return jnp.repeat(jnp.arange(group_sizes.shape[0], dtype=jnp.int32), group_sizes, total_repeat_length=rows)


@dataclasses.dataclass(frozen=True)
class _BlockLayout:
    """Grouped rows placed in whole ``block``-row tiles: row ``r`` goes to slot ``dest[r]``, tile ``n`` is expert
    ``block_expert[n]``'s (padding slots stay empty)."""

    dest: jax.Array
    block_expert: jax.Array
    blocks: int
    block: int

    def scatter(self, x: jax.Array) -> jax.Array:
        """``x [M, D]`` -> zero-padded tiles ``[blocks, block, D]``."""
        buffer = jnp.zeros((self.blocks * self.block, x.shape[1]), x.dtype).at[self.dest].set(x)
        return buffer.reshape(self.blocks, self.block, -1)


def _block_layout(group_sizes: jax.Array, rows: int, block: int) -> _BlockLayout:
    num_experts = group_sizes.shape[0]
    blocks = (rows + num_experts * (block - 1)) // block + 1
    padded = (group_sizes + block - 1) // block * block
    padded_end = jnp.cumsum(padded)
    eid = expert_ids(group_sizes, rows)
    start = jnp.cumsum(group_sizes) - group_sizes
    dest = (padded_end - padded)[eid] + jnp.arange(rows, dtype=jnp.int32) - start[eid]
    block_expert = jnp.searchsorted(padded_end, jnp.arange(blocks, dtype=jnp.int32) * block, side="right")
    return _BlockLayout(dest=dest, block_expert=jnp.minimum(block_expert, num_experts - 1), blocks=blocks, block=block)


def _blocked_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, block: int) -> jax.Array:
    """``grouped_matmul`` as dense ``[block, D] @ [D, F]`` products: each expert's rows padded to whole blocks.

    Exactly the per-row products of ``ragged_dot`` (every output element is one ``x_r · w_e[:, f]`` dot), at the
    cost of at most ``E (block - 1)`` padding rows; on CPU it is about 5x faster than XLA's ``ragged_dot``.
    """
    layout = _block_layout(group_sizes, x.shape[0], block)
    out = jnp.einsum("nbd,ndf->nbf", layout.scatter(x), w[layout.block_expert])
    return out.reshape(layout.blocks * block, -1)[layout.dest]


def grouped_gram(x: jax.Array, group_sizes: jax.Array, *, block: int = 256) -> jax.Array:
    """Per-expert ``X_eᵀ X_e`` ``[E, D, D]`` of grouped rows ``x [M, D]`` (float32 or wider, highest precision)."""
    layout = _block_layout(group_sizes, x.shape[0], block)
    tiles = layout.scatter(x)
    gram = jnp.einsum("nbi,nbj->nij", tiles, tiles, precision=jax.lax.Precision.HIGHEST)
    return jax.ops.segment_sum(gram, layout.block_expert, group_sizes.shape[0])


def grouped_matmul(x: jax.Array, w: jax.Array | QArray | ExpertPartition, group_sizes: jax.Array, *,
                   block: int | None = None) -> jax.Array:
    """``y[r] = x[r] @ w[e(r)]`` for rows ``x [M, D]`` sorted by expert, ``w [E, D, F]``, ``group_sizes [E]``.

    ``w`` may be a ``QArray`` quantized along axis 1 (per-expert scales) or an ``ExpertPartition`` (experts in
    different formats). In dispatch mode ``"pallas"`` (``jq.ops.force_path`` / ``JQUANT_KERNELS``) integer
    weights go to the Pallas grouped kernel (``pallas_kernels.grouped_matmul``: one call per precision group
    of a partition) when their formats and shapes fit it; otherwise, and in the other modes until a GPU
    measurement says the kernel wins, they are dequantized to ``x.dtype`` (the XLA path). ``Σ group_sizes`` must equal ``M``. On CPU the product runs as
    blocked dense matmuls of ``block`` rows (default: the power of two nearest ``M / E``, between 8 and 128);
    elsewhere as ``jax.lax.ragged_dot``.
    """
    if isinstance(w, (QArray, ExpertPartition)) and (kernel_out := _pallas_grouped(x, w, group_sizes)) is not None:
        return kernel_out
    if isinstance(w, ExpertPartition):
        weight = w.dequantize(x.dtype)
    else:
        weight = dequantize(w, x.dtype) if isinstance(w, QArray) else w.astype(x.dtype)
    if weight.ndim != 3 or weight.shape[1] != x.shape[-1] or weight.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"grouped_matmul: weights {tuple(weight.shape)} do not fit inputs {tuple(x.shape)} with "
                         f"{group_sizes.shape[0]} groups; expected [E, {x.shape[-1]}, F].")
    if block is None and jax.default_backend() != "cpu":
        return jax.lax.ragged_dot(x, weight, group_sizes, precision=jax.lax.Precision.HIGHEST)
    if block is None:
        block = int(min(128, max(8, 2 ** round(math.log2(max(x.shape[0] // weight.shape[0], 1))))))
    return _blocked_grouped_matmul(x, weight, group_sizes, block)


def _pallas_grouped(x: jax.Array, w: QArray | ExpertPartition, group_sizes: jax.Array) -> jax.Array | None:
    """The Pallas grouped kernel's result in dispatch mode ``"pallas"`` (None: take the XLA path), recorded."""
    from jquant.ops import dispatch

    if dispatch.current_mode() != "pallas":
        dispatch._record(dispatch.XLA_PATH, f"mode {dispatch.current_mode()!r}: no measured grouped-GEMM table yet",
                         x, w, None, op="grouped_matmul")
        return None
    from jquant.pallas_kernels import grouped_matmul as kernel

    try:
        if isinstance(w, ExpertPartition):
            groups = [kernel.ExpertGroup(ids, p if isinstance(p, QArray) else p.astype(x.dtype))
                      for ids, p in zip(w.experts, w.parts)]
            kernel.check_mixed(x, group_sizes, groups, kernel.TileConfig())
            out = kernel.mixed_grouped_matmul(x, group_sizes, groups)
        else:
            kernel.check(x, group_sizes, w, kernel.TileConfig())
            out = kernel.grouped_matmul(x, group_sizes, w)
    except ValueError as err:
        dispatch._record(dispatch.XLA_PATH, f"grouped kernel does not fit: {err}", x, w, None, op="grouped_matmul")
        return None
    dispatch._record("pallas-grouped-matmul", "mode 'pallas'", x, w, None, op="grouped_matmul")
    return out


def combine(expert_out: jax.Array, routing: Routing, grouping: ExpertGrouping, num_tokens: int) -> jax.Array:
    """``y_t = Σ_j c_{t,j} · E_j(x_t)``: weight the grouped outputs ``[N k, D]`` and add them back per token ``[N, D]``.

    The ``k`` contributions of a token are added in the order of its choices (as Hugging Face's loop over
    experts does not; the sum is the same up to float rounding).
    """
    weights = routing.weights.reshape(-1)[grouping.order].astype(expert_out.dtype)
    contributions = jnp.zeros((routing.weights.size, expert_out.shape[-1]), expert_out.dtype)
    contributions = contributions.at[grouping.order].set(expert_out * weights[:, None])
    return contributions.reshape(num_tokens, routing.weights.shape[-1], -1).sum(axis=1)


def quantize_expert_activations(x: jax.Array, group_sizes: jax.Array, formats: tuple[Format | None, ...]) -> jax.Array:
    """Fake-quantize each grouped row of ``x [M, D]`` with its expert's activation format (None: unchanged).

    ``formats`` has one entry per expert; rows of experts sharing a format are quantized by one call.
    """
    from jquant.ops.linear import quantize_activation

    distinct = sorted({f for f in formats if f is not None}, key=lambda f: f.name)
    if not distinct:
        return x
    eid = expert_ids(group_sizes, x.shape[0])
    out = x
    for fmt in distinct:
        uses = jnp.asarray([f == fmt for f in formats])
        out = jnp.where(uses[eid][:, None], quantize_activation(x, fmt), out)
    return out
