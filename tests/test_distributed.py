"""Multi-process caching through torch.distributed (gloo on CPU; the same code path serves NCCL)."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_attribution import _shard_bytes, loss_fn, make_problem

from attribution import Attributor


def _worker(rank, world, init_file, store, result):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, train, test = make_problem(torch.float32)
        attr = Attributor(model, loss_fn, compressor="factgrass", k=32, seed=3, store=store, compile=False, progress=False)
        scores = attr.cache(train).attribute(test)
        torch.save(scores, f"{result}.{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_the_same_store_as_one_process(tmp_path):
    store, result = str(tmp_path / "dist"), str(tmp_path / "scores")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), store, result), nprocs=2, join=True)
    model, train, test = make_problem(torch.float32)
    single = Attributor(model, loss_fn, compressor="factgrass", k=32, seed=3, store=tmp_path / "single",
                        compile=False, progress=False).cache(train)
    assert _shard_bytes(store) == _shard_bytes(tmp_path / "single")  # shards and FIM, byte for byte
    expected = single.attribute(test)
    for rank in range(2):
        torch.testing.assert_close(torch.load(f"{result}.{rank}.pt"), expected, rtol=0, atol=0)
    assert sorted(os.listdir(os.path.join(store, "ckpt_000", "shards"))) == ["00000000", "00000001", "00000002"]
