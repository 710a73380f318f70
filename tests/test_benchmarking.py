"""grass_ops.benchmarking's process measurements: peak RSS and handing freed heap pages back to the OS."""
import platform

import pytest
import torch

from grass_ops.benchmarking import peak_rss_bytes, release_freed_memory


def test_peak_rss_covers_a_touched_allocation_and_never_decreases():
    before = peak_rss_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page touched
    during = peak_rss_bytes()
    del block
    assert during >= before and during >= 64 * 2**20 and peak_rss_bytes() >= during


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_freed_memory_runs_malloc_trim_under_glibc():
    blocks = [torch.ones(2**18) for _ in range(64)]  # 1 MiB each
    del blocks
    assert release_freed_memory() is True


def test_release_freed_memory_frees_what_only_a_reference_cycle_holds():
    import gc
    import weakref

    class Holder:
        pass

    gc.disable()  # no automatic collection in between: only release_freed_memory's own
    try:
        holder = Holder()
        holder.me, holder.weights = holder, torch.ones(1024)  # a cycle, as a Hugging Face model is
        alive = weakref.ref(holder)
        del holder
        assert alive() is not None  # reference counting alone does not free a cycle
        release_freed_memory()
        assert alive() is None
    finally:
        gc.enable()


def test_the_primitive_cache_limit_is_set_once_and_leaves_a_users_value(monkeypatch):
    from grass_ops.benchmarking import ONEDNN_CACHE_VARIABLE, limit_primitive_cache

    monkeypatch.setenv(ONEDNN_CACHE_VARIABLE, "0")  # recorded first, so that teardown restores the real value
    monkeypatch.delenv(ONEDNN_CACHE_VARIABLE)
    assert limit_primitive_cache(32) == "32" and limit_primitive_cache(8) == "32"  # the first value stays
    monkeypatch.setenv(ONEDNN_CACHE_VARIABLE, "500")
    assert limit_primitive_cache() == "500"
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(ValueError, match="capacity must be an int >= 0"):
            limit_primitive_cache(bad)
