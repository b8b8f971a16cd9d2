"""Outputs that appear whole or not at all: directories and files written aside, synced, then swapped into place.

Every multi-file output lorakit writes (an adapter, a checkpoint, a merged model) goes through :func:`atomic_dir`:
the files are written into a hidden sibling ``.lorakit-tmp-<pid>-<random>``, flushed to disk, and the finished
directory takes the target's name in one ``rename`` (or, when the target exists, one ``renameat2(RENAME_EXCHANGE)``
that swaps old and new, after which the old copy is deleted). A process killed at any point leaves either the old
output or the new one under the target's name, never a mix, plus at most a hidden leftover that
:func:`remove_leftovers` deletes once its process is gone. Readers skip names starting with a dot.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "discard", "atomic_write_bytes", "atomic_write_text", "remove_leftovers", "TEMP_PREFIX"]

#: Prefix of every temporary sibling lorakit creates; followed by the writer's pid.
TEMP_PREFIX = ".lorakit-tmp-"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _temp_sibling(target: Path) -> Path:
    return target.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{target.name}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _default_mode(directory: bool) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the call is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty hidden directory beside ``target``; when the block ends without an error its content becomes
    ``target`` in one step (an existing ``target`` is replaced as a whole when ``replace``), otherwise it is deleted.

    Raises:
        FileExistsError: ``target`` exists and ``replace`` is False, or ``target`` is a file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and (not replace or not target.is_dir()):
        kind = "a file" if not target.is_dir() else "a directory"
        raise FileExistsError(f"{target} already exists ({kind}); choose another path or remove it first")
    tmp = _temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        os.chmod(tmp, _default_mode(directory=True))
        _fsync_tree(tmp)
        if target.exists():
            if not _exchange(tmp, target):  # no renameat2: move the old copy aside first
                old = _temp_sibling(target)
                os.rename(target, old)
                os.rename(tmp, target)
                tmp = old
        else:
            os.rename(tmp, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new files on failure, the old copy after a swap


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a synced temporary sibling and one ``os.replace``."""
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(parent: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings in ``parent`` whose writing process has ended; returns what was removed."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        pid = entry.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        _delete(entry)
        removed.append(entry)
    return removed


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def discard(path: str | os.PathLike) -> None:
    """Delete ``path`` (file or directory) after renaming it to a hidden temporary sibling, so a kill in between
    never leaves part of it under its own name (:func:`remove_leftovers` finishes the job)."""
    path = Path(path)
    aside = _temp_sibling(path)
    os.rename(path, aside)
    _delete(aside)
