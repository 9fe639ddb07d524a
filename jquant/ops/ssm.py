"""State-space scans of the Mamba families, and their causal depthwise convolution.

Mamba-1's selective scan (chunked ``associative_scan`` and recurrent forms) and Mamba-2's SSD
(chunked and recurrent forms). Models call these through ``jquant.ops`` so that a kernel can
replace them here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def causal_conv1d(x: jax.Array, weight: jax.Array, bias: jax.Array | None, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Causal depthwise convolution continuing from ``state``.

    ``x [B, T, C]``, ``weight [K, C]``, ``bias [C]``, ``state [B, K-1, C]`` (the
    inputs before ``x``; zeros at the start) -> ``y [B, T, C]`` with
    ``y_t[c] = bias[c] + sum_k weight[k, c] * x_{t-K+1+k}[c]``, and the new state
    (the last ``K-1`` inputs).
    """
    k, t = weight.shape[0], x.shape[1]
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    w = weight.astype(x.dtype)
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
    """``[B, T, ...]`` -> ``[T_pad / q, B, q, ...]``, zero-padding time to a multiple of ``q``."""
    pad = (-x.shape[1]) % q
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], -1, q, *x.shape[2:]), 1, 0)


def selective_scan(u, delta, A, B, C, h0, *, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Mamba-1 scan, full-sequence form: ``lax.scan`` over chunks, ``associative_scan`` inside each.

    ``u, delta [B, T, Di]``, ``A [Di, N]``, ``B, C [B, T, N]``, ``h0 [B, Di, N]`` ->
    ``y [B, T, Di]`` with ``y_t = h_t C_t`` (no ``D`` skip) and the last state
    ``h_T [B, Di, N]``. Memory is ``O(B * chunk * Di * N)``; padded steps have
    ``delta = 0`` (``h`` unchanged), so ``h_T`` is exact.
    """
    b, t, di = u.shape
    q = min(chunk_size, t)

    def chunk(h, inputs):
        u_c, d_c, b_c, c_c = inputs
        decay = jnp.exp(d_c[..., None] * A)                     # [B, q, Di, N]
        drive = (d_c * u_c)[..., None] * b_c[:, :, None, :]     # [B, q, Di, N]
        drive = drive.at[:, 0].add(decay[:, 0] * h)
        _, hs = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
        return hs[:, -1], jnp.einsum("bqdn,bqn->bqd", hs, c_c, precision=HIGHEST)

    h, ys = jax.lax.scan(chunk, h0, tuple(_chunks(a, q) for a in (u, delta, B, C)))
    return jnp.moveaxis(ys, 0, 1).reshape(b, -1, di)[:, :t], h


def selective_scan_recurrent(u, delta, A, B, C, h0) -> tuple[jax.Array, jax.Array]:
    """Mamba-1 scan, recurrent form (one token per ``lax.scan`` step); same arguments and results as ``selective_scan``."""

    def token(h, inputs):
        u_t, d_t, b_t, c_t = inputs
        h = jnp.exp(d_t[..., None] * A) * h + (d_t * u_t)[..., None] * b_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, c_t, precision=HIGHEST)

    h, ys = jax.lax.scan(token, h0, tuple(jnp.moveaxis(a, 1, 0) for a in (u, delta, B, C)))
    return jnp.moveaxis(ys, 0, 1), h


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
