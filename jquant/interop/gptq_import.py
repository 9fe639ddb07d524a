"""Read a GPTQ-format checkpoint (AutoGPTQ / GPTQModel / optimum: ``qweight``, ``qzeros``, ``scales``, ``g_idx``).

Per linear ``[out, in]`` with ``b``-bit codes in groups of ``group_size`` input channels (``-1``: one group):

  ``qweight`` int32 ``[in b / 32, out]``: unsigned codes packed along ``in`` (``interop.packing``)
  ``qzeros``  int32 ``[groups, out b / 32]``: zero points packed along ``out``
  ``scales``  ``[groups, out]`` (float16)
  ``g_idx``   int32 ``[in]``: the group of each input channel (``i // group_size`` without act-order;
              scattered with ``desc_act``; absent: ``i // group_size``)

  ``W[o, i] = s[g_idx[i], o] (q[i, o] - z[g_idx[i], o])``

with ``z`` the stored zero point plus one in the original format (``checkpoint_format`` "gptq": AutoGPTQ
subtracts one before packing, so a zero point of 0 wraps to 2^b - 1 and reads back as 2^b) and as stored in
``gptq_v2``. A layer whose every zero point is ``2^(b-1)`` (symmetric GPTQ: scale ``amax / (2^(b-1) - 1/2)``)
becomes a full-range symmetric ``IntFormat`` with codes ``q - 2^(b-1)``; any other layer an asymmetric
``IntFormat`` with unsigned codes and zero points (``x = (q - z) s``, jquant's convention; a v1 zero point
of 2^b is kept as is). Act-order groups become contiguous groups (``interop.regroup``).
"""

from __future__ import annotations

import numpy as np

from jquant.formats import IntFormat
from jquant.interop.codes import LinearCodes
from jquant.interop.packing import unpack_int32
from jquant.interop.regroup import contiguous_groups

GPTQ_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")


def gptq_settings(qc: dict, source: str) -> tuple[int, int, bool]:
    """``(bits, group_size, v2)`` of a GPTQ ``quantization_config`` / ``quantize_config.json``."""
    bits = qc.get("bits")
    if bits not in GPTQ_BITS:
        raise ValueError(f"{source}: GPTQ bits={bits!r}; jquant reads {GPTQ_BITS}-bit GPTQ checkpoints.")
    form = qc.get("checkpoint_format", "gptq")
    if form not in FORMATS:
        raise ValueError(f"{source}: GPTQ checkpoint_format {form!r} is not read (only {FORMATS}; repack "
                         "Marlin / other kernel layouts to the gptq format first).")
    return int(bits), int(qc.get("group_size", -1)), form == "gptq_v2"


def linear(local: dict, bits: int, group_size: int, v2: bool, where: str) -> LinearCodes:
    """The ``LinearCodes`` of one GPTQ linear (``local``: its ``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
    qweight, scales = local["qweight"], np.asarray(local["scales"])
    n, out = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = unpack_int32(qweight, bits, n, axis=0)
    z = unpack_int32(local["qzeros"], bits, out, axis=1) + (0 if v2 else 1)
    groups = n if group_size == -1 else group_size
    g_idx = local.get("g_idx")
    g_idx = np.arange(n) // groups if g_idx is None else np.asarray(g_idx)
    if g_idx.shape != (n,) or scales.shape != z.shape or scales.shape[1] != out:
        raise ValueError(f"{where}: qweight {qweight.shape}, qzeros {local['qzeros'].shape}, scales {scales.shape} "
                         f"and g_idx {g_idx.shape} do not describe one {bits}-bit [{out}, {n}] layer.")
    if scales.dtype.name not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"{where}: scales have dtype {scales.dtype}; float16, bfloat16 or float32 were expected.")
    size, s, zeros = contiguous_groups(g_idx, scales, z)
    offset = 1 << (bits - 1)
    shape = {"granularity": "channel"} if size == n else {"group_size": size}
    if (zeros == offset).all():
        fmt = IntFormat(bits=bits, symmetric_range="full", scale_dtype=scales.dtype.name, **shape)
        return LinearCodes(fmt, np.ascontiguousarray((q - offset).T), np.ascontiguousarray(s.T))
    if zeros.max() > 255:
        raise ValueError(f"{where}: a zero point of {zeros.max()} (the v1 format's wrapped zero) does not fit "
                         "jquant's uint8 zero points; re-save the checkpoint in the gptq_v2 format.")
    fmt = IntFormat(bits=bits, symmetric=False, scale_dtype=scales.dtype.name, **shape)
    return LinearCodes(fmt, np.ascontiguousarray(q.T), np.ascontiguousarray(s.T), np.ascontiguousarray(zeros.T))


def read(qc: dict, tensors: dict[str, np.ndarray], source: str
         ) -> tuple[dict[str, np.ndarray], dict[str, LinearCodes]]:
    """Split a GPTQ checkpoint into float tensors and the codes of each quantized module."""
    bits, group_size, v2 = gptq_settings(qc, source)
    floats, linears = dict(tensors), {}
    for name in sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")):
        local = {k: floats.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")
                 if f"{name}.{k}" in floats}
        missing = [k for k in ("qzeros", "scales") if k not in local]
        if missing:
            raise ValueError(f"{source}: {name} has a qweight but no {' / '.join(missing)}; the checkpoint is "
                             "incomplete.")
        linears[name] = linear(local, bits, group_size, v2, f"{source}: {name}")
    return floats, linears
