"""Multi-process caching through torch.distributed (gloo on CPU; the same code path serves NCCL)."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from attribution_problems import loss_fn, make_problem, store_files

from attribution import Attributor

FAST = dict(compressor="factgrass", k=32, seed=3, compile=False, progress=False)


def _worker(rank, world, init_file, store, result):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, train, test = make_problem(torch.float32, n_train=45, batch=8)  # 6 batches, the last of 5 rows
        attr = Attributor(model, loss_fn, store=store, **FAST)
        scores = attr.cache(train[:5]).attribute(test)  # 5 batches: an uneven split over 2 ranks
        grown = attr.cache(train).attribute(test)
        torch.save((scores, grown), f"{result}.{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_the_same_store_as_one_process(tmp_path):
    store, result = str(tmp_path / "dist"), str(tmp_path / "scores")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), store, result), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same GEMM blocking as the ranks, for bitwise equal scores
    try:
        model, train, test = make_problem(torch.float32, n_train=45, batch=8)
        single = Attributor(model, loss_fn, store=tmp_path / "single", **FAST)
        expected_part = single.cache(train[:5]).attribute(test)
        expected = single.cache(train).attribute(test)
    finally:
        torch.set_num_threads(threads)
    assert store_files(store) == store_files(tmp_path / "single")  # shards, records and FIM, byte for byte
    for rank in range(2):
        scores, grown = torch.load(f"{result}.{rank}.pt")
        torch.testing.assert_close(scores, expected_part, rtol=0, atol=0)
        torch.testing.assert_close(grown, expected, rtol=0, atol=0)
    assert sorted(os.listdir(os.path.join(store, "ckpt_000", "shards"))) == [f"{i:08d}" for i in range(6)]
