"""Read a compressed-tensors checkpoint folder (llm-compressor, ``jquant export``) into a quantized jquant model.

``config.json``'s ``quantization_config`` gives each module's scheme (``config_groups``: targets, weight and
input-activation args, format). Per quantized linear (the layouts of ``interop.ct_export``):

  integer weights   ``IntFormat``: symmetric -> full range (codes in [-2^(b-1), 2^(b-1) - 1], the
                    compressed-tensors convention), asymmetric -> unsigned codes ``q + 2^(b-1)`` with zero
                    points ``zp + 2^(b-1)`` (so ``(q - zp) s`` is unchanged); ``pack-quantized`` or int8
                    ``weight`` (``int-quantized`` / ``naive-quantized``)
  FP8 weights       ``FP8Format(e4m3)``;  NVFP4: ``NVFP4Format`` with tensor scale ``1 / weight_global_scale``
                    (float32; decoding differs from compressed-tensors' ``s / g`` by at most an ulp of the
                    block scale)
  activations       int per token (dynamic) -> int per token, full range, float32 scales; symmetric int per
                    tensor (static ``input_scale``) -> jquant's static per-tensor activation; fp8 per token
                    (dynamic) -> fp8-e4m3 per token; NVFP4 (``input_global_scale``) -> nvfp4 with that
                    ``tensor_amax``. Other schemes are refused with the reason.

Scales keep their stored dtype; the other tensors load as the family's ``from_tensors`` reads them.
"""

from __future__ import annotations

import re

import numpy as np

from jquant.formats import FP8Format, IntFormat, NVFP4Format
from jquant.formats.integer import INT_BITS
from jquant.formats.qarray import Format
from jquant.interop.codes import LinearCodes
from jquant.interop.packing import unpack_int32
from jquant.interop.regroup import contiguous_groups

# Tensors compressed-tensors writes for a quantized module, besides ``weight``.
LOCAL_NAMES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_global_scale",
               "weight_g_idx", "input_scale", "input_zero_point", "input_global_scale")
_E4M3_MAX, _E2M1_MAX = 448.0, 6.0


def _matches(target: str, name: str) -> bool:
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def scheme_for(config: dict, name: str) -> dict:
    """The config group whose targets match module ``name`` (exact names before regexes before "Linear")."""
    groups = list(config.get("config_groups", {}).values())
    for test in (lambda t: t == name, lambda t: t.startswith("re:") and _matches(t, name), lambda t: t == "Linear"):
        for group in groups:
            if any(test(t) for t in group.get("targets", [])):
                return group
    raise ValueError(f"module {name} holds quantized tensors but no config group of quantization_config targets it.")


def _scale_dtype(scales: np.ndarray, where: str) -> str:
    name = scales.dtype.name
    if name not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"{where}: weight_scale has dtype {name}; float16, bfloat16 or float32 scales were expected.")
    return name


def _granularity(args: dict, where: str) -> dict:
    strategy = args.get("strategy")
    if strategy == "group":
        return {"group_size": int(args["group_size"])}
    if strategy in ("channel", "tensor"):
        return {"granularity": strategy}
    raise ValueError(f"{where}: weight strategy {strategy!r} has no jquant format (group, channel and tensor do).")


def _scales_2d(scales: np.ndarray, out: int) -> np.ndarray:
    return scales.reshape(1, 1) if scales.size == 1 and out != 1 else scales.reshape(out, -1)


def int_codes(local: dict, args: dict, form: str, where: str) -> LinearCodes:
    """The codes of an integer-quantized module (``pack-quantized``, or int8 ``weight``)."""
    bits, sym = int(args["num_bits"]), bool(args.get("symmetric", True))
    if bits not in INT_BITS:
        raise ValueError(f"{where}: {bits}-bit integer weights have no jquant format (bits {INT_BITS}).")
    offset = 1 << (bits - 1)
    if form == "pack-quantized":
        out, n = (int(v) for v in local["weight_shape"])
        unsigned = unpack_int32(local["weight_packed"], bits, n, axis=1)
    else:
        unsigned = local["weight"].astype(np.int32) + offset
        out, n = unsigned.shape
    scales = _scales_2d(local["weight_scale"], out)
    zeros = None
    if not sym:
        zp = local["weight_zero_point"]
        packed = form == "pack-quantized" and args.get("strategy") in ("group", "channel")
        zeros = unpack_int32(zp, bits, out, axis=0) if packed else zp.astype(np.int32).reshape(scales.shape) + offset
    fmt_fields = dict(bits=bits, symmetric=sym, scale_dtype=_scale_dtype(scales, where), **_granularity(args, where))
    if sym:
        fmt_fields["symmetric_range"] = "full"
    if "weight_g_idx" in local:  # older compressed-tensors: GPTQ act-order groups
        size, s_rows, z_rows = contiguous_groups(local["weight_g_idx"], scales.T, None if zeros is None else zeros.T)
        scales, zeros = s_rows.T, None if z_rows is None else z_rows.T
        fmt_fields.pop("granularity", None)
        fmt_fields["group_size"] = size
    codes = unsigned - offset if sym else unsigned
    return LinearCodes(IntFormat(**fmt_fields), codes, scales, zeros)


def float_codes(local: dict, args: dict, form: str, where: str) -> LinearCodes:
    """The codes of an FP8 (``float-quantized``) or NVFP4 (``nvfp4-pack-quantized``) module."""
    if form == "nvfp4-pack-quantized":
        packed = local["weight_packed"].astype(np.uint8)
        codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
        scales = np.ascontiguousarray(local["weight_scale"]).view(np.uint8)
        g = np.float32(np.asarray(local.get("weight_global_scale", np.ones(1, np.float32)), np.float32).reshape(()))
        return LinearCodes(NVFP4Format(), codes, scales, tensor_scale=np.float32(1.0) / g)
    if int(args["num_bits"]) != 8 or local["weight"].dtype.name != "float8_e4m3fn":
        raise ValueError(f"{where}: float weights of {args['num_bits']} bits stored as {local['weight'].dtype} "
                         "have no jquant format (fp8 e4m3 and nvfp4 do).")
    weight = local["weight"]
    scales = _scales_2d(local["weight_scale"], weight.shape[0])
    fmt = FP8Format(element="e4m3", scale_dtype=_scale_dtype(scales, where), **_granularity(args, where))
    return LinearCodes(fmt, weight, scales)


def activation_format(args: dict | None, local: dict, where: str) -> tuple[Format, float | None] | None:
    """The jquant activation format (and static scale) of a scheme's ``input_activations``."""
    if args is None:
        return None
    kind, bits, strategy, dynamic = args.get("type"), int(args["num_bits"]), args.get("strategy"), args.get("dynamic")
    sym = bool(args.get("symmetric", True))
    if kind == "int" and strategy == "token" and dynamic is True and bits in INT_BITS:
        fields = dict(symmetric_range="full") if sym else {}
        return IntFormat(bits=bits, symmetric=sym, granularity="channel", scale_dtype="float32", **fields), None
    if kind == "int" and strategy == "tensor" and dynamic is False and sym and bits in INT_BITS:
        fmt = IntFormat(bits=bits, granularity="tensor", symmetric_range="full", scale_dtype="float32")
        return fmt, float(np.asarray(local["input_scale"], np.float32).reshape(()))
    if kind == "float" and bits == 8 and strategy == "token" and dynamic is True:
        return FP8Format(element="e4m3", granularity="channel"), None
    if kind == "float" and bits == 4 and strategy == "tensor_group" and "input_global_scale" in local:
        amax = _E4M3_MAX * _E2M1_MAX / float(np.asarray(local["input_global_scale"], np.float32).reshape(()))
        return NVFP4Format(tensor_amax=amax), None
    raise ValueError(f"{where}: input activations {args} have no jquant equivalent (supported: int per token "
                     "dynamic, symmetric int per tensor static, fp8 per token dynamic, nvfp4 with a global scale).")


def read(config: dict, tensors: dict[str, np.ndarray], source: str
         ) -> tuple[dict[str, np.ndarray], dict[str, LinearCodes], dict[str, tuple[Format, float | None]]]:
    """Split a checkpoint into float tensors, the codes of each quantized module and its activation format."""
    qc = config["quantization_config"]
    if qc.get("quantization_status", "compressed") != "compressed":
        raise ValueError(f"{source}: quantization_status is {qc.get('quantization_status')!r}; jquant reads "
                         "compressed checkpoints (save the model compressed, as llm-compressor does by default).")
    if qc.get("kv_cache_scheme") or qc.get("sparsity_config") or qc.get("transform_config"):
        raise ValueError(f"{source}: KV-cache schemes, sparsity and transforms of compressed-tensors are not read by "
                         "jquant; export the checkpoint without them.")
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".weight_scale", ".weight_packed"))})
    floats, linears, activations = dict(tensors), {}, {}
    for name in modules:
        where = f"{source}: {name}"
        local = {k: floats.pop(f"{name}.{k}") for k in (*LOCAL_NAMES, "weight") if f"{name}.{k}" in floats}
        group = scheme_for(qc, name)
        form = group.get("format") or qc.get("format")
        args = group["weights"]
        if args.get("type") == "int" and form in ("pack-quantized", "int-quantized", "naive-quantized"):
            linears[name] = int_codes(local, args, form, where)
        elif args.get("type") == "float" and form in ("float-quantized", "naive-quantized", "nvfp4-pack-quantized"):
            linears[name] = float_codes(local, args, form, where)
        else:
            raise ValueError(f"{where}: format {form!r} with {args.get('type')} weights is not one jquant reads "
                             "(pack-quantized, int-quantized, float-quantized, nvfp4-pack-quantized).")
        act = activation_format(group.get("input_activations"), local, where)
        if act is not None:
            activations[name] = act
    return floats, linears, activations
