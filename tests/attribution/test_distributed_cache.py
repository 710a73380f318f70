"""Multi-process caching through torch.distributed (gloo on CPU; the same code path serves NCCL)."""
import os

import torch
from attribution_problems import grow_on_two_ranks_and_one, store_files

FAST = dict(compressor="factgrass", k=32, seed=3, compile=False, progress=False)


def test_two_ranks_write_the_same_store_as_one_process(tmp_path):
    ranks, (expected_part, expected) = grow_on_two_ranks_and_one(tmp_path, FAST)
    store = str(tmp_path / "dist")
    assert store_files(store) == store_files(tmp_path / "single")  # shards, records and FIM, byte for byte
    for scores, grown in ranks:  # bitwise: the ranks and the single process use one thread each
        torch.testing.assert_close(scores, expected_part, rtol=0, atol=0)
        torch.testing.assert_close(grown, expected, rtol=0, atol=0)
    assert sorted(os.listdir(os.path.join(store, "ckpt_000", "shards"))) == [f"{i:08d}" for i in range(6)]
