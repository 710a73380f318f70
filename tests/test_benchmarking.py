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


MMAP_PROBE = """
import ctypes, sys
from grass_ops.benchmarking import fix_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
fixed = fix_mmap_threshold() if sys.argv[1] == "fixed" else None
freed = bytearray(8 << 20)  # mapped; freeing it raises glibc's dynamic threshold to 8 MiB unless it is fixed
del freed
mapped = libc.mallinfo2().hblkhd
block = bytearray(2 << 20)
print(fixed, libc.mallinfo2().hblkhd - mapped >= 2 << 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")
def test_a_fixed_mmap_threshold_keeps_blocks_of_a_few_mib_mapped_after_a_larger_one_is_freed():
    """In a fresh process each (the setting is process-wide): after an 8 MiB block is freed, a 2 MiB block comes
    from the heap by default and is mapped of its own with fix_mmap_threshold(); a user's MALLOC_MMAP_THRESHOLD_
    is left in force."""
    import os
    import subprocess
    import sys

    def probe(mode, **env):
        run = subprocess.run([sys.executable, "-c", MMAP_PROBE, mode], capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env)
        return run.stdout.split()

    assert probe("default") == ["None", "False"]
    assert probe("fixed") == ["True", "True"]
    assert probe("fixed", MALLOC_MMAP_THRESHOLD_="33554432") == ["False", "False"]  # the user's 32 MiB stays


def test_the_mmap_threshold_must_be_a_positive_number_of_bytes():
    from grass_ops.benchmarking import fix_mmap_threshold

    for bad in (0, -1, 1.5, True, "1M"):
        with pytest.raises(ValueError, match="threshold must be a positive number of bytes"):
            fix_mmap_threshold(bad)
