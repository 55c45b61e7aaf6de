"""Writing files and folders so that nobody ever reads half of one.

Every file hbird writes goes through :func:`atomic_file`: the bytes go to a temporary file
in the same folder, are flushed and fsynced, and the file is renamed over the target with
``os.replace`` (atomic on POSIX and Windows), after which the folder itself is fsynced.
A reader sees the old file or the new one, never a mix; a crash leaves at most a hidden
``.<name>.*.tmp`` file.

Folders (banks, indexes, FUNGI extractors) are built as a hidden sibling and swapped in by
:func:`replace_folder`; the old folder survives until the new one is complete.

Modes: every file gets ``0o666`` and every folder ``0o777``, less the process umask — what
``open(path, "w")`` and ``mkdir`` give — whichever tool wrote it (``mkstemp`` alone would
give ``0o600`` and ``mkdtemp`` ``0o700``).

Replacing: hbird deletes or replaces only a folder that is empty or that a check says it
wrote itself (``is_ours``, e.g. "holds a bank manifest"). Anything else is refused with an
error naming it, and nothing is deleted.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hbird.errors import InputError

PathLike = str | os.PathLike[str]


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of every file hbird writes: ``0o666`` less the umask (usually ``0o644``)."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode of every folder hbird creates: ``0o777`` less the umask (usually ``0o755``)."""
    return 0o777 & ~_umask()


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or, on POSIX, a folder) to the disk."""
    if path.is_dir() and os.name == "nt":
        return  # Windows cannot open a folder for fsync; its rename is durable anyway
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it becomes ``path``.

    Write the whole file to the yielded path with any tool (``save_file``, ``np.save``,
    ``PIL.Image.save``, ``torch.save``...); the temporary name ends with ``path``'s suffix
    so tools that add one do not. On error the temporary file is removed and ``path`` is
    left as it was. Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, sort_keys: bool = True) -> Path:
    """Write ``obj`` as indented JSON (non-JSON values as ``str``) atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def save_tensors(
    path: PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> Path:
    """Write torch ``tensors`` (made contiguous, moved to the CPU) as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata)
    return Path(path)


def has_file(name: str) -> Callable[[Path], bool]:
    """An ``is_ours`` check: the folder holds a file called ``name``."""
    return lambda folder: (folder / name).is_file()


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_replaceable(
    folder: PathLike,
    what: str,
    is_ours: Callable[[Path], bool],
    overwrite: bool = True,
    flag: str = "overwrite=True",
    error: type[Exception] = InputError,
) -> None:
    """Raise :class:`InputError` unless hbird may put a new ``what`` at ``folder``.

    Allowed: ``folder`` does not exist, is an empty folder, or (with ``overwrite``) is a
    folder ``is_ours`` accepts. A file, or a folder holding anything else, is refused and
    left untouched. ``flag`` names the overwrite switch in the message; ``error`` is the
    exception class raised.
    """
    folder = Path(folder)
    if not folder.exists() or _is_empty_folder(folder):
        return
    if folder.is_dir() and is_ours(folder):
        if overwrite:
            return
        raise error(
            f"{folder} already exists (it holds {what}); choose another folder or pass {flag} to replace it"
        )
    kind = "a file" if not folder.is_dir() else "a folder that is not " + what
    shown = "" if not folder.is_dir() else f" (it holds {_some_names(folder)})"
    raise error(
        f"refusing to overwrite {folder}: it is {kind}{shown}; nothing was deleted. "
        f"{flag} replaces only {what}; choose another folder"
    )


def check_output(path: PathLike, flag: str, kind: str = "folder") -> None:
    """Raise :class:`InputError` unless ``path`` can be written as a ``kind`` (``"folder"``
    or ``"file"``); call it before any work. Refused, naming ``flag`` and the path: an
    existing path of the other kind, a file where a parent folder would go, and a place
    where this process cannot create files (tried, so read-only disks count too).
    """
    path = Path(path)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder; give a folder path")
    if kind == "file" and path.is_dir():
        example = path / "results.json"
        raise InputError(f"{flag} {path} is a folder; give a file path, e.g. {example}")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
    try:
        handle, probe = tempfile.mkstemp(dir=parent, prefix=".hbird-write-test.")
    except OSError as err:
        raise InputError(
            f"{flag} {path}: cannot create files in {parent} ({err.strerror}); "
            "choose a folder you can write to"
        ) from None
    os.close(handle)
    os.unlink(probe)


def _some_names(folder: Path, most: int = 3) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def remove_folder(folder: PathLike, what: str, is_ours: Callable[[Path], bool]) -> None:
    """Delete ``folder`` if it is missing, empty or accepted by ``is_ours``; refuse otherwise."""
    folder = Path(folder)
    check_replaceable(folder, what, is_ours)
    if folder.exists():
        shutil.rmtree(folder)


def sync_folder(folder: Path) -> None:
    """fsync every file under ``folder``, then the folders themselves, deepest first."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def replace_folder(new: PathLike, folder: PathLike) -> Path:
    """Move the finished folder ``new`` to ``folder``, replacing what is there.

    The caller has checked ``folder`` with :func:`check_replaceable`. The old folder is
    renamed aside first and removed only once ``new`` is in place; if the second rename
    fails, the old folder is put back.
    """
    new, folder = Path(new), Path(folder)
    sync_folder(new)
    os.chmod(new, folder_mode())
    if not folder.exists():
        os.replace(new, folder)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
        os.replace(folder, old / folder.name)
        try:
            os.replace(new, folder)
        except BaseException:
            os.replace(old / folder.name, folder)
            old.rmdir()
            raise
        shutil.rmtree(old)
    _fsync(folder.parent)
    return folder


@contextmanager
def atomic_folder(
    folder: PathLike, what: str, is_ours: Callable[[Path], bool], overwrite: bool = True
) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``folder``; on success it replaces ``folder``.

    ``folder`` must pass :func:`check_replaceable` (checked before the caller writes
    anything). On error the temporary folder is removed and ``folder`` is left as it was.

    Args:
        what: how to name that kind of folder in an error (``"a saved index"``).
        is_ours: accepts a folder hbird wrote of this kind (e.g. ``has_file("index.json")``).
    """
    folder = Path(folder)
    check_replaceable(folder, what, is_ours, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
