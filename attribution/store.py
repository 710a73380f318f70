"""Storage of compressed training gradients: in memory, or on disk, sharded, checksummed and crash-safe.

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

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

FORMAT = "grass_ops.attribution.store/3"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_NUMPY_STORAGE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float64": np.dtype("<f8")}
GRADS_FILE, META_FILE, COMPLETE_FILE, DONE_FILE = "grads.npy", "meta.json", "complete.json", "done.json"
MANIFEST_FILE, LOCK_FILE, ATTACHED_FILE = "manifest.json", "lock", "attached.json"


class StoreError(RuntimeError):
    """The store cannot serve this request as asked."""


class IncompleteStoreError(StoreError):
    """The cache stage has not completed: shards or the completion record are missing."""


class CorruptStoreError(StoreError):
    """A file's bytes differ from what the store recorded when it was written."""


class StoreBusyError(StoreError):
    """Another process holds the store's writer lock."""


# ---- files ---------------------------------------------------------------------------------------
def crc32_of(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(name: str) -> str:
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}"


def _write_bytes(path: Path, data: bytes) -> list[int]:
    """Write and fsync ``data``; returns [size, crc32]."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return [len(data), crc32_of(data)]


def _json_bytes(data) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def atomic_write_json(path: Path, data) -> list[int]:
    """Write JSON through a temporary file and an atomic rename; returns [size, crc32]."""
    path = Path(path)
    tmp = path.with_name(_tmp_name(path.name))
    record = _write_bytes(tmp, _json_bytes(data))
    os.replace(tmp, path)
    return record


def atomic_save_npy(path: Path, array: np.ndarray) -> list[int]:
    path = Path(path)
    tmp = path.with_name(_tmp_name(path.name))
    record = _write_bytes(tmp, _npy_bytes(array))
    os.replace(tmp, path)
    return record


def _create_json(path: Path, data) -> bool:
    """Create ``path`` with JSON content only if it does not exist (atomic); returns whether it did."""
    tmp = path.with_name(_tmp_name(path.name))
    _write_bytes(tmp, _json_bytes(data))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path, what: str = "file"):
    """Parse a JSON file, naming it in the error if it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptStoreError(f"{path}: the {what} is not valid JSON ({err})") from None


def _read_checked(path: Path, record, what: str) -> bytearray:
    """The file's bytes, checked against record = [size, crc32]."""
    try:
        with open(path, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(buf)
    except FileNotFoundError:
        raise CorruptStoreError(f"{path}: the {what} is missing; run cache() again to rewrite it") from None
    size, crc = record
    if len(buf) != size:
        raise CorruptStoreError(f"{path}: {len(buf)} bytes but the store recorded {size} (truncated or altered); "
                                "delete the shard directory and run cache() to rewrite it")
    if crc32_of(buf) != crc:
        raise CorruptStoreError(f"{path}: checksum mismatch (the file was altered after it was written); "
                                "delete the shard directory and run cache() to rewrite it")
    return buf


def _npy_data_offset(head: bytes, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """The offset of the data in a .npy file that starts with ``head``, after checking that its header
    holds ``dtype`` and ``shape`` in C order."""
    stream = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got_shape, fortran, got_dtype = read_header(stream)
    except ValueError as err:
        raise CorruptStoreError(f"{path}: not a valid .npy file ({err})") from None
    if got_dtype != dtype or tuple(got_shape) != tuple(shape) or fortran:
        raise CorruptStoreError(f"{path}: holds {got_dtype} {tuple(got_shape)}, the store expects {dtype} {tuple(shape)}")
    return stream.tell()


def _parse_npy(buf: bytearray, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A writable array over ``buf`` (no copy), after checking the header's dtype and shape."""
    offset = _npy_data_offset(buf, path, dtype, shape)
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


def _check_storage_range(stored: Tensor, storage: str, index: int) -> None:
    """Refuse a shard whose values did not fit the storage dtype (float16 overflows past 65504)."""
    if storage in ("float16", "bfloat16") and not bool(torch.isfinite(stored).all()):
        raise FloatingPointError(f"batch {index}: the compressed gradients overflow {storage} storage; use "
                                 "storage_dtype='float32' (or 'bfloat16', whose range is float32's)")


def _sealed(record: dict) -> dict:
    """record with "self_crc32": the CRC32 of its own canonical JSON, so any edit of the file is detected."""
    body = {k: v for k, v in record.items() if k != "self_crc32"}
    return {**body, "self_crc32": crc32_of(json.dumps(body, sort_keys=True).encode())}


def _unsealed(record, path: Path, what: str, remedy: str) -> dict:
    """A sealed JSON object without its seal, or CorruptStoreError naming the file if it was edited."""
    if not isinstance(record, dict) or _sealed(record)["self_crc32"] != record.get("self_crc32"):
        raise CorruptStoreError(f"{path}: the {what} was altered after it was written (checksum mismatch); {remedy}")
    return {k: v for k, v in record.items() if k != "self_crc32"}


def _check_sealed(meta, path: Path, required: tuple[str, ...]) -> dict:
    if not isinstance(meta, dict) or any(k not in meta for k in required):
        raise CorruptStoreError(f"{path}: malformed shard metadata (needs {', '.join(required)})")
    _unsealed(meta, path, "shard metadata", "delete the shard directory and run cache() to rewrite it")
    return meta


_META_KEYS = ("rows", "digest", "start", "values", "files")


def check_manifest(manifest, where) -> dict:
    """The manifest's shape, or CorruptStoreError naming the file."""
    if not isinstance(manifest, dict):
        raise CorruptStoreError(f"{where}: the manifest must be a JSON object")
    blocks = manifest.get("blocks")
    if (not isinstance(blocks, list) or not blocks
            or not all(isinstance(b, list) and len(b) == 2 and isinstance(b[0], str) and isinstance(b[1], int) and b[1] > 0
                       for b in blocks)):
        raise CorruptStoreError(f"{where}: the manifest's 'blocks' must list [name, width] pairs")
    if manifest.get("storage_dtype") not in STORAGE_DTYPES:
        raise CorruptStoreError(f"{where}: unknown storage_dtype {manifest.get('storage_dtype')!r}")
    return manifest


def read_manifest(path: Path) -> dict:
    """A store's manifest.json without its seal: CorruptStoreError if it was edited, StoreError if another
    format wrote it."""
    manifest = read_json(path, "manifest")
    if not isinstance(manifest, dict):
        raise CorruptStoreError(f"{path}: the manifest must be a JSON object")
    if "self_crc32" in manifest or manifest.get("format") == FORMAT:
        manifest = _unsealed(manifest, path, "manifest", "restore it, or cache into a new store path")
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{path.parent} was written in format {manifest.get('format')!r}; this version reads "
                         f"{FORMAT!r}: cache into a new store path")
    return check_manifest(manifest, path)


def to_numpy(t: Tensor, storage: str) -> np.ndarray:
    t = t.detach().to("cpu", STORAGE_DTYPES[storage]).contiguous()
    if storage == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_numpy(a: np.ndarray, storage: str) -> Tensor:
    if storage == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# ---- records -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    """One shard as the completion record lists it: files = {name: [size, crc32]}."""

    index: int
    rows: int
    digest: str
    files: dict

    def as_dict(self) -> dict:
        return {"index": self.index, "rows": self.rows, "digest": self.digest, "files": self.files}


@dataclass(frozen=True)
class Completion:
    """The record written once a checkpoint's cache is complete."""

    samples: int
    shards: tuple[ShardInfo, ...]
    fingerprint: str

    @classmethod
    def from_shards(cls, shards: list[ShardInfo]) -> "Completion":
        shards = tuple(sorted(shards, key=lambda s: s.index))
        h = hashlib.sha256()
        for s in shards:
            h.update(json.dumps(s.as_dict(), sort_keys=True).encode())
        return cls(sum(s.rows for s in shards), shards, h.hexdigest()[:32])

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "Completion":
        try:
            shards = [ShardInfo(int(s["index"]), int(s["rows"]), str(s["digest"]), dict(s["files"])) for s in data["shards"]]
            record = cls.from_shards(shards)
            if record.samples != int(data["samples"]) or record.fingerprint != data["fingerprint"]:
                raise CorruptStoreError(f"{where}: the completion record does not add up (samples or fingerprint)")
            return record
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptStoreError(f"{where}: malformed completion record ({err!r})") from None

    def as_dict(self) -> dict:
        return {"samples": self.samples, "fingerprint": self.fingerprint, "shards": [s.as_dict() for s in self.shards]}

    def starts(self) -> list[int]:
        out, n = [], 0
        for s in self.shards:
            out.append(n)
            n += s.rows
        return out


def _check_against_record(visible: set[int], record: Completion | None, where: str) -> None:
    """Raise IncompleteStoreError unless the visible shards are exactly the completed set."""
    if record is None:
        if not visible:
            raise IncompleteStoreError(f"{where} holds no cached gradients: call cache(train_loader) first")
        raise IncompleteStoreError(f"{where}: the cache did not complete ({len(visible)} shards written, no completion "
                                   "record); call cache() with the same train loader to resume it")
    listed = [s.index for s in record.shards]
    if listed != list(range(len(listed))):
        gaps = sorted(set(range(max(listed) + 1)) - set(listed)) if listed else []
        raise CorruptStoreError(f"{where}: the completion record's shards are not contiguous (missing {gaps[:10]})")
    missing = sorted(set(listed) - visible)
    if missing:
        raise IncompleteStoreError(f"{where}: shards {missing[:10]} of the completed cache are missing; call cache() "
                                   "with the same train loader to rewrite them")
    extra = sorted(visible - set(listed))
    if extra:
        raise IncompleteStoreError(f"{where}: shards {extra[:10]} lie beyond the completion record (a cache() run is "
                                   "growing the store, or was interrupted); call cache() with the whole train loader "
                                   "to complete it")


# ---- stores --------------------------------------------------------------------------------------
class MemoryStore:
    """Everything in RAM (``store=None``); the same interface and checks as :class:`DiskStore`."""

    def __init__(self, columns: int, storage: str = "float32"):
        self.columns, self.storage = int(columns), storage
        self.shards: dict[int, dict[int, tuple[Tensor, dict]]] = {}
        self.records: dict[int, Completion] = {}
        self.derived: dict[tuple[int, str], tuple[str, dict, dict]] = {}

    def __repr__(self) -> str:
        return "MemoryStore()"

    @contextlib.contextmanager
    def writer(self):
        yield

    delegated_writer = writer

    def shard_meta(self, ckpt: int) -> dict[int, dict]:
        return {i: meta for i, (_, meta) in sorted(self.shards.get(ckpt, {}).items())}

    def write_shard(self, ckpt: int, index: int, grads: Tensor, meta: dict) -> None:
        stored = grads.detach().to("cpu", STORAGE_DTYPES[self.storage]).clone()
        _check_storage_range(stored, self.storage, index)
        self.shards.setdefault(ckpt, {})[index] = (stored, {**meta, "files": {}})

    def shard_info(self, ckpt: int, index: int, meta: dict) -> ShardInfo:
        return ShardInfo(index, int(meta["rows"]), meta["digest"], {})

    def completion(self, ckpt: int) -> Completion | None:
        return self.records.get(ckpt)

    def write_completion(self, ckpt: int, record: Completion) -> None:
        self.records[ckpt] = record

    def require_complete(self, ckpt: int) -> Completion:
        record = self.completion(ckpt)
        _check_against_record(set(self.shards.get(ckpt, {})), record, f"the in-memory store (checkpoint {ckpt})")
        return record

    def read_shard(self, ckpt: int, shard: ShardInfo) -> Tensor:
        return self.shards[ckpt][shard.index][0]

    def read_values(self, ckpt: int, shard: ShardInfo) -> list[float]:
        return self.shards[ckpt][shard.index][1]["values"]

    def read_rows(self, ckpt: int, shard: ShardInfo, rows) -> Tensor:
        return self.shards[ckpt][shard.index][0][torch.as_tensor(rows, dtype=torch.long)]

    def save_derived(self, ckpt: int, name: str, arrays: dict[str, np.ndarray], fingerprint: str, meta: dict) -> None:
        self.derived[(ckpt, name)] = (fingerprint, {k: np.array(v) for k, v in arrays.items()}, dict(meta))

    def has_derived(self, ckpt: int, name: str, fingerprint: str) -> bool:
        entry = self.derived.get((ckpt, name))
        return entry is not None and entry[0] == fingerprint

    def load_derived(self, ckpt: int, name: str, fingerprint: str):
        entry = self.derived.get((ckpt, name))
        if entry is None or entry[0] != fingerprint:
            return None
        return entry[1], entry[2]

    def derived_names(self, ckpt: int) -> list[str]:
        return sorted(name for c, name in self.derived if c == ckpt)

    def remove_derived(self, ckpt: int, name: str) -> None:
        self.derived.pop((ckpt, name), None)

    def derived_meta(self, ckpt: int, name: str) -> tuple[str, dict] | None:
        entry = self.derived.get((ckpt, name))
        return None if entry is None else (entry[0], dict(entry[2]))


class DiskStore:
    """Sharded, checksummed, crash-safe store under ``root`` (see the module docstring).

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
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._delegated = False

    def __repr__(self) -> str:
        return f"DiskStore({str(self.root)!r})"

    def _ckpt(self, ckpt: int) -> Path:
        return self.root / f"ckpt_{ckpt:03d}"

    def checkpoints(self) -> list[int]:
        return sorted(int(p.name[5:]) for p in self.root.glob("ckpt_[0-9][0-9][0-9]") if p.is_dir())

    # ---- the writer lock -----------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self):
        """Hold the store's writer lock (re-entrant); refuses with StoreBusyError if another process
        holds it. On first acquisition, removes leftover temporary directories (no live writer owns them)."""
        if self._lock_depth == 0:
            self._acquire()
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                self._release()

    def _acquire(self) -> None:
        path = self.root / "lock"
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
        self._lock_fd = fd
        self._remove_temporaries()

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.ftruncate(fd, 0)
            os.close(fd)  # releases the flock

    def _remove_temporaries(self) -> None:
        for folder in [*self.root.glob("ckpt_*"), *self.root.glob("ckpt_*/shards")]:
            for entry in folder.iterdir() if folder.is_dir() else []:
                if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)

    @contextlib.contextmanager
    def delegated_writer(self):
        """Write under a lock another process of the same job holds (torch.distributed: rank 0's)."""
        self._delegated = True
        try:
            yield
        finally:
            self._delegated = False

    def _require_lock(self) -> None:
        if self._lock_fd is None and not self._delegated:
            raise RuntimeError("internal: write outside DiskStore.writer()")

    # ---- shards --------------------------------------------------------------------------------
    def shard_meta(self, ckpt: int) -> dict[int, dict]:
        """{index: meta} of the visible (complete) shards; reads only."""
        shard_root = self._ckpt(ckpt) / "shards"
        if not shard_root.is_dir():
            return {}
        out = {}
        for entry in shard_root.iterdir():
            if entry.name.isdigit():
                out[int(entry.name)] = self.shard_meta_of(ckpt, int(entry.name))
        return dict(sorted(out.items()))

    def _visible(self, ckpt: int) -> set[int]:
        shard_root = self._ckpt(ckpt) / "shards"
        return {int(e.name) for e in shard_root.iterdir() if e.name.isdigit()} if shard_root.is_dir() else set()

    def write_shard(self, ckpt: int, index: int, grads: Tensor, meta: dict) -> None:
        """grads [rows, columns]; meta: rows, digest, values (JSON)."""
        self._require_lock()
        if grads.dim() != 2 or grads.shape[1] != self.columns:
            raise ValueError(f"internal: shard of shape {tuple(grads.shape)}, expected [rows, {self.columns}]")
        shard_root = self._ckpt(ckpt) / "shards"
        shard_root.mkdir(parents=True, exist_ok=True)
        final = shard_root / f"{index:08d}"
        tmp = shard_root / _tmp_name(final.name)
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
        _fsync_dir(tmp)
        os.rename(tmp, final)  # atomic: the shard appears complete or not at all
        _fsync_dir(shard_root)

    def shard_info(self, ckpt: int, index: int, meta: dict) -> ShardInfo:
        """The record entry of a visible shard: its grads.npy record and its meta.json's own size and CRC."""
        meta_path = self._ckpt(ckpt) / "shards" / f"{index:08d}" / META_FILE
        data = meta_path.read_bytes()
        return ShardInfo(index, int(meta["rows"]), meta["digest"], {**meta["files"], META_FILE: [len(data), crc32_of(data)]})

    def read_shard(self, ckpt: int, shard: ShardInfo) -> Tensor:
        """[rows, columns] in the storage dtype, checked (size, header, CRC32) against the record."""
        path = self._ckpt(ckpt) / "shards" / f"{shard.index:08d}" / GRADS_FILE
        buf = _read_checked(path, shard.files[GRADS_FILE], "shard file")
        return from_numpy(_parse_npy(buf, path, _NUMPY_STORAGE[self.storage], (shard.rows, self.columns)), self.storage)

    def read_values(self, ckpt: int, shard: ShardInfo) -> list[float]:
        path = self._ckpt(ckpt) / "shards" / f"{shard.index:08d}" / META_FILE
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
        path = self._ckpt(ckpt) / "shards" / f"{shard.index:08d}" / GRADS_FILE
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
        path = self._ckpt(ckpt) / "shards" / f"{shard.index:08d}" / GRADS_FILE
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
        path = self._ckpt(ckpt) / COMPLETE_FILE
        if not path.is_file():
            return None
        return Completion.from_dict(read_json(path, "completion record"), str(path))

    def write_completion(self, ckpt: int, record: Completion) -> None:
        self._require_lock()
        atomic_write_json(self._ckpt(ckpt) / COMPLETE_FILE, record.as_dict())

    def require_complete(self, ckpt: int) -> Completion:
        """The completion record, after checking that exactly its shards are present."""
        record = self.completion(ckpt)
        _check_against_record(self._visible(ckpt), record, f"store {self.root} (checkpoint {ckpt})")
        return record

    # ---- derived data (FIM, ...) ---------------------------------------------------------------
    def save_derived(self, ckpt: int, name: str, arrays: dict[str, np.ndarray], fingerprint: str, meta: dict) -> None:
        """Replace ckpt_XXX/<name>/ with ``arrays`` (.npy each), tagged with the shards' fingerprint."""
        self._require_lock()
        folder = self._ckpt(ckpt) / name
        tmp = folder.with_name(_tmp_name(name))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = {f"{key}.npy": _write_bytes(tmp / f"{key}.npy", _npy_bytes(a)) for key, a in arrays.items()}
        _write_bytes(tmp / DONE_FILE, _json_bytes(_sealed({"fingerprint": fingerprint, "files": files, "meta": meta})))
        _fsync_dir(tmp)
        if folder.exists():
            old = folder.with_name(f".{name}.old-{os.getpid()}")
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
        _fsync_dir(folder.parent)

    def has_derived(self, ckpt: int, name: str, fingerprint: str) -> bool:
        """Whether ckpt_XXX/<name>/ records this fingerprint (reads only its done.json)."""
        done = self._ckpt(ckpt) / name / DONE_FILE
        return done.is_file() and _check_done(read_json(done, f"{name} record"), done)["fingerprint"] == fingerprint

    def derived_meta(self, ckpt: int, name: str) -> tuple[str, dict] | None:
        """(fingerprint, meta) of ckpt_XXX/<name>/ whatever data it was computed from, or None if absent."""
        done = self._ckpt(ckpt) / name / DONE_FILE
        if not done.is_file():
            return None
        record = _check_done(read_json(done, f"{name} record"), done)
        return record["fingerprint"], dict(record.get("meta", {}))

    def load_derived(self, ckpt: int, name: str, fingerprint: str):
        """(arrays, meta) if ckpt_XXX/<name>/ was computed from data with this fingerprint, else None."""
        folder = self._ckpt(ckpt) / name
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
        folder = self._ckpt(ckpt)
        return sorted(p.name for p in folder.iterdir() if (p / DONE_FILE).is_file()) if folder.is_dir() else []

    def remove_derived(self, ckpt: int, name: str) -> None:
        """Delete ckpt_XXX/<name>/ (e.g. partial sums made obsolete by their final result); atomic."""
        self._require_lock()
        folder = self._ckpt(ckpt) / name
        if folder.exists():
            old = folder.with_name(f".{name}.old-{os.getpid()}")
            os.rename(folder, old)
            _fsync_dir(folder.parent)
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
        """Check every file the store depends on: the manifest and every record against their seals, every
        checkpoint's completion, every shard, derived and attached file's size, header and CRC32.
        Returns {"ok", "checkpoints", "shards", "samples", "bytes", "derived", "unchecked", "problems": [...]};
        "unchecked" lists the files under the root that no record covers (nothing reads them)."""
        problems, shards, samples, nbytes, derived = [], 0, 0, 0, {}
        checked = {self.root / MANIFEST_FILE, self.root / LOCK_FILE, self.root / ATTACHED_FILE}
        try:
            read_manifest(self.root / MANIFEST_FILE)
        except StoreError as err:
            problems.append(str(err))
        try:
            nbytes += self.check_attached()
            checked |= {self.root / name for name in self.attached()}
        except StoreError as err:
            problems.append(str(err))
        checkpoints = self.checkpoints()
        if not checkpoints:
            problems.append(f"store {self.root} holds no cached gradients")
        for ckpt in checkpoints:
            try:
                record = self.require_complete(ckpt)
            except StoreError as err:
                problems.append(str(err))
                continue
            checked.add(self._ckpt(ckpt) / COMPLETE_FILE)
            samples += record.samples
            for shard in record.shards:
                folder = self._ckpt(ckpt) / "shards" / f"{shard.index:08d}"
                checked |= {folder / GRADS_FILE, folder / META_FILE}
                try:
                    self.read_shard(ckpt, shard)
                    self.read_values(ckpt, shard)
                    meta = self.shard_meta_of(ckpt, shard.index)
                    if meta["digest"] != shard.digest or int(meta["rows"]) != shard.rows:
                        problems.append(f"shard {shard.index} of checkpoint {ckpt}: meta.json disagrees with the record")
                    shards += 1
                    nbytes += sum(size for size, _ in shard.files.values())
                except StoreError as err:
                    problems.append(str(err))
            for folder in sorted(p for p in self._ckpt(ckpt).iterdir() if p.is_dir() and p.name != "shards"
                                 and not p.name.startswith(".")):
                try:
                    if not (folder / DONE_FILE).is_file():
                        raise CorruptStoreError(f"{folder}: derived data without its record ({DONE_FILE})")
                    done = _check_done(read_json(folder / DONE_FILE, f"{folder.name} record"), folder / DONE_FILE)
                    checked.add(folder / DONE_FILE)
                    for fname, rec in done["files"].items():
                        _read_checked(folder / fname, rec, f"{folder.name} file")
                        checked.add(folder / fname)
                        nbytes += rec[0]
                    unrecorded = sorted(p.name for p in folder.iterdir() if p.name != DONE_FILE and not p.name.startswith(".")
                                        and p.name not in done["files"])
                    if unrecorded:
                        raise CorruptStoreError(f"{folder}: files {unrecorded[:3]} are not in its {DONE_FILE} (an edited "
                                                "record); delete the folder and cache() recomputes it")
                    current = done["fingerprint"] == record.fingerprint
                    derived[f"ckpt_{ckpt:03d}/{folder.name}"] = "current" if current else "stale (recomputed by cache())"
                except StoreError as err:
                    problems.append(str(err))
        unchecked = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                           if p.is_file() and p not in checked and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        return {"ok": not problems, "store": str(self.root), "checkpoints": len(checkpoints), "shards": shards,
                "samples": samples, "bytes": nbytes, "derived": derived, "unchecked": unchecked, "problems": problems}

    def shard_meta_of(self, ckpt: int, index: int) -> dict:
        """A shard's meta.json, checked against its own checksum."""
        path = self._ckpt(ckpt) / "shards" / f"{index:08d}" / META_FILE
        if not path.is_file():
            raise CorruptStoreError(f"{path}: the shard metadata is missing; delete the shard directory and run cache()")
        return _check_sealed(read_json(path, "shard metadata"), path, _META_KEYS)


def _check_done(done, path: Path) -> dict:
    """A derived folder's record (done.json), checked against its seal and its shape."""
    if not isinstance(done, dict):
        raise CorruptStoreError(f"{path}: malformed record of derived data")
    done = _unsealed(done, path, "record of derived data", "delete its folder and cache() recomputes it")
    files = done.get("files")
    if (not isinstance(done.get("fingerprint"), str) or not isinstance(files, dict)
            or not all(isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r) for r in files.values())
            or not isinstance(done.get("meta", {}), dict)):
        raise CorruptStoreError(f"{path}: malformed record of derived data")
    done.setdefault("meta", {})
    return done


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


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
