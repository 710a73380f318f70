"""The disk store: sharded, checksummed and crash-safe under one directory (layout: see :mod:`attribution.store`)."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from torch import Tensor

from grass_ops.atomic_files import fsync_dir, tmp_path

from . import verify as _verify
from .lock import WriterLock
from .records import (
    _META_KEYS,
    _NUMPY_STORAGE,
    ATTACHED_FILE,
    COMPLETE_FILE,
    DONE_FILE,
    FORMAT,
    GRADS_FILE,
    MANIFEST_FILE,
    META_FILE,
    STORAGE_DTYPES,
    Completion,
    CorruptStoreError,
    ShardInfo,
    StoreError,
    _check_against_record,
    _check_done,
    _check_sealed,
    _check_storage_range,
    _create_json,
    _json_bytes,
    _npy_bytes,
    _npy_data_offset,
    _parse_npy,
    _read_checked,
    _sealed,
    _short,
    _unsealed,
    _write_bytes,
    atomic_write_json,
    check_manifest,
    crc32_of,
    from_numpy,
    read_json,
    read_manifest,
    to_numpy,
)


class DiskStore:
    """Sharded, checksummed, crash-safe store under ``root`` (see :mod:`attribution.store`).

    ``manifest``: the configuration to check against (or to write into a new store); None opens an
    existing store as it is (e.g. to verify it)."""

    def __init__(self, root: str | Path, manifest: dict | None = None, storage: str = "float32"):
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}")
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.root} exists and is not a directory")
        path = self.root / MANIFEST_FILE
        if manifest is None:
            if not path.is_file():
                raise StoreError(f"{self.root} is not an attribution store (no {MANIFEST_FILE})")
            manifest = read_manifest(path)
        else:
            manifest = {**manifest, "storage_dtype": storage, "format": FORMAT}
        if path.is_file():
            existing = read_manifest(path)
            diffs = [key for key in sorted(set(existing) | set(manifest)) if existing.get(key) != manifest.get(key)]
            if diffs:
                detail = "; ".join(f"{k}: store has {_short(existing.get(k))}, config has {_short(manifest.get(k))}"
                                   for k in diffs[:4])
                raise ValueError(f"store {self.root} was built with a different configuration ({detail}); "
                                 "use a new store path or the original configuration")
        else:
            leftovers = sorted(p.name for p in self.root.glob("ckpt_*")) if self.root.is_dir() else []
            if leftovers:
                raise StoreError(f"{self.root} holds cached data ({', '.join(leftovers[:3])}) but no {MANIFEST_FILE}: "
                                 f"refusing to recreate it under a new configuration; restore {MANIFEST_FILE} or use a "
                                 "new store path")
            self.root.mkdir(parents=True, exist_ok=True)
            if not _create_json(path, _sealed(manifest)):  # another process created it meanwhile: check against it
                return self.__init__(root, manifest, storage)
        self.manifest = check_manifest(manifest, path)
        self.storage = manifest["storage_dtype"]
        self.columns = int(sum(width for _, width in manifest["blocks"]))
        self._lock = WriterLock(self.root)

    def __repr__(self) -> str:
        return f"DiskStore({str(self.root)!r})"

    def ckpt_dir(self, ckpt: int) -> Path:
        return self.root / f"ckpt_{ckpt:03d}"

    def shard_dir(self, ckpt: int, index: int) -> Path:
        return self.ckpt_dir(ckpt) / "shards" / f"{index:08d}"

    def checkpoints(self) -> list[int]:
        return sorted(int(p.name[5:]) for p in self.root.glob("ckpt_[0-9][0-9][0-9]") if p.is_dir())

    # ---- the writer lock -----------------------------------------------------------------------
    def writer(self):
        """Hold the store's writer lock (re-entrant); refuses with StoreBusyError if another process
        holds it. On first acquisition, removes leftover temporary directories (no live writer owns them)."""
        return self._lock.held()

    def delegated_writer(self):
        """Write under a lock another process of the same job holds (torch.distributed: rank 0's)."""
        return self._lock.delegated()

    @property
    def _lock_fd(self) -> int | None:
        """The lock file's descriptor while this process holds the lock, else None."""
        return self._lock.fd

    def _require_lock(self) -> None:
        self._lock.require()

    # ---- shards --------------------------------------------------------------------------------
    def shard_meta(self, ckpt: int) -> dict[int, dict]:
        """{index: meta} of the visible (complete) shards; reads only."""
        shard_root = self.ckpt_dir(ckpt) / "shards"
        if not shard_root.is_dir():
            return {}
        out = {}
        for entry in shard_root.iterdir():
            if entry.name.isdigit():
                out[int(entry.name)] = self.shard_meta_of(ckpt, int(entry.name))
        return dict(sorted(out.items()))

    def _visible(self, ckpt: int) -> set[int]:
        shard_root = self.ckpt_dir(ckpt) / "shards"
        return {int(e.name) for e in shard_root.iterdir() if e.name.isdigit()} if shard_root.is_dir() else set()

    def write_shard(self, ckpt: int, index: int, grads: Tensor, meta: dict) -> None:
        """grads [rows, columns]; meta: rows, digest, values (JSON)."""
        self._require_lock()
        if grads.dim() != 2 or grads.shape[1] != self.columns:
            raise ValueError(f"internal: shard of shape {tuple(grads.shape)}, expected [rows, {self.columns}]")
        shard_root = self.ckpt_dir(ckpt) / "shards"
        shard_root.mkdir(parents=True, exist_ok=True)
        final = shard_root / f"{index:08d}"
        tmp = tmp_path(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        array = to_numpy(grads, self.storage)
        try:
            _check_storage_range(from_numpy(array, self.storage), self.storage, index)
        except FloatingPointError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        files = {GRADS_FILE: _write_bytes(tmp / GRADS_FILE, _npy_bytes(array))}
        _write_bytes(tmp / META_FILE, _json_bytes(_sealed({**meta, "files": files})))
        fsync_dir(tmp)
        os.rename(tmp, final)  # atomic: the shard appears complete or not at all
        fsync_dir(shard_root)

    def shard_info(self, ckpt: int, index: int, meta: dict) -> ShardInfo:
        """The record entry of a visible shard: its grads.npy record and its meta.json's own size and CRC."""
        meta_path = self.shard_dir(ckpt, index) / META_FILE
        data = meta_path.read_bytes()
        return ShardInfo(index, int(meta["rows"]), meta["digest"], {**meta["files"], META_FILE: [len(data), crc32_of(data)]})

    def read_shard(self, ckpt: int, shard: ShardInfo) -> Tensor:
        """[rows, columns] in the storage dtype, checked (size, header, CRC32) against the record."""
        path = self.shard_dir(ckpt, shard.index) / GRADS_FILE
        buf = _read_checked(path, shard.files[GRADS_FILE], "shard file")
        return from_numpy(_parse_npy(buf, path, _NUMPY_STORAGE[self.storage], (shard.rows, self.columns)), self.storage)

    def read_values(self, ckpt: int, shard: ShardInfo) -> list[float]:
        path = self.shard_dir(ckpt, shard.index) / META_FILE
        meta = _check_sealed(json.loads(bytes(_read_checked(path, shard.files[META_FILE], "shard metadata"))), path, _META_KEYS)
        values = meta["values"]
        if not isinstance(values, list) or len(values) != shard.rows:
            raise CorruptStoreError(f"{path}: holds {len(values) if isinstance(values, list) else 'no'} per-sample values "
                                    f"for {shard.rows} rows")
        return values

    def prefetch_rows(self, ckpt: int, shard: ShardInfo, rows) -> None:
        """Advise the kernel that these rows of a shard will be read soon (POSIX_FADV_WILLNEED), so that
        a cold page cache fetches many rows in parallel instead of one read at a time. Advisory only."""
        if not hasattr(os, "posix_fadvise"):
            return
        path = self.shard_dir(ckpt, shard.index) / GRADS_FILE
        row_bytes = self.columns * _NUMPY_STORAGE[self.storage].itemsize
        offset = shard.files[GRADS_FILE][0] - shard.rows * row_bytes  # the .npy header's size
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # read_rows reports a missing file
        try:
            for r in rows:
                os.posix_fadvise(fd, offset + int(r) * row_bytes, row_bytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def read_rows(self, ckpt: int, shard: ShardInfo, rows) -> Tensor:
        """Some rows of a shard, [len(rows), columns] in the storage dtype, read in place (one positioned
        read per row). The file's size and .npy header are checked against the record; the rows' bytes
        cannot be checked against the shard's CRC32 without reading it all: callers that read rows this
        way check them against checksums of their own (the ANN index records a CRC32 per row)."""
        path = self.shard_dir(ckpt, shard.index) / GRADS_FILE
        dtype = _NUMPY_STORAGE[self.storage]
        out = np.empty((len(rows), self.columns), dtype=dtype)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptStoreError(f"{path}: the shard file is missing; run cache() again to rewrite it") from None
        try:
            size = os.fstat(fd).st_size
            if size != shard.files[GRADS_FILE][0]:
                raise CorruptStoreError(f"{path}: {size} bytes but the store recorded {shard.files[GRADS_FILE][0]} "
                                        "(truncated or altered); delete the shard directory and run cache() to rewrite it")
            offset = _npy_data_offset(os.pread(fd, 4096, 0), path, dtype, (shard.rows, self.columns))
            row_bytes = self.columns * dtype.itemsize
            for i, r in enumerate(rows):
                if not 0 <= int(r) < shard.rows:
                    raise IndexError(f"row {r} of shard {shard.index} (it holds {shard.rows})")
                if os.preadv(fd, [memoryview(out[i]).cast("B")], offset + int(r) * row_bytes) != row_bytes:
                    raise CorruptStoreError(f"{path}: short read")
        finally:
            os.close(fd)
        return from_numpy(out, self.storage)

    # ---- completion ----------------------------------------------------------------------------
    def completion(self, ckpt: int) -> Completion | None:
        path = self.ckpt_dir(ckpt) / COMPLETE_FILE
        if not path.is_file():
            return None
        return Completion.from_dict(read_json(path, "completion record"), str(path))

    def write_completion(self, ckpt: int, record: Completion) -> None:
        self._require_lock()
        atomic_write_json(self.ckpt_dir(ckpt) / COMPLETE_FILE, record.as_dict())

    def require_complete(self, ckpt: int) -> Completion:
        """The completion record, after checking that exactly its shards are present."""
        record = self.completion(ckpt)
        _check_against_record(self._visible(ckpt), record, f"store {self.root} (checkpoint {ckpt})")
        return record

    # ---- derived data (FIM, ...) ---------------------------------------------------------------
    def save_derived(self, ckpt: int, name: str, arrays: dict[str, np.ndarray], fingerprint: str, meta: dict) -> None:
        """Replace ckpt_XXX/<name>/ with ``arrays`` (.npy each), tagged with the shards' fingerprint."""
        self._require_lock()
        folder = self.ckpt_dir(ckpt) / name
        tmp = tmp_path(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = {f"{key}.npy": _write_bytes(tmp / f"{key}.npy", _npy_bytes(a)) for key, a in arrays.items()}
        _write_bytes(tmp / DONE_FILE, _json_bytes(_sealed({"fingerprint": fingerprint, "files": files, "meta": meta})))
        fsync_dir(tmp)
        if folder.exists():
            old = folder.with_name(f".{name}.old-{os.getpid()}")
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
        fsync_dir(folder.parent)

    def has_derived(self, ckpt: int, name: str, fingerprint: str) -> bool:
        """Whether ckpt_XXX/<name>/ records this fingerprint (reads only its done.json)."""
        done = self.ckpt_dir(ckpt) / name / DONE_FILE
        return done.is_file() and _check_done(read_json(done, f"{name} record"), done)["fingerprint"] == fingerprint

    def derived_meta(self, ckpt: int, name: str) -> tuple[str, dict] | None:
        """(fingerprint, meta) of ckpt_XXX/<name>/ whatever data it was computed from, or None if absent."""
        done = self.ckpt_dir(ckpt) / name / DONE_FILE
        if not done.is_file():
            return None
        record = _check_done(read_json(done, f"{name} record"), done)
        return record["fingerprint"], dict(record.get("meta", {}))

    def load_derived(self, ckpt: int, name: str, fingerprint: str):
        """(arrays, meta) if ckpt_XXX/<name>/ was computed from data with this fingerprint, else None."""
        folder = self.ckpt_dir(ckpt) / name
        if not (folder / DONE_FILE).is_file():
            return None
        done = _check_done(read_json(folder / DONE_FILE, f"{name} record"), folder / DONE_FILE)
        if done["fingerprint"] != fingerprint:
            return None
        arrays = {}
        for fname, record in done["files"].items():
            buf = _read_checked(folder / fname, record, f"{name} file")
            try:
                arrays[fname[:-4]] = np.load(io.BytesIO(buf), allow_pickle=False)
            except ValueError as err:
                raise CorruptStoreError(f"{folder / fname}: not a valid .npy file ({err})") from None
        return arrays, done["meta"]

    def derived_names(self, ckpt: int) -> list[str]:
        """The names of ckpt_XXX's derived folders (those with a done.json); reads only."""
        folder = self.ckpt_dir(ckpt)
        return sorted(p.name for p in folder.iterdir() if (p / DONE_FILE).is_file()) if folder.is_dir() else []

    def remove_derived(self, ckpt: int, name: str) -> None:
        """Delete ckpt_XXX/<name>/ (e.g. partial sums made obsolete by their final result); atomic."""
        self._require_lock()
        folder = self.ckpt_dir(ckpt) / name
        if folder.exists():
            old = folder.with_name(f".{name}.old-{os.getpid()}")
            os.rename(folder, old)
            fsync_dir(folder.parent)
            shutil.rmtree(old, ignore_errors=True)

    # ---- files the store depends on, beside its own ---------------------------------------------
    def attached(self) -> dict[str, list[int]]:
        """{path relative to the root: [size, crc32]} of the attached files (see :meth:`attach`); reads only."""
        path = self.root / ATTACHED_FILE
        if not path.is_file():
            return {}
        record = _unsealed(read_json(path, "record of attached files"), path, "record of attached files",
                           "restore it, or cache into a new store path")
        files = record.get("files")
        if not isinstance(files, dict) or not all(isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r)
                                                  for r in files.values()):
            raise CorruptStoreError(f"{path}: malformed record of attached files")
        return files

    def attach(self, names: list[str], replace: tuple[str, ...] = ()) -> None:
        """Record the size and CRC32 of files under the root that the store's data depends on (e.g. the
        corpus and the masks of ``grass-attribute``), so that :meth:`verify` and :meth:`check_attached`
        check them. Write-once: a file recorded before must still hold its recorded bytes, except the
        ``replace`` ones, recorded anew (a grown store's corpus and configuration). Writes (under the
        writer lock) only when a file's record is new or replaced."""
        recorded = self.attached()
        self.check_attached([n for n in names if n in recorded and n not in replace])
        new = {}
        for name in names:
            if name not in recorded or name in replace:
                data = (self.root / name).read_bytes()
                new[name] = [len(data), crc32_of(data)]
        if new:
            with self.writer():
                atomic_write_json(self.root / ATTACHED_FILE, _sealed({"files": {**recorded, **new}}))

    def check_attached(self, names: list[str] | None = None) -> int:
        """Check attached files (default: all) against their recorded size and CRC32 (CorruptStoreError
        naming the file); returns their bytes."""
        recorded = self.attached()
        total = 0
        for name in recorded if names is None else names:
            if name not in recorded:
                raise CorruptStoreError(f"{self.root / name}: not in the store's record of attached files "
                                        f"({ATTACHED_FILE}); cache again to record it")
            _read_checked(self.root / name, recorded[name], "attached file")
            total += recorded[name][0]
        return total

    # ---- verification --------------------------------------------------------------------------
    def verify(self) -> dict:
        """Check every file the store depends on (see :func:`attribution.store.verify.verify`): returns
        {"ok", "checkpoints", "shards", "samples", "bytes", "derived", "unchecked", "problems": [...]}."""
        return _verify.verify(self)


    def shard_meta_of(self, ckpt: int, index: int) -> dict:
        """A shard's meta.json, checked against its own checksum."""
        path = self.shard_dir(ckpt, index) / META_FILE
        if not path.is_file():
            raise CorruptStoreError(f"{path}: the shard metadata is missing; delete the shard directory and run cache()")
        return _check_sealed(read_json(path, "shard metadata"), path, _META_KEYS)



def store_containing(path: str | Path) -> Path | None:
    """The store that ``path`` lies in (a folder at or above it holding a store's manifest.json), else None."""
    path = Path(path).expanduser().resolve()
    for folder in (path, *path.parents):
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(FORMAT.rsplit("/", 1)[0] + "/"):
            return folder
    return None


def refuse_inside_store(path: str | Path, label: str) -> None:
    """ValueError if ``path`` (an output, named ``label`` in the message) lies inside a store: writing
    there could overwrite the store's files."""
    root = store_containing(path)
    if root is not None:
        raise ValueError(f"{label} lies inside the store {root}: writing there could overwrite its files; choose a "
                         "path outside every store")


def open_store(path: str | Path) -> DiskStore:
    """An existing store as it is (no configuration to check), e.g. to verify it."""
    return DiskStore(path)
