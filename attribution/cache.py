"""Cache stage: every training batch's compressed gradients into the store, resumable and shardable.

* Resume: a batch whose shard is already stored is skipped after its digest is checked (the loader
  must yield the same batches in the same order); a changed batch is an error, never a silent mix.
* Growth: a loader that yields more batches than a completed store holds adds shards; the completion
  record and everything derived from the data (e.g. the FIM) are then recomputed.
* Nothing to do writes nothing: the writer lock is taken only before the first write.
* torch.distributed: rank r caches the batches i % world == r into the shared store; rank 0 holds
  the writer lock for the whole job and cleans up leftovers before a barrier; once every rank's shards
  are visible, every rank takes part in deriving data from them (e.g. the FIM partials of its own
  shards), and rank 0 writes the derived data and the completion record.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

from tqdm import tqdm

from .batches import batch_digest, batch_size
from .collectives import collectively
from .process_group import all_gather_objects, barrier, first_error, rank_and_world
from .store import Completion, CorruptStoreError, Store


class LazyWriter:
    """Takes the store's writer lock on the first :meth:`ensure` and holds it until closed."""

    def __init__(self, store: Store):
        self.store = store
        self.stack = contextlib.ExitStack()
        self.held = False
        self.delegated = False  # under torch.distributed, ranks > 0 write under rank 0's lock

    def ensure(self) -> None:
        if not self.held:
            self.stack.enter_context(self.store.delegated_writer() if self.delegated else self.store.writer())
            self.held = True

    def __enter__(self) -> "LazyWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()
        self.held = False


def require_reiterable(loader, why: str, name: str = "train_loader") -> None:
    if iter(loader) is loader:
        raise TypeError(f"{name} must be re-iterable (a list, a DataLoader, ...), not a one-shot iterator: {why}")


def check_same_batches(records: list[Completion]) -> None:
    """Every checkpoint's record lists the same batches (a shuffling loader would mix them)."""
    if len({tuple(s.digest for s in r.shards) for r in records}) != 1:
        raise ValueError("the train loader yielded different batches for different checkpoints (a shuffling "
                         "DataLoader?): every checkpoint must see the same batches in the same order")


def write_shards(store: Store, compress_batch: Callable, loader: Iterable, ckpt: int, writer: LazyWriter,
                 progress: bool = True, observer=None, lockstep: Callable | None = None) -> int:
    """Cache this rank's missing batches of checkpoint ``ckpt``; returns the number of batches.
    ``observer`` (optional): ``written(index, digest)`` after each shard this rank writes, ``flush()`` once
    this rank's batches are done (e.g. to accumulate statistics of the batches with the shards).
    ``lockstep(batch)`` (a sharded model, see attribution.sharding): the batches go in rounds, one per rank; the
    ranks agree on each round before and after its compressions: a round every rank has stored is skipped, an
    error of any rank is raised by every rank, and a rank whose batch is stored (or who has none left) runs
    ``lockstep`` (a dropped, unchecked compression of one sample) while the others compress theirs."""
    rank, world = rank_and_world()
    done = store.shard_meta(ckpt)
    count, n, spare = 0, 0, None
    bar = tqdm(loader, desc=f"cache ckpt {ckpt}", disable=not progress or rank != 0, leave=False)

    def check(index: int, batch, rows: int) -> tuple[str, bool]:
        """(digest, whether stored), or a ValueError for an empty or changed batch."""
        if rows == 0:
            raise ValueError(f"batch {index} of the train loader holds no samples")
        digest = batch_digest(batch)
        if index in done and (done[index]["digest"] != digest or int(done[index]["rows"]) != rows):
            raise ValueError(f"batch {index} differs from the one stored in shard {index}: the train loader must yield "
                             "the same batches in the same order to resume or grow a store (or use a new store)")
        return digest, index in done

    def write(index: int, batch, rows: int, digest: str, start: int) -> None:
        if not writer.held:
            writer.ensure()
            done.update(store.shard_meta(ckpt))  # a writer that held the lock until now may have stored this batch
            if check(index, batch, rows)[1]:
                return
        grads, values = compress_batch(batch)
        store.write_shard(ckpt, index, grads, {"rows": rows, "digest": digest, "start": start,
                                               "values": values.double().cpu().tolist()})
        if observer is not None:
            observer.written(index, digest)

    def round_of(item) -> None:
        """One lock-step round: ``item`` is (index, batch, rows, start) or None (no batch left)."""
        status, error = "idle", None
        try:
            if item is not None:
                digest, stored = check(*item[:3])
                status = "stored" if stored else "compute"
        except ValueError as err:
            error = err
        error = first_error(error)  # before any collective forward: every rank raises together
        if error is not None:
            raise error
        statuses = all_gather_objects(status)
        if "compute" not in statuses:
            return  # every batch of the round is stored (or none is left)
        try:
            if status == "compute":
                write(*item[:3], digest, item[3])
            else:
                lockstep(item[1] if item is not None else spare)
        except Exception as err:  # noqa: BLE001 - raised below on every rank (after the round's collectives)
            error = err
        error = first_error(error)
        if error is not None:
            raise error

    for index, batch in enumerate(bar):
        count = index + 1
        rows = batch_size(batch)
        spare = batch if spare is None else spare
        if index % world != rank:  # another rank's batch
            n += rows
            continue
        if lockstep is not None:
            round_of((index, batch, rows, n))
        else:
            digest, stored = check(index, batch, rows)
            if not stored:
                write(index, batch, rows, digest, n)
        n += rows
    if lockstep is not None and count % world and rank >= count % world:
        round_of(None)  # the last round: the other ranks compress a batch
    if observer is not None:
        observer.flush()
    return count


def completion_record(store: Store, ckpt: int, count: int) -> Completion:
    """The record of shards 0..count-1, after checking that exactly those are visible."""
    done = store.shard_meta(ckpt)
    stale = [i for i in done if i >= count]
    if stale:
        raise ValueError(f"the store holds shards {stale[:5]} beyond the train loader's {count} batches: a store only "
                         "grows (use a new store for a smaller training set)")
    missing = [i for i in range(count) if i not in done]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} are missing after caching (did a rank fail?); call cache() again")
    if count == 0:
        raise ValueError("train_loader yielded no batches")
    previous = store.completion(ckpt)
    recorded = {s.index: s for s in previous.shards} if previous is not None else {}
    shards = []
    for i in range(count):
        info = store.shard_info(ckpt, i, done[i])
        if i in recorded:
            if info != recorded[i]:  # a completed shard never changes: its files were altered
                raise CorruptStoreError(f"shard {i} of checkpoint {ckpt} differs from the completion record (its files were "
                                        "altered); delete that shard directory and run cache() to rewrite it")
        else:
            store.read_shard(ckpt, info)  # a new shard is checked against its own checksum before it is recorded
        shards.append(info)
    record = Completion.from_shards(shards)
    starts = [int(done[i]["start"]) for i in range(count)]
    if starts != record.starts():
        raise RuntimeError(f"the shards' row offsets {starts[:5]}... disagree with their sizes: the store is inconsistent; "
                           "use a new store")
    if record.samples == 0:
        raise ValueError("train_loader yielded no samples")
    return record


def cache_checkpoint(store: Store, compress_batch: Callable, loader: Iterable, ckpt: int, writer: LazyWriter,
                     derive: Callable[[Completion], None], progress: bool = True, observer=None,
                     lockstep: Callable | None = None) -> Completion:
    """The cache stage for one checkpoint (collective under torch.distributed). ``derive(record)``
    runs on every rank (collective itself; rank 0 holds the writer and writes) before the completion
    record is written. ``observer``: see :func:`write_shards`."""
    rank, world = rank_and_world()
    if world > 1:  # rank 0 holds the lock for the whole job and cleans up before anyone writes
        writer.delegated = rank != 0
        collectively(writer.ensure)
        barrier()
    count = collectively(lambda: write_shards(store, compress_batch, loader, ckpt, writer, progress, observer, lockstep))
    return finish_checkpoint(store, ckpt, count, writer, derive)


def finish_checkpoint(store: Store, ckpt: int, count: int, writer: LazyWriter,
                      derive: Callable[[Completion], None]) -> Completion:
    """Collective: once every rank's shards 0..count-1 of checkpoint ``ckpt`` are written, check them,
    ``derive(record)`` on every rank, and let rank 0 write the completion record (if it changed)."""
    rank, world = rank_and_world()
    if world > 1 and len(set(all_gather_objects(count))) != 1:
        raise RuntimeError("ranks saw different numbers of batches: give every rank the same train loader")
    barrier()
    record = collectively(lambda: completion_record(store, ckpt, count))
    derive(record)

    def finalize():
        if rank != 0:
            return
        if store.completion(ckpt) != record:
            writer.ensure()
            store.write_completion(ckpt, record)

    collectively(finalize)
    barrier()
    return record

