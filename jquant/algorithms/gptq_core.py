"""GPTQ (Frantar et al., 2023): one-shot weight quantization with second-order error feedback.

Paper maths only; ``jquant.algorithms.gptq`` wires it to formats and sites.

Layout: ``W [in, out]`` (jquant's kernel layout; GPTQ's "columns" are our
rows), ``H = X^T X [in, in]`` over calibration inputs. With
``U = chol(H^-1)^T`` (upper Cholesky factor of the damped inverse Hessian),
rows are quantized in order; after row ``i`` the error is pushed onto the
rows not yet quantized (paper Eq. 3 / Alg. 1):

    e_i = (w_i - q(w_i)) / U[i, i],        W[j, :] -= U[i, j] * e_i   for j > i

Lazy batch updates: rows are processed in blocks of ``block_size``; inside a
block updates touch only the block, and the accumulated block error
``E [block, out]`` updates the remaining rows once (``W[rest] -= U[block, rest]^T E``);
inside a block, sub-blocks of ``SUB_BLOCK`` rows do the same one level down
(``gptq_loop``). ``U`` comes from one Cholesky factorization of the reversed
``H`` and a triangular inverse (``inverse_cholesky_upper``).

Groups: with ``group_size`` the quantization parameters (scale, zero) of a
group of consecutive rows are computed from the *current* (error-updated)
rows when the group's first row is reached. ``static_groups`` computes them
all from the original weights up front; ``act_order`` (rows in order of
decreasing ``diag(H)``) with groups always uses static groups, so every group
stays a contiguous block of the original rows and the stored format is a
plain group-wise one. ``block_size`` is rounded to a multiple of ``group_size``.

Programs: ``gptq_columns`` (``gptq`` for one weight) runs the factor (the act-order permutation, dead inputs, damping
and ``U``) once per solve and the sweep (``gptq_sweep``, which also casts the weight, zeroes dead rows, permutes it
and runs the caller's ``finish``, e.g. the format's encode) on chunks of ``OUT_CHUNK`` output columns: one compiled
sweep per input size and settings, shared by every weight shape of that input size. Where the arrays live on the CPU
the factor is LAPACK's (``_hessian_factor_host``: no XLA program to compile) and the columns are cut into chunks and
the results cut back apart by numpy; on an accelerator the factor (``_hessian_factor_once``, damping traced, so
retries reuse it) is one program per input size and the cut and split (``_out_chunks``, ``_split_out_chunks``) two
small programs per set of weight shapes. Host arrays are cast on the host, so no eager operation compiles per shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

ParamsFn = Callable[[jax.Array], tuple[jax.Array, jax.Array | None]]
QdqFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
SUB_BLOCK = 16  # rows per inner lazy batch (gptq_loop); smaller where the block or group size needs it
OUT_CHUNK = 512  # output columns per compiled sweep (``gptq``): narrower layers are zero-padded to it
_GATHER_ROWS = 512  # rows per chunk when the host factor gathers the permuted Hessian


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQConfig:
    """``damp``: fraction of ``mean(diag(H))`` added to the diagonal; see the module docstring for the rest.

    ``act_order`` is on by default (as llm-compressor's ``actorder="static"``): experiments/results/gptq_act_order.md
    measures it against off on jq-llama-small over three calibration seeds, and it is ahead at more settings than it
    is behind (lower KL to the float model at every one)."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = False

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"GPTQConfig.block_size must be >= 1, got {self.block_size}.")
        if not 0 <= self.damp < 1:
            raise ValueError(f"GPTQConfig.damp must be in [0, 1), got {self.damp}.")


@dataclasses.dataclass(frozen=True)
class GPTQResult:
    """Dequantized weights ``[in, out]``, per-group scales/zeros ``[n_groups, out]`` and the damping used."""

    weights: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    damp: float


def prepare_hessian(h: jax.Array, w: jax.Array, damp: float) -> tuple[jax.Array, jax.Array]:
    """Dead inputs (``H[i,i] == 0``) get ``H[i,i] = 1`` and zero weight rows; then ``H += damp * mean(diag) * I``."""
    diag = jnp.diag(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    w = jnp.where(dead[:, None], 0.0, w)
    return h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype), w


def damped_factor(h: jax.Array, w: jax.Array, damp: float, max_retries: int = 4, *, what: str = "gptq"
                  ) -> tuple[jax.Array, jax.Array, jax.Array, float]:
    """``(H_damped, W0, U, damp)``: ``prepare_hessian`` then ``inverse_cholesky_upper``, multiplying the
    damping by 10 (up to ``max_retries`` times) while ``H`` is not positive definite; then raises
    ``FloatingPointError`` naming ``what``."""
    (h_damped, w0, u), damp = _with_damping_retries(lambda d: _damped_factor_once(h, w, d), damp, max_retries, what)
    return h_damped, w0, u, damp


def _with_damping_retries(factor_once: Callable, damp: float, max_retries: int, what: str) -> tuple[tuple, float]:
    """``(outputs, damp)`` of the first ``factor_once(damp) -> (*outputs, finite)`` whose factor is finite, the
    damping multiplied by 10 after each failure (``max_retries`` times); then a ``FloatingPointError`` naming
    ``what``."""
    for _ in range(max_retries + 1):
        *outputs, finite = factor_once(damp)
        if bool(finite):
            return tuple(outputs), damp
        damp = damp * 10 if damp > 0 else 1e-4
    raise FloatingPointError(
        f"{what}: the Hessian is not positive definite even with damping {damp / 10:g}; the calibration inputs "
        "are probably degenerate (too few tokens or constant features). Use more calibration data or RTN."
    )


@jax.jit
def _damped_factor_once(h: jax.Array, w: jax.Array, damp: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One try of ``damped_factor`` as one program (``damp`` traced: retries reuse it): ``(H_damped, W0, U, finite)``."""
    h_damped, w0 = prepare_hessian(h, w, damp)
    u = inverse_cholesky_upper(h_damped)
    return h_damped, w0, u, jnp.all(jnp.isfinite(u))


@functools.partial(jax.jit, static_argnames=("act_order",))
def _hessian_factor_once(h: jax.Array, damp: float, *, act_order: bool
                         ) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array]:
    """One try of GPTQ's factor of ``h [in, in]`` as one program per input size: ``(U, perm, dead, finite)``.

    ``U`` is in the sweep's row order: with ``act_order`` the rows are first permuted by ``act_order_permutation``
    (damping and dead inputs commute with permuting, so the permuted Hessian is factored directly); ``perm [in]`` is
    None without it. ``dead [in]`` (original order) marks inputs with ``H[i, i] == 0``, whose weight rows the sweep
    zeroes (``prepare_hessian``). Unlike ``_damped_factor_once`` the weight is no argument (sites of one input size
    share the program) and the damped Hessian no output (no extra ``[in, in]`` buffer outlives the call).
    """
    dead = jnp.diag(h) == 0
    perm = act_order_permutation(h) if act_order else None
    if act_order:
        h = h[perm][:, perm]
    h_damped, _ = prepare_hessian(h, jnp.zeros((h.shape[0], 1), h.dtype), damp)
    u = inverse_cholesky_upper(h_damped)
    return u, perm, dead, jnp.all(jnp.isfinite(u))


def _hessian_factor_host(h: np.ndarray, damp: float, *, act_order: bool, dtype=None
                         ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray, bool]:
    """``_hessian_factor_once`` in numpy and LAPACK (``potrf``, ``trtri``), for Hessians on the CPU: the same maths
    (``inverse_cholesky_upper``), no XLA program to compile. ``(U, perm, dead, finite)`` as host arrays, ``U`` in
    ``dtype`` (default ``h``'s).

    Memory: besides ``h`` (left as it is, e.g. the float64 statistics) it holds two ``[in, in]`` arrays of ``dtype``:
    the permuted, reversed and damped Hessian, gathered from ``h`` in row chunks (so a float64 ``h`` is never copied
    whole) and factored and inverted in place by LAPACK, and ``U``.
    """
    dtype = np.dtype(dtype or h.dtype)
    n = h.shape[0]
    diag = np.diag(h).astype(dtype)
    dead = diag == 0
    perm = np.argsort(-np.where(dead, 1.0, diag), kind="stable").astype(np.int32) if act_order else None
    order = (np.arange(n) if perm is None else perm)[::-1]
    reversed_h = np.empty((n, n), dtype)  # J P H P^T J, symmetric: its C-order memory is also its Fortran order
    for start in range(0, n, _GATHER_ROWS):
        rows = order[start:start + _GATHER_ROWS]
        reversed_h[start:start + len(rows)] = h[rows[:, None], order[None, :]]
    d = diag[order]
    d = d + np.where(d == 0, 1, 0).astype(dtype)  # dead inputs: H[i, i] = 1 (prepare_hessian)
    rows = np.arange(n)
    reversed_h[rows, rows] = d + (damp * np.mean(d[::-1])).astype(dtype)  # mean in the sweep's order
    potrf, trtri = scipy.linalg.get_lapack_funcs(("potrf", "trtri"), (reversed_h,))
    lower, info = potrf(reversed_h.T, lower=1, clean=1, overwrite_a=1)  # .T: Fortran order, factored in place
    if info != 0:
        return None, perm, dead, False
    inverse, info = trtri(lower, lower=1, overwrite_c=1)
    u = np.ascontiguousarray(inverse[::-1, ::-1])
    del lower, inverse, reversed_h
    return u, perm, dead, info == 0 and bool(np.all(np.isfinite(u)))


@jax.jit
def inverse_cholesky_upper(h: jax.Array) -> jax.Array:
    """``U`` upper triangular with ``U^T U = H^-1`` (NaN if ``H`` is not positive definite).

    With ``J`` the reversal permutation and ``J H J = M M^T`` (lower Cholesky ``M``), ``H = R R^T`` for the upper
    ``R = J M J``, so ``U = R^-1 = J M^-1 J``: one Cholesky and one triangular inverse, without forming ``H^-1``
    and factoring it again (about a third of the flops, and no explicit inverse's rounding).
    """
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    return jax.scipy.linalg.solve_triangular(lower, eye, lower=True)[::-1, ::-1]


def gptq_loop(w, u, static_scales, static_zeros, row_group, *, params_fn, qdq_fn, group_size, block_size, sub_block,
              per_row_params):
    """The quantization sweep over rows of ``w [in, out]`` given ``u`` (see module docstring).

    ``row_group [in]`` is each (already permuted) row's group index, used to
    look up ``static_scales/static_zeros [n_groups, out]`` when
    ``per_row_params`` is False; otherwise group parameters are computed from
    the current rows at each group start and written back into them.
    Returns the dequantized rows and the (possibly updated) group parameters.

    Lazy batches at two levels: inside a block, rows are quantized in sub-blocks of ``sub_block`` rows (which
    divides the block and the group size), row updates touching only the sub-block, whose error then updates
    the rest of the block with one ``[sub, block]^T @ E_sub`` product (so a group's rows are current when its
    first row, a sub-block start, computes its parameters); after a block only the later blocks are updated,
    one ``[block, block]^T @ E`` product each (``U`` is upper triangular, so earlier rows would get zero).
    Finished rows are overwritten with their quantized values in place: no second ``[in, out]`` buffer.
    """
    n_in, n_out = w.shape
    n_blocks = n_in // block_size
    has_zero = static_zeros is not None
    sub_rows = jnp.arange(sub_block)
    block_rows = jnp.arange(block_size)

    def block_body(b, carry):
        w, scales, zeros = carry
        i1 = b * block_size
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (block_size, block_size))

        def sub_body(t, inner):
            w1, e1, scales, zeros = inner
            j1 = t * sub_block
            if per_row_params:
                def fresh(args):
                    scales, zeros = args
                    s, z = params_fn(jax.lax.dynamic_slice(w1, (j1, 0), (group_size, n_out)))
                    g = row_group[i1 + j1]
                    return scales.at[g].set(s[0]), zeros.at[g].set(z[0]) if has_zero else zeros

                scales, zeros = jax.lax.cond(j1 % group_size == 0, fresh, lambda a: a, (scales, zeros))
            us = jax.lax.dynamic_slice(u1, (j1, j1), (sub_block, sub_block))

            def row_body(j, rows):
                ws, qs, es = rows
                g = row_group[i1 + j1 + j]
                q = qdq_fn(ws[j][None], scales[g][None], zeros[g][None] if has_zero else None)[0]
                err = (ws[j] - q) / us[j, j]
                ws = ws - jnp.where(sub_rows > j, us[j], 0.0)[:, None] * err[None, :]
                return ws, qs.at[j].set(q), es.at[j].set(err)

            ws = jax.lax.dynamic_slice(w1, (j1, 0), (sub_block, n_out))
            _, qs, es = jax.lax.fori_loop(0, sub_block, row_body, (ws, jnp.zeros_like(ws), jnp.zeros_like(ws)))
            u_rest = jax.lax.dynamic_slice(u1, (j1, 0), (sub_block, block_size))
            later = (block_rows >= j1 + sub_block)[:, None]
            w1 = jax.lax.dynamic_update_slice(w1 - jnp.where(later, u_rest.T @ es, 0.0), qs, (j1, 0))
            return w1, jax.lax.dynamic_update_slice(e1, es, (j1, 0)), scales, zeros

        w1 = jax.lax.dynamic_slice(w, (i1, 0), (block_size, n_out))
        init = (w1, jnp.zeros_like(w1), scales, zeros)
        q1, e1, scales, zeros = jax.lax.fori_loop(0, block_size // sub_block, sub_body, init)

        def update_later(k, w):
            r = k * block_size
            u_k = jax.lax.dynamic_slice(u, (i1, r), (block_size, block_size))
            w_k = jax.lax.dynamic_slice(w, (r, 0), (block_size, n_out))
            return jax.lax.dynamic_update_slice(w, w_k - u_k.T @ e1, (r, 0))

        w = jax.lax.fori_loop(b + 1, n_blocks, update_later, jax.lax.dynamic_update_slice(w, q1, (i1, 0)))
        return w, scales, zeros

    return jax.lax.fori_loop(0, n_blocks, block_body, (w, static_scales, static_zeros))


def gptq(
    w: jax.Array,
    h: jax.Array,
    params_fn: ParamsFn,
    qdq_fn: QdqFn,
    *,
    group_size: int | None,
    config: GPTQConfig = GPTQConfig(),
    max_damp_retries: int = 4,
    out_chunk: int | None = None,
) -> GPTQResult:
    """Quantize ``w [in, out]`` against Hessian ``h [in, in]``.

    ``params_fn(rows [g, out]) -> (scale [1, out], zero [1, out] | None)``
    gives a group's quantization parameters; ``qdq_fn(row [1, out], scale,
    zero) -> [1, out]`` quantizes and dequantizes a row with them. Without
    ``group_size`` one parameter set covers all rows (per output channel).

    If the damped Hessian is not positive definite, damping is multiplied by
    10 up to ``max_damp_retries`` times (the damping used is returned); after
    that a ``FloatingPointError`` explains what to do. ``out_chunk``: see ``gptq_columns``.
    """
    (result,), damp = gptq_columns([w], h, params_fn, qdq_fn, group_size=group_size, config=config,
                                   max_damp_retries=max_damp_retries, out_chunk=out_chunk)
    return GPTQResult(*result, damp=damp)


def gptq_columns(
    weights: Sequence[jax.Array],
    h: jax.Array,
    params_fn: ParamsFn,
    qdq_fn: QdqFn,
    *,
    group_size: int | None,
    config: GPTQConfig = GPTQConfig(),
    max_damp_retries: int = 4,
    out_chunk: int | None = None,
    finish: Callable | None = None,
) -> tuple[list, float]:
    """``gptq`` of every ``weights[i] [in, out_i]`` against one Hessian ``h [in, in]`` (linears that read the same
    inputs): ``([finish(q_i, scales_i, zeros_i) ...], damp)``, ``finish`` defaulting to the tuple itself.

    Output channels are independent given ``H`` (every update of Eq. 3 acts column by column), so the weights' columns
    are swept together, in chunks of ``out_chunk`` columns (default ``OUT_CHUNK``), the last zero-padded: one factor
    serves them all, one compiled sweep serves every output size of an input size, and each result equals the
    whole-width sweep of that weight alone (``tests/algorithms/test_gptq_core.py``). ``finish`` (e.g. the format's
    encode) runs inside the sweep, on each chunk: it must work column by column and return a pytree whose arrays hold
    the output columns on their last axis; any static metadata of its result (a QArray's shape) is the chunk's, for
    the caller to set.
    """
    out_chunk = out_chunk or OUT_CHUNK
    if not weights or len({w.shape[0] for w in weights}) != 1 or any(w.ndim != 2 for w in weights):
        raise ValueError(f"gptq: the weights must be [in, out] with one input size, got "
                         f"{[tuple(w.shape) for w in weights]}.")
    dtype = jnp.promote_types(jnp.result_type(*weights), jnp.float32)  # float64 stays float64 (tests)
    host = _on_host(h, *weights)
    # device weights are cast inside the sweep: no eager program per shape
    weights = tuple(w if isinstance(w, jax.Array) else _as_dtype(w, dtype) for w in weights)
    n_in = weights[0].shape[0]
    if h.shape != (n_in, n_in):
        raise ValueError(f"gptq: Hessian shape {h.shape} does not match the weight's input size {n_in}.")
    sweep = _sweep_settings(n_in, group_size, config, dtype)
    if host:
        h = np.asarray(h)  # cast row chunk by row chunk in the factor: no whole copy of float64 statistics
        factor = lambda d: _hessian_factor_host(h, d, act_order=config.act_order, dtype=dtype)  # noqa: E731
    else:
        h = _as_dtype(h, dtype)
        factor = lambda d: _hessian_factor_once(h, float(d), act_order=config.act_order)  # noqa: E731
    (u, perm, dead), damp = _with_damping_retries(factor, config.damp, max_damp_retries, "gptq")
    del h
    widths = tuple(int(w.shape[1]) for w in weights)
    if host:
        u, perm, dead = jax.device_put((u, perm, dead))
        chunks = weights if widths == (out_chunk,) else jax.device_put(_cut_columns(weights, width=out_chunk, xp=np))
    else:
        chunks = weights if widths == (out_chunk,) else _out_chunks(weights, width=out_chunk)
    parts = [gptq_sweep(c, dead, u, perm, params_fn=params_fn, qdq_fn=qdq_fn, finish=finish, **sweep)
             for c in chunks]
    if host:
        results = [jax.tree.map(jax.device_put, r) for r in _split_columns(parts, widths=widths, xp=np)]
    else:
        results = _split_out_chunks(parts, widths=widths)
    return results, damp


def _on_host(*arrays) -> bool:
    """Whether every array is a CPU device array or a host array while JAX's default backend is the CPU: then the
    factor, cut and split run on the host (numpy, LAPACK) instead of compiling XLA programs for them."""
    return all(all(d.platform == "cpu" for d in a.devices()) if isinstance(a, jax.Array)
               else jax.default_backend() == "cpu" for a in arrays)


def _cut_columns(weights: Sequence, *, width: int, xp) -> tuple:
    """The weights' columns side by side as ``ceil(Σ out / width)`` chunks ``[in, width]``, the last zero-padded;
    ``xp``: numpy (host arrays) or jax.numpy (in ``_out_chunks``)."""
    joined = xp.concatenate([xp.asarray(w) for w in weights], axis=1)
    n = -(-joined.shape[1] // width)
    padded = xp.concatenate([joined, xp.zeros((joined.shape[0], n * width - joined.shape[1]), joined.dtype)], axis=1)
    return tuple(padded[:, i * width:(i + 1) * width] for i in range(n))


def _split_columns(parts: Sequence, *, widths: tuple[int, ...], xp) -> list:
    """The sweeps' results of consecutive column chunks (pytrees whose arrays hold the output columns on their last
    axis: ``(q, scales, zeros)`` or ``finish``'s) cut back into one result per weight of ``widths`` columns, padding
    dropped. The pytree structure (and any static metadata, e.g. a QArray's shape) is the first chunk's."""
    leaves, treedef = zip(*(jax.tree.flatten(p) for p in parts))
    joined = [xp.concatenate([xp.asarray(chunk[i]) for chunk in leaves], axis=-1) for i in range(len(leaves[0]))]
    ends = np.cumsum(widths)
    return [jax.tree.unflatten(treedef[0], [x[..., e - n:e] for x in joined]) for e, n in zip(ends, widths)]


@functools.partial(jax.jit, static_argnames=("width",))
def _out_chunks(weights: tuple[jax.Array, ...], *, width: int) -> tuple[jax.Array, ...]:
    """``_cut_columns`` on device arrays, as one program."""
    return _cut_columns(weights, width=width, xp=jnp)


@functools.partial(jax.jit, static_argnames=("widths",))
def _split_out_chunks(parts: list, *, widths: tuple[int, ...]) -> list:
    """``_split_columns`` on device arrays, as one program."""
    return _split_columns(parts, widths=widths, xp=jnp)


def _sweep_settings(n_in: int, group_size: int | None, config: GPTQConfig, dtype) -> dict:
    """``gptq_sweep``'s static settings for ``n_in`` input rows: dtype, group, block and sub-block size, and whether
    the groups are static. Raises if ``group_size`` does not divide ``n_in``."""
    gs = group_size or n_in
    if n_in % gs:
        raise ValueError(f"gptq: group_size={gs} does not divide the input size {n_in}.")
    block = max(gs, config.block_size - config.block_size % gs) if group_size else config.block_size
    block = min(block, n_in)
    if n_in % block:
        block = gs if group_size else _largest_divisor_at_most(n_in, block)
    return {"dtype": jnp.dtype(dtype), "group_size": gs, "block_size": block,
            "sub_block": math.gcd(block, gs, SUB_BLOCK),
            "static_groups": config.static_groups or config.act_order or group_size is None}


@functools.partial(jax.jit, static_argnames=("dtype", "params_fn", "qdq_fn", "finish", "group_size", "block_size",
                                             "sub_block", "static_groups"))
def gptq_sweep(w, dead, u, perm, *, dtype, params_fn, qdq_fn, finish, group_size, block_size, sub_block,
               static_groups):
    """Group parameters (from the original row order when ``static_groups``), ``gptq_loop`` and the rows put back
    in their original order: ``(q [in, out], scales, zeros)``, or ``finish`` of them.

    ``w [in, out]`` and ``dead [in]`` are in the original row order (``w`` is cast to ``dtype`` and its dead rows
    zeroed here, as ``prepare_hessian`` does), ``u`` in the sweep's, ``perm [in]`` (or None) the original index
    of each sweep row. One program per shapes, grid functions, group, block and sub-block size: every array is an
    argument, so sites of the same shape and format share it.
    """
    n_in, n_out = w.shape
    w = jnp.where(dead[:, None], 0.0, w.astype(dtype))
    w0 = w if perm is None else w[perm]
    inverse = None if perm is None else jnp.argsort(perm)
    n_groups = n_in // group_size
    group_of_row = jnp.arange(n_in) // group_size
    if static_groups:
        grouped = w.reshape(n_groups, group_size, n_out)
        s, z = jax.vmap(params_fn)(grouped)
        scales, zeros = s[:, 0], None if z is None else z[:, 0]
    else:
        s, z = jax.eval_shape(params_fn, w0[:group_size])
        scales = jnp.zeros((n_groups, n_out), s.dtype)
        zeros = None if z is None else jnp.zeros((n_groups, n_out), z.dtype)
    q, scales, zeros = gptq_loop(w0, u, scales, zeros, group_of_row if perm is None else group_of_row[perm],
                                 params_fn=params_fn, qdq_fn=qdq_fn, group_size=group_size, block_size=block_size,
                                 sub_block=sub_block, per_row_params=not static_groups)
    q = q if inverse is None else q[inverse]
    return (q, scales, zeros) if finish is None else finish(q, scales, zeros)


def act_order_permutation(h: jax.Array) -> jax.Array:
    """Rows in order of decreasing ``diag(H)`` as ``prepare_hessian`` leaves it (dead inputs count as 1; the
    damping adds the same amount to every entry, so it does not change the order)."""
    diag = jnp.diag(h)
    return jnp.argsort(-jnp.where(diag == 0, 1.0, diag))


def _as_dtype(x, dtype) -> jax.Array:
    """``x`` as a ``dtype`` device array without an XLA program: host arrays are cast by numpy and copied with
    ``device_put``, device arrays of that dtype pass unchanged (``jnp.asarray(x, dtype)`` would compile a small
    program for every new shape)."""
    if isinstance(x, jax.Array):
        return x if x.dtype == dtype else x.astype(dtype)
    return jax.device_put(np.asarray(x, dtype))


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, limit + 1) if n % d == 0)
