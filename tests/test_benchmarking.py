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
