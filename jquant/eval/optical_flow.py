"""TV-L1 optical flow and backward warping in JAX, batched over image pairs.

Convention (that of ``skimage.registration.optical_flow_tvl1(reference, moving)``, tested against it): the
flow ``w [N, H, W, 2]`` (``(dy, dx)`` per pixel, channels last) maps the reference onto the moving image,
``reference(y, x) ~ moving(y + dy, x + dx)``, so :func:`warp` ``(moving, w)`` reconstructs the reference.

The solver (Zach, Pock & Bischof 2007, "A duality based approach for realtime TV-L1 optical flow", with the
improvements of Wedel et al. 2009; the implementation follows Pérez, Meinhardt-Llopis & Facciolo 2013,
IPOL, as scikit-image 0.26 does) minimises ``sum |grad w| + lambda |moving(x + w) - reference(x)|``
coarse to fine. For each level of a pyramid (halving with a Gaussian of sigma 2/3 and linear resampling
while the smaller side exceeds 32 pixels, as ``skimage.transform.pyramid_reduce``), starting from the
coarser level's flow (nearest-neighbour upsampled, scaled by the size ratio), ``num_warp`` times:

1. warp the moving image by ``w`` (bilinear, edge-clamped); ``I_w``, its gradient ``g`` (central
   differences, one-sided at the borders) and ``rho_0 = I_w - reference - g . w``;
2. ``num_iter`` times: the thresholding step on ``rho = rho_0 + g . w`` (``lambda theta = attachment *
   tightness``): ``v = w - rho g / |g|^2`` where ``|rho| <= lambda theta |g|^2``, else
   ``v = w - lambda theta sign(rho) g``; then two steps of Chambolle's projection per flow component,
   ``p <- (p - tau grad w_c) / (1 + tau / theta |grad w_c|)``, ``w_c = v_c - div p`` (``tau = 1/4``,
   forward differences, the dual ``p`` kept across warps of one level);
3. stop early (per pair) once ``|w - v_1|^2 < tol H W``, ``v_1`` being the first thresholding step's
   output of this warp (scikit-image's criterion).

Images are single-channel ``[N, H, W]`` floats; the defaults (``attachment`` 15) suit values in [0, 1].
The result is invariant to adding a constant to both images.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

PYRAMID_DOWNSCALE = 2
PYRAMID_MIN_SIZE = 16
PYRAMID_LEVELS = 10
_TAU = 0.25  # 0.5 / ndim: the Chambolle step for 2-D images
_REGULARIZATION_STEPS = 2
_HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------ warping


def warp(images: jax.Array, flow: jax.Array) -> jax.Array:
    """``out(y, x) = images(y + dy, x + dx)``: ``images [N, H, W]`` or ``[N, H, W, C]`` sampled bilinearly at
    positions moved by ``flow [N, H, W, 2]`` (``(dy, dx)``), positions clamped to the image (edge values
    repeat, as ``scipy.ndimage.map_coordinates(order=1, mode="nearest")``)."""
    images, flow = jnp.asarray(images), jnp.asarray(flow)
    channels = images.ndim == 4
    if images.ndim not in (3, 4) or flow.shape != images.shape[:3] + (2,):
        raise ValueError(f"warp: images must be [N, H, W] or [N, H, W, C] and flow [N, H, W, 2] of the same N, H, W; "
                         f"got images {images.shape} and flow {flow.shape}.")
    images = images.astype(jnp.promote_types(images.dtype, jnp.float32))
    out = _warp(images if channels else images[..., None], flow.astype(images.dtype))
    return out if channels else out[..., 0]


@jax.jit
def _warp(images: jax.Array, flow: jax.Array) -> jax.Array:
    n, h, w, _ = images.shape
    y = jnp.clip(jnp.arange(h, dtype=flow.dtype)[None, :, None] + flow[..., 0], 0, h - 1)
    x = jnp.clip(jnp.arange(w, dtype=flow.dtype)[None, None, :] + flow[..., 1], 0, w - 1)
    y0 = jnp.clip(jnp.floor(y), 0, max(h - 2, 0)).astype(jnp.int32)
    x0 = jnp.clip(jnp.floor(x), 0, max(w - 2, 0)).astype(jnp.int32)
    y1, x1 = jnp.minimum(y0 + 1, h - 1), jnp.minimum(x0 + 1, w - 1)
    fy, fx = (y - y0)[..., None], (x - x0)[..., None]
    batch = jnp.arange(n)[:, None, None]

    def at(yy, xx):
        return images[batch, yy, xx]

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return top * (1 - fy) + bottom * fy


# ------------------------------------------------------------------ pyramid


def _reflect(i: int, n: int) -> int:
    """scipy.ndimage's "reflect" (half-sample symmetric) index into ``[0, n)``."""
    period = 2 * n
    i %= period
    return i if i < n else period - 1 - i


def _gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """``[n, n]``: ``scipy.ndimage.gaussian_filter1d(x, sigma, mode="reflect", truncate=4)`` as a matrix."""
    radius = int(truncate * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    m = np.zeros((n, n))
    for i in range(n):
        for k, t in zip(range(-radius, radius + 1), taps):
            m[i, _reflect(i + k, n)] += t
    return m


def _linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]``: linear resampling at input positions ``(i + 0.5) n_in / n_out - 0.5`` (pixel centres
    aligned, as ``skimage.transform.resize(order=1)``), mirrored past the ends."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = (i + 0.5) * n_in / n_out - 0.5
        lo = math.floor(c)
        for j, weight in ((lo, 1.0 - (c - lo)), (lo + 1, c - lo)):
            j = abs(j) if j < 0 else (2 * (n_in - 1) - j if j > n_in - 1 else j)
            m[i, j] += weight
    return m


@functools.lru_cache(maxsize=64)
def _reduce_matrix(n: int) -> np.ndarray:
    """``[ceil(n / 2), n]``: one ``pyramid_reduce`` step along an axis (Gaussian of sigma 2/3, then linear)."""
    return _linear_resize_matrix(n, math.ceil(n / PYRAMID_DOWNSCALE)) @ _gaussian_matrix(n, 2 * PYRAMID_DOWNSCALE / 6)


def pyramid_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """Level shapes, finest first: halve (rounding up) while the smaller side exceeds 32, at most 10 levels."""
    shapes = [(height, width)]
    while len(shapes) < PYRAMID_LEVELS and min(shapes[-1]) > PYRAMID_DOWNSCALE * PYRAMID_MIN_SIZE:
        shapes.append(tuple(math.ceil(s / PYRAMID_DOWNSCALE) for s in shapes[-1]))
    return shapes


def _nearest_upsample(flow: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """``scipy.ndimage.zoom(flow, order=0)`` to ``shape`` (positions ``i (n_in - 1) / (n_out - 1)``, rounded
    half up), each component scaled by its axis' size ratio."""
    out = flow
    for axis, n_out in enumerate(shape):
        n_in = flow.shape[axis + 1]
        index = np.floor(np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1)) + 0.5).astype(np.int32)
        out = jnp.take(out, jnp.asarray(np.minimum(index, n_in - 1)), axis=axis + 1)
    scale = jnp.asarray([shape[0] / flow.shape[1], shape[1] / flow.shape[2]], flow.dtype)
    return out * scale


# ------------------------------------------------------------------ solver


def _gradient(image: jax.Array) -> jax.Array:
    """``np.gradient`` of ``[N, H, W]`` along rows and columns: ``[N, H, W, 2]``."""

    def along(x, axis):
        n = x.shape[axis]
        take = functools.partial(jax.lax.slice_in_dim, x, axis=axis)
        inner = (take(2, n) - take(0, n - 2)) / 2
        return jnp.concatenate([take(1, 2) - take(0, 1), inner, take(n - 1, n) - take(n - 2, n - 1)], axis=axis)

    return jnp.stack([along(image, 1), along(image, 2)], axis=-1)


def _forward_differences(flow: jax.Array) -> jax.Array:
    """``[N, H, W, 2 components]`` -> ``[N, H, W, 2 components, 2 axes]``, 0 on the last row / column."""
    dy = jnp.pad(flow[:, 1:] - flow[:, :-1], ((0, 0), (0, 1), (0, 0), (0, 0)))
    dx = jnp.pad(flow[:, :, 1:] - flow[:, :, :-1], ((0, 0), (0, 0), (0, 1), (0, 0)))
    return jnp.stack([dy, dx], axis=-1)


def _negative_divergence(p: jax.Array) -> jax.Array:
    """``-div p`` with backward differences (``p [N, H, W, comp, axis]``):
    ``d = -p_y - p_x + p_y(y - 1) + p_x(x - 1)``."""
    d = -(p[..., 0] + p[..., 1])
    d = d.at[:, 1:].add(p[:, :-1, :, :, 0])
    return d.at[:, :, 1:].add(p[:, :, :-1, :, 1])


def _solve_level(reference, moving, flow, *, attachment, tightness, num_warp, num_iter, tol):
    """One pyramid level for ``reference, moving [N, H, W]`` from ``flow [N, H, W, 2]`` (module docstring)."""
    f0, f1 = attachment * tightness, _TAU / tightness
    threshold = tol * reference.shape[1] * reference.shape[2]

    def one_warp(_, carry):
        flow, proj, done = carry
        warped = warp(moving, flow)
        grad = _gradient(warped)
        norm2 = jnp.sum(grad * grad, axis=-1)
        norm2 = jnp.where(norm2 == 0, 1.0, norm2)
        rho_0 = warped - reference - jnp.sum(grad * flow, axis=-1)

        def iteration(i, state):
            w, p, first = state
            rho = rho_0 + jnp.sum(grad * w, axis=-1)
            small = jnp.abs(rho) <= f0 * norm2
            step = jnp.where(small[..., None], rho[..., None] * grad / norm2[..., None],
                             (f0 * jnp.sign(rho))[..., None] * grad)
            v = w - step
            w = v
            for _ in range(_REGULARIZATION_STEPS):
                g = _forward_differences(w)
                scale = 1.0 + f1 * jnp.sqrt(jnp.sum(g * g, axis=-1))
                p = (p - _TAU * g) / scale[..., None]
                w = v + _negative_divergence(p)
            first = jnp.where(i == 0, v, first)
            return w, p, first

        new, new_proj, first = jax.lax.fori_loop(0, num_iter, iteration, (flow, proj, flow))
        keep = done[:, None, None, None]
        converged = jnp.sum((first - new) ** 2, axis=(1, 2, 3)) < threshold
        return (jnp.where(keep, flow, new), jnp.where(keep[..., None], proj, new_proj), done | converged)

    proj = jnp.zeros(flow.shape + (2,), flow.dtype)
    done = jnp.zeros(flow.shape[0], bool)
    flow, _, _ = jax.lax.fori_loop(0, num_warp, one_warp, (flow, proj, done))
    return flow


@functools.partial(jax.jit, static_argnames=("attachment", "tightness", "num_warp", "num_iter", "tol"))
def _tvl1(reference, moving, *, attachment, tightness, num_warp, num_iter, tol):
    shapes = pyramid_shapes(*reference.shape[1:])
    pyramid = [(reference, moving)]
    for (h, w) in shapes[:-1]:
        rows, cols = (jnp.asarray(_reduce_matrix(n), reference.dtype) for n in (h, w))
        pyramid.append(tuple(jnp.einsum("ih,nhw,jw->nij", rows, x, cols, precision=_HIGHEST)
                             for x in pyramid[-1]))
    flow = jnp.zeros(pyramid[-1][0].shape + (2,), reference.dtype)
    solve = functools.partial(_solve_level, attachment=attachment, tightness=tightness, num_warp=num_warp,
                              num_iter=num_iter, tol=tol)
    for level, (ref, mov) in enumerate(reversed(pyramid)):
        if level:
            flow = _nearest_upsample(flow, ref.shape[1:])
        flow = solve(ref, mov, flow)
    return flow


def tvl1_flow(reference: jax.Array, moving: jax.Array, *, attachment: float = 15.0, tightness: float = 0.3,
              num_warp: int = 5, num_iter: int = 10, tol: float = 1e-4) -> jax.Array:
    """TV-L1 flow ``[N, H, W, 2]`` (``(dy, dx)``) with ``reference(x) ~ moving(x + w(x))`` for grey images
    ``reference, moving [N, H, W]`` (float32 unless given float64). Parameters as scikit-image's
    ``optical_flow_tvl1`` (``attachment`` lambda, ``tightness`` theta; module docstring)."""
    reference, moving = jnp.asarray(reference), jnp.asarray(moving)
    if reference.ndim != 3 or reference.shape != moving.shape or min(reference.shape[1:]) < 2:
        raise ValueError(f"tvl1_flow: reference and moving must be two [N, H, W] grey image batches of the same "
                         f"shape with H, W >= 2; got {reference.shape} and {moving.shape}.")
    for name, value in (("attachment", attachment), ("tightness", tightness), ("tol", tol)):
        if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
            raise ValueError(f"tvl1_flow: {name} must be a finite number > 0, got {value!r}.")
    for name, value in (("num_warp", num_warp), ("num_iter", num_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"tvl1_flow: {name} must be a positive integer, got {value!r}.")
    dtype = jnp.promote_types(jnp.float32, reference.dtype if jnp.issubdtype(reference.dtype, jnp.floating)
                              else jnp.float32)
    return _tvl1(reference.astype(dtype), moving.astype(dtype), attachment=float(attachment),
                 tightness=float(tightness), num_warp=num_warp, num_iter=num_iter, tol=float(tol))
