"""State-space scans of the Mamba families, and their causal depthwise convolution.

Mamba-1's selective scan (chunked form with a hand-written gradient, and recurrent form) and Mamba-2's SSD
(chunked and recurrent forms). Models call these through ``jquant.ops`` so that a kernel can
replace them here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jquant.formats import Format, QArray
from jquant.numerics.hadamard import fwht
from jquant.ops.linear import as_array, quantize_activation

HIGHEST = jax.lax.Precision.HIGHEST


def causal_conv1d(x: jax.Array, weight: jax.Array | QArray, bias: jax.Array | None, state: jax.Array, *,
                  activation: Format | None = None,
                  activation_scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Causal depthwise convolution continuing from ``state``.

    ``x [B, T, C]``, ``weight [K, C]`` (an array, or a ``QArray`` quantized along the taps, axis 0: one scale
    per channel or group of taps), ``bias [C]``, ``state [B, K-1, C]`` (the inputs before ``x``; zeros at the
    start) -> ``y [B, T, C]`` with ``y_t[c] = bias[c] + sum_k weight[k, c] * x'_{t-K+1+k}[c]``, and the new state
    (the last ``K-1`` of ``x'``). ``x' = Q_a(x)`` when ``activation`` is given (with an optional static
    ``activation_scale``: MambaQuant's site a1), quantized as ``linear`` quantizes its inputs, this call's positions
    only; the state keeps them as quantized, so each position is quantized once, when it arrives.
    """
    k, t = weight.shape[0], x.shape[1]
    if activation is not None:
        x = quantize_activation(x, activation, activation_scale)
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    w = as_array(weight, x.dtype).astype(x.dtype)
    y = sum(w[j] * padded[:, j : j + t] for j in range(k))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y, padded[:, t:]


def _combine(earlier: tuple[jax.Array, jax.Array], later: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Compose two affine maps ``h -> a h + b`` (``earlier`` applied first)."""
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


def _chunks(x: jax.Array, q: int) -> jax.Array:
    """``[B, T, ...]`` -> ``[T / q, B, q, ...]`` (``T`` a multiple of ``q``)."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, q, *x.shape[2:]), 1, 0)


def _associative_states(decay: jax.Array, drive: jax.Array, h0: jax.Array) -> jax.Array:
    """All states ``[h_1..h_q] [B, q, ...]`` of ``h_t = decay_t h_{t-1} + drive_t`` (log-depth ``associative_scan``)."""
    drive = drive.at[:, 0].add(decay[:, 0] * h0)
    return jax.lax.associative_scan(_combine, (decay, drive), axis=1)[1]


def _terms(u, delta, A, B):
    """``decay = exp(delta A)`` and ``drive = delta u B`` ``[B, (q,) Di, N]`` of Mamba-1's recurrence."""
    return jnp.exp(delta[..., None] * A), (delta * u)[..., None] * B[..., None, :]


def _time_major(*xs: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.moveaxis(x, 1, 0) for x in xs)


def _chunk_states(u, delta, A, B, h0, parallel: bool) -> jax.Array:
    """A chunk's states ``[B, q, Di, N]`` from its start state ``h0 [B, Di, N]``."""
    if parallel:
        return _associative_states(*_terms(u, delta, A, B), h0)

    def token(h, inputs):
        decay, drive = _terms(*inputs[:2], A, inputs[2])
        h = decay * h + drive
        return h, h

    return jnp.moveaxis(jax.lax.scan(token, h0, _time_major(u, delta, B))[1], 0, 1)


def _chunk_outputs(u, delta, A, B, C, h0, parallel: bool) -> tuple[jax.Array, jax.Array]:
    """A chunk's ``y [B, q, Di]`` and end state; the sequential form never holds ``[B, q, Di, N]``."""
    if parallel:
        hs = _chunk_states(u, delta, A, B, h0, parallel)
        return jnp.einsum("bqdn,bqn->bqd", hs, C, precision=HIGHEST), hs[:, -1]

    def token(h, inputs):
        u_t, d_t, b_t, c_t = inputs
        decay, drive = _terms(u_t, d_t, A, b_t)
        h = decay * h + drive
        return h, jnp.einsum("bdn,bn->bd", h, c_t, precision=HIGHEST)

    h, ys = jax.lax.scan(token, h0, _time_major(u, delta, B, C))
    return jnp.moveaxis(ys, 0, 1), h


def _input_grads(g, h_prev, decay, u, delta, A, B, C, h, dy):
    """Cotangents of one token (or a chunk, with a ``q`` axis) from ``g = dL/dh_t`` (spec of ``selective_scan``).

    ``w = g h_{t-1} decay_t`` is ``dL/d(delta_t A)``. Returns ``du, ddelta, dB, dC`` and this
    token's share of ``dA``.
    """
    g_b = jnp.einsum("b...dn,b...n->b...d", g, B, precision=HIGHEST)
    w = g * h_prev * decay
    du = delta * g_b
    ddelta = u * g_b + jnp.einsum("b...dn,dn->b...d", w, A, precision=HIGHEST)
    dB = jnp.einsum("b...dn,b...d->b...n", g, delta * u, precision=HIGHEST)
    dC = jnp.einsum("b...dn,b...d->b...n", h, dy, precision=HIGHEST)
    dA = jnp.einsum("b...dn,b...d->dn", w, delta, precision=HIGHEST)
    return du, ddelta, dB, dC, dA


def _chunk_grads(u, delta, A, B, C, dy, h_start, g_end, parallel: bool):
    """Backward through one chunk: ``(du, ddelta, dB, dC)``, ``dA`` and ``dL/dh_start``.

    The adjoint runs backwards: ``g_t = dy_t C_t + decay_{t+1} g_{t+1}``, with
    ``g_end`` (``dL/dh_q`` from later chunks) entering at the last token.
    """
    hs = _chunk_states(u, delta, A, B, h_start, parallel)
    h_prev = jnp.concatenate([h_start[:, None], hs[:, :-1]], axis=1)
    if parallel:
        decay = _terms(u, delta, A, B)[0]
        later_decay = jnp.concatenate([decay[:, 1:], jnp.ones_like(decay[:, :1])], axis=1)
        direct = dy[..., None] * C[..., None, :]
        g = _associative_states(later_decay[:, ::-1], direct[:, ::-1], g_end)[:, ::-1]
        *grads, dA = _input_grads(g, h_prev, decay, u, delta, A, B, C, hs, dy)
        return tuple(grads), dA, decay[:, 0] * g[:, 0]

    def token(carry, inputs):
        g_next, dA = carry
        u_t, d_t, b_t, c_t, dy_t, h_t, hp_t = inputs
        decay = _terms(u_t, d_t, A, b_t)[0]
        g = g_next + dy_t[..., None] * c_t[:, None, :]
        *grads, dA_t = _input_grads(g, hp_t, decay, u_t, d_t, A, b_t, c_t, h_t, dy_t)
        return (decay * g, dA + dA_t), tuple(grads)

    (g_start, dA), grads = jax.lax.scan(token, (g_end, jnp.zeros_like(A)),
                                        _time_major(u, delta, B, C, dy, hs, h_prev), reverse=True)
    return tuple(jnp.moveaxis(x, 0, 1) for x in grads), dA, g_start


def selective_scan(u, delta, A, B, C, h0, *, chunk_size: int, parallel: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Mamba-1 scan, full-sequence form: ``h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t``, ``y_t = h_t C_t``.

    ``u, delta [B, T, Di]``, ``A [Di, N]``, ``B, C [B, T, N]``, ``h0 [B, Di, N]`` ->
    ``y [B, T, Di]`` (no ``D`` skip) and the last state ``h_T [B, Di, N]``.

    ``lax.scan`` over chunks of ``chunk_size`` tokens. ``parallel`` (default: off CPU) solves
    each chunk with a log-depth ``associative_scan``; otherwise a token loop that never
    materialises ``[B, chunk, Di, N]`` in the forward pass (on CPU the scan is memory bound, and
    this is several times faster). The gradient is hand-written (``jax.custom_vjp``): forward
    keeps only each chunk's start state; backward recomputes the chunk's states and runs the
    adjoint recurrence backwards, so training memory is ``O(B * (T / chunk + chunk) * Di * N)``.
    Padded steps have ``delta = 0`` (``h`` unchanged), so ``h_T`` is exact.
    """
    if parallel is None:
        parallel = jax.default_backend() != "cpu"
    t = u.shape[1]
    q = min(chunk_size, t)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, (-t) % q)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    y, h = _selective_scan(q, parallel, pad(u), pad(delta), A, pad(B), pad(C), h0)
    return y[:, :t], h


def _merge_chunks(x: jax.Array) -> jax.Array:
    """``[T / q, B, q, ...]`` -> ``[B, T, ...]`` (inverse of ``_chunks``)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _selective_scan(q, parallel, u, delta, A, B, C, h0):
    return _selective_scan_fwd(q, parallel, u, delta, A, B, C, h0)[0]


def _selective_scan_fwd(q, parallel, u, delta, A, B, C, h0):
    chunked = tuple(_chunks(x, q) for x in (u, delta, B, C))

    def chunk(h, inputs):
        y, h_end = _chunk_outputs(*inputs[:2], A, *inputs[2:], h, parallel)
        return h_end, (h, y)

    h, (starts, ys) = jax.lax.scan(chunk, h0, chunked)
    return (_merge_chunks(ys), h), (chunked, A, starts)


def _selective_scan_bwd(q, parallel, residuals, cotangents):
    (u, delta, B, C), A, starts = residuals
    dy, dh_last = cotangents

    def chunk(carry, inputs):
        g_end, dA = carry
        u_c, d_c, b_c, c_c, dy_c, h_start = inputs
        grads, dA_c, g_start = _chunk_grads(u_c, d_c, A, b_c, c_c, dy_c, h_start, g_end, parallel)
        return (g_start, dA + dA_c), grads

    (dh0, dA), grads = jax.lax.scan(chunk, (dh_last, jnp.zeros_like(A)), (u, delta, B, C, _chunks(dy, q), starts),
                                    reverse=True)
    du, ddelta, dB, dC = (_merge_chunks(x) for x in grads)
    return du, ddelta, dA, dB, dC, dh0


_selective_scan.defvjp(_selective_scan_fwd, _selective_scan_bwd)


def _state_step(h, u_t, d_t, b_t, A):
    """One token of the Mamba-1 recurrence: ``h_t = exp(δ_t A) h_{t-1} + δ_t u_t B_t`` (``h [B, Di, N]``)."""
    return jnp.exp(d_t[..., None] * A) * h + (d_t * u_t)[..., None] * b_t[:, None, :]


def selective_scan_recurrent(u, delta, A, B, C, h0) -> tuple[jax.Array, jax.Array]:
    """Mamba-1 scan, recurrent form (one token per ``lax.scan`` step); same arguments and results as ``selective_scan``."""
    return selective_scan_quantized(u, delta, A, B, C, h0, fmt=None)


def ssm_matmul(h: jax.Array, c: jax.Array, fmt: Format | None, *, rotate: bool = False) -> jax.Array:
    """MambaQuant's quantized SSM matmul (site a4, spec §3.5b): ``y[b, i] = Σ_n Q(h')[b, i, n] Q(c)[b, n]``.

    ``h [B, Di, N]`` (one token's states), ``c [B, N]`` -> ``[B, Di]``. With ``rotate`` the state is rotated
    online first, ``h' = h H_N`` (R4; ``c`` must then already be ``C H_N``, which the folded ``x_proj`` gives), else
    ``h' = h``. Both operands are quantized per token with ``fmt`` along their flattened features (one scale for
    the token's ``Di × N`` states, one for its ``N`` values of ``c``), as ``linear`` quantizes its inputs; with
    ``fmt=None`` they stay float (a rotated model's exact float path).
    """
    b, di, n = h.shape
    if rotate:
        h = fwht(h, axis=-1)
    if fmt is not None:
        h = quantize_activation(h.reshape(b, di * n), fmt).reshape(b, di, n)
        c = quantize_activation(c, fmt)
    return jnp.einsum("bdn,bn->bd", h, c, precision=HIGHEST)


def selective_scan_quantized(u, delta, A, B, C, h0, *, fmt: Format | None,
                             rotate: bool = False) -> tuple[jax.Array, jax.Array]:
    """Mamba-1 scan, recurrent form, with the output matmul ``ssm_matmul`` (quantized per token with ``fmt``, rotated
    with ``rotate``; ``fmt=None, rotate=False`` is the plain ``selective_scan_recurrent``); same arguments and results as
    ``selective_scan``. The recurrence itself stays in float (spec §3: not quantized); each token's
    ``h_t`` is materialised, so this is the recurrent form, one token per ``lax.scan`` step."""

    def token(h, inputs):
        u_t, d_t, b_t, c_t = inputs
        h = _state_step(h, u_t, d_t, b_t, A)
        return h, ssm_matmul(h, c_t, fmt, rotate=rotate)

    h, ys = jax.lax.scan(token, h0, tuple(jnp.moveaxis(a, 1, 0) for a in (u, delta, B, C)))
    return jnp.moveaxis(ys, 0, 1), h


def selective_scan_state_absmax(u, delta, A, B, C, h0) -> jax.Array:
    """``max |h_t[b, i, n]|`` over the batch, the tokens and the channels: ``[N]``, for each state of the Mamba-1 scan
    (same arguments as ``selective_scan_recurrent``; calibration of MambaQuant's S4)."""

    def token(carry, inputs):
        h, peak = carry
        h = _state_step(h, *inputs, A)
        return (h, jnp.maximum(peak, jnp.max(jnp.abs(h), axis=(0, 1)))), None

    start = (h0, jnp.zeros(A.shape[-1], h0.dtype))
    (_, peak), _ = jax.lax.scan(token, start, tuple(jnp.moveaxis(a, 1, 0) for a in (u, delta, B)))
    return peak


def segment_sum(a: jax.Array) -> jax.Array:
    """``a [..., Q]`` -> ``[..., Q, Q]`` with ``out[l, s] = sum_{k=s+1}^{l} a_k`` for ``s <= l``, ``-inf`` above.

    Summed from masked copies rather than as differences of a cumulative sum, so
    no cancellation (as Hugging Face and the reference ``ssd_minimal`` do).
    """
    q = a.shape[-1]
    rows = jnp.broadcast_to(a[..., :, None], (*a.shape, q))  # rows[k, s] = a_k
    strictly_below = jnp.tril(jnp.ones((q, q), bool), -1)
    sums = jnp.cumsum(jnp.where(strictly_below, rows, 0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((q, q), bool)), sums, -jnp.inf)


def _per_head(bc: jax.Array, heads: int) -> jax.Array:
    """``[..., G, N]`` -> ``[..., H, N]``: head ``h`` gets group ``h // (H / G)``."""
    return jnp.repeat(bc, heads // bc.shape[-2], axis=-2)


def ssd_chunked(x, dt, A, B, C, s0, *, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Mamba-2 scan, full-sequence (chunked SSD) form.

    ``x [B, T, H, P]``, ``dt [B, T, H]`` (after softplus), ``A [H]``,
    ``B, C [B, T, G, N]``, ``s0 [B, H, P, N]`` -> ``y [B, T, H, P]`` (no ``D``
    skip) and the last state ``[B, H, P, N]``. With ``a_t = dt_t A`` and
    ``x~_t = dt_t x_t``, inside each chunk of ``Q`` tokens:
    ``Y_diag[l] = sum_{s<=l} exp(sum_{k=s+1}^{l} a_k) (C_l . B_s) x~_s``; chunk
    start states follow ``S_{c+1} = exp(sum_{k in c} a_k) S_c + S^loc_c``; and
    ``Y_off[l] = exp(sum_{k<=l} a_k) S_c C_l``. Time is zero-padded to a
    multiple of ``Q`` (padded steps have ``dt = 0``: the state is unchanged).
    """
    b, t, h, p = x.shape
    q = min(chunk_size, t)
    B, C = _per_head(B, h), _per_head(C, h)

    def chunks(v):  # [B, T, ...] -> [B, c, Q, ...]
        v = jnp.pad(v, [(0, 0), (0, (-t) % q)] + [(0, 0)] * (v.ndim - 2))
        return v.reshape(b, -1, q, *v.shape[2:])

    xd, B, C = chunks(x * dt[..., None]), chunks(B), chunks(C)
    a = jnp.moveaxis(chunks(dt * A), -1, 1)                                        # [B, H, c, Q]
    a_cum = jnp.cumsum(a, axis=-1)
    ein = lambda spec, *ops: jnp.einsum(spec, *ops, precision=HIGHEST)  # noqa: E731
    scores = ein("bclhn,bcshn->bhcls", C, B) * jnp.exp(segment_sum(a))
    y_diag = ein("bhcls,bcshp->bclhp", scores, xd)
    local = ein("bclhn,bhcl,bclhp->bchpn", B, jnp.exp(a_cum[..., -1:] - a_cum), xd)
    states = jnp.concatenate([s0[:, None], local], axis=1)                         # [B, c+1, H, P, N]
    chunk_decay = jnp.exp(segment_sum(jnp.pad(a_cum[..., -1], [(0, 0), (0, 0), (1, 0)])))  # [B, H, c+1, c+1]
    states = ein("bhzs,bshpn->bzhpn", chunk_decay, states)
    y_off = ein("bclhn,bchpn,bhcl->bclhp", C, states[:, :-1], jnp.exp(a_cum))
    return (y_diag + y_off).reshape(b, -1, h, p)[:, :t], states[:, -1]


def ssd_recurrent(x, dt, A, B, C, s0) -> tuple[jax.Array, jax.Array]:
    """Mamba-2 scan, recurrent form (one token per ``lax.scan`` step); same arguments and results as ``ssd_chunked``."""
    heads = x.shape[2]

    def token(s, inputs):
        x_t, dt_t, b_t, c_t = inputs
        b_t, c_t = _per_head(b_t, heads), _per_head(c_t, heads)
        s = jnp.exp(dt_t * A)[..., None, None] * s + (dt_t[..., None] * x_t)[..., None] * b_t[:, :, None, :]
        return s, jnp.einsum("bhpn,bhn->bhp", s, c_t, precision=HIGHEST)

    s, ys = jax.lax.scan(token, s0, tuple(jnp.moveaxis(v, 1, 0) for v in (x, dt, B, C)))
    return jnp.moveaxis(ys, 0, 1), s
