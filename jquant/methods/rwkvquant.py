"""RWKVQuant (Xu et al., ICML 2025, arXiv 2505.03803): proxy-guided hybrid of scalar and vector quantization,
the model-level driver (it sits above ``jquant.quantize``, which it calls).

``rwkvquant(model, calib, config) -> (qmodel, report)``:

1. Every linear site (``jquant.sites``; the recipe's ``keep_float`` sites excepted) gets the
   coarse-to-fine proxy of its float weight (``jquant.algorithms.rwkvquant_proxy``, §3.2) and
   the decision: scalar quantization (GPTQ on ``config.sq_format``, §3.3) or vector
   quantization (GPTVQ on ``config.vq_format``, §3.4), with per-model percentile thresholds (``vq_fraction``;
   by default the paper's about 10% of the matrices to VQ) or fixed thresholds ``τ_c, τ_f``.
2. Every element-wise site (RWKV's ``time_maa_*`` mixes ``y = μ ⊙ δ``) gets an
   activation-weighted codebook on ``config.mix_format`` (§3.5, ``jquant.algorithms.rwkvquant.mix_codebook``).
3. The choices become a concrete recipe, one ``Rule`` per site path naming its format and the
   registered algorithm ``"rwkvquant"`` (``jquant.algorithms.weights``: GPTQ on integer formats,
   GPTVQ on codebook formats of matrices, ``mix_codebook`` on codebook formats of vectors; the codebook
   sites name ``"rwkvquant-codebook"`` of ``jquant.methods.rwkvquant_vq`` instead when the paper code's
   Mahalanobis k-means start or codebook compression is asked for), and ``jquant.quantize`` runs it block
   by block on the calibration tokens. Every site's format is
   in the recipe, so ``jquant.save`` / ``jquant.load`` rebuild the model like any other.

The report lists per site the proxy values, the choice, the format and the bits per weight of
the stored arrays (codes, scales, zero points, codebooks; compressed codebooks counted as
``jquant.methods.rwkvquant_codebook`` stores them).

Compressed codebooks take the paper's M-step on their factors (``rwkvquant_vq.finetune_compressed``). Not
implemented from the paper: percentile clipping of the activations before ``E[δ²]`` inside the
sequential walk (the calibration keeps sums, not samples) and the README's incoherence selector.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from flax import nnx

from jquant.algorithms.rwkvquant_proxy import (
    TAU_C,
    TAU_F,
    check_thresholds,
    percentile_thresholds,
    proxy,
    use_vector,
)
from jquant.algorithms.weights import gptq_supports, gptvq_supports
from jquant.formats import CodebookFormat, IntFormat, get_format
from jquant.methods.rwkvquant_codebook import KMeansInit
from jquant.methods.rwkvquant_vq import ALGORITHM as CODEBOOK_ALGORITHM
from jquant.methods.rwkvquant_vq import CodebookOptions, stored_bits_per_weight
from jquant.quantization import quantize
from jquant.recipes import Recipe, Rule
from jquant.recipes.rules import DEFAULT_KEEP_FLOAT
from jquant.sites import find_sites

# bits-per-weight settings (float16 scales, zero points and codebooks counted): SQ + VQ format names
BITS_PRESETS: dict[float, tuple[str, str]] = {
    3.0: ("int3-asym", "vq-d1-k3-cb128x32"),  # 3 + 32/in per channel; 8 codewords per 4096 weights (3.03)
    3.25: ("int3-g128-asym", "vq-d1-k3-cb32x16"),  # 3 + 32/128; 8 codewords per 512 weights
}
VQ_FRACTION = 0.1  # the paper's share of matrices given VQ (spec §3.2: thresholds set for about 10%)


def _freeze(options: Mapping[str, Any] | tuple) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(dict(options).items()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RWKVQuantConfig:
    """Formats, thresholds and per-branch options of ``rwkvquant``.

    ``sq_format``: integer format of the GPTQ branch; ``vq_format``: codebook format of the VQ
    branch (``vq-d{d}-k{k}-cb{R}x{C}``: one codebook per ``R`` inputs × ``C`` outputs);
    ``mix_format``: codebook format of the element-wise weights (one codebook per ``R`` channels).
    A group, ``R`` or ``C`` longer than a site's dimension is shortened to it (one group along it).
    Thresholds: ``vq_fraction`` (in [0, 1]) picks per-model percentile thresholds sending that share of the
    matrices to VQ; else ``tau_c`` / ``tau_f`` set fixed thresholds (one given: the other is the paper's
    ``TAU_C`` / ``TAU_F``); neither given: percentile thresholds at ``VQ_FRACTION`` (the paper's 10%).
    ``view_dtype``: the precision the proxy sees the weights in.
    ``sq_options`` / ``vq_options`` / ``mix_options``: ``GPTQConfig`` / ``GPTVQConfig`` / ``MixConfig`` fields.
    Codebooks (VQ and element-wise sites): ``kmeans_init`` (``"kmeans++"``, jquant's, or ``"mahalanobis"``, the
    paper code's), ``svd_rank`` (rank of the SVD-compressed codebooks, None: off; the paper's K/2 = 4) and
    ``codebook_bits`` (8: int8 codebooks with one scale per fitting step; None: float16).
    ``RWKVQuantConfig.preset(bits)`` picks the formats of a bits-per-weight setting (``BITS_PRESETS``).
    """

    sq_format: str = BITS_PRESETS[3.25][0]
    vq_format: str = BITS_PRESETS[3.25][1]
    mix_format: str = "vq-d1-k3-cb64xall"
    tau_c: float | None = None
    tau_f: float | None = None
    vq_fraction: float | None = None
    view_dtype: str | None = "float16"
    sq_options: tuple[tuple[str, Any], ...] = ()
    vq_options: tuple[tuple[str, Any], ...] = ()
    mix_options: tuple[tuple[str, Any], ...] = ()
    kmeans_init: KMeansInit = "kmeans++"
    svd_rank: int | None = None
    codebook_bits: int | None = None

    def __post_init__(self):
        for name, cls, check in (("sq_format", IntFormat, gptq_supports), ("vq_format", CodebookFormat, gptvq_supports),
                                 ("mix_format", CodebookFormat, gptvq_supports)):
            try:
                fmt = get_format(getattr(self, name))
            except (ValueError, TypeError) as err:
                raise ValueError(f"RWKVQuantConfig.{name}: {err}") from None
            reason = check(fmt) if isinstance(fmt, cls) else f"needs a {cls.__name__}, got {fmt.name}"
            if reason:
                raise ValueError(f"RWKVQuantConfig.{name}={getattr(self, name)!r}: {reason}")
        check_thresholds(*self.fixed_thresholds)
        if self.percentile is not None:
            percentile_thresholds([0.0], [0.0], self.percentile)  # validates the fraction
        _ = self.codebook  # validates the codebook options
        for name in ("sq_options", "vq_options", "mix_options"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))

    @property
    def percentile(self) -> float | None:
        """The share of matrices the percentile thresholds send to VQ (None: fixed thresholds)."""
        if self.vq_fraction is not None:
            return self.vq_fraction
        return VQ_FRACTION if self.tau_c is None and self.tau_f is None else None

    @property
    def fixed_thresholds(self) -> tuple[float, float]:
        """``(τ_c, τ_f)`` with the paper's value for one not given."""
        return (TAU_C if self.tau_c is None else self.tau_c), (TAU_F if self.tau_f is None else self.tau_f)

    @property
    def codebook(self) -> CodebookOptions | None:
        """The codebook options of ``"rwkvquant-codebook"`` (None: jquant's plain k-means++ float16 codebooks)."""
        if self.kmeans_init == "kmeans++" and self.svd_rank is None and self.codebook_bits is None:
            return None
        return CodebookOptions(init=self.kmeans_init, svd_rank=self.svd_rank, codebook_bits=self.codebook_bits)

    @classmethod
    def preset(cls, bits: float, **changes) -> RWKVQuantConfig:
        """The config of a bits-per-weight setting in ``BITS_PRESETS`` (3 or 3.25), with ``changes``."""
        if bits not in BITS_PRESETS:
            raise ValueError(f"RWKVQuant bits setting {bits!r} is not one of {sorted(BITS_PRESETS)}; pass sq_format and "
                             "vq_format explicitly for other settings.")
        sq, vq = BITS_PRESETS[bits]
        return cls(**{"sq_format": sq, "vq_format": vq, **changes})


@dataclasses.dataclass(frozen=True)
class SiteChoice:
    """One site: ``method`` ``"sq"`` / ``"vq"`` (linear) or ``"mix"`` (element-wise), its ``format`` name,
    the proxies (None for element-wise sites), ``size`` (elements) and the stored ``bits_per_weight``."""

    path: str
    method: Literal["sq", "vq", "mix"]
    format: str
    coarse: float | None
    fine: float | None
    size: int
    bits_per_weight: float


@dataclasses.dataclass(frozen=True)
class RWKVQuantReport:
    """The thresholds used and one ``SiteChoice`` per quantized site."""

    tau_c: float
    tau_f: float
    sites: tuple[SiteChoice, ...]

    def bits_per_weight(self, methods: tuple[str, ...] = ("sq", "vq")) -> float:
        """Stored bits per weight over the sites of ``methods`` (default: the linears)."""
        chosen = [s for s in self.sites if s.method in methods]
        return sum(s.bits_per_weight * s.size for s in chosen) / max(sum(s.size for s in chosen), 1)

    @property
    def vq_fraction(self) -> float:
        """Fraction of the linear sites that took vector quantization."""
        linear = [s for s in self.sites if s.method != "mix"]
        return sum(s.method == "vq" for s in linear) / max(len(linear), 1)


def _fit(name: str, shape: tuple[int, ...], path: str) -> str:
    """The format ``name`` with each group (int ``group_size``, codebook rows/cols) longer than its dimension
    shortened to the dimension; a group that does not divide a longer dimension is an error naming ``path``."""
    fmt = get_format(name)
    if isinstance(fmt, IntFormat):
        fields = (("group_size", 0),)
    else:
        fields = (("codebook_rows", 0),) + ((("codebook_cols", len(shape) - 1),) if len(shape) > 1 else ())
    changes = {}
    for field, dim in fields:
        size = getattr(fmt, field)
        if size is None:
            continue
        if shape[dim] < size:
            changes[field] = shape[dim]
        elif shape[dim] % size:
            raise ValueError(f"site {path!r} (weight shape {shape}): {field}={size} of {name} does not divide its "
                             f"length {shape[dim]} along axis {dim}; pick a divisor.")
    return dataclasses.replace(fmt, **changes).name if changes else fmt.name


def rwkvquant_recipe(model: nnx.Module, config: RWKVQuantConfig | None = None,
                     keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT) -> tuple[Recipe, RWKVQuantReport]:
    """The concrete per-site recipe of RWKVQuant for ``model`` and a report without bit counts (steps 1-3)."""
    config = config or RWKVQuantConfig()
    sites = [s for s in find_sites(model) if not any(re.fullmatch(p, s.path) for p in keep_float)]
    linear = [s for s in sites if s.spec.kind == "linear"]
    mixes = [s for s in sites if s.spec.kind == "elementwise"]
    if not linear and not mixes:
        raise ValueError("rwkvquant found no linear or element-wise quantization site in the model.")
    proxies = [proxy(np.asarray(s.weight.get_value()), config.view_dtype) for s in linear]
    coarse, fine = np.array([p.coarse for p in proxies]), np.array([p.fine for p in proxies])
    tau_c, tau_f = config.fixed_thresholds if config.percentile is None or not linear else \
        percentile_thresholds(coarse, fine, config.percentile)
    vq = use_vector(coarse, fine, tau_c, tau_f)
    codebook = config.codebook
    books = "rwkvquant" if codebook is None else CODEBOOK_ALGORITHM
    extra = () if codebook is None else _freeze(dataclasses.asdict(codebook))
    rules, choices = [], []
    for site, p, v in zip(linear, proxies, vq.tolist()):
        name, options, algo = (config.vq_format, config.vq_options + extra, books) if v else \
            (config.sq_format, config.sq_options, "rwkvquant")
        fmt = _fit(name, tuple(site.weight.get_value().shape), site.path)
        rules.append(Rule(pattern=re.escape(site.path), weight=fmt, algorithm=algo, options=options))
        choices.append(SiteChoice(site.path, "vq" if v else "sq", fmt, p.coarse, p.fine, site.weight.get_value().size,
                                  float("nan")))
    for site in mixes:
        fmt = _fit(config.mix_format, tuple(site.weight.get_value().shape), site.path)
        rules.append(Rule(pattern=re.escape(site.path), weight=fmt, algorithm=books,
                          options=config.mix_options + extra))
        choices.append(SiteChoice(site.path, "mix", fmt, None, None, site.weight.get_value().size, float("nan")))
    recipe = Recipe(name="rwkvquant", rules=tuple(rules), keep_float=keep_float,
                    description=f"RWKVQuant: SQ {config.sq_format} / VQ {config.vq_format} by the proxy "
                                f"(tau_c={tau_c:.4g}, tau_f={tau_f:.4g}); element-wise {config.mix_format}")
    return recipe, RWKVQuantReport(tau_c=float(tau_c), tau_f=float(tau_f), sites=tuple(choices))


def rwkvquant(model: nnx.Module, calib: np.ndarray, config: RWKVQuantConfig | None = None, *,
              batch_size: int = 8, progress: bool = True) -> tuple[nnx.Module, RWKVQuantReport]:
    """RWKVQuant-quantized copy of ``model`` (calibration tokens ``calib [N, T]``) and its per-site report
    (``config`` defaults to ``RWKVQuantConfig()``: the 3.25 bits-per-weight setting, 10% of the matrices to VQ)."""
    config = config or RWKVQuantConfig()
    recipe, report = rwkvquant_recipe(model, config)
    qmodel = quantize(model, recipe, calib, batch_size=batch_size, progress=progress)
    stored = {s.path: s.weight.get_value() for s in find_sites(qmodel)}
    options = config.codebook or CodebookOptions(init="kmeans++")
    sites = tuple(dataclasses.replace(c, bits_per_weight=float(stored_bits_per_weight(stored[c.path], options)))
                  for c in report.sites)
    return qmodel, dataclasses.replace(report, sites=sites)
