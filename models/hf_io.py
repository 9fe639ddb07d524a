"""Reading and writing Hugging Face checkpoint folders (config.json + safetensors).

Family-independent: families map tensor names and shapes; this module moves
bytes.  Writes are atomic: files go to a temporary sibling folder that is
renamed into place only once complete, so an interrupted export never leaves a
folder that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jquant.atomic import atomic_folder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# diffusers' file names (``ModelMixin.save_pretrained``): one file, or shards with this index.
DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"


def _index_name(weights_name: str) -> str:
    return weights_name + ".index.json"


def read_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint folder as a dict."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        if (Path(path) / "state").is_dir():
            raise FileNotFoundError(f"{path} looks like an incomplete jquant checkpoint: it has a state/ folder but no "
                                    "jquant.json; save the model again (or copy the whole folder from its source).")
        raise FileNotFoundError(
            f"{config_path} not found: a Hugging Face checkpoint folder needs config.json next to its safetensors files."
        )
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); fix or re-download the file.") from None


def read_diffusers_config(path: str | os.PathLike, class_names: tuple[str, ...]) -> dict:
    """``config.json`` of a diffusers model folder whose ``_class_name`` is one of ``class_names``.

    A folder of another class (or a transformers folder) is refused with an error naming what it holds.
    """
    config = read_config(path)
    found = config.get("_class_name")
    if found not in class_names:
        what = f"_class_name {found!r}" if found is not None else f"no _class_name (model_type {config.get('model_type')!r})"
        raise ValueError(f"{path}: config.json has {what}, but this reader takes diffusers "
                         f"{' / '.join(class_names)} folders; load it with the family that reads it "
                         "(jquant.models.load picks one from the folder).")
    return config


def read_safetensors(path: str | os.PathLike, *, weights_name: str = SINGLE_FILE) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder, single-file or sharded with an index.

    ``weights_name`` is the single file's name (``DIFFUSERS_FILE`` for diffusers folders); the index of a
    sharded folder is that name plus ``.index.json``.
    """
    folder = Path(path)
    index_file = _index_name(weights_name)
    if (folder / index_file).is_file():
        weight_map = json.loads((folder / index_file).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / weights_name).is_file():
        weight_map, files = None, [weights_name]
    else:
        raise FileNotFoundError(
            f"No weights in {folder}: expected {weights_name} or {index_file} with its shards "
            "(PyTorch .bin checkpoints are not read; re-save with safe_serialization=True)."
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        shard = folder / name
        if not shard.is_file():
            raise FileNotFoundError(f"{index_file} in {folder} lists shard {name}, which is missing.")
        try:
            with safe_open(shard, framework="numpy") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except SafetensorError as err:
            raise ValueError(f"{shard} is not a readable safetensors file ({err}): it is damaged or truncated; "
                             "re-download or re-export the checkpoint.") from None
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{index_file} in {folder} lists tensors that no shard holds: {missing[:5]}")
    return tensors


def stored_dtype(tensors: Mapping[str, np.ndarray], *, default: str) -> str:
    """The one floating dtype every tensor is stored in, else ``default`` (mixed or non-float storage)."""
    stored = {str(v.dtype) for v in tensors.values()}
    return stored.pop() if len(stored) == 1 and stored <= {"float32", "bfloat16", "float16", "float64"} else default


def write_checkpoint(
    path: str | os.PathLike,
    config: Mapping,
    tensors: Mapping[str, np.ndarray],
    *,
    max_shard_bytes: int = 2 * 1024**3,
    extra_files: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    weights_name: str = SINGLE_FILE,
) -> Path:
    """Write ``config.json`` and safetensors (sharded with an index above ``max_shard_bytes``) atomically.

    ``weights_name``: the single file's name (``DIFFUSERS_FILE`` writes a folder diffusers'
    ``from_pretrained`` reads); shards are named after it and indexed in ``weights_name + ".index.json"``.

    ``extra_files(folder)`` may add files (a tokenizer, say) before the folder
    is moved into place.  ``path`` must be new or an empty folder; ``overwrite=True``
    replaces a folder jquant wrote, only after the new one is complete (``jquant.atomic``).
    """
    with atomic_folder(path, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        shards = _plan_shards(tensors, max_shard_bytes)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file({k: np.ascontiguousarray(tensors[k]) for k in shards[0]}, tmp / weights_name, metadata=metadata)
        else:
            weight_map = {}
            stem = weights_name.removesuffix(".safetensors")
            for i, names in enumerate(shards):
                fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({k: np.ascontiguousarray(tensors[k]) for k in names}, tmp / fname, metadata=metadata)
                weight_map.update({k: fname for k in names})
            total = int(sum(t.nbytes for t in tensors.values()))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / _index_name(weights_name)).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if extra_files is not None:
            extra_files(tmp)
    return Path(path).absolute()


def _plan_shards(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of tensor names, in sorted order, into shards of at most ``max_shard_bytes``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards
