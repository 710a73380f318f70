"""The Store protocol: MemoryStore and DiskStore implement it, and behave alike through it."""
import inspect

import numpy as np
import pytest
import torch
from attribution_problems import loss_fn, make_problem

from attribution import Attributor, IncompleteStoreError
from attribution.cache import LazyWriter
from attribution.store import Completion, DiskStore, MemoryStore, Store

FAST = dict(compressor="factgrass", k=8, seed=3, compile=False, progress=False)
COLUMNS = 5


def _members():
    return sorted(name for name in dir(Store) if not name.startswith("_") and callable(getattr(Store, name)))


def _store(kind, tmp_path, storage="float32"):
    if kind == "memory":
        return MemoryStore(COLUMNS, storage)
    return DiskStore(tmp_path / "store", {"blocks": [["a", 3], ["b", 2]]}, storage)


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_both_stores_are_stores(kind, tmp_path):
    store = _store(kind, tmp_path)
    assert isinstance(store, Store)
    assert store.columns == COLUMNS and store.storage == "float32"
    for name in _members():  # the same parameters as the protocol's, so a caller typed with Store may call either
        assert list(inspect.signature(getattr(store, name)).parameters) == \
            list(inspect.signature(getattr(Store, name)).parameters)[1:], name


def test_the_attributors_stores_are_stores(tmp_path):
    model, _, _ = make_problem(torch.float32)
    assert isinstance(Attributor(model, loss_fn, **FAST).store, MemoryStore)
    assert isinstance(Attributor(model, loss_fn, **FAST).store, Store)
    assert isinstance(Attributor(model, loss_fn, store=tmp_path, **FAST).store, Store)


def test_something_else_is_not_a_store():
    assert not isinstance(object(), Store)
    assert "write_shard" in _members() and "read_rows" in _members() and "checkpoints" not in _members()


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_shard_round_trips_and_completes_alike(kind, storage, tmp_path):
    """Write two shards, read them back, record and check the completion, derived data: through the protocol only."""
    store: Store = _store(kind, tmp_path, storage)
    model, train, _ = make_problem(torch.float32, n_train=7, batch=4)
    grads = [torch.cat([x, -x], 1)[:, :COLUMNS] for x, _ in train]  # [4, 5] and [3, 5]
    with pytest.raises(IncompleteStoreError, match="no cached gradients"):
        store.require_complete(0)
    assert store.completion(0) is None and store.shard_meta(0) == {}
    with LazyWriter(store) as writer:
        writer.ensure()
        start = 0
        for index, g in enumerate(grads):
            store.write_shard(0, index, g, {"rows": len(g), "digest": f"batch{index}", "start": start,
                                            "values": [float(index)] * len(g)})
            start += len(g)
        with pytest.raises(IncompleteStoreError, match="did not complete"):
            store.require_complete(0)
        meta = store.shard_meta(0)
        assert sorted(meta) == [0, 1] and [m["rows"] for m in meta.values()] == [4, 3]
        record = Completion.from_shards([store.shard_info(0, i, m) for i, m in meta.items()])
        store.write_completion(0, record)
    assert store.completion(0) == record and store.require_complete(0) == record
    assert record.samples == 7 and record.starts() == [0, 4]
    dtype = getattr(torch, storage)
    for shard, g in zip(record.shards, grads):
        got = store.read_shard(0, shard)
        assert got.dtype == dtype and got.shape == (shard.rows, COLUMNS)
        torch.testing.assert_close(got, g.to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(store.read_rows(0, shard, [2, 0]), g.to(dtype)[[2, 0]], rtol=0, atol=0)
        assert store.read_values(0, shard) == [float(shard.index)] * shard.rows

    arrays = {"x": np.arange(6.0).reshape(2, 3)}
    with store.writer():
        store.save_derived(0, "fim", arrays, record.fingerprint, {"damping": 0.1})
    assert store.has_derived(0, "fim", record.fingerprint) and not store.has_derived(0, "fim", "other")
    loaded, meta = store.load_derived(0, "fim", record.fingerprint)
    np.testing.assert_array_equal(loaded["x"], arrays["x"])
    assert meta == {"damping": 0.1} and store.derived_meta(0, "fim") == (record.fingerprint, {"damping": 0.1})
    assert store.load_derived(0, "fim", "other") is None and store.derived_names(0) == ["fim"]
    with store.writer():
        store.remove_derived(0, "fim")
    assert store.derived_names(0) == [] and store.derived_meta(0, "fim") is None
