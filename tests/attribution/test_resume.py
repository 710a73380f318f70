"""Interrupted and killed caches resume bit for bit; a fresh process reads what another wrote."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from attribution_problems import Interrupt, interrupting, loss_fn, make_problem, read_line, store_files

from attribution import Attributor

FAST = dict(compressor="factgrass", k=32, seed=3, compile=False, progress=False)
HERE = os.path.dirname(__file__)


def test_interrupted_cache_resumes_bit_for_bit(tmp_path):
    model, train, test = make_problem(torch.float32)
    full = Attributor(model, loss_fn, store=tmp_path / "full", **FAST).cache(train)
    partial = Attributor(model, loss_fn, store=tmp_path / "resumed", **FAST)
    with pytest.raises(Interrupt):
        partial.cache(interrupting(train, after=2))
    assert sorted(os.listdir(tmp_path / "resumed" / "ckpt_000" / "shards")) == ["00000000", "00000001"]
    assert not (tmp_path / "resumed" / "ckpt_000" / "complete.json").exists()
    resumed = Attributor(model, loss_fn, store=tmp_path / "resumed", **FAST).cache(train)
    assert store_files(tmp_path / "full") == store_files(tmp_path / "resumed")
    torch.testing.assert_close(resumed.attribute(test), full.attribute(test), rtol=0, atol=0)


def test_a_changed_batch_is_refused_on_resume(tmp_path):
    model, train, _ = make_problem(torch.float32)
    with pytest.raises(Interrupt):
        Attributor(model, loss_fn, store=tmp_path, **FAST).cache(interrupting(train, after=2))
    changed = [train[0], (train[1][0] + 1, train[1][1]), train[2]]
    with pytest.raises(ValueError, match="batch 1 differs from the one stored in shard 1"):
        Attributor(model, loss_fn, store=tmp_path, **FAST).cache(changed)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {here!r})
    from attribution_problems import loss_fn, make_problem
    from attribution import Attributor
    model, train, test = make_problem(torch.float32)
    def slow(batches):
        for b in batches:
            yield b
            print("batch", flush=True)
            time.sleep({delay})
    Attributor(model, loss_fn, store={store!r}, compressor="factgrass", k=32, seed=3, compile=False,
               progress=False).cache(slow(train))
    print("done", flush=True)
    """
)


def test_sigkill_mid_cache_loses_no_completed_shard_and_a_fresh_process_resumes(tmp_path):
    store = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(here=HERE, delay=30, store=store)],
                            stdout=subprocess.PIPE, text=True)
    assert read_line(proc) == "batch"  # the first shard is written before the loader resumes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.listdir(os.path.join(store, "ckpt_000", "shards")) == ["00000000"]
    model, train, test = make_problem(torch.float32)
    resumed = Attributor(model, loss_fn, store=store, **FAST).cache(train)
    fresh = Attributor(model, loss_fn, store=tmp_path / "fresh", **FAST).cache(train)
    assert store_files(store) == store_files(tmp_path / "fresh")
    torch.testing.assert_close(resumed.attribute(test), fresh.attribute(test), rtol=0, atol=0)
    # and another process reads the finished store
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {HERE!r})
        from attribution_problems import loss_fn, make_problem
        from attribution import Attributor
        model, train, test = make_problem(torch.float32)
        scores = Attributor(model, loss_fn, store={store!r}, compressor="factgrass", k=32, seed=3, compile=False,
                            progress=False).attribute(test)
        torch.save(scores, {str(tmp_path / "other.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "other.pt"), fresh.attribute(test), rtol=0, atol=0)


def test_several_checkpoints_need_a_reiterable_loader(tmp_path):
    model, train, _ = make_problem(torch.float32)
    states = [model.state_dict(), model.state_dict()]
    attr = Attributor(model, loss_fn, method="tracin", checkpoints=states, store=tmp_path, **FAST)
    with pytest.raises(TypeError, match="re-iterable .*read once per checkpoint"):
        attr.cache(iter(train))
