"""Every stage under torch.distributed with 2 gloo ranks (the same code path serves NCCL): the FIM from
per-rank partials, attribute / top_k / select / self_influence / attribute(out=) on disjoint shard
ranges, all equal bitwise to one process; a rank that dies mid-cache leaves a store that resumes."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from attribution_problems import loss_fn, make_problem, store_files

from attribution import Attributor, collectives
from attribution.process_group import exit_now  # skips the shutdown where gloo aborts now and then

FAST = dict(compressor="factgrass", k=16, seed=3, compile=False, progress=False, memory_budget=3000)
N_TRAIN, BATCH = 141, 4  # 36 batches (more than the FIM tree's 16 leaves), the last of 1 row


def _init(rank, world, init_file, timeout=120):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))


def _stages(root, tag):
    """What the ranks and the single process both compute (stores under root/<tag>...)."""
    model, train, test = make_problem(torch.float32, n_train=N_TRAIN, batch=BATCH)
    attr = Attributor(model, loss_fn, store=root / f"{tag}_if", **FAST)
    attr.cache(train[:35])  # 35 batches: an uneven split over 2 ranks
    first = attr.top_k(test, k=5)
    attr.cache(train)  # grows
    cos = Attributor(model, loss_fn, method="gradcos", store=root / f"{tag}_cos", **FAST).cache(train)
    return {"first": first, "scores": attr.attribute(test), "top": attr.top_k(test, k=5),
            "bottom": attr.top_k(test, k=5, largest=False), "self": attr.self_influence(),
            "file": attr.attribute(test, out=root / f"{tag}_m.npy").clone(), "select": cos.select(test, n=9),
            "cos_top": cos.top_k(test, k=3)}


def _worker(rank, world, init_file, root):
    _init(rank, world, init_file)
    try:
        torch.set_num_threads(1)
        torch.save(_stages(root, "dist"), root / f"out.{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_now(0)


def _equal(a, b):
    if isinstance(a, (tuple, list)):
        return all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def test_two_ranks_compute_every_stage_as_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the GEMMs of the ranks, for bitwise equal results
    try:
        single = _stages(tmp_path, "single")
    finally:
        torch.set_num_threads(threads)
    for tag in ("if", "cos"):  # shards, completion record and the FIM from per-rank partials: byte for byte
        assert store_files(tmp_path / f"dist_{tag}") == store_files(tmp_path / f"single_{tag}")
    ranks = [torch.load(tmp_path / f"out.{r}.pt") for r in range(2)]
    for key, expected in single.items():
        for rank, got in enumerate(ranks):
            assert _equal(got[key], expected), (key, rank)
    expected = torch.sort(single["scores"], dim=1, descending=True, stable=True)
    assert torch.equal(single["top"][1], expected.indices[:, :5]) and torch.equal(single["top"][0], expected.values[:, :5])


def _dying_worker(rank, world, init_file, root, die_at):
    _init(rank, world, init_file, timeout=60)
    torch.set_num_threads(1)
    model, train, _ = make_problem(torch.float32, n_train=N_TRAIN, batch=BATCH)

    def loader():
        for i, batch in enumerate(train):
            if rank == 1 and i == die_at:
                os._exit(3)  # killed mid-cache: no cleanup, no goodbye to rank 0
            yield batch

    try:
        Attributor(model, loss_fn, store=root / "store", **FAST).cache(loader())
    except Exception as err:  # rank 0 learns that rank 1 is gone at the next collective
        (root / "rank0_error").write_text(f"{type(err).__name__}: {err}")
    exit_now(0)


def _resume_worker(rank, world, init_file, root):
    _init(rank, world, init_file)
    try:
        torch.set_num_threads(1)
        model, train, test = make_problem(torch.float32, n_train=N_TRAIN, batch=BATCH)
        attr = Attributor(model, loss_fn, store=root / "store", **FAST).cache(train)
        torch.save(attr.top_k(test, k=4), root / f"resumed.{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_now(0)


def test_a_rank_that_dies_mid_cache_leaves_a_store_that_resumes(tmp_path):
    context = mp.spawn(_dying_worker, args=(2, str(tmp_path / "init1"), tmp_path, 9), nprocs=2, join=False)
    for process in context.processes:
        process.join(120)
    assert [p.exitcode for p in context.processes] == [0, 3]
    assert (tmp_path / "rank0_error").exists()  # rank 0 raised instead of hanging
    shards = sorted(int(s) for s in os.listdir(tmp_path / "store" / "ckpt_000" / "shards") if s.isdigit())
    assert {1, 3, 5, 7} <= set(shards) and 9 not in shards and 11 not in shards  # rank 1 died at batch 9
    assert not (tmp_path / "store" / "ckpt_000" / "complete.json").exists()
    mp.spawn(_resume_worker, args=(2, str(tmp_path / "init2"), tmp_path), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, train, test = make_problem(torch.float32, n_train=N_TRAIN, batch=BATCH)
        fresh = Attributor(model, loss_fn, store=tmp_path / "fresh", **FAST).cache(train)
        expected = fresh.top_k(test, k=4)
    finally:
        torch.set_num_threads(threads)
    assert store_files(tmp_path / "store") == store_files(tmp_path / "fresh")
    for rank in range(2):
        assert _equal(torch.load(tmp_path / f"resumed.{rank}.pt"), expected)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    model, train, test = make_problem(torch.float32, n_train=N_TRAIN, batch=BATCH)
    return Attributor(model, loss_fn, store=tmp_path_factory.mktemp("cached"), **FAST).cache(train), test


@pytest.mark.parametrize("world", [2, 3, 4, 5, 8, 16, 32])
def test_fim_partials_sum_to_one_process_fim(cached, world):
    """Each rank's partial as collectives.empirical_fims forms it, simulated in one process: a power of two
    up to 16 ranks reproduces one process's sum bit for bit, any other world size up to rounding."""
    attr = cached[0]
    record = attr._records()[0]
    gram = collectives.ShardGram(attr.store, 0, record, attr.scorer.split, attr.dims, 7, "cpu", torch.float32)
    one = collectives.local_partial(gram, len(record.shards), 0, 1)
    parts = [collectives.local_partial(gram, len(record.shards), r, world) for r in range(world)]
    for j in range(len(attr.dims)):
        total = collectives._combine([p[j].clone() if p is not None else torch.zeros_like(one[j]) for p in parts], world)
        if collectives.tree_world(world):
            assert torch.equal(total, one[j])
        else:
            torch.testing.assert_close(total, one[j], rtol=1e-5, atol=1e-6)


def test_ranks_score_disjoint_ranges_of_whole_blocks(cached):
    attr, test = cached
    records, rows = attr._records(), attr._row_budget(6)
    queries = attr.scorer.prepared_queries(attr.query_features(test), attr.damping, records)
    whole = {start: block for start, block in attr.scorer.score_blocks(queries, records, rows)}
    seen = []
    for rank in range(3):
        for start, block in attr.scorer.score_blocks(queries, records, rows, part=(rank, 3)):
            assert torch.equal(block, whole[start])  # the same block, the same bits, whoever scores it
            seen.append(start)
    assert seen == sorted(whole) and len(seen) > 3
