"""What the pipeline asks of a store: the interface :class:`MemoryStore` and :class:`DiskStore` share.

Shapes: a shard holds ``rows`` training samples, [rows, columns] compressed gradients in the storage dtype
(every block side by side; ``columns`` is the sum of the blocks' widths) and ``rows`` per-sample values.
A checkpoint ``ckpt`` (an int) holds shards 0..n-1 and, once its cache completed, a :class:`Completion`.
Derived data (FIM, K-FAC, ANN index) is a named set of numpy arrays per checkpoint, tagged with the
fingerprint of the shards it was computed from.

Only the disk store has more: ``root``, ``checkpoints()``, ``verify()``, ``attach()``, ``prefetch_rows()``
(callers that want those ask for a :class:`DiskStore`, or use ``getattr``).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from .records import Completion, ShardInfo


@runtime_checkable
class Store(Protocol):
    """A store of compressed training gradients, their completion records and derived data."""

    columns: int  # the width of a row: the sum of the blocks' widths
    storage: str  # the storage dtype's name, a key of STORAGE_DTYPES ("float32", "bfloat16", ...)

    # ---- writing: only under writer() (this process holds the lock) or delegated_writer() ----
    def writer(self) -> AbstractContextManager:
        """Hold the writer lock (re-entrant) while the block runs; StoreBusyError if another process holds it."""

    def delegated_writer(self) -> AbstractContextManager:
        """Write under a lock another process of the same job holds (torch.distributed: rank 0's)."""

    def write_shard(self, ckpt: int, index: int, grads: Tensor, meta: dict) -> None:
        """Store shard ``index``: grads [rows, columns]; meta: rows, digest, start, values ([rows] floats)."""

    def write_completion(self, ckpt: int, record: Completion) -> None:
        """Record that the checkpoint's cache completed with exactly ``record.shards``."""

    # ---- shards and their completion ----
    def shard_meta(self, ckpt: int) -> dict[int, dict]:
        """{index: meta} of the checkpoint's visible (complete) shards, in index order."""

    def shard_info(self, ckpt: int, index: int, meta: dict) -> ShardInfo:
        """The completion record's entry for a visible shard (its files' sizes and CRC32s on disk)."""

    def completion(self, ckpt: int) -> Completion | None:
        """The checkpoint's completion record, or None if its cache did not complete."""

    def require_complete(self, ckpt: int) -> Completion:
        """The completion record, after checking that exactly its shards are present (IncompleteStoreError)."""

    def read_shard(self, ckpt: int, shard: ShardInfo) -> Tensor:
        """[rows, columns] in the storage dtype, checked against the record."""

    def read_values(self, ckpt: int, shard: ShardInfo) -> list[float]:
        """The shard's [rows] per-sample values."""

    def read_rows(self, ckpt: int, shard: ShardInfo, rows) -> Tensor:
        """[len(rows), columns] in the storage dtype: some rows of a shard (``rows``: indices within it)."""

    # ---- derived data, per checkpoint and name ----
    def save_derived(self, ckpt: int, name: str, arrays: dict[str, np.ndarray], fingerprint: str, meta: dict) -> None:
        """Replace the derived data ``name`` with ``arrays``, tagged with ``fingerprint`` and JSON ``meta``."""

    def has_derived(self, ckpt: int, name: str, fingerprint: str) -> bool:
        """Whether ``name`` is stored with this fingerprint."""

    def load_derived(self, ckpt: int, name: str, fingerprint: str) -> tuple[dict[str, np.ndarray], dict] | None:
        """(arrays, meta) if ``name`` was computed from data with this fingerprint, else None."""

    def derived_meta(self, ckpt: int, name: str) -> tuple[str, dict] | None:
        """(fingerprint, meta) of ``name`` whatever data it was computed from, or None if absent."""

    def derived_names(self, ckpt: int) -> list[str]:
        """The names of the checkpoint's derived data, sorted."""

    def remove_derived(self, ckpt: int, name: str) -> None:
        """Delete the derived data ``name`` (if present)."""
