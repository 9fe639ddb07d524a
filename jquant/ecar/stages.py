"""ECAR's stage bookkeeping: token-map resolutions, per-stage noise windows and Euler steps (spec ecar.md §3.1, §3.3).

Stage ``s = 1..S`` generates a token map of ``r_s x r_s`` tokens (``r_S`` = the latent side ``h``; each stage doubles
the last, ``r_{s+1} = 2 r_s``, as Pyramid Flow's re-noising rule needs). Its flow moves the map through the noise
window ``[σ_s^start, σ_s^end]`` of the path ``x_σ = σ ε + (1 − σ) data``; the windows' original edges
``1 = e_0 > e_1 > … > e_S = 0`` meet (stage ``s`` spans ``[e_{s−1}, e_s]``). After the up-sample + re-noise step
(``jquant.ecar.renoise``), stage ``s > 1`` starts at the corrected level ``σ̃_s^start = 1 − α_s (1 − e_{s−1})``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

GAMMA = 1.0 / 3.0  # Pyramid Flow's block-noise correlation for 2x2 up-sampling


def renoise_alpha(s0: float, gamma: float = GAMMA) -> float:
    """Pyramid Flow's ``α = 1 / (sqrt(1 + 1/γ) (1 − s0) + s0)`` for the signal coefficient ``s0`` at a stage's
    un-corrected start (``1 / (2 − s0)`` for γ = 1/3)."""
    return 1.0 / (math.sqrt(1.0 + 1.0 / gamma) * (1.0 - s0) + s0)


def renoise_beta(s0: float, gamma: float = GAMMA) -> float:
    """Pyramid Flow's ``β = α (1 − s0) / sqrt(γ)``: the scale of the block noise added after up-sampling."""
    return renoise_alpha(s0, gamma) * (1.0 - s0) / math.sqrt(gamma)


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


@dataclasses.dataclass(frozen=True)
class StageSchedule:
    """``resolutions (r_1, …, r_S)``, window ``edges (e_0 = 1, …, e_S = 0)`` and Euler ``steps (n_1, …, n_S)`` of a
    final ``latent_size x latent_size`` token map. Bad input (a resolution that does not divide the final map or
    does not double, edges that do not cover [0, 1] decreasing, a stage without steps) raises naming the fix."""

    latent_size: int
    resolutions: tuple[int, ...]
    edges: tuple[float, ...]
    steps: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "resolutions", tuple(self.resolutions))
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        object.__setattr__(self, "steps", tuple(self.steps))
        h, res = self.latent_size, self.resolutions
        if not res or not all(_positive_int(r) for r in res):
            raise ValueError(f"stage resolutions must be a non-empty tuple of positive ints, got {res!r}.")
        bad = [r for r in res if h % r]
        if bad or res[-1] != h:
            raise ValueError(f"stage resolutions {res} must divide the final token map ({h}x{h}) and end at {h}; "
                             f"{bad or [res[-1]]} does not. Use e.g. {tuple(h // 2 ** i for i in range(2, -1, -1))}.")
        if any(b != 2 * a for a, b in zip(res[:-1], res[1:])):
            raise ValueError(f"stage resolutions {res} must double from stage to stage (the up-sample + re-noise "
                             "rule is for 2x2 blocks), e.g. (2, 4, 8).")
        e = self.edges
        if len(e) != len(res) + 1:
            raise ValueError(f"noise windows: give {len(res) + 1} edges for {len(res)} stages (1 = e_0 > ... > e_S = "
                             f"0), got {len(e)}: {e}.")
        if e[0] != 1.0 or e[-1] != 0.0 or any(not b < a for a, b in zip(e[:-1], e[1:])):
            raise ValueError(f"noise windows {e} must cover [0, 1]: start at 1, end at 0 and decrease strictly "
                             "(e.g. numpy.linspace(1, 0, S + 1)).")
        if len(self.steps) != len(res) or not all(_positive_int(n) for n in self.steps):
            raise ValueError(f"steps per stage must be {len(res)} positive ints (every stage needs at least one "
                             f"Euler step), got {self.steps!r}.")

    @property
    def num_stages(self) -> int:
        return len(self.resolutions)

    def token_counts(self) -> tuple[int, ...]:
        """Tokens per stage, ``r_s²``."""
        return tuple(r * r for r in self.resolutions)

    def windows(self) -> tuple[tuple[float, float], ...]:
        """The original windows ``(e_{s−1}, e_s)`` per stage (before the start correction)."""
        return tuple(zip(self.edges[:-1], self.edges[1:]))

    def start_sigmas(self, gamma: float = GAMMA) -> tuple[float, ...]:
        """``σ_s^start``: 1 for stage 1, the corrected ``1 − α_s (1 − e_{s−1})`` after it (Pyramid Flow)."""
        starts = [1.0]
        for e in self.edges[1:-1]:
            s0 = 1.0 - e
            starts.append(1.0 - renoise_alpha(s0, gamma) * s0)
        return tuple(starts)

    def end_sigmas(self) -> tuple[float, ...]:
        """``σ_s^end = e_s``."""
        return self.edges[1:]


def split_steps(total: int, stages: int) -> tuple[int, ...]:
    """``total`` Euler steps spread over ``stages`` as evenly as possible (earlier stages take the remainder)."""
    if not _positive_int(total) or total < stages:
        raise ValueError(f"steps={total!r} must be an int >= the number of stages ({stages}): every stage needs at "
                         "least one Euler step.")
    return tuple(total // stages + (1 if s < total % stages else 0) for s in range(stages))


def default_resolutions(latent_size: int, stages: int) -> tuple[int, ...]:
    """The factor-2 pyramid ``r_s = h / 2^{S − s}``."""
    return tuple(latent_size // 2 ** (stages - 1 - s) for s in range(stages))


def equal_edges(stages: int) -> tuple[float, ...]:
    """Equal split of σ: ``linspace(1, 0, S + 1)`` (spec §3.3's jquant default)."""
    return tuple(float(e) for e in np.linspace(1.0, 0.0, stages + 1))


def block_causal_mask(prefix: int, counts: tuple[int, ...]) -> np.ndarray:
    """``[N, N]`` bool (``N = prefix + Σ counts``), True where a query may attend: the ``prefix`` condition tokens
    attend to each other; a token of stage ``s`` to the prefix and to every token of stages ``≤ s`` (block-causal
    across stages, bidirectional within a stage)."""
    stage = np.concatenate([np.zeros(prefix, np.int64)] + [np.full(n, s + 1) for s, n in enumerate(counts)])
    return stage[None, :] <= stage[:, None]
