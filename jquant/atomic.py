"""Writing a folder atomically: build it in a temporary sibling, then rename it into place.

    with atomic_folder("runs/x") as tmp:
        (tmp / "a.json").write_text(...)

If the block raises (or is interrupted) the temporary folder is removed and
any existing folder at the target is untouched; otherwise the new folder
replaces it in one rename, with the permissions a plain ``mkdir`` would give.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` when the block completes."""
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(folder: Path) -> None:
    """Give the folder and its files the permissions a plain ``mkdir``/``open`` would (mkdtemp uses 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
