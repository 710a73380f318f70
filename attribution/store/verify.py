"""Verification of a disk store: every file it depends on, against its record (:meth:`DiskStore.verify`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .records import (
    ATTACHED_FILE,
    COMPLETE_FILE,
    DONE_FILE,
    GRADS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    META_FILE,
    WHITENING_DIR,
    CorruptStoreError,
    StoreError,
    _check_done,
    _read_checked,
    read_json,
    read_manifest,
)

if TYPE_CHECKING:
    from .disk import DiskStore

# derived data that the rows depend on (tagged with their own data's fingerprint, not the shards')
PINNED = {WHITENING_DIR: "pinned (every row was whitened by it; deleting it makes the store unusable)"}


def verify(store: DiskStore) -> dict:
    """Check every file the store depends on: the manifest and every record against their seals, every
    checkpoint's completion, every shard, derived and attached file's size, header and CRC32.
    Returns {"ok", "checkpoints", "shards", "samples", "bytes", "derived", "unchecked", "problems": [...]};
    "unchecked" lists the files under the root that no record covers (nothing reads them)."""
    problems, shards, samples, nbytes, derived = [], 0, 0, 0, {}
    checked = {store.root / MANIFEST_FILE, store.root / LOCK_FILE, store.root / ATTACHED_FILE}
    try:
        read_manifest(store.root / MANIFEST_FILE)
    except StoreError as err:
        problems.append(str(err))
    try:
        nbytes += store.check_attached()
        checked |= {store.root / name for name in store.attached()}
    except StoreError as err:
        problems.append(str(err))
    checkpoints = store.checkpoints()
    if not checkpoints:
        problems.append(f"store {store.root} holds no cached gradients")
    for ckpt in checkpoints:
        try:
            record = store.require_complete(ckpt)
        except StoreError as err:
            problems.append(str(err))
            continue
        checked.add(store.ckpt_dir(ckpt) / COMPLETE_FILE)
        samples += record.samples
        for shard in record.shards:
            folder = store.shard_dir(ckpt, shard.index)
            checked |= {folder / GRADS_FILE, folder / META_FILE}
            try:
                store.read_shard(ckpt, shard)
                store.read_values(ckpt, shard)
                meta = store.shard_meta_of(ckpt, shard.index)
                if meta["digest"] != shard.digest or int(meta["rows"]) != shard.rows:
                    problems.append(f"shard {shard.index} of checkpoint {ckpt}: meta.json disagrees with the record")
                shards += 1
                nbytes += sum(size for size, _ in shard.files.values())
            except StoreError as err:
                problems.append(str(err))
        for folder in sorted(p for p in store.ckpt_dir(ckpt).iterdir() if p.is_dir() and p.name != "shards"
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
                    fix = ("the rows depend on it: restore it, or cache into a new store" if folder.name in PINNED
                           else "delete the folder and cache() recomputes it")
                    raise CorruptStoreError(f"{folder}: files {unrecorded[:3]} are not in its {DONE_FILE} (an edited "
                                            f"record); {fix}")
                current = done["fingerprint"] == record.fingerprint
                derived[f"ckpt_{ckpt:03d}/{folder.name}"] = (
                    PINNED[folder.name] if folder.name in PINNED else "current" if current else "stale (recomputed by cache())")
            except StoreError as err:
                problems.append(str(err))
    unchecked = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*")
                       if p.is_file() and p not in checked and not any(part.startswith(".") for part in p.relative_to(store.root).parts))
    return {"ok": not problems, "store": str(store.root), "checkpoints": len(checkpoints), "shards": shards,
            "samples": samples, "bytes": nbytes, "derived": derived, "unchecked": unchecked, "problems": problems}
