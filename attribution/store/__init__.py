"""Storage of compressed training gradients: in memory, or on disk, sharded, checksummed and crash-safe.

The package: :mod:`.protocol` (:class:`Store`, the interface the pipeline uses), :mod:`.memory`
(:class:`MemoryStore`), :mod:`.disk` (:class:`DiskStore`), :mod:`.records` (format constants, errors,
checksummed and sealed JSON, checked .npy reads, the manifest's shape, :class:`ShardInfo`,
:class:`Completion`), :mod:`.lock` (the writer lock), :mod:`.verify` (``DiskStore.verify``),
:mod:`.manifest` (model fingerprints, the query features' signature). Files are replaced atomically
through :mod:`grass_ops.atomic_files`.

On-disk layout (readable with numpy and json alone; no pickle anywhere)::

    manifest.json                          configuration: model fingerprint, blocks and their widths,
                                           compressor specs and seeds, dtypes; a differing one is refused;
                                           sealed with the CRC32 of its own content, like every JSON record
    lock                                   {pid, host} of the writer holding it (flock; released on exit)
    attached.json                          size and CRC32 of the files under the root that the data depends
                                           on beside the store's own (grass-attribute's corpus, flags, masks)
    ckpt_000/shards/00000000/grads.npy     [rows, columns] compressed gradients of one batch, every
                                           block side by side (manifest "blocks" gives the widths)
    ckpt_000/shards/00000000/meta.json     rows, batch digest, per-sample values, checksum of grads.npy
    ckpt_000/complete.json                 the completion record: every shard (index, rows, digest,
                                           sizes and CRC32s of its files), the sample count and a
                                           fingerprint of it all; written last, once the cache is complete
    ckpt_000/fim/                          data derived from the shards (e.g. the FIM eigendecompositions),
                                           with done.json recording the fingerprint it was computed from

Guarantees:

* A shard is written into a temporary directory and renamed into place only when complete, so a kill
  at any moment loses no completed shard and never leaves a partial one visible.
* Readers refuse a store whose cache did not complete (no completion record, a shard missing, shards
  beyond the record) and name what is missing; ``cache()`` resumes it.
* Every read checks the file's size, its .npy header (dtype, shape) and its CRC32 against the record,
  so a truncated or altered file raises :class:`CorruptStoreError` naming it. JSON records (the manifest,
  meta.json, done.json, attached.json) carry a CRC32 of their own content. :meth:`DiskStore.verify`
  checks every file the store depends on, and lists the files no record covers.
* Derived data is stored with the fingerprint of the shards it was computed from and is recomputed
  when the store grows; reading never writes (a read-only store can be attributed from).
* One writer at a time: a process takes ``lock`` (``fcntl.flock``, released by the OS even on kill -9)
  before its first write; another process that needs to write is refused, naming the holder's pid
  and host. Only the lock holder removes leftover temporary directories, before it writes.

bfloat16 storage is kept as raw uint16 (numpy has no bf16).
"""
from __future__ import annotations

from .disk import DiskStore, open_store, refuse_inside_store, store_containing
from .lock import WriterLock
from .memory import MemoryStore
from .protocol import Store
from .records import (
    ATTACHED_FILE,
    COMPLETE_FILE,
    DONE_FILE,
    FORMAT,
    GRADS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    META_FILE,
    STORAGE_DTYPES,
    Completion,
    CorruptStoreError,
    IncompleteStoreError,
    ShardInfo,
    StoreBusyError,
    StoreError,
    _sealed,
    _unsealed,
    atomic_save_npy,
    atomic_write_json,
    from_numpy,
    read_json,
    read_manifest,
    to_numpy,
)

__all__ = [
    "ATTACHED_FILE", "COMPLETE_FILE", "DONE_FILE", "FORMAT", "GRADS_FILE", "LOCK_FILE", "MANIFEST_FILE", "META_FILE",
    "STORAGE_DTYPES", "Completion", "CorruptStoreError", "DiskStore", "IncompleteStoreError", "MemoryStore", "ShardInfo",
    "Store", "StoreBusyError", "StoreError", "WriterLock", "_sealed", "_unsealed", "atomic_save_npy", "atomic_write_json",
    "from_numpy", "open_store", "read_json", "read_manifest", "refuse_inside_store",
    "store_containing", "to_numpy",
]
