"""MxMoE bit allocation (Duanmu et al., ICML 2025, arXiv 2505.05799): schemes, cost model, solver.

Pure numpy/scipy: no model or jax imports. One MoE layer has ``blocks`` linear blocks, ordered
expert-major, ``(expert 0 gate, up, down), (expert 1 gate, up, down), …`` and then, if the
layer has shared experts, one merged shared expert ``(gate, up, down)``. Each block gets one
scheme out of ``schemes`` candidates (paper §3.4)::

    minimise   L^r · T^(1−r)                 L = Σ_{b,k} Δ_{b,k} x_{b,k}     (accuracy, §3.2)
                                             T = Σ_{b,k} t_{b,k} x_{b,k}     (modelled time, §3.3)
    subject to Σ_k x_{b,k} = 1               for every block b
               Σ_{b,k} bits_k · size_b · x_{b,k} ≤ B_mem
               x_{i,k} = x_{j,k}             for tied blocks (gate and up of one expert)

* ``r = 1`` (accuracy only) is a multiple-choice knapsack, solved exactly as a MILP by
  ``scipy.optimize.milp`` (HiGHS). ``r = 0`` minimises ``T`` the same way.
* ``0 < r < 1``: ``L^r T^(1−r)`` is concave and increasing in ``(L, T)``, so its minimum over
  the finite feasible set is an extreme point of the lower-left convex hull of the feasible
  ``(L, T)`` points, and each such point minimises ``L + λT`` for some ``λ > 0`` (spec §3.4(b)).
  Instead of a fixed geometric λ grid (which can step over a hull vertex), the λ values are
  chosen by dichotomic search (Aneja & Nair 1979): start from ``argmin L`` and ``argmin T``;
  for two neighbouring hull points take λ normal to the segment joining them and solve
  ``min L + λT``; a point strictly below the segment is a new vertex, searched on both sides.
  This visits every supported vertex with at most ``2·vertices + 1`` MILPs, so the result
  equals exhaustive search up to the solver's tolerance.
* Zero loss (experts that get no calibration tokens have ``Δ = 0``) is handled by evaluating
  ``r·log(L + ε_L) + (1−r)·log(T + ε_T)`` with ``ε = 1e-12 × scale`` (``scale`` =
  ``Σ_groups max_k`` of the term): solutions with ``L = 0`` win, and among them the fastest.
* Ties are enforced by merging each tied group into one decision (its Δ, times and sizes
  summed): this is the same feasible set as the equality constraints, with fewer variables.

The 1-bit scheme ``w1a16_g128`` of the paper is left out: jquant's integer formats have
2–8 bits (``get_format("int1-g128-asym")`` is an error).

The runtime model (``block_time``) is analytic, from datasheet figures; it is not the paper's
profiled per-tile table, which must be re-measured on real kernels (spec §6).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

# ---------------------------------------------------------------- schemes (spec §3.1)


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One candidate quantization scheme ``w{W}a{A}_g{G}``.

    ``weight_bits``: bits per weight charged to the memory budget (spec §3.1 table, group
    scales included: ``g128`` adds 0.25). ``activation_bits``: 16 (weight-only), 8 or 4.
    ``group_size``: 128, or None for per channel (weights) / per token (activations).
    ``weight_format`` / ``activation_format``: jquant format names (``jquant.formats``); a16
    schemes are asymmetric min-max weight-only, W-A schemes symmetric with dynamic per-token
    (``int8``, ``int4``) or per-128-group (``int4-g128``) activation quantization.
    """

    name: str
    weight_bits: float
    activation_bits: int
    group_size: int | None
    weight_format: str
    activation_format: str | None

    @property
    def activation_traffic_bits(self) -> float:
        """Bits per activation element read from memory: 16, or the quantized bits plus the
        spec table's 0.25 for a per-128-group scale (``w4a4_g128`` → 4.25)."""
        if self.activation_bits >= 16:
            return 16.0
        return self.activation_bits + (0.25 if self.group_size else 0.0)


def _scheme(w: int, a: int, g: int | None, weight_bits: float) -> Scheme:
    tail = f"-g{g}" if g else ""
    if a == 16:
        return Scheme(f"w{w}a16_g{g or -1}", weight_bits, 16, g, f"int{w}{tail}-asym", None)
    return Scheme(f"w{w}a{a}_g{g or -1}", weight_bits, a, g, f"int{w}{tail}", f"int{a}{tail}")


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    _scheme(8, 16, None, 8.0),
    _scheme(4, 16, None, 4.0),
    _scheme(4, 16, 128, 4.25),
    _scheme(3, 16, 128, 3.25),
    _scheme(2, 16, 128, 2.25),
    _scheme(3, 16, None, 3.0),  # jquant additions: per-channel 3 and 2 bits stand in for the paper's missing
    _scheme(2, 16, None, 2.0),  # w1a16_g128 as the cheap end of the weight-only set (jquant has no 1-bit format)
    _scheme(4, 4, None, 4.0),
    _scheme(4, 4, 128, 4.25),
    _scheme(8, 8, None, 8.0),
)}

CANDIDATES: dict[str, tuple[str, ...]] = {
    "weight-only": ("w2a16_g-1", "w2a16_g128", "w3a16_g-1", "w3a16_g128", "w4a16_g128", "w4a16_g-1", "w8a16_g-1"),
    "w5a5": ("w4a4_g-1", "w4a4_g128", "w8a8_g-1"),
    "w4.25a15.5": ("w4a16_g-1", "w8a8_g-1"),
}


def parse_scheme(name: str | Scheme) -> Scheme:
    """The ``Scheme`` called ``name`` (a ``Scheme`` is returned as is)."""
    if isinstance(name, Scheme):
        return name
    if name in SCHEMES:
        return SCHEMES[name]
    hint = " (1-bit: jquant has no int1 format)" if str(name).startswith("w1") else ""
    raise ValueError(f"Unknown MxMoE scheme {name!r}{hint}. Valid names: {', '.join(SCHEMES)}.")


# ---------------------------------------------------------------- cost model (spec §3.3)


@dataclasses.dataclass(frozen=True)
class HardwareModel:
    """Roofline figures of one accelerator.

    ``bandwidth``: memory bytes/s. ``peak_ops_16`` / ``_8`` / ``_4``: dense tensor-core
    multiply–accumulate throughput (2 ops per MAC) for 16-, 8- and 4-bit operands.
    ``num_sms``: streaming multiprocessors ``P``. ``tile_m`` × ``tile_n``: the output tile of
    every scheme, unless ``tiles`` holds ``(scheme name, BM, BN)`` for it.
    """

    name: str
    bandwidth: float
    peak_ops_16: float
    peak_ops_8: float
    peak_ops_4: float
    num_sms: int
    tile_m: int = 64
    tile_n: int = 128
    tiles: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        for field in ("bandwidth", "peak_ops_16", "peak_ops_8", "peak_ops_4", "num_sms", "tile_m", "tile_n"):
            if not getattr(self, field) > 0:
                raise ValueError(f"HardwareModel.{field} must be > 0, got {getattr(self, field)!r}.")
        for name, bm, bn in self.tiles:
            parse_scheme(name)
            if not (bm > 0 and bn > 0):
                raise ValueError(f"HardwareModel.tiles: tile of {name!r} must be positive, got ({bm}, {bn}).")

    def tile(self, scheme: Scheme) -> tuple[int, int]:
        """``(BM, BN)`` of ``scheme``."""
        return next(((bm, bn) for name, bm, bn in self.tiles if name == scheme.name), (self.tile_m, self.tile_n))

    def peak(self, scheme: Scheme) -> float:
        """MMA throughput of ``scheme``: weights are dequantized to the activation precision."""
        return {16: self.peak_ops_16, 8: self.peak_ops_8, 4: self.peak_ops_4}[scheme.activation_bits]


#: NVIDIA H100 SXM5, datasheet figures (not measurements): HBM3 3.35 TB/s, dense BF16 989 TFLOPS,
#: dense INT8/FP8 1979 TOPS, 132 SMs. Hopper has no INT4 tensor cores, so 4-bit activations are
#: charged the INT8 rate: w4a4 then only saves memory traffic, never compute.
H100_SXM = HardwareModel("H100 SXM (datasheet)", 3.35e12, 989.4e12, 1978.9e12, 1978.9e12, 132)

#: NVIDIA RTX 4090 (the paper's GPU), Ada whitepaper figures (not measurements): 1008 GB/s,
#: dense FP16 tensor with FP32 accumulate 165.2 TFLOPS, INT8 660.6 TOPS, INT4 1321.2 TOPS, 128 SMs.
#: Its roofline reproduces the paper's crossovers (W4A16 < W8A8 for m ≲ 82, W2A16 < W4A4 for m ≲ 41).
RTX_4090 = HardwareModel("RTX 4090 (datasheet)", 1.008e12, 165.2e12, 660.6e12, 1321.2e12, 128)


def expert_workloads(counts: Sequence[int] | np.ndarray, batch: int, top_k: int) -> np.ndarray:
    """Rows per expert ``M_i = ⌊B · count_i / N_tokens⌋``, ``N_tokens = Σ count / top_k`` (spec §3.3).

    ``counts [experts]``: top-k assignments per expert in the calibration trace (integers ≥ 0).
    Returns int64 ``[experts]``; ``Σ M_i ≈ B · top_k`` (each term is floored).
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or not np.all(np.isfinite(c)) or np.any(c < 0) or np.any(c != np.round(c)):
        raise ValueError(f"expert_workloads: counts must be a non-empty 1-D array of integers >= 0, got {counts!r}.")
    if c.sum() <= 0:
        raise ValueError("expert_workloads: counts sum to 0; at least one expert must have been routed to.")
    _check_int("batch", batch, 0)
    _check_int("top_k", top_k, 1)
    ci = c.astype(np.int64)
    return (batch * top_k * ci) // int(ci.sum())  # exact integer floor of B·count_i·top_k / Σcount


def tile_time(scheme: Scheme | str, m: int, n: int, k: int, hw: HardwareModel = H100_SXM) -> float:
    """Modelled time ``c_t`` of one ``BM × BN`` output tile on one SM, seconds.

    The GEMM ``[m, k] @ [k, n]`` moves ``bytes = n·k·weight_bits/8 + m·k·act_bits/8 + 2·m·n``
    (weights, activations, 16-bit output) once from memory (operand re-reads are assumed to hit
    in L2), shared evenly by its tiles. Each tile computes a full ``BM × BN × k`` product
    (padding included). One SM gets ``1/P`` of the bandwidth and of the peak::

        c_t = max(bytes / n_tiles / (bandwidth / P),  2·BM·BN·k / (peak(scheme) / P))

    Not modelled: dequantization and activation-quantization work, pipeline latency, L2 misses.
    """
    s = parse_scheme(scheme)
    n_tiles = _n_tiles(s, m, n, hw)
    if n_tiles == 0:
        return 0.0
    bm, bn = hw.tile(s)
    moved = n * k * s.weight_bits / 8 + m * k * s.activation_traffic_bits / 8 + 2 * m * n
    return max(moved / n_tiles / (hw.bandwidth / hw.num_sms), 2 * bm * bn * k / (hw.peak(s) / hw.num_sms))


def block_time(scheme: Scheme | str, m: int, n: int, k: int, hw: HardwareModel = H100_SXM) -> float:
    """Modelled time of one linear block ``[m, k] @ [k, n]`` under ``scheme``, seconds (spec §3.3).

    ``T = n_t · c_t / P`` with ``n_t = ⌈m/BM⌉·⌈n/BN⌉`` tiles spread evenly over the ``P`` SMs of
    the fused persistent kernel (many more tiles than SMs, so makespan ≈ work / P) and ``c_t``
    from ``tile_time``. This equals the roofline ``max(bytes / bandwidth, padded flops / peak)``
    of the block. ``m = 0`` costs 0.
    """
    for name, v in (("m", m), ("n", n), ("k", k)):
        _check_int(name, v, 0 if name == "m" else 1)
    s = parse_scheme(scheme)
    return _n_tiles(s, m, n, hw) * tile_time(s, m, n, k, hw) / hw.num_sms


def _n_tiles(s: Scheme, m: int, n: int, hw: HardwareModel) -> int:
    bm, bn = hw.tile(s)
    return math.ceil(m / bm) * math.ceil(n / bn)


def layer_shapes(counts: Sequence[int] | np.ndarray, d_model: int, d_ffn: int, batch: int, *, top_k: int,
                 n_shared: int = 0) -> list[tuple[int, int, int]]:
    """GEMM shapes ``(m, n, k)`` of the layer's blocks, in block order (spec §3.3).

    Routed expert ``i``: gate and up ``(M_i, d_ffn, d_model)``, down ``(M_i, d_model, d_ffn)``
    with ``M_i`` from ``expert_workloads``. Shared experts (``n_shared > 0``) are merged into one
    expert with ``m = batch`` and ``d_ffn · n_shared`` hidden units.
    """
    _check_int("d_model", d_model, 1)
    _check_int("d_ffn", d_ffn, 1)
    _check_int("n_shared", n_shared, 0)
    rows = [int(v) for v in expert_workloads(counts, batch, top_k)] + ([batch] if n_shared else [])
    hidden = [d_ffn] * (len(rows) - bool(n_shared)) + ([d_ffn * n_shared] if n_shared else [])
    return [shape for m, h in zip(rows, hidden) for shape in ((m, h, d_model), (m, h, d_model), (m, d_model, h))]


def layer_costs(counts: Sequence[int] | np.ndarray, d_model: int, d_ffn: int, batch: int,
                schemes: Sequence[Scheme | str], *, top_k: int, n_shared: int = 0,
                hw: HardwareModel = H100_SXM) -> np.ndarray:
    """Modelled times ``t [blocks, schemes]`` (seconds) of one MoE layer, ``blocks = 3·(experts + [n_shared>0])``."""
    parsed = [parse_scheme(s) for s in schemes]
    if not parsed:
        raise ValueError("layer_costs: schemes is empty.")
    shapes = layer_shapes(counts, d_model, d_ffn, batch, top_k=top_k, n_shared=n_shared)
    return np.array([[block_time(s, *shape, hw) for s in parsed] for shape in shapes])


def layer_sizes(n_experts: int, d_model: int, d_ffn: int, n_shared: int = 0) -> np.ndarray:
    """Weights per block ``[blocks]`` (float64): ``d_model·d_ffn`` for routed blocks, ``n_shared`` times that for shared."""
    _check_int("n_experts", n_experts, 1)
    _check_int("n_shared", n_shared, 0)
    sizes = [1.0] * (3 * n_experts) + [float(n_shared)] * (3 if n_shared else 0)
    return np.array(sizes) * d_model * d_ffn


def gate_up_ties(n_experts: int, n_shared: int = 0) -> list[tuple[int, int]]:
    """Tied groups ``[(gate, up), …]`` in block order: gate and up read the same input (spec §3.4)."""
    _check_int("n_experts", n_experts, 1)
    _check_int("n_shared", n_shared, 0)
    return [(3 * e, 3 * e + 1) for e in range(n_experts + bool(n_shared))]


# ---------------------------------------------------------------- allocation (spec §3.4)


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A solved layer: ``choice [blocks]`` (scheme index per block, int64) and its totals.

    ``loss`` = L, ``time`` = T (seconds if the times were), ``bits`` = Σ bits·size,
    ``average_bits`` = bits / Σ size, ``objective``: L (r = 1), T (r = 0), else
    ``(L + ε_L)^r (T + ε_T)^(1−r)``. ``status``: how it was solved.
    """

    choice: np.ndarray
    loss: float
    time: float
    bits: float
    average_bits: float
    objective: float
    r: float
    status: str


@dataclasses.dataclass(frozen=True)
class _Problem:
    """The validated problem with tied blocks merged: ``group [blocks]`` maps block → group;
    ``loss`` / ``time`` / ``weight`` are ``[groups, schemes]`` (weight = bits·size)."""

    block_loss: np.ndarray
    block_time: np.ndarray
    block_weight: np.ndarray
    sizes: np.ndarray
    group: np.ndarray
    loss: np.ndarray
    time: np.ndarray
    weight: np.ndarray
    budget: float
    r: float
    eps_loss: float
    eps_time: float


def budget_from_average_bits(average_bits: float, sizes: Sequence[float] | np.ndarray) -> float:
    """``B_mem = average_bits × Σ size`` (total bits)."""
    if not (isinstance(average_bits, (int, float)) and math.isfinite(average_bits) and average_bits > 0):
        raise ValueError(f"average_bits must be a finite number > 0, got {average_bits!r}.")
    return float(average_bits) * float(_positive_vector("sizes", sizes).sum())


def allocate(loss: np.ndarray, time: np.ndarray, sizes: np.ndarray, bits: np.ndarray, budget_bits: float, *,
             r: float = 1.0, tied: Sequence[Sequence[int]] = ()) -> Allocation:
    """Solve the MxMoE allocation of one layer (spec §3.4) exactly.

    ``loss [blocks, schemes]``: Δ (≥ 0). ``time [blocks, schemes]``: modelled times (≥ 0).
    ``sizes [blocks]``: weights per block. ``bits [schemes]`` or ``[blocks, schemes]``: budget bits per
    weight (per block when scale/zero overhead depends on the block's shape).
    ``budget_bits``: total bits (``budget_from_average_bits``). ``r`` in [0, 1]. ``tied``: groups
    of block indices that must share a scheme (``gate_up_ties``).
    r = 1 and r = 0: one MILP; 0 < r < 1: dichotomic λ-search over ``min L + λT`` (module doc).
    Raises ValueError for a budget below the smallest achievable memory.
    """
    p = _prepare(loss, time, sizes, bits, budget_bits, r, tied)
    if p.r == 1.0:
        return _finish(p, _solve_mckp(p.loss, p.weight, p.budget), "optimal (MILP, min L)")
    if p.r == 0.0:
        return _finish(p, _solve_mckp(p.time, p.weight, p.budget), "optimal (MILP, min T)")
    choices = _supported_points(p)
    rows = np.arange(p.loss.shape[0])
    best = min(choices, key=lambda c: _objective(p, p.loss[rows, c].sum(), p.time[rows, c].sum(), log=True))
    return _finish(p, best, f"optimal (dichotomic λ-search, {len(choices)} hull points examined)")


def brute_force(loss: np.ndarray, time: np.ndarray, sizes: np.ndarray, bits: np.ndarray, budget_bits: float, *,
                r: float = 1.0, tied: Sequence[Sequence[int]] = (), max_combinations: int = 1_000_000) -> Allocation:
    """Exhaustive reference for ``allocate`` (same arguments; small instances only).

    Enumerates ``schemes ** groups`` assignments (tied blocks form one group) and refuses more
    than ``max_combinations`` (at most 1e6).
    """
    p = _prepare(loss, time, sizes, bits, budget_bits, r, tied)
    groups, n_schemes = p.loss.shape
    if not 1 <= max_combinations <= 1_000_000:
        raise ValueError(f"max_combinations must be in [1, 1e6], got {max_combinations}.")
    if n_schemes ** groups > max_combinations:
        raise ValueError(f"brute_force: {n_schemes}^{groups} assignments exceed max_combinations={max_combinations}.")
    total_l, total_t, total_w = (_all_sums(a) for a in (p.loss, p.time, p.weight))
    objective = _objective(p, total_l, total_t, log=True)
    objective = np.where(total_w <= p.budget * (1 + 1e-12), objective, np.inf)
    flat = int(np.argmin(objective))
    return _finish(p, np.array(np.unravel_index(flat, (n_schemes,) * groups)), "optimal (brute force)")


def _all_sums(a: np.ndarray) -> np.ndarray:
    """``[schemes ** groups]``: Σ_g a[g, k_g] over every assignment, in C order of ``(k_0, …)``."""
    total = np.zeros(())
    for row in a:
        total = total[..., None] + row
    return total.reshape(-1)


def _prepare(loss, time, sizes, bits, budget_bits, r, tied) -> _Problem:
    loss = np.asarray(loss, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64)
    if loss.ndim != 2 or loss.size == 0:
        raise ValueError(f"loss must be a non-empty [blocks, schemes] array, got shape {loss.shape}.")
    for name, a in (("loss", loss), ("time", time)):
        if a.shape != loss.shape:
            raise ValueError(f"{name} must have shape [blocks, schemes] = {loss.shape}, got {a.shape}.")
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"{name} must be finite and >= 0.")
    sizes = _positive_vector("sizes", sizes, loss.shape[0])
    if np.ndim(bits) == 2:  # per block: the stored bits of each scheme on each block's shape
        bits = np.asarray(bits, dtype=np.float64)
        if bits.shape != loss.shape or not np.all(np.isfinite(bits)) or np.any(bits <= 0):
            raise ValueError(f"bits must be finite, > 0 and of shape [schemes] or [blocks, schemes] = {loss.shape}, "
                             f"got shape {bits.shape}.")
    else:
        bits = _positive_vector("bits", bits, loss.shape[1])[None, :]
    if not (isinstance(budget_bits, (int, float)) and math.isfinite(budget_bits) and budget_bits > 0):
        raise ValueError(f"budget_bits must be a finite number > 0, got {budget_bits!r}.")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
        raise ValueError(f"r must be a number in [0, 1], got {r!r}.")
    group = _tie_groups(tied, loss.shape[0])
    n_groups = int(group.max()) + 1
    weight = sizes[:, None] * bits
    merged = [np.zeros((n_groups, loss.shape[1])) for _ in range(3)]
    for out, a in zip(merged, (loss, time, weight)):
        np.add.at(out, group, a)
    _check_budget(merged[2], budget_bits, sizes.sum())
    eps_loss, eps_time = (1e-12 * (a.max(1).sum() or 1.0) for a in merged[:2])
    return _Problem(loss, time, weight, sizes, group, *merged, float(budget_bits), float(r), eps_loss, eps_time)


def _positive_vector(name: str, v, length: int | None = None) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or (length is not None and a.size != length):
        want = f"[{length}]" if length is not None else "non-empty 1-D"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}.")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"{name} must be finite and > 0.")
    return a


def _tie_groups(tied: Sequence[Sequence[int]], n_blocks: int) -> np.ndarray:
    """Union-find over ``tied``: ``[blocks]`` group ids numbered by first block."""
    parent = list(range(n_blocks))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for g in tied:
        members = list(g)
        for i in members:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n_blocks:
                raise ValueError(f"tied: block index {i!r} is not an int in [0, {n_blocks}).")
        for i in members[1:]:
            parent[root(i)] = root(members[0])
    roots = [root(i) for i in range(n_blocks)]
    ids = {rt: n for n, rt in enumerate(dict.fromkeys(roots))}
    return np.array([ids[rt] for rt in roots], dtype=np.int64)


def _check_budget(weight: np.ndarray, budget: float, total_size: float) -> None:
    least = weight.min(1).sum()
    if least > budget * (1 + 1e-12):
        raise ValueError(
            f"budget_bits={budget:.6g} is {budget / total_size:.4f} bits per weight on average, but the least "
            f"achievable with these schemes (and ties) is {least / total_size:.4f} bits per weight. Raise the "
            f"budget to at least {least:.6g} bits (average {least / total_size:.4f}) or add a lower-bit scheme.")


def _solve_mckp(cost: np.ndarray, weight: np.ndarray, capacity: float) -> np.ndarray:
    """Multiple-choice knapsack as a MILP: ``choice [groups]`` minimising Σ cost[g, k_g] with
    Σ weight[g, k_g] ≤ capacity (binary ``x [groups·schemes]``, one 1 per group).

    The objective is scaled so that its largest total is 1e6: HiGHS stops at an absolute gap of
    1e-6, so the result is optimal to ~1e-12 relative. A solution that meets the memory row
    only within HiGHS's feasibility tolerance is re-solved once with a 2e-6 tighter budget.
    """
    groups, n_schemes = cost.shape
    scale = cost.max(1).sum()
    c = (cost * (1e6 / scale) if scale > 0 else cost).reshape(-1)
    one_each = csr_matrix((np.ones(groups * n_schemes), (np.repeat(np.arange(groups), n_schemes),
                                                         np.arange(groups * n_schemes))))
    for rhs in (1.0, 1.0 - 2e-6):
        res = milp(c, integrality=np.ones_like(c), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0},
                   constraints=[LinearConstraint(one_each, 1, 1),
                                LinearConstraint(weight.reshape(1, -1) / capacity, -np.inf, rhs)])
        if res.status != 0:
            raise RuntimeError(f"MxMoE allocation MILP failed: {res.message}")
        choice = res.x.reshape(groups, n_schemes).argmax(1)
        if weight[np.arange(groups), choice].sum() <= capacity * (1 + 1e-12):
            return choice
    raise RuntimeError("MxMoE allocation MILP: the solution exceeds the memory budget beyond float tolerance.")


def _supported_points(p: _Problem) -> list[np.ndarray]:
    """Choices at every supported vertex of the lower-left hull of feasible (L, T), by
    dichotomic search on ``min w_L·l + w_T·t`` (``l``, ``t``: L and T over their scales)."""
    l = p.loss / (p.loss.max(1).sum() or 1.0)
    t = p.time / (p.time.max(1).sum() or 1.0)
    rows = np.arange(l.shape[0])

    def solve(wl: float, wt: float) -> tuple[np.ndarray, tuple[float, float]]:
        c = _solve_mckp(wl * l + wt * t, p.weight, p.budget)
        return c, (float(l[rows, c].sum()), float(t[rows, c].sum()))

    found = [solve(1.0, 0.0), solve(0.0, 1.0)]
    stack = [(found[0][1], found[1][1])]
    while stack:
        (la, ta), (lb, tb) = stack.pop()  # a: the smaller l, b: the smaller t
        wl, wt = ta - tb, lb - la  # normal of the segment a–b
        if wl <= 1e-12 or wt <= 1e-12:
            continue
        c, (lc, tc) = solve(wl, wt)
        if wl * lc + wt * tc < wl * la + wt * ta - 1e-10 * (wl + wt):  # strictly below the segment
            found.append((c, (lc, tc)))
            stack += [((la, ta), (lc, tc)), ((lc, tc), (lb, tb))]
    return [c for c, _ in found]


def _objective(p: _Problem, total_loss, total_time, *, log: bool):
    """L (r = 1), T (r = 0), else ``r·log(L + ε_L) + (1−r)·log(T + ε_T)`` (``log``) or its exp.
    Scalars or arrays."""
    if p.r == 1.0:
        return total_loss
    if p.r == 0.0:
        return total_time
    value = p.r * np.log(total_loss + p.eps_loss) + (1 - p.r) * np.log(total_time + p.eps_time)
    return value if log else np.exp(value)


def _finish(p: _Problem, group_choice: np.ndarray, status: str) -> Allocation:
    choice = np.asarray(group_choice, dtype=np.int64)[p.group]
    rows = np.arange(choice.size)
    total_l = float(p.block_loss[rows, choice].sum())
    total_t = float(p.block_time[rows, choice].sum())
    total_w = float(p.block_weight[rows, choice].sum())
    objective = float(_objective(p, total_l, total_t, log=False))
    return Allocation(choice, total_l, total_t, total_w, total_w / float(p.sizes.sum()), objective, p.r, status)


def _check_int(name: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}.")
