"""attribution.cache through a fake step (batch -> its own rows as "gradients"): the lazy writer lock,
resume, growth, the checks on the loader, the observer, and the completion record."""
import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.cache import (
    LazyWriter,
    cache_checkpoint,
    check_same_batches,
    completion_record,
    require_reiterable,
    write_shards,
)
from attribution.store import CorruptStoreError, DiskStore, MemoryStore


class Step:
    """The fake cache step: a batch [B, 3] is its own compressed gradients; counts the rows it computes."""

    def __init__(self):
        self.rows = 0

    def __call__(self, batch):
        self.rows += batch.shape[0]
        return batch.double(), batch[:, 0].double()


class Observer:
    def __init__(self):
        self.events = []

    def written(self, index, digest):
        self.events.append(("written", index))

    def flush(self):
        self.events.append(("flush",))


class LockCountingStore(MemoryStore):
    def __init__(self, *args):
        super().__init__(*args)
        self.locks = []

    @contextlib.contextmanager
    def writer(self):
        self.locks.append("taken")
        yield
        self.locks.append("released")


def _batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, generator=g) for n in sizes]


def _cache(store, loader, step=None, derive=None, observer=None):
    derived = []
    with LazyWriter(store) as writer:
        record = cache_checkpoint(store, step or Step(), loader, 0, writer,
                                  derive or (lambda record: derived.append(record)), False, observer)
    return record, derived


# ---- the writer lock and the loader --------------------------------------------------------------------
def test_the_lock_is_taken_on_the_first_write_and_released_on_exit():
    store = LockCountingStore(3)
    with LazyWriter(store) as writer:
        assert store.locks == [] and not writer.held
        writer.ensure()
        writer.ensure()
        assert store.locks == ["taken"] and writer.held
    assert store.locks == ["taken", "released"] and not writer.held


def test_require_reiterable_refuses_one_shot_iterators():
    require_reiterable([1, 2], "why")
    with pytest.raises(TypeError, match="not a one-shot iterator: because"):
        require_reiterable(iter([1, 2]), "because")


def test_check_same_batches_compares_every_checkpoints_digests():
    store = MemoryStore(3)
    a, _ = _cache(store, _batches([2, 3]))
    b, _ = _cache(MemoryStore(3), _batches([2, 3], seed=1))
    check_same_batches([a, a])
    with pytest.raises(ValueError, match="different batches for different checkpoints"):
        check_same_batches([a, b])


# ---- resume and growth ---------------------------------------------------------------------------------
def test_a_first_cache_writes_every_shard_and_derives_before_completion():
    store, loader, step = MemoryStore(3), _batches([2, 3, 1]), Step()
    seen_incomplete = []
    record, _ = _cache(store, loader, step, derive=lambda record: seen_incomplete.append(store.completion(0) is None))
    assert seen_incomplete == [True]  # derived data first, then the completion record
    assert store.completion(0) == record and record.samples == 6 and step.rows == 6
    assert [s.rows for s in record.shards] == [2, 3, 1] and record.starts() == [0, 2, 5]
    assert torch.equal(store.read_shard(0, record.shards[1]), loader[1].double())
    assert store.read_values(0, record.shards[2]) == loader[2][:, 0].double().tolist()


def test_an_interrupted_cache_resumes_with_the_missing_batches_only():
    store, loader = MemoryStore(3), _batches([2, 3, 1, 4])
    with LazyWriter(store) as writer:
        write_shards(store, Step(), loader[:2], 0, writer, progress=False)  # interrupted after 2 batches
    assert store.completion(0) is None
    step, observer = Step(), Observer()
    record, derived = _cache(store, loader, step, observer=observer)
    assert step.rows == 5 and observer.events == [("written", 2), ("written", 3), ("flush",)]
    assert derived == [record] and record.samples == 10


def test_an_up_to_date_store_writes_nothing_and_takes_no_lock():
    store, loader = LockCountingStore(3), _batches([2, 3])
    first, _ = _cache(store, loader)
    taken = len(store.locks)
    step = Step()
    again, derived = _cache(store, loader, step)
    assert again == first and step.rows == 0 and len(store.locks) == taken and derived == [first]


def test_growth_adds_shards_and_a_new_record():
    store, loader = MemoryStore(3), _batches([2, 3, 1, 4])
    first, _ = _cache(store, loader[:2])
    step = Step()
    grown, derived = _cache(store, loader, step)
    assert step.rows == 5 and grown.samples == 10 and grown.fingerprint != first.fingerprint
    assert grown.shards[:2] == first.shards and derived == [grown]


@settings(deadline=None, max_examples=15)
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=8), data=st.data())
def test_any_interruption_then_resume_gives_the_record_of_one_run(sizes, data):
    loader = _batches(sizes)
    done = data.draw(st.integers(0, len(sizes)))
    store = MemoryStore(3)
    with LazyWriter(store) as writer:
        write_shards(store, Step(), loader[:done], 0, writer, progress=False)
    step = Step()
    resumed, _ = _cache(store, loader, step)
    whole, _ = _cache(MemoryStore(3), loader)
    assert resumed == whole and step.rows == sum(sizes[done:])


# ---- refusals ------------------------------------------------------------------------------------------
def test_a_changed_batch_is_refused_never_mixed():
    store, loader = MemoryStore(3), _batches([2, 3])
    _cache(store, loader)
    changed = [loader[0], loader[1] + 1]
    with pytest.raises(ValueError, match="batch 1 differs from the one stored in shard 1"):
        _cache(store, changed)
    shorter = [loader[0], loader[1][:2]]
    with pytest.raises(ValueError, match="batch 1 differs"):
        _cache(store, shorter)


def test_empty_loaders_and_empty_batches_are_refused():
    with pytest.raises(ValueError, match="train_loader yielded no batches"):
        _cache(MemoryStore(3), [])
    with pytest.raises(ValueError, match="batch 1 of the train loader holds no samples"):
        _cache(MemoryStore(3), [torch.zeros(2, 3), torch.zeros(0, 3)])


def test_a_store_never_shrinks():
    store, loader = MemoryStore(3), _batches([2, 3, 1])
    _cache(store, loader)
    with pytest.raises(ValueError, match=r"shards \[2\] beyond the train loader's 2 batches"):
        _cache(store, loader[:2])


def test_completion_record_refuses_missing_shards():
    store, loader = MemoryStore(3), _batches([2, 3])
    with LazyWriter(store) as writer:
        write_shards(store, Step(), loader[:1], 0, writer, progress=False)
    with pytest.raises(RuntimeError, match=r"shards \[1\] are missing after caching"):
        completion_record(store, 0, 2)


def test_an_altered_completed_shard_is_corruption(tmp_path):
    manifest = {"blocks": [["b", 3]]}
    store, loader = DiskStore(tmp_path, manifest, "float64"), _batches([2, 3])
    record, _ = _cache(store, loader)
    meta = tmp_path / "ckpt_000" / "shards" / "00000001" / "meta.json"
    meta.write_bytes(meta.read_bytes() + b" ")  # the same metadata, other bytes than the record lists
    with pytest.raises(CorruptStoreError, match="shard 1 of checkpoint 0 differs from the completion record"):
        _cache(store, loader)
