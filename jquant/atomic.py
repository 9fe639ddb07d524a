"""Writing output folders without ever losing a user's data.

    with atomic_folder("runs/x") as tmp:
        (tmp / "a.json").write_text(...)

The folder is built in a temporary sibling ``.x.jquant-partial-<process>-<random>``
and renamed into place only when the block completes; if the block raises (or
is interrupted) the temporary folder is removed and nothing at the target is
touched.  The rules for the target (``check_output_folder``):

* absent, or an empty folder: written;
* a file, a symbolic link, a non-empty folder jquant did not write, the working
  directory or one of its parents: refused with ``OutputPathError``, always;
* a non-empty folder jquant wrote (it holds ``MARKER``, or is a checkpoint or
  reference export from before the marker existed): refused unless
  ``overwrite=True``, and then swapped with the new folder in one atomic
  exchange (``renameat2(RENAME_EXCHANGE)`` on Linux), so the target is never
  absent.

Callers with long work before the write call ``check_output_folder`` first, so
a bad target fails before the work.  Single output files (an image, a clip, a
latent archive) follow ``check_output_file`` (an existing file is refused unless
the command has an explicit overwrite flag and the user passed it) and are
written by ``write_file_atomically``: to a hidden ``.name.partial`` sibling,
then renamed onto the target, so a failed or interrupted write leaves nothing.  Leftovers of a killed save (partial
folders whose process is gone, and the ``.x.<random>`` / ``.x.old.<random>``
folders of jquant versions before this one) are removed at the next save to
the same target; a partial folder whose process is still running means another
save is in progress, and the second save is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

MARKER = ".jquant-written"
"""File jquant writes into every folder it creates; only such folders may be replaced."""

_LEGACY_MANIFESTS = ("jquant.json", "reference_info.json")  # checkpoints / reference exports written before MARKER
_PARTIAL = ".jquant-partial-"


class OutputPathError(ValueError):
    """An output path jquant refuses to write: it would replace or delete something jquant did not create."""


def written_by_jquant(folder: Path) -> bool:
    """Whether ``folder`` is one jquant wrote (holds ``MARKER``, or a pre-marker checkpoint or reference export)."""
    return any((folder / name).is_file() for name in (MARKER, *_LEGACY_MANIFESTS))


def check_output_file(path: str | os.PathLike, suffixes: Sequence[str], *, argument: str = "--out",
                      overwrite: bool = False, overwrite_flag: str | None = None) -> Path:
    """``path`` as a ``Path`` if a new file may be written there; else ``OutputPathError`` naming ``argument``: a
    suffix outside ``suffixes`` (lower case, with the dot), a folder, a missing parent folder, or an existing file
    (allowed only when the command offers ``overwrite_flag`` and ``overwrite`` is true)."""
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise OutputPathError(f"{argument} {str(path)!r} must end in {' or '.join(suffixes)}.")
    if out.is_dir():
        raise OutputPathError(f"{argument} {str(path)!r} is a folder; name a file inside it.")
    if out.exists() and not overwrite:
        fix = (f"pass {overwrite_flag} to replace it, or pick a new name" if overwrite_flag else
               "jquant never replaces a file it did not create. Pick a new name")
        raise OutputPathError(f"{argument} {str(path)!r} exists; {fix}.")
    if not out.parent.is_dir():
        raise OutputPathError(f"{argument} {str(path)!r}: the folder {out.parent} does not exist.")
    return out


def write_file_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` into the hidden sibling ``.<name>.partial<suffix>`` of ``path``, then rename it onto ``path``;
    the temporary file is removed if ``write`` fails, so ``path`` is written whole or not touched. -> ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_output_folder(path: str | os.PathLike, *, overwrite: bool = False, argument: str = "path",
                        overwrite_hint: str = "overwrite=True") -> Path:
    """Raise ``OutputPathError`` (naming ``argument`` and the fix) unless ``path`` may receive a new folder.

    Returns the absolute target.  ``overwrite_hint`` is how the caller's user
    asks for replacement (``--overwrite`` on the command line).
    """
    target = Path(os.path.abspath(path))
    for ancestor in target.parents:
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise OutputPathError(f"{argument} {path!s}: {ancestor} is a file, so no folder can be made under it; "
                                      "choose a path inside a folder.")
            break
    if target.is_symlink():
        raise OutputPathError(f"{argument} {path!s} is a symbolic link; jquant does not replace links. "
                              "Pass the path of a new folder.")
    if not target.exists():
        return target
    if not target.is_dir():
        raise OutputPathError(f"{argument} {path!s} is an existing file; jquant never replaces files it did not write. "
                              "Choose a new folder path.")
    if not any(target.iterdir()):
        return target
    cwd = Path.cwd().resolve()
    if target.resolve() == cwd or target.resolve() in cwd.parents:
        raise OutputPathError(f"{argument} {path!s} is the working directory or contains it; choose a new folder path.")
    if not written_by_jquant(target):
        raise OutputPathError(f"{argument} {path!s} is a non-empty folder that jquant did not write; jquant will not "
                              "replace it, even when asked to overwrite. Choose a new folder path.")
    if not overwrite:
        raise OutputPathError(f"{argument} {path!s} already holds a folder jquant wrote; choose a new path, or pass "
                              f"{overwrite_hint} to replace it.")
    return target


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False, argument: str = "path",
                  overwrite_hint: str = "overwrite=True") -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` when the block completes (rules in the module docstring)."""
    target = Path(os.path.abspath(path))
    if target.parent.is_dir():
        _clean_leftovers(target, argument)
    check_output_folder(path, overwrite=overwrite, argument=argument, overwrite_hint=overwrite_hint)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}{_PARTIAL}{_process_tag(os.getpid())}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"written_by": "jquant"}) + "\n")
        _apply_umask(tmp)
        _move_into_place(tmp, target, path, overwrite=overwrite, argument=argument, overwrite_hint=overwrite_hint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; holds the replaced folder after an exchange


def check_work_folder(path: str | os.PathLike, *, argument: str = "workdir", resumable: tuple[str, ...] = ()) -> Path:
    """Raise ``OutputPathError`` unless ``path`` may be a folder a long job writes into step by step.

    An existing folder is reused only when empty, written by jquant, or holding
    one of the ``resumable`` entries of an earlier run; anything else is refused.
    """
    target = Path(os.path.abspath(path))
    if target.is_dir() and not target.is_symlink() and any(target.iterdir()):
        if not (written_by_jquant(target) or any((target / name).exists() for name in resumable)):
            raise OutputPathError(f"{argument} {path!s} is a non-empty folder that is not a jquant run of this kind "
                                  "(nothing to resume); choose a new folder path.")
        return target
    return check_output_folder(path, argument=argument)


def prepare_work_folder(path: str | os.PathLike, *, argument: str = "workdir", resumable: tuple[str, ...] = ()) -> Path:
    """Create (or reopen, by ``check_work_folder``'s rules) a work folder and mark it as jquant's."""
    target = check_work_folder(path, argument=argument, resumable=resumable)
    target.mkdir(parents=True, exist_ok=True)
    (target / MARKER).touch()
    return target


def _move_into_place(tmp: Path, target: Path, path, *, overwrite: bool, argument: str, overwrite_hint: str) -> None:
    """Rename ``tmp`` to ``target``; a jquant folder now at ``target`` is exchanged with it atomically."""
    check_output_folder(path, overwrite=overwrite, argument=argument, overwrite_hint=overwrite_hint)  # may have changed
    if target.is_dir() and any(target.iterdir()):
        if not _exchange(tmp, target):  # no atomic exchange here: two renames, the target briefly absent
            old = tmp.with_name(tmp.name + "-old")
            os.rename(target, old)
            os.rename(tmp, target)
            os.rename(old, tmp)
        return
    try:
        os.rename(tmp, target)  # replaces an empty folder; fails on anything else that appeared meanwhile
    except OSError as err:
        raise OutputPathError(f"{argument} {path!s} was created by someone else while jquant was writing; "
                              "nothing was replaced. Choose a new folder path.") from err


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux's ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _process_tag(pid: int) -> str:
    """``pid`` plus the process's start time where /proc tells it, so a reused pid is not mistaken for a live save."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return str(pid)
    return f"{pid}_{start}"


def _clean_leftovers(target: Path, argument: str) -> None:
    """Tidy what killed saves to ``target`` left behind; refuse if another live process is writing it.

    A save killed mid-replacement leaves the target absent and the previous
    folder aside (``...-old``, or ``.x.old.<random>/x`` before this version):
    that folder is moved back first, never deleted.  Other leftovers are partial
    copies and are removed.
    """
    name = re.escape(target.name)
    partial = re.compile(rf"^\.{name}{re.escape(_PARTIAL)}(\d+(?:_\d+)?)-[0-9a-f]{{8}}(-old)?$")
    legacy = re.compile(rf"^\.{name}\.(old\.)?[a-z0-9_]{{8}}$")  # tempfile.mkdtemp names of jquant <= 0.1
    leftovers = []
    for entry in target.parent.iterdir():
        match = partial.match(entry.name)
        if match:
            tag = match.group(1)
            if _process_tag(int(tag.split("_")[0])) == tag:
                raise OutputPathError(f"{argument} {target}: another jquant save (process {tag.split('_')[0]}) is "
                                      "writing this folder now; wait for it to finish or choose another path.")
            aside = entry if match.group(2) else None
        elif (match := legacy.match(entry.name)) and entry.is_dir() and not entry.is_symlink():
            aside = entry / target.name if match.group(1) else None
        else:
            continue
        if aside is not None and aside.is_dir() and not target.exists() and not target.is_symlink():
            os.rename(aside, target)
        leftovers.append(entry)
    for entry in leftovers:
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)


def _apply_umask(folder: Path) -> None:
    """Give the folder and its files the permissions a plain ``mkdir``/``open`` would (mkdir of a hidden tmp kept them)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
