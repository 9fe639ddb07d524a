"""VGDFR: training-free dynamic latent frame rate during video-DiT sampling (Yuan et al. 2025, arXiv 2504.12259; spec
``vgdfr.md``). ``sample_dynamic_frame_rate`` is the two-phase sampler on a ``TextToVideo`` pipeline's parts::

    z = ε₀ ~ N(0, I) [B, T_l, h, w, L];  K Euler steps on all T_l latent frames (the pipeline's guided flow)
    x̂₀ = x_K - σ_K v_{K-1}                    (§3.2(a); or M coarse Euler steps, ``compress_denoise_steps``)
    per clip: f = Dec_c(x̂₀) -> s_1 .. s_{c-1} (neighbour SSIM on [0, 1]) -> MergePlan (threshold or keep ratio)
        empty plan: nothing more (fast path: the remaining steps are the pipeline's own, bit-identical)
        else:       z' = σ_K ε₀[kept] + (1 - σ_K) scale · mode(Enc_c(merge(f)))    (``merge.compress_latents``)
                    N - K Euler steps on T' latent frames, DyRoPE: blocks in G at the kept frames' original
                    positions, the others at 0 .. T' - 1;  decode (the pipeline's VAE) -> interpolate -> T_v frames

``v_{K-1}`` is recovered from the last step, ``v_{K-1} = (x_K - x_{K-1}) / (σ_K - σ_{K-1})``, so the first phase is
the pipeline's compiled scan unchanged (no extra DiT call; float32 rounding of ~1e-6). ``Dec_c`` / ``Enc_c`` are
``compression_vae`` (default: the pipeline's VAE; the spec's half-resolution variant where one is given).

Fast path: a configuration that cannot merge (``enabled=False``, τ = 1, keep ratio 1) is ``pipe.generate`` itself, bit
for bit; plans found empty after the first phase continue the plain flow from ``x_K`` with no decode / encode (the
same steps, but the flow's scan run in two pieces differs from one scan by float32 round-off, ~1e-6).

JAX: the plan is per clip and decides ``T'``, so the second phase runs clip by clip and compiles once per distinct
``T'`` (at most ``T_l`` programs, cached by shape); the DyRoPE block set is static. The official code decodes and
re-encodes even an empty plan; here an empty plan skips it (spec §7.5).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.frame_rate.interpolate import Interpolator, linear_interpolate
from jquant.frame_rate.merge import compress_with, merge_weights
from jquant.frame_rate.schedule import MergePlan, keep_ratio_schedule, threshold_schedule
from jquant.frame_rate.similarity import neighbour_ssim
from jquant.sampling.flow import _run, euler_flow_with_state, generation_key, guidance_batch, guided_velocity, \
    split_module
from jquant.sampling.schedule import flow_sigmas

HUNYUAN_VIDEO_GLOBAL_BLOCKS = (4, 19, 23, 31, 35, 36, 37, 40)  # spec §3.2(g), for 20 double + 40 single blocks


def default_global_blocks(transformer) -> tuple[int, ...]:
    """The DyRoPE set G: the official one for the 20 + 40-block HunyuanVideo, else none (every block local). G is
    model-specific and found by a per-layer analysis the official code does not contain; on our tiny DiT (2 + 4
    blocks) no block is known to prefer global positions, so the compact local ones are used throughout."""
    sizes = (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))
    return HUNYUAN_VIDEO_GLOBAL_BLOCKS if sizes == (20, 40) else ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrameRateConfig:
    """VGDFR's options: exactly one of ``keep_ratio`` (target kept fraction of video frames, in (0, 1]) or
    ``threshold`` (τ in [0, 1]; 1.0 merges nothing); ``compress_after`` = K full-length steps before the compression
    (``None``: 0.2 N, at least 1, as the paper's K ∈ {0.1 N, 0.2 N}); ``compress_denoise_steps`` = M; ``global_blocks``
    the DyRoPE set G (None: ``default_global_blocks``); ``interpolator`` restores the frame count;
    ``compression_vae`` decodes x̂₀ and encodes the merged clip (None: the pipeline's VAE); ``enabled=False`` is the
    plain pipeline."""

    keep_ratio: float | None = None
    threshold: float | None = None
    compress_after: int | None = None
    compress_denoise_steps: int = 1
    global_blocks: tuple[int, ...] | None = None
    interpolator: Interpolator = linear_interpolate
    compression_vae: object = None
    enabled: bool = True

    def __post_init__(self):
        if (self.keep_ratio is None) == (self.threshold is None):
            raise ValueError("FrameRateConfig: give exactly one of keep_ratio (e.g. 0.7) or threshold (τ in [0, 1]).")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and 0 <= self.threshold <= 1):
            raise ValueError(f"threshold must be in [0, 1] (SSIM above it merges; 1.0 merges nothing), got "
                             f"{self.threshold!r}.")
        if self.keep_ratio is not None and not (isinstance(self.keep_ratio, (int, float))
                                                and 0 < self.keep_ratio <= 1):
            raise ValueError(f"keep_ratio must be in (0, 1] (the fraction of video frames kept), got "
                             f"{self.keep_ratio!r}.")
        for name, low in (("compress_after", 1), ("compress_denoise_steps", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")

    @property
    def merges_nothing(self) -> bool:
        """Off, τ = 1 (SSIM never exceeds 1) or keep ratio 1: known before sampling to be the plain pipeline."""
        return not self.enabled or self.threshold == 1.0 or self.keep_ratio == 1.0

    def steps_before(self, steps: int) -> int:
        """K for an ``steps``-step schedule (checked: at least one step must remain after the compression)."""
        k = max(1, round(0.2 * steps)) if self.compress_after is None else self.compress_after
        if k >= steps:
            raise ValueError(f"compress_after={k} must be below the number of steps ({steps}): the compression runs "
                             "after K full steps and sampling continues on the shorter latent.")
        return k

    def check_clip(self, frames: int, compression: int) -> None:
        """Refuse, before sampling, a clip too short for one merge or a keep ratio no plan can reach."""
        if frames < 3 * compression + 1:
            raise ValueError(f"frames={frames} is too short for dynamic frame rate: a merge takes {2 * compression} "
                             f"frames after frame 0 and starts before the last {2 * compression + 1} frames; use at "
                             f"least {3 * compression + 1} frames.")
        if self.keep_ratio is not None:
            least = least_keep_ratio(frames, compression)
            if self.keep_ratio < least:
                raise ValueError(f"keep_ratio={self.keep_ratio} leaves fewer frames than any plan can keep for "
                                 f"{frames} frames (at least {least:.3f}: frame 0, the tail and one of every "
                                 f"{compression} merged frames stay); use keep_ratio >= {least:.3f}.")


def least_keep_ratio(frames: int, compression: int = 4) -> float:
    """The smallest kept ratio any plan reaches on a ``frames``-frame clip (every frame as similar as can be)."""
    ones = [np.ones(frames - d) for d in range(1, compression)]
    return threshold_schedule(ones, 0.0, compression=compression).keep_ratio


@dataclasses.dataclass(frozen=True)
class DynamicSample:
    """``videos [B, T_v, H, W, 3]`` in ``[-1, 1]``, one ``MergePlan`` per clip, ``steps`` and K, the DiT work done
    relative to fixed-rate sampling (``token_fraction``: Σ latent frames over the steps / (N T_l), per clip), and
    ``seconds``: the wall times of the first phase, the compression module (x̂₀, decode, SSIM, plans, merge, encode,
    re-noise), the second phase and the final decode + interpolation (compilation included on a first call; a
    configuration that cannot merge runs the pipeline: all its denoising counts as the first phase)."""

    videos: jax.Array
    plans: tuple[MergePlan, ...]
    steps: int
    compress_after: int
    seconds: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @property
    def denoise_seconds(self) -> float:
        """Both phases and the compression module: the paper's latency (no final decode, no interpolation)."""
        return sum(self.seconds[:3])

    @property
    def token_fraction(self) -> np.ndarray:
        n, k = self.steps, self.compress_after
        return np.array([(k * p.latent_frames + (n - k) * len(p.kept_latents)) / (n * p.latent_frames)
                         for p in self.plans])


class DyRoPEVelocity(nnx.Module):
    """The transformer's velocity on a shortened latent: ``state`` is the kept frames' global positions ``[T']``,
    threaded unchanged through ``euler_flow_with_state``; blocks in ``global_blocks`` use them."""

    def __init__(self, transformer: nnx.Module, global_blocks: tuple[int, ...]):
        self.transformer = transformer
        self.global_blocks = tuple(global_blocks)

    def __call__(self, x, sigmas, cond, step, positions):
        v = self.transformer.flow_velocity(x, sigmas, *cond, global_frame_positions=positions,
                                           global_blocks=self.global_blocks)
        return v, positions


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _run_dyrope(graphdef, state, x, sigmas, cond, uncond, guidance, positions):
    velocity = nnx.merge(graphdef, state)
    return euler_flow_with_state(velocity, x, sigmas, cond, per_step=None, state=positions, uncond=uncond,
                                 guidance=guidance)[0]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _velocity(graphdef, state, x, sigma, cond, uncond, guidance):
    velocity = nnx.merge(graphdef, state)
    stateless = lambda x, t, c, step, s: (velocity(x, t, c), s)  # noqa: E731
    return guided_velocity(stateless, x, sigma, cond, guidance_batch(cond, uncond), guidance, None, None)[0]


def clean_estimate(module, x_prev, x_k, sigmas, k: int, cond, uncond, guidance, m: int = 1) -> jax.Array:
    """x̂₀ after K steps (spec §3.2(a)): ``x_K - σ_K v_{K-1}``, or with ``m > 1`` M Euler steps of ``σ_K / M`` from
    ``x_K``, the first with ``v_{K-1}``, step ``i`` with the velocity at ``σ[round(K + (N - K) i / M)]``."""
    v = (x_k - x_prev) / (sigmas[k] - sigmas[k - 1])
    dt, n = float(sigmas[k]) / m, len(sigmas) - 1
    x = x_k - dt * v
    graphdef, state = split_module(module)
    for i in range(1, m):
        sigma = jnp.float32(sigmas[round(k + (n - k) * i / m)])
        x = x - dt * _velocity(graphdef, state, x, sigma, cond, uncond, guidance)
    return x


@functools.partial(jax.jit, static_argnames=("compression",))
def _neighbour_ssims(frames01: jax.Array, compression: int) -> list[jax.Array]:
    return [neighbour_ssim(frames01, d)[0] for d in range(1, compression)]


def plan_clip(frames01: jax.Array, config: FrameRateConfig, compression: int) -> MergePlan:
    """The merge plan of one decoded clip ``frames01 [1, T_v, H, W, C]`` in ``[0, 1]`` by ``config``'s scheduler."""
    ssims = [np.asarray(s) for s in _neighbour_ssims(frames01, compression)]
    if config.threshold is not None:
        return threshold_schedule(ssims, config.threshold, compression=compression)
    return keep_ratio_schedule(ssims, config.keep_ratio, compression=compression)[0]


def sample_dynamic_frame_rate(pipe, prompts: Sequence[str], config: FrameRateConfig, *, seed: int | None = None,
                              key: jax.Array | None = None, steps: int | None = None,
                              guidance: float | None | str = "default", frames: int | None = None,
                              planner=None) -> DynamicSample:
    """VGDFR on ``pipe`` (a ``TextToVideo``) for ``prompts`` (module docstring). ``planner(frames01 [1, T_v, H, W, C],
    clip index) -> MergePlan`` replaces the SSIM scheduler (e.g. the uniform frame-dropping baseline)."""
    from jquant.text_to_video import VideoVelocity, _decode

    key = generation_key(seed, key)
    steps = pipe.defaults.steps if steps is None else steps
    guidance = pipe.defaults.guidance if guidance == "default" else guidance
    frames = pipe.defaults.frames if frames is None else frames
    vae = pipe.vae
    compression = vae.config.temporal_compression_ratio
    latent_shape = pipe.latent_shape(frames)  # refuses clip lengths the VAE cannot take
    k = config.steps_before(steps)
    config.check_clip(frames, compression)
    _check_dyrope(pipe.transformer)
    cond, uncond = pipe.encode(prompts)
    b = len(prompts)
    shape = (b, *latent_shape)
    if config.merges_nothing:  # the pipeline's own sampler, bit for bit
        start = time.perf_counter()
        latents = pipe.generate_latents(prompts, key=key, steps=steps, guidance=guidance, frames=frames)
        latents.block_until_ready()
        denoised = time.perf_counter()
        videos = jnp.clip(_decode(vae, latents).astype(jnp.float32), -1.0, 1.0)
        videos.block_until_ready()
        return DynamicSample(videos, tuple(MergePlan(frames, compression) for _ in prompts), steps, k,
                             seconds=(denoised - start, 0.0, 0.0, time.perf_counter() - denoised))
    pipe.check_memory(b, frames, guided=guidance is not None)
    start = time.perf_counter()
    sigmas = flow_sigmas(steps, shift=pipe.defaults.shift).astype(np.float32)
    noise = jax.random.normal(key, shape, jnp.float32)
    g = None if guidance is None else jnp.float32(guidance)
    unc = None if guidance is None else uncond
    velocity = VideoVelocity(pipe.transformer)
    graphdef, state = split_module(velocity)
    x_prev = noise if k == 1 else _run(graphdef, state, noise, sigmas[:k], cond, unc, g)
    x_k = _run(graphdef, state, x_prev, sigmas[k - 1:k + 1], cond, unc, g).block_until_ready()
    times = [time.perf_counter()]
    x0 = clean_estimate(velocity, x_prev, x_k, sigmas, k, cond, unc, g, config.compress_denoise_steps)
    cvae = nnx.split(config.compression_vae or vae)
    decoded = _vae_decode(*cvae, x0)
    plans = tuple(_plan(decoded[i:i + 1], config, compression, planner, i) for i in range(b))
    compressed = [None if p.empty else _compress(*cvae, decoded[i:i + 1], noise[i:i + 1], sigmas[k],
                                                 jnp.asarray(merge_weights(p)), jnp.asarray(p.kept_latents, jnp.int32))
                  for i, p in enumerate(plans)]
    jax.block_until_ready(compressed)
    times.append(time.perf_counter())
    if all(p.empty for p in plans):  # the remaining steps of the plain flow, no decode / encode
        latents = [_run(graphdef, state, x_k, sigmas[k:], cond, unc, g)]
    else:
        blocks = default_global_blocks(pipe.transformer) if config.global_blocks is None else tuple(config.global_blocks)
        dyrope = split_module(DyRoPEVelocity(pipe.transformer, blocks))
        latents = []
        for i, (plan, z) in enumerate(zip(plans, compressed)):
            one = lambda tree: jax.tree.map(lambda a: a[i:i + 1], tree)  # noqa: E731
            if plan.empty:
                latents.append(_run(graphdef, state, x_k[i:i + 1], sigmas[k:], one(cond), one(unc), g))
            else:
                positions = jnp.asarray(plan.kept_latents, jnp.float32)
                latents.append(_run_dyrope(*dyrope, z, sigmas[k:], one(cond), one(unc), g, positions))
    jax.block_until_ready(latents)
    times.append(time.perf_counter())
    videos = _decode_clips(vae, latents, plans, config.interpolator).block_until_ready()
    return DynamicSample(videos, plans, steps, k, seconds=(times[0] - start, times[1] - times[0], times[2] - times[1],
                                                          time.perf_counter() - times[2]))


def _decode_clips(vae, latents: list[jax.Array], plans: tuple[MergePlan, ...], interpolator: Interpolator) -> jax.Array:
    """Videos ``[B, T_v, H, W, 3]`` of the second phase's latents (one array for the whole batch when no plan merged,
    else one per clip), the shortened clips restored to ``T_v`` frames by ``interpolator``."""
    split = nnx.split(vae)
    if len(latents) == 1 and all(p.empty for p in plans):
        return _vae_decode(*split, latents[0])
    return jnp.concatenate([_vae_decode(*split, z) if p.empty else interpolator(_vae_decode(*split, z), p)
                            for z, p in zip(latents, plans)])


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _vae_decode(graphdef, state, latents: jax.Array) -> jax.Array:
    """Clips in ``[-1, 1]`` (float32) of diffusion latents, the VAE's weights a jit argument."""
    return jnp.clip(nnx.merge(graphdef, state).decode_latents(latents).astype(jnp.float32), -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _compress(graphdef, state, frames, noise, sigma, weights, kept_latents) -> jax.Array:
    """``merge.compress_with`` jitted once per shortened length ``T'`` (the plan enters as arrays)."""
    return compress_with(frames, noise, sigma, weights, kept_latents, nnx.merge(graphdef, state))


def _plan(decoded: jax.Array, config: FrameRateConfig, compression: int, planner, index: int) -> MergePlan:
    frames01 = decoded / 2 + 0.5
    return planner(frames01, index) if planner is not None else plan_clip(frames01, config, compression)


def _check_dyrope(transformer) -> None:
    params = inspect.signature(transformer.flow_velocity).parameters
    if "global_frame_positions" not in params or "global_blocks" not in params:
        raise TypeError(f"dynamic frame rate needs a transformer whose flow_velocity takes global_frame_positions and "
                        f"global_blocks (DyRoPE; e.g. HunyuanVideo); {type(transformer).__name__} does not.")
