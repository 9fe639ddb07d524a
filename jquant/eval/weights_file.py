"""Reading the pretrained weights of the evaluation networks (FID Inception, LPIPS) from a local file.

No weights are downloaded: users point at the files they have, in the layouts those projects publish:

- ``.pth`` / ``.pt``: a PyTorch state dict (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, torchvision's
  ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``, the lpips package's ``weights/v0.1/alex.pth``); reading
  it needs torch (imported here only, lazily), loaded with ``weights_only=True`` onto the CPU;
- ``.safetensors`` / ``.npz``: the same tensor names, read without torch.

``check_tensors`` compares a state dict with the tensors a network needs before anything is built: every missing,
unexpected or mis-shaped tensor is an error naming the file and the tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")


def read_weights(path: str | os.PathLike, *, what: str) -> dict[str, np.ndarray]:
    """The named tensors of the weights file ``path`` (module docstring); ``what`` names the file's role in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} is not a file (give the path of a local {'/'.join(SUFFIXES)} "
                                "weights file; nothing is downloaded).")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{what}: {path} must end in one of {', '.join(SUFFIXES)}.")
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(path))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
    except Exception as err:  # noqa: BLE001 - any reader failure means an unreadable file, reported as such
        raise ValueError(f"{what}: {path} is not a readable {suffix} file ({type(err).__name__}: {err}).") from None
    return _read_torch(path, what)


def _read_torch(path: Path, what: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"{what}: reading {path} (a PyTorch state dict) needs torch; install torch, or convert the "
                          "file to .safetensors / .npz with the same tensor names, which need no torch.") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged or non-state-dict files
        raise ValueError(f"{what}: {path} is not a readable PyTorch state dict ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}).") from None
    if not isinstance(state, Mapping):
        raise ValueError(  # noqa: TRY004 - a file with the wrong contents, not a wrong argument type
            f"{what}: {path} holds a {type(state).__name__}, not a state dict of named tensors.")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{what}: {path}: entries {not_tensors[:4]} are not tensors (a training checkpoint? save "
                         "the model's state_dict()).")
    return {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).numpy() for k, v in state.items()}


def check_tensors(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], *, source: str,
                  what: str, ignored: Callable[[str], bool] = lambda name: False) -> None:
    """Raise unless ``tensors`` holds exactly the ``expected`` names with those shapes, all floating point.

    Names for which ``ignored(name)`` is true may be present and are not used (a classifier head, BatchNorm's
    ``num_batches_tracked``). ``source`` is the file, ``what`` the network, both named in the error.
    """
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ValueError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all; {what} needs "
                         f"them). Is this the right file?")
    unexpected = sorted(name for name in tensors if name not in expected and not ignored(name))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensors not used by {what}: {unexpected[:6]} (another network or "
                         "variant?).")
    for name, shape in expected.items():
        array = tensors[name]
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}; {what} needs {tuple(shape)}.")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{source}: tensor {name!r} has dtype {array.dtype}; a floating-point tensor was expected.")
