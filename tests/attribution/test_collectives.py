"""attribution.collectives: the FIM tree's leaves and grouping, the per-rank partials, the collective helpers
in a world of one, and the same helpers on 2 gloo ranks."""
import datetime
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution import collectives
from attribution.cache import LazyWriter, cache_checkpoint
from attribution.fim import block_fims
from attribution.process_group import exit_now  # skips the shutdown where gloo aborts now and then
from attribution.scoring import split_columns
from attribution.store import MemoryStore
from attribution.streaming import plan_blocks

WIDTHS, OFFSETS = [2, 3], [0, 2, 5]


def _store(g: torch.Tensor, shard_rows: list[int]):
    store = MemoryStore(g.shape[1], "float64")
    bounds = np.cumsum([0] + shard_rows).tolist()
    batches = [torch.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    with LazyWriter(store) as writer:
        record = cache_checkpoint(store, lambda rows: (g[rows], torch.zeros(len(rows), dtype=torch.float64)), batches,
                                  0, writer, lambda record: None, progress=False)
    return store, record


def _split(x):
    return split_columns(x, OFFSETS)


# ---- the FIM tree --------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_each_rank_leaves_hold_exactly_its_shards(world):
    assert collectives.tree_world(world)
    n_shards = 37
    covered = []
    for rank in range(world):
        leaves = collectives.rank_leaves(rank, world)
        assert len(leaves) == collectives.FIM_LEAVES // world  # one contiguous subtree
        shards = sorted(i for p in leaves for i in collectives.leaf_shards(n_shards, p))
        assert shards == list(range(rank, n_shards, world))
        covered += shards
    assert sorted(covered) == list(range(n_shards))


@pytest.mark.parametrize("world", [3, 5, 6, 17, 32])
def test_other_world_sizes_are_not_tree_worlds(world):
    assert not collectives.tree_world(world)


def test_leaf_shards_follow_the_bit_reversed_leaf_order():
    assert list(collectives.leaf_shards(40, 0)) == [0, 16, 32]
    assert list(collectives.leaf_shards(40, 1)) == [8, 24]  # position 1 = 0b0001 -> shard residue 0b1000
    assert list(collectives.leaf_shards(40, 15)) == [15, 31]


def test_tree_sum_groups_pairwise():
    items = [[torch.tensor([float(2**i)])] for i in range(4)]
    assert collectives._tree_sum(iter(items))[0].item() == 15.0
    assert collectives._tree_sum([None, [torch.tensor([1.0])]])[0].item() == 1.0  # empty leaves are skipped
    with pytest.raises(AssertionError, match="power-of-two"):
        collectives._tree_sum([[torch.tensor([1.0])]] * 3)


@settings(deadline=None, max_examples=10)
@given(shards=st.lists(st.integers(1, 4), min_size=1, max_size=40), world=st.sampled_from([1, 2, 3, 4, 8]))
def test_rank_partials_combine_to_one_process_sum(shards, world):
    """Partials of every rank added by _combine equal the one-process sum (bitwise for tree worlds)."""
    g = torch.randn(sum(shards), 5, generator=torch.Generator().manual_seed(len(shards)))
    store, record = _store(g.double(), shards)
    gram = collectives.ShardGram(store, 0, record, _split, WIDTHS, 3, "cpu", torch.float32)
    one = collectives.local_partial(gram, len(shards), 0, 1)
    partials = [collectives.local_partial(gram, len(shards), rank, world) for rank in range(world)]
    for j, w in enumerate(WIDTHS):
        parts = [p[j].clone() if p is not None else torch.zeros(w, w) for p in partials]
        total = collectives._combine(parts, world)
        if collectives.tree_world(world):
            assert torch.equal(total, one[j])
        else:
            torch.testing.assert_close(total, one[j], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one[j].double(), _split(g.double())[j].T @ _split(g.double())[j], rtol=1e-5, atol=1e-4)


def test_a_shard_gram_of_no_shards_is_none():
    store, record = _store(torch.randn(4, 5, dtype=torch.float64), [4])
    assert collectives.ShardGram(store, 0, record, _split, WIDTHS, 3, "cpu", torch.float64)([]) is None


def test_empirical_fims_in_one_process_equal_the_block_fims_of_the_rows():
    g = torch.randn(13, 5, dtype=torch.float64)
    store, record = _store(g, [5, 1, 7])
    fims = collectives.empirical_fims(store, 0, record, _split, WIDTHS, 4, "cpu", torch.float64)
    expected = block_fims([(g, None)], _split, WIDTHS, 13, "cpu", torch.float64)
    for got, want in zip(fims, expected):
        torch.testing.assert_close(got.eigvals, want.eigvals)
        torch.testing.assert_close(got.eigvecs @ torch.diag(got.eigvals) @ got.eigvecs.T,
                                   want.eigvecs @ torch.diag(want.eigvals) @ want.eigvecs.T)


# ---- collective helpers in a world of one ----------------------------------------------------------------
def test_collectively_returns_the_result_or_raises_the_error_itself():
    assert collectives.collectively(lambda: 3) == 3
    with pytest.raises(KeyError, match="mine"):
        collectives.collectively(lambda: {}["mine"])
    with pytest.raises(SystemExit):  # CLI errors too
        collectives.collectively(lambda: exit(2))
    assert collectives.agreed({"a": 1}) == {"a": 1}


def _blocks(scores: torch.Tensor, width: int):
    return ((lo, scores[:, lo : lo + width]) for lo in range(0, scores.shape[1], width))


def test_rank_bounds_score_matrix_and_top_k_in_one_process():
    scores = torch.randn(3, 10, dtype=torch.float64)
    blocks = plan_blocks([4, 6], 3)
    assert collectives.rank_bounds(blocks) == [(0, 10)]
    matrix = collectives.score_matrix(_blocks(scores, 3), 3, 10, [(0, 10)], torch.float64, "cpu")
    assert torch.equal(matrix, scores)
    values, indices = collectives.top_k(_blocks(scores, 4), 3, 2, True, "cpu")
    assert torch.equal(indices, scores.topk(2, dim=1).indices)
    values, indices = collectives.top_k(_blocks(scores, 4), 1, 2, False, "cpu", reduce=lambda b: b.mean(0, keepdim=True))
    assert torch.equal(indices[0], scores.mean(0).topk(2, largest=False).indices)
    with pytest.raises(ValueError, match="no training rows"):
        collectives.merge_top_k(None, None, 3, 2, True, "cpu")
    collectives.check_same_queries([torch.zeros(2, 2)])  # one rank: nothing to compare


def test_write_score_matrix_renames_into_place_and_leaves_nothing_on_failure(tmp_path):
    scores = torch.randn(2, 7)
    path = tmp_path / "out" / "m.npy"
    got = collectives.write_score_matrix(path, _blocks(scores, 3), 2, 7, torch.float32)
    assert torch.equal(got, scores) and np.load(path).dtype == np.float32
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.npy"]

    def failing():
        yield 0, scores[:, :3]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        collectives.write_score_matrix(tmp_path / "out" / "n.npy", failing(), 2, 7, torch.float64)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.npy"]


# ---- 2 gloo ranks ------------------------------------------------------------------------------------------
def _two_ranks(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = {"agreed": collectives.agreed(f"rank {rank}")}
        try:
            collectives.collectively(lambda: rank == 1 and {}["only rank 1 fails"])
        except BaseException as err:  # noqa: BLE001 - recorded for the parent
            result["error"] = f"{type(err).__name__}: {err}"
            result["is_runtime_error"] = isinstance(err, RuntimeError)
        scores = torch.arange(12.0).reshape(2, 6) * (-1) ** torch.arange(6)
        mine = [(lo, scores[:, lo : lo + 3]) for lo in (0, 3)][rank : rank + 1]  # rank r scores columns 3r..3r+3
        result["matrix"] = collectives.score_matrix(iter(mine), 2, 6, [(0, 3), (3, 6)], torch.float32, "cpu")
        result["top"] = collectives.top_k(iter(mine), 2, 3, True, "cpu")
        try:
            collectives.check_same_queries([torch.full((1, 2), float(rank))])
        except ValueError as err:
            result["queries"] = str(err)
        out.joinpath(f"{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()
    exit_now(0)


def test_two_ranks_raise_together_and_share_their_columns(tmp_path):
    mp.spawn(_two_ranks, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    results = [pickle.loads((tmp_path / f"{r}.pkl").read_bytes()) for r in range(2)]
    scores = torch.arange(12.0).reshape(2, 6) * (-1) ** torch.arange(6)
    assert results[1]["error"].startswith("KeyError") and "only rank 1 fails" in results[1]["error"]
    # the other rank raises RankFailed, a RuntimeError that names the failing rank and the original error
    assert results[0]["error"].startswith("RankFailed: rank 1 failed: KeyError") and results[0]["is_runtime_error"]
    assert not results[1]["is_runtime_error"]
    for result in results:
        assert result["agreed"] == "rank 0"
        assert torch.equal(result["matrix"], scores)
        assert torch.equal(result["top"][1], scores.topk(3, dim=1).indices)
        assert "ranks hold different queries" in result["queries"]
