"""Several processes and one store: the writer lock, in-flight temporaries, concurrent caches."""
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from attribution_problems import loss_fn, make_problem, read_line, store_files

from attribution import Attributor, StoreBusyError
from attribution.store import DiskStore

FAST = dict(compressor="factgrass", k=32, seed=3, compile=False, progress=False)
HERE = os.path.dirname(__file__)

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {here!r})
    from attribution_problems import loss_fn, make_problem
    from attribution import Attributor
    model, train, _ = make_problem(torch.float32)
    attr = Attributor(model, loss_fn, store={store!r}, compressor="factgrass", k=32, seed=3, compile=False, progress=False)
    with attr.store.writer():
        print("locked", flush=True)
        time.sleep(60)
    """
)

CACHE = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {here!r})
    from attribution_problems import loss_fn, make_problem
    from attribution import Attributor, StoreBusyError
    model, train, _ = make_problem(torch.float32)
    def slow(batches):
        for b in batches:
            time.sleep(0.3)
            yield b
    try:
        Attributor(model, loss_fn, store={store!r}, compressor="factgrass", k=32, seed=3, compile=False,
                   progress=False).cache(slow(train))
        print("done", flush=True)
    except StoreBusyError as err:
        print("busy", err, flush=True)
    """
)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    store = str(tmp_path / "store")
    model, train, test = make_problem(torch.float32)
    Attributor(model, loss_fn, store=store, **FAST)  # creates the store
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(here=HERE, store=store)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert read_line(holder) == "locked"
        attr = Attributor(model, loss_fn, store=store, **FAST)
        with pytest.raises(StoreBusyError, match=f"in use by pid {holder.pid} on host {socket.gethostname()}"):
            attr.cache(train)
        assert not (tmp_path / "store" / "ckpt_000" / "shards").exists()  # refused before computing or writing
    finally:
        holder.kill()  # kill -9: the OS releases the lock
        holder.wait()
    Attributor(model, loss_fn, store=store, **FAST).cache(train)
    Attributor(model, loss_fn, store=tmp_path / "fresh", **FAST).cache(train)
    assert store_files(store) == store_files(tmp_path / "fresh")


def test_readers_never_delete_a_live_writers_temporary_shard(tmp_path):
    model, train, test = make_problem(torch.float32)
    attr = Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)
    in_flight = tmp_path / "ckpt_000" / "shards" / f".00000003.tmp-{socket.gethostname()}-999999"
    in_flight.mkdir()
    (in_flight / "grads.npy").write_bytes(b"partial")
    Attributor(model, loss_fn, store=tmp_path, **FAST).attribute(test)
    Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)  # up to date: no writer, no cleanup
    attr.verify()
    assert in_flight.exists()
    # a writer that holds the lock knows that no live writer owns it: leftovers go before it writes
    Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train + [train[0]])
    assert not in_flight.exists()


def test_two_processes_caching_one_store_agree_or_one_is_refused(tmp_path):
    store = str(tmp_path / "store")
    model, train, test = make_problem(torch.float32)
    Attributor(model, loss_fn, store=store, **FAST)
    procs = [subprocess.Popen([sys.executable, "-c", CACHE.format(here=HERE, store=store)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outcomes = [read_line(p) for p in procs]
    for p in procs:
        p.wait(timeout=120)
    assert "done" in outcomes, outcomes
    for outcome in outcomes:
        assert outcome == "done" or outcome.startswith("busy store") and "in use by pid" in outcome
    fresh = Attributor(model, loss_fn, store=tmp_path / "fresh", **FAST).cache(train)
    assert store_files(store) == store_files(tmp_path / "fresh")
    torch.testing.assert_close(Attributor(model, loss_fn, store=store, **FAST).attribute(test), fresh.attribute(test),
                               rtol=0, atol=0)


def test_the_lock_is_reentrant_and_released(tmp_path):
    model, _, _ = make_problem(torch.float32)
    store = Attributor(model, loss_fn, store=tmp_path, **FAST).store
    assert isinstance(store, DiskStore)
    with store.writer():
        with store.writer():
            pass
        assert store._lock_fd is not None
    assert store._lock_fd is None and (tmp_path / "lock").read_text() == ""
    started = time.time()
    with store.writer():
        assert time.time() - started < 5
