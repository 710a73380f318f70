"""The ANN index (the optional `faiss` extra): candidates re-ranked exactly, every method's vectors,
a derived file that follows the store (rebuilt on growth, refused when stale, never pickled), rows
checked on the random-access path, 2 ranks, and the CLI."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from attribution_problems import loss_fn, make_problem

from attribution.process_group import exit_now  # skips the shutdown where gloo aborts now and then

pytest.importorskip("faiss", reason="the `faiss` extra (faiss-cpu) is not installed")

from attribution import Attributor, CorruptStoreError, StoreError, index  # noqa: E402

FAST = dict(compressor="factgrass", k=16, seed=3, compile=False, progress=False, memory_budget=6000)
HERE = os.path.dirname(__file__)


def _problem(n_train=120, batch=7):
    return make_problem(torch.float32, n_train=n_train, batch=batch)


@pytest.mark.parametrize("method", ["if", "graddot", "gradcos", "tracin"])
def test_an_exhaustive_index_reranked_is_the_exact_top_k(tmp_path, method):
    model, train, test = _problem()
    extra = {}
    if method == "tracin":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        other = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}
        extra = dict(checkpoints=[state, other], checkpoint_weights=[0.5, 2.0])
    attr = Attributor(model, loss_fn, method=method, store=tmp_path, **FAST, **extra).cache(train)
    summary = attr.build_index("Flat", project=None if method == "graddot" else 20)  # whole, or the top 20 of 32
    assert summary["mode"] == index.mode_of(method) and summary["rows"] == 120
    for largest in (True, False):
        values, indices = attr.top_k(test, k=5, largest=largest)
        got_values, got = attr.top_k(test, k=5, largest=largest, index=True, candidates=120)
        assert torch.equal(got, indices)
        torch.testing.assert_close(got_values, values, rtol=1e-5, atol=1e-5)


def test_trak_vectors_carry_the_trak_weights(tmp_path):
    from attribution_problems import margin

    model, train, test = _problem()
    attr = Attributor(model, loss_fn, method="trak", output_fn=margin, store=tmp_path, **FAST).cache(train)
    attr.build_index("Flat")
    assert attr.build_index("Flat")["mode"] == "trak"
    assert torch.equal(attr.top_k(test, k=4, index=True, candidates=120)[1], attr.top_k(test, k=4)[1])


def test_an_ivf_pq_index_finds_the_top_k_among_few_candidates(tmp_path):
    model, train, test = _problem(n_train=400, batch=9)
    attr = Attributor(model, loss_fn, method="graddot", store=tmp_path, **FAST).cache(train)
    attr.build_index("IVF8,PQ8x4", project=31, train_size=400, nprobe=8)  # all lists probed: PQ approximates
    exact = attr.top_k(test, k=5)[1]
    got = attr.top_k(test, k=5, index=True, candidates=60)[1]
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(got, exact)])
    assert recall >= 0.9, recall
    few = attr.top_k(test, k=5, index=True, candidates=60, nprobe=1)[1]  # one list: candidates run out
    assert few.shape == (6, 5)


def test_the_index_follows_the_store_and_is_never_pickled(tmp_path):
    model, train, test = _problem()
    attr = Attributor(model, loss_fn, method="graddot", store=tmp_path, **FAST).cache(train[:10])
    attr.build_index("IVF4,Flat", train_size=70, nprobe=4)
    folder = tmp_path / "ckpt_000" / "index-ip"
    assert sorted(os.listdir(folder)) == ["done.json", "faiss.npy", "projection.npy", "row_crc32.npy"]
    for name in ("faiss.npy", "projection.npy", "row_crc32.npy"):
        np.load(folder / name, allow_pickle=False)  # plain arrays: never a pickle
    old = tmp_path / "old_index"
    shutil.copytree(folder, old)
    attr.cache(train)  # the store grows: cache() rebuilds the index with its recorded parameters
    done = json.loads((folder / "done.json").read_text())
    assert done["meta"]["rows"] == 120 and done["meta"]["factory"] == "IVF4,Flat" and done["meta"]["nprobe"] == 4
    assert torch.equal(attr.top_k(test, k=5, index=True, candidates=120)[1], attr.top_k(test, k=5)[1])
    shutil.rmtree(folder)
    shutil.copytree(old, folder)  # as if the store had grown without its index
    fresh = Attributor(model, loss_fn, method="graddot", store=tmp_path, **FAST)
    with pytest.raises(index.StaleIndexError, match="stale"):
        fresh.top_k(test, k=5, index=True)
    shutil.rmtree(folder)
    with pytest.raises(StoreError, match="no ANN index"):
        fresh.top_k(test, k=5, index=True)
    assert attr.verify()["ok"]


def test_an_interrupted_build_leaves_no_index_and_a_rebuild_works(tmp_path, monkeypatch):
    model, train, test = _problem()
    attr = Attributor(model, loss_fn, method="graddot", store=tmp_path, **FAST).cache(train)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(index, "row_crcs", killed)
    with pytest.raises(KeyboardInterrupt):
        attr.build_index("Flat")
    monkeypatch.undo()
    assert not (tmp_path / "ckpt_000" / "index-ip").exists()
    attr.build_index("Flat")
    assert torch.equal(attr.top_k(test, k=3, index=True)[1], attr.top_k(test, k=3)[1])


def test_rows_read_for_reranking_are_checked(tmp_path):
    model, train, test = _problem()
    attr = Attributor(model, loss_fn, method="graddot", store=tmp_path, **FAST).cache(train)
    attr.build_index("Flat")
    best = attr.top_k(test, k=1)[1][0, 0].item()
    shard, row = divmod(best, 7)
    path = tmp_path / "ckpt_000" / "shards" / f"{shard:08d}" / "grads.npy"
    data = bytearray(path.read_bytes())
    rows = min(7, 120 - 7 * shard)
    data[-(rows - row) * 32 * 4] ^= 0x40  # one byte of that row
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=f"shard {shard}.*rows \\[{row}\\]"):
        attr.top_k(test, k=1, index=True)


def test_a_fresh_process_and_a_memory_store_and_single_row_queries(tmp_path):
    model, train, test = _problem()
    attr = Attributor(model, loss_fn, method="gradcos", store=tmp_path / "s", **FAST).cache(train)
    attr.build_index("HNSW8")
    one = [(test[0][0][:1], test[0][1][:1])]
    expected = attr.top_k(one, k=3, index=True)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {HERE!r})
        from attribution_problems import loss_fn, make_problem
        from attribution import Attributor
        model, train, test = make_problem(torch.float32, n_train=120, batch=7)
        attr = Attributor(model, loss_fn, method="gradcos", store={str(tmp_path / 's')!r}, compressor="factgrass", k=16,
                          seed=3, compile=False, progress=False, memory_budget=6000)
        torch.save(attr.top_k([(test[0][0][:1], test[0][1][:1])], k=3, index=True), {str(tmp_path / 'o.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    got = torch.load(tmp_path / "o.pt")
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])
    memory = Attributor(model, loss_fn, method="gradcos", **FAST).cache(train)
    memory.build_index("Flat")
    assert torch.equal(memory.top_k(one, k=3, index=True)[1], attr.top_k(one, k=3)[1])


def _worker(rank, world, init_file, root):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, train, test = _problem()
        attr = Attributor(model, loss_fn, method="graddot", store=root / "store", **FAST).cache(train)
        attr.build_index("IVF4,Flat", train_size=100, nprobe=2)
        queries = [(torch.cat([test[0][0]] * 2)[:7], torch.cat([test[0][1]] * 2)[:7])]  # 7 queries: 4 + 3
        torch.save(attr.top_k(queries, k=4, index=True, candidates=30), root / f"out.{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_now(0)


def test_two_ranks_split_the_queries_and_agree(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    model, train, test = _problem()
    attr = Attributor(model, loss_fn, method="graddot", store=tmp_path / "store", **FAST)
    queries = [(torch.cat([test[0][0]] * 2)[:7], torch.cat([test[0][1]] * 2)[:7])]
    expected = attr.top_k(queries, k=4, index=True, candidates=30)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}.pt")
        assert torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[0], expected[0])


def test_bad_arguments_are_refused(tmp_path):
    model, train, test = _problem()
    attr = Attributor(model, loss_fn, method="graddot", store=tmp_path, **FAST).cache(train)
    with pytest.raises(ValueError, match="cannot build index factory 'Bogus7'"):
        attr.build_index("Bogus7")
    with pytest.raises(ValueError, match="could not train"):
        attr.build_index("IVF64,Flat", train_size=10)
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        attr.top_k(test, k=3, index=True, candidates=0)
    assert not (tmp_path / "ckpt_000" / "index-ip").exists()


def test_the_randomized_projection_keeps_the_energy_of_the_exact_one(tmp_path, monkeypatch):
    model, train, test = _problem(n_train=300, batch=9)
    attr = Attributor(model, loss_fn, method="graddot", store=tmp_path, **FAST).cache(train)
    folder = tmp_path / "ckpt_000" / "index-ip"
    attr.build_index("Flat", project=6)
    exact = torch.from_numpy(np.load(folder / "projection.npy"))
    monkeypatch.setattr(index, "EXACT_MOMENT_MAX_DIM", 8)  # 32 columns: take the randomized path
    monkeypatch.setattr(index, "OVERSAMPLE", 4)  # a sketch of 10 of the 32 directions
    attr.build_index("Flat", project=6)
    randomized = torch.from_numpy(np.load(folder / "projection.npy"))
    assert exact.shape == randomized.shape == (6, 32) and not torch.allclose(exact.abs(), randomized.abs())
    rows = torch.cat([attr.store.read_shard(0, s).float() for s in attr._records()[0].shards])
    energy = [float((rows @ p.T).square().sum() / rows.square().sum()) for p in (exact, randomized)]
    assert energy[1] >= 0.85 * energy[0] and energy[0] > 0.5, energy
    assert torch.equal(attr.top_k(test, k=4, index=True, candidates=300)[1], attr.top_k(test, k=4)[1])


def test_candidates_are_capped_at_the_row_count(tmp_path):
    model, train, test = _problem()
    attr = Attributor(model, loss_fn, method="graddot", store=tmp_path, **FAST).cache(train)
    attr.build_index("Flat")
    expected = attr.top_k(test, k=4, index=True, candidates=attr.n_train)
    got = attr.top_k(test, k=4, index=True, candidates=10**12)  # n_test x 10**12 candidates fit no memory
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])
