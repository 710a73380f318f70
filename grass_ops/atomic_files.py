"""Atomic file writes: tmp file in the same directory, fsync, os.replace, fsync the directory.

A reader sees either the old file or the whole new one, never a partial write; the tmp
file is removed if the writer raises.

The tmp file is ``.{name}.tmp-{hostname}-{pid}`` beside the target (:func:`tmp_path`): hidden, and
recognizable by whoever cleans up after a killed writer (the attribution store removes leftover
``.tmp-`` names under its writer lock). It is created like ``open(path, "wb")`` (mode 0o666 less the
umask), so the renamed file has the permissions a plain write would give it.

Two ways in: :func:`atomic_writer` (or :func:`write_bytes_atomic` and its text and JSON forms) writes
the tmp file and commits it; :func:`commit_tmp` commits a tmp file that was filled another way (e.g.
positioned writes from several processes into a preallocated .npy).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_writer", "commit_tmp", "fsync_dir", "tmp_path", "write_bytes_atomic", "write_text_atomic",
           "write_json_atomic"]


def tmp_path(path: str | os.PathLike) -> Path:
    """The tmp file beside ``path`` that this process writes before renaming it onto ``path``:
    ``.{name}.tmp-{hostname}-{pid}`` (unique per host and process, so writers sharing a file system
    never collide; the same name for every write of ``path`` by this process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(tmp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def _replace(tmp: Path, path: Path) -> None:
    """Rename the (already fsynced) ``tmp`` onto ``path`` and fsync the directory; the tmp file is
    removed if the rename fails."""
    try:
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    fsync_dir(path.parent)


def commit_tmp(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Commit a tmp file that is already filled (closed by its writers): fsync it, rename it onto
    ``path`` (os.replace) and fsync the directory. The tmp file is removed if this fails."""
    tmp, path = Path(tmp), Path(path)
    try:
        _fsync_file(tmp)
    except BaseException:
        _discard(tmp)
        raise
    _replace(tmp, path)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a file object (for np.save, np.savez, torch.save) that replaces ``path`` atomically on exit."""
    path = Path(path)
    tmp = tmp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _discard(tmp)
        raise
    _replace(tmp, path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically."""
    write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """Replace ``path`` with ``json.dumps(obj, **dumps_kwargs)`` atomically."""
    write_text_atomic(path, json.dumps(obj, **dumps_kwargs))
