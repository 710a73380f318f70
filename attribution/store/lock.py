"""The store's writer lock: one writer at a time.

A process takes ``<root>/lock`` (``fcntl.flock``, released by the OS even on kill -9) before its first
write and records ``{pid, host, since}`` in it; another process that needs to write is refused with
:class:`StoreBusyError` naming the holder. Only the lock holder removes leftover temporary files and
directories (``.<name>.tmp-<host>-<pid>``, ``.<name>.old-<pid>``: no live writer owns them), when it
takes the lock, before it writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .records import LOCK_FILE, StoreBusyError, StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


class WriterLock:
    """The writer lock of the store at ``root``: re-entrant within a process (:meth:`held`), or delegated
    (:meth:`delegated`: another process of the same job holds it, as torch.distributed's rank 0 does)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.fd: int | None = None
        self._depth = 0
        self._delegated = False

    @contextlib.contextmanager
    def held(self):
        """Hold the lock (re-entrant); refuses with StoreBusyError if another process holds it. On first
        acquisition, removes leftover temporaries (no live writer owns them)."""
        if self._depth == 0:
            self._acquire()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._release()

    @contextlib.contextmanager
    def delegated(self):
        """Write under a lock another process of the same job holds (torch.distributed: rank 0's)."""
        self._delegated = True
        try:
            yield
        finally:
            self._delegated = False

    def require(self) -> None:
        """RuntimeError unless this process may write now (it holds the lock, or writes under a delegated one)."""
        if self.fd is None and not self._delegated:
            raise RuntimeError("internal: write outside DiskStore.writer()")

    def _acquire(self) -> None:
        path = self.root / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StoreError(f"cannot write to store {self.root} ({err.strerror}); is it read-only?") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
                except json.JSONDecodeError:
                    holder = {}
                os.close(fd)
                raise StoreBusyError(f"store {self.root} in use by pid {holder.get('pid', '?')} on host "
                                     f"{holder.get('host', '?')} (a cache() is writing it); wait for it to finish or "
                                     "stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        self.fd = fd
        remove_temporaries(self.root)

    def _release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.ftruncate(fd, 0)
            os.close(fd)  # releases the flock


def remove_temporaries(root: Path) -> None:
    """Remove the temporary files and directories writers left under the checkpoints (call it holding the lock)."""
    for folder in [*root.glob("ckpt_*"), *root.glob("ckpt_*/shards")]:
        for entry in folder.iterdir() if folder.is_dir() else []:
            if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
