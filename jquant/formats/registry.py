"""Named formats: ``FORMATS[name](**overrides) -> Format`` and ``get_format``.

Integer names are ``int{b}[-tensor|-g{G}][-asym|-full]`` for b in {2, 3, 4, 5, 6, 8}:
symmetric unless ``-asym`` (restricted range [-(2^(b-1)-1), 2^(b-1)-1]; ``-full``: all 2^b
codes, the compressed-tensors / GPTQ-checkpoint convention, ``symmetric_range="full"``),
per channel (= per token for activations) unless ``-tensor`` or ``-g{G}``, float16 scales.
``FORMATS`` lists G in {32, 64, 128}; ``get_format`` also accepts any other positive G
(e.g. ``"int4-g16"``), codebook format names ``vq-d{d}-k{k}[x{M}][-g{G}][-cb{R}x{C}]``
(``CodebookFormat``; the codebooks come from an algorithm such as ``gptvq``) and
``pcdvq-d{k}-a{a}-b{b}[-ch][-norht][-s{seed}]`` (``PolarVQFormat``). Every name equals the
``.name`` of the format it builds. Overrides are the descriptor's fields, e.g.
``get_format("int4-g128", clip_search=True)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from typing import Callable

from jquant.formats.codebook import CodebookFormat
from jquant.formats.fp8 import FP8Format
from jquant.formats.gse import GSE_BITS, GSEFormat
from jquant.formats.integer import INT_BITS, IntFormat
from jquant.formats.nf4 import NF4Format
from jquant.formats.mx import MX_ELEMENTS, MXFormat
from jquant.formats.nvfp4 import NVFP4Format
from jquant.formats.polar import PolarVQFormat
from jquant.formats.qarray import Format

P = functools.partial
_VQ_NAME = re.compile(r"vq-d(\d+)-k(\d+)(?:x(\d+))?(?:-g(\d+))?(?:-cb(\d+|all)x(\d+|all))?")
_PCDVQ_NAME = re.compile(r"pcdvq-d(\d+)-a(\d+)-b(\d+)(-ch)?(-norht)?(?:-s(\d+))?")


def _parse_vector_format(name: str, overrides: dict) -> Format | None:
    """The ``CodebookFormat`` / ``PolarVQFormat`` a ``vq-...`` / ``pcdvq-...`` name spells, else None."""
    if m := _VQ_NAME.fullmatch(name):
        d, k, M, g, rows, cols = m.groups()
        opt = lambda v: None if v in (None, "all") else int(v)  # noqa: E731
        fields = dict(vector_dim=int(d), index_bits=int(k), num_codebooks=int(M or 1), group_size=opt(g),
                      codebook_rows=opt(rows), codebook_cols=opt(cols))
        return CodebookFormat(**{**fields, **overrides})
    if m := _PCDVQ_NAME.fullmatch(name):
        d, a, b, ch, norht, seed = m.groups()
        fields = dict(vector_dim=int(d), direction_bits=int(a), magnitude_bits=int(b),
                      scale="channel" if ch else "tensor", rht=not norht, seed=int(seed or 0))
        return PolarVQFormat(**{**fields, **overrides})
    return None


_INT_TAILS = {"": dict(symmetric=True), "-full": dict(symmetric=True, symmetric_range="full"),
              "-asym": dict(symmetric=False)}


def _build() -> dict[str, Callable[..., Format]]:
    out: dict[str, Callable[..., Format]] = {}
    for b in INT_BITS:
        for tail, kind in _INT_TAILS.items():
            out[f"int{b}{tail}"] = P(IntFormat, bits=b, **kind)
            out[f"int{b}-tensor{tail}"] = P(IntFormat, bits=b, granularity="tensor", **kind)
            for g in (32, 64, 128):
                out[f"int{b}-g{g}{tail}"] = P(IntFormat, bits=b, group_size=g, **kind)
    for el in ("e4m3", "e5m2"):
        out[f"fp8-{el}"] = P(FP8Format, element=el)
        out[f"fp8-{el}-tensor"] = P(FP8Format, element=el, granularity="tensor")
    out["nvfp4"] = P(NVFP4Format)
    out["nvfp4-1level"] = P(NVFP4Format, two_level=False)
    for el in MX_ELEMENTS:
        out[f"mx{el}"] = P(MXFormat, element=el)
    for b in GSE_BITS:
        out[f"gse-int{b}"] = P(GSEFormat, bits=b)
    out["nf4"] = P(NF4Format)
    out["nf4-fp32scale"] = P(NF4Format, double_quant=False)
    return out


FORMATS: dict[str, Callable[..., Format]] = _build()


def get_format(name: str | Format, **overrides) -> Format:
    """The format called ``name`` (or a ``Format`` itself), with field ``overrides``."""
    if isinstance(name, Format):
        return dataclasses.replace(name, **overrides) if overrides else name
    m = re.fullmatch(r"int(\d+)-g(\d+)(-asym|-full)?", str(name))
    if name not in FORMATS and m and int(m.group(2)) > 0:
        kind = _INT_TAILS[m.group(3) or ""]
        return IntFormat(bits=int(m.group(1)), group_size=int(m.group(2)), **{**kind, **overrides})
    if name not in FORMATS and isinstance(name, str):
        try:
            vector = _parse_vector_format(name, overrides)
        except TypeError as e:
            raise TypeError(f"get_format({name!r}): bad override: {e}") from None
        if vector is not None:
            return vector
    if name not in FORMATS:
        close = difflib.get_close_matches(str(name), FORMATS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown format {name!r}.{hint} Valid names: {', '.join(sorted(FORMATS))}. "
            f"Vector formats: 'vq-d{{d}}-k{{k}}[-cb{{R}}x{{C}}]' (codebooks from an algorithm such as gptvq) and "
            f"'pcdvq-d8-a14-b2'.")
    try:
        return FORMATS[name](**overrides)
    except TypeError as e:
        raise TypeError(f"get_format({name!r}): bad override: {e}") from None
