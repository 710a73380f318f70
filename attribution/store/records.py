"""The store's records and files: format constants, errors, checksummed and sealed JSON, checked .npy
reads, the manifest's shape, and the completion record (:class:`ShardInfo`, :class:`Completion`).

Every file is written through :mod:`grass_ops.atomic_files` (a tmp file beside it, fsync, rename) or into a
temporary directory that is renamed into place; the bytes are those of ``json.dumps(indent=1,
sort_keys=True)`` and ``np.save`` (format unchanged since ``FORMAT``'s last bump). A file's record is
[size, crc32] of its bytes; a JSON record is *sealed*: it carries ``self_crc32``, the CRC32 of its own
canonical JSON. bfloat16 storage is kept as raw uint16 (numpy has no bf16).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from grass_ops.atomic_files import tmp_path, write_bytes_atomic

FORMAT = "grass_ops.attribution.store/3"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_NUMPY_STORAGE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float64": np.dtype("<f8")}
GRADS_FILE, META_FILE, COMPLETE_FILE, DONE_FILE = "grads.npy", "meta.json", "complete.json", "done.json"
WHITENING_DIR = "whitening"  # a whitened store's factors (attribution.whitening): derived before the rows, never recomputed
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


def _write_bytes(path: Path, data: bytes) -> list[int]:
    """Write and fsync ``data`` (into a temporary directory that is renamed into place once complete);
    returns [size, crc32]."""
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


def _write_atomic(path: Path, data: bytes) -> list[int]:
    write_bytes_atomic(path, data)
    return [len(data), crc32_of(data)]


def atomic_write_json(path: Path, data) -> list[int]:
    """Write JSON through a temporary file and an atomic rename; returns [size, crc32]."""
    return _write_atomic(Path(path), _json_bytes(data))


def atomic_save_npy(path: Path, array: np.ndarray) -> list[int]:
    """Write an .npy through a temporary file and an atomic rename; returns [size, crc32]."""
    return _write_atomic(Path(path), _npy_bytes(array))


def _create_json(path: Path, data) -> bool:
    """Create ``path`` with JSON content only if it does not exist (atomic); returns whether it did."""
    tmp = tmp_path(path)
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

