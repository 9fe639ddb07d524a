"""VGDFR's dynamic frame-rate schedulers (spec ``vgdfr.md`` §3.2(d); official ``frame_rate_schedule.py``).

A causal video VAE of temporal compression ``c`` (``c = 4`` for HunyuanVideo's and ours) maps ``T_v = 1 + c (T_l - 1)``
video frames to ``T_l`` latent frames: video frame 0 <-> latent 0, frames ``c j - c + 1 .. c j`` <-> latent ``j``.
Two merge types, both turning a run of frames into ``c`` frames, i.e. one latent frame:

- the **2-merge** ("2x4" for ``c = 4``) at ``i``: frames ``i .. i + 2c - 1`` become the ``c`` pair means
  ``(i, i+1), (i+2, i+3), ..``; it covers 2 latent frames and keeps the first;
- the **c-merge** ("4x4") at ``i``: frames ``i .. i + c² - 1`` become the ``c`` means of ``c`` consecutive frames;
  it covers ``c`` latent frames and keeps the first.

The threshold scheduler walks ``i = 1, ..`` (frame 0 is never merged; no merge starts in the tail: ``i < T_v - (2c + 1)``)::

    if allow_c_merge and i < T_v - (c² + 1) and min over groups g and pairs (a, a + d) inside each group of
            s_d[i + g + a] > τ:           c-merge at i;  i += c²;  continue
    if min over g in 0, 2, .., 2c - 2 of s_1[i + g] > τ:  2-merge at i
    i += 2c

with ``s_d[k] = SSIM(f_k, f_{k + d})`` (``jquant.frame_rate.neighbour_ssim``). For ``c = 4`` this is the official
pseudo-code to the index: the 4x4 test reads ``s1, s2, s3`` at ``i + g`` and ``s1, s2`` at ``i + g + 1`` and ``s1``
at ``i + g + 2``; the dropped latents are ``1 + (i + 4m) // 4``. Every merge keeps ``c`` of its frames, so the
kept count stays ``≡ 1 (mod c)``: the shortened clip is a valid causal-VAE input. The keep-ratio scheduler
bisects τ over ``[0.01, 0.99]`` until the bracket is narrower than 0.001 (c-merges allowed only while τ < 0.5)
and returns the plan of the bracket's upper end, the lowest threshold seen whose kept ratio reached the target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

TAU_LOW, TAU_HIGH, TAU_TOLERANCE, C_MERGE_BELOW = 0.01, 0.99, 1e-3, 0.5


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """Which frames of a ``frames``-frame clip (VAE temporal compression ``compression``) are merged: ``merges``
    holds ``(start, span)`` pairs, ``span`` = 2 (a 2-merge of ``2c`` frames) or ``c`` (a c-merge of ``c²`` frames),
    sorted and disjoint. Hashable, so a jit may take it as a static argument."""

    frames: int
    compression: int = 4
    merges: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        c = self.compression
        if isinstance(c, bool) or not isinstance(c, int) or c < 2:
            raise ValueError(f"MergePlan.compression must be the VAE's temporal compression, an int >= 2; got {c!r}.")
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames % c != 1:
            raise ValueError(f"MergePlan.frames must be 1 + {c}k video frames (the causal VAE's clip lengths); "
                             f"got {self.frames!r}.")
        end = 1
        for start, span in self.merges:
            if span not in (2, c) or start < end or (start - 1) % c or start + span * c >= self.frames:
                raise ValueError(f"MergePlan.merges: ({start}, {span}) is not a 2- or {c}-merge starting at 1 + {c}k "
                                 f"after the previous merge, followed by a kept frame inside the {self.frames} frames.")
            end = start + span * c

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // self.compression + 1

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """One tuple of video frame indices per kept frame (the frames whose mean it becomes), in order."""
        c, out, v = self.compression, [], 0
        starts = dict(self.merges)
        while v < self.frames:
            if v in starts:
                size = starts[v]
                out += [tuple(range(v + k * size, v + (k + 1) * size)) for k in range(c)]
                v += size * c
            else:
                out.append((v,))
                v += 1
        return tuple(out)

    @property
    def kept_frames(self) -> tuple[int, ...]:
        """The video frames kept (each merge group's first frame), ``≡ 1 (mod c)`` many."""
        return tuple(g[0] for g in self.groups)

    @property
    def dropped_latents(self) -> tuple[int, ...]:
        """Latent frames removed: all but the first latent a merge covers (``1 + (start - 1) // c + m``)."""
        c = self.compression
        return tuple(1 + (start - 1) // c + m for start, span in self.merges for m in range(1, span))

    @property
    def kept_latents(self) -> tuple[int, ...]:
        """The original latent indices of the shortened latent's frames (its RoPE *global* positions)."""
        dropped = set(self.dropped_latents)
        return tuple(j for j in range(self.latent_frames) if j not in dropped)

    @property
    def keep_ratio(self) -> float:
        """Kept video frames / frames (the paper's "token ratio", counted in video frames)."""
        return len(self.kept_frames) / self.frames

    @property
    def latent_keep_ratio(self) -> float:
        """Kept latent frames / latent frames (the DiT's token ratio after compression)."""
        return len(self.kept_latents) / self.latent_frames

    @property
    def empty(self) -> bool:
        return not self.merges


def _check_ssims(ssims: Sequence[np.ndarray], frames: int, c: int) -> list[np.ndarray]:
    if len(ssims) < c - 1:
        raise ValueError(f"threshold_schedule: ssims must hold s_1 .. s_{c - 1} (SSIM of frames 1 .. {c - 1} apart), "
                         f"got {len(ssims)} arrays.")
    out = [np.asarray(s, np.float64) for s in ssims[: c - 1]]
    for d, s in enumerate(out, start=1):
        if s.shape != (frames - d,):
            raise ValueError(f"threshold_schedule: s_{d} must have shape ({frames - d},) for {frames} frames, "
                             f"got {s.shape}.")
    return out


def _check_tau(tau: float, name: str = "threshold") -> float:
    if not (isinstance(tau, (int, float, np.floating)) and 0.0 <= tau <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1] (SSIM above it merges; 1.0 merges nothing), got {tau!r}.")
    return float(tau)


def threshold_schedule(ssims: Sequence[np.ndarray], tau: float, *, compression: int = 4,
                       allow_c_merge: bool | None = None) -> MergePlan:
    """The merge plan of one clip from ``ssims = (s_1, s_2, .., s_{c-1})``, ``s_d [T_v - d]`` (module docstring);
    ``allow_c_merge`` defaults to the keep-ratio search's rule, τ < 0.5."""
    tau = _check_tau(tau)
    allow_c_merge = tau < C_MERGE_BELOW if allow_c_merge is None else allow_c_merge
    c = compression
    frames = len(np.asarray(ssims[0])) + 1
    s = _check_ssims(ssims, frames, c)
    pairs = [(a, d) for d in range(1, c) for a in range(c - d)]
    merges, i = [], 1
    while i < frames - (2 * c + 1):
        if allow_c_merge and i < frames - (c * c + 1) and min(
                s[d - 1][i + g + a] for g in range(0, c * c, c) for a, d in pairs) > tau:
            merges.append((i, c))
            i += c * c
            continue
        if min(s[0][i + g] for g in range(0, 2 * c, 2)) > tau:
            merges.append((i, 2))
        i += 2 * c
    return MergePlan(frames, c, tuple(merges))


def keep_ratio_schedule(ssims: Sequence[np.ndarray], keep_ratio: float, *, compression: int = 4
                        ) -> tuple[MergePlan, float]:
    """``(plan, τ)``: the threshold plan whose kept ratio is the smallest reached ``>= keep_ratio`` along the
    bisection of τ (module docstring); c-merges only while τ < 0.5."""
    if not (isinstance(keep_ratio, (int, float, np.floating)) and 0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio must be in (0, 1] (the fraction of video frames kept), got {keep_ratio!r}.")

    def plan(tau: float) -> MergePlan:
        return threshold_schedule(ssims, tau, compression=compression, allow_c_merge=tau < C_MERGE_BELOW)

    low, high = TAU_LOW, TAU_HIGH
    while high - low >= TAU_TOLERANCE:
        mid = (low + high) / 2
        if plan(mid).keep_ratio < keep_ratio:
            low = mid
        else:
            high = mid
    return plan(high), high


def uniform_plan(frames: int, kept: int, *, compression: int = 4) -> MergePlan:
    """A content-blind plan of 2-merges spread evenly over the mergeable windows keeping ``kept`` video frames (the
    uniform frame-dropping baseline at the same token count); ``kept`` is rounded up to ``1 + c k`` and to what
    2-merges can reach."""
    c = compression
    windows = list(range(1, frames - (2 * c + 1), 2 * c))
    wanted = max(0, -(-(frames - kept) // c))
    count = min(wanted, len(windows))
    chosen = sorted({windows[int(round(k))] for k in np.linspace(0, len(windows) - 1, count)}) if count else []
    return MergePlan(frames, c, tuple((i, 2) for i in chosen))
