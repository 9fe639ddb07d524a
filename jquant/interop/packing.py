"""Integer packing of the PyTorch checkpoint formats, and a safetensors reader that knows FP8.

compressed-tensors (``pack_to_int32``) and GPTQ (``qweight`` / ``qzeros``) pack unsigned ``b``-bit codes
densely into little-endian int32 words along one axis: code ``i`` occupies bits ``[i b, (i + 1) b)`` of the
axis' bit stream, word ``j`` holds stream bits ``[32 j, 32 j + 32)`` with bit 0 the least significant
(for b = 4: eight codes per word, code 8j in the low nibble; b = 3 splits codes across words). An axis of
``n`` codes takes ``ceil(n b / 32)`` words; the unused high bits of the last word are zero.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np


def int32_words(n: int, bits: int) -> int:
    """Number of int32 words ``n`` codes of ``bits`` bits occupy."""
    return -(-n * bits // 32)


def pack_int32(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned ``codes`` (values in ``[0, 2^bits)``) packed into int32 words along ``axis``."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"pack_int32: codes must lie in [0, {1 << bits}) for {bits} bits, "
                         f"got [{codes.min()}, {codes.max()}].")
    x = np.moveaxis(codes.astype(np.uint32), axis, -1)
    n = x.shape[-1]
    planes = ((x[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    stream = planes.reshape(*x.shape[:-1], n * bits)
    words = int32_words(n, bits)
    stream = np.concatenate([stream, np.zeros((*x.shape[:-1], words * 32 - n * bits), np.uint8)], axis=-1)
    packed = np.packbits(stream, axis=-1, bitorder="little")
    return np.moveaxis(np.ascontiguousarray(packed).view("<i4"), -1, axis)


def unpack_int32(words: np.ndarray, bits: int, n: int, axis: int) -> np.ndarray:
    """The first ``n`` unsigned codes (int32) packed in int32 ``words`` along ``axis`` (inverse of ``pack_int32``)."""
    words = np.asarray(words)
    if words.dtype != np.int32 or words.shape[axis] != int32_words(n, bits):
        raise ValueError(f"unpack_int32: {n} codes of {bits} bits need {int32_words(n, bits)} int32 words along axis "
                         f"{axis}, got an array {words.shape} {words.dtype}.")
    x = np.ascontiguousarray(np.moveaxis(words, axis, -1)).view(np.uint8)
    stream = np.unpackbits(x, axis=-1, bitorder="little")[..., :n * bits]
    planes = stream.reshape(*stream.shape[:-1], n, bits).astype(np.int32)
    codes = np.sum(planes << np.arange(bits, dtype=np.int32), axis=-1, dtype=np.int32)
    return np.moveaxis(codes, -1, axis)


# safetensors dtype names -> numpy dtypes (ml_dtypes for the ones numpy lacks).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors_file(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file (FP8 included, which ``safetensors.numpy`` cannot read)."""
    data = path.read_bytes()
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
    except (struct.error, ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a readable safetensors file (bad header): it is damaged or truncated; "
                         "re-download or re-export the checkpoint.") from None
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which jquant does not read.")
        start, end = entry["data_offsets"]
        raw = data[8 + size + start:8 + size + end]
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        if len(raw) != end - start or len(raw) != dtype.itemsize * int(np.prod(entry["shape"], dtype=np.int64)):
            raise ValueError(f"{path}: tensor {name!r} is truncated; re-download or re-export the checkpoint.")
        out[name] = np.frombuffer(raw, dtype).reshape(entry["shape"]).copy()
    return out


def read_folder_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face folder: ``model.safetensors``, or the shards its index lists."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"No weights in {folder}: expected model.safetensors or model.safetensors.index.json "
                                "with its shards.")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{index} lists shard {name}, which is missing.")
        tensors.update(read_safetensors_file(folder / name))
    return tensors
