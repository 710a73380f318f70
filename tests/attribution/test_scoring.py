"""attribution.scoring: the methods' closed forms on tiny stores, the streamed blocks and their rank
shares, self-influence, and the running top-k's ties."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.cache import LazyWriter, cache_checkpoint
from attribution.scoring import QueryFeatures, Scorer, TopK, check_features, split_columns
from attribution.store import MemoryStore

OFFSETS = [0, 2, 5]  # two blocks: 2 and 3 columns


class Scaling:
    """A stand-in preconditioner: P^-1 = diag(scale) on every checkpoint; records the calls."""

    def __init__(self, scale: torch.Tensor):
        self.scale, self.calls = scale, []

    def precondition(self, ckpt, record, features, damping):
        self.calls.append((ckpt, record, damping))
        return features.grads[ckpt].double() * self.scale

    def quadratic_form(self, ckpt, record, damping):
        return lambda g: (g.double().square() * self.scale).sum(1)


def _store(grads: list[torch.Tensor], shard_rows: list[int], values: list[torch.Tensor] | None = None):
    """A MemoryStore holding, per checkpoint c, the rows grads[c] [n, 5] cut into shards of ``shard_rows``."""
    store = MemoryStore(grads[0].shape[1], "float64")
    records = []
    bounds = torch.tensor([0] + shard_rows).cumsum(0).tolist()
    for c, g in enumerate(grads):
        batches = [torch.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]  # the "batches": row ids
        v = values[c] if values is not None else torch.zeros(g.shape[0], dtype=torch.float64)
        with LazyWriter(store) as writer:
            records.append(cache_checkpoint(store, lambda rows, g=g, v=v: (g[rows], v[rows]), batches, c, writer,
                                            lambda record: None, progress=False))
    return store, records


def _scorer(method: str, store, weights=(1.0,), scale=None, normalize=False) -> Scorer:
    scale = torch.ones(5, dtype=torch.float64) if scale is None else scale
    return Scorer(method, store, OFFSETS, list(weights), torch.float64, torch.device("cpu"), Scaling(scale), normalize)


def _rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---- queries -------------------------------------------------------------------------------------------
def test_split_columns_cuts_the_blocks_side_by_side():
    x = torch.arange(10.0).reshape(2, 5)
    a, b = split_columns(x, OFFSETS)
    assert torch.equal(a, x[:, :2]) and torch.equal(b, x[:, 2:])


def test_query_norms_are_the_raw_queries_unless_given():
    q = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    features = QueryFeatures([q], "sig")
    assert features.n_test == 2
    torch.testing.assert_close(features.query_norms(0), torch.tensor([5.0, 1e-30], dtype=torch.float64))
    given_norms = QueryFeatures([q], "sig", norms=[torch.tensor([7.0, 1.0], dtype=torch.float64)])
    assert given_norms.query_norms(0).tolist() == [7.0, 1.0]


def test_check_features_refuses_other_objects_and_other_configurations():
    features = QueryFeatures([torch.zeros(1, 5)], "mine")
    assert check_features(features, "mine") is features
    with pytest.raises(TypeError, match="must come from Attributor.query_features, got Tensor"):
        check_features(torch.zeros(1, 5), "mine")
    with pytest.raises(ValueError, match="another configuration or model"):
        check_features(features, "other")


def test_prepared_queries_precondition_every_checkpoint_and_normalize_by_the_raw_norms():
    q = [_rows(3, 0), _rows(3, 1)]
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    scorer = _scorer("if", None, weights=(1.0, 1.0), scale=scale, normalize=True)
    records = ["record 0", "record 1"]
    out = scorer.prepared_queries(QueryFeatures(q, "sig"), 0.5, records)
    assert scorer.preconditioner.calls == [(0, "record 0", 0.5), (1, "record 1", 0.5)]
    for c in range(2):  # P^-1 (q / |q|): the norm is the raw query's, not the preconditioned one's
        torch.testing.assert_close(out[c], q[c] * scale / q[c].norm(dim=1, keepdim=True))


# ---- the methods' closed forms -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["if", "graddot", "tracin", "gradcos", "trak"])
def test_score_rows_equal_each_methods_closed_form(method):
    queries = [_rows(2, 0), _rows(2, 1)]
    grads = [_rows(4, 2), _rows(4, 3)]
    values = [torch.tensor([0.0, 1.0, -2.0, 5.0], dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0, -1.0], dtype=torch.float64)]
    weights = (0.5, 2.0)
    scores = _scorer(method, None, weights=weights).score_rows(queries, grads, values)
    # every method weighs its checkpoints (Checkpoints refuses non-unit weights for TRAK's ensemble before this)
    if method in ("if", "graddot", "tracin"):
        expected = 0.5 * queries[0] @ grads[0].T + 2.0 * queries[1] @ grads[1].T
    elif method == "gradcos":  # queries arrive normalized from prepared_queries; the rows are normalized here
        expected = sum(w * q @ (g / g.norm(dim=1, keepdim=True)).T for w, q, g in zip(weights, queries, grads))
    else:
        keep = ((1 - torch.sigmoid(values[0])) + (1 - torch.sigmoid(values[1]))) / 2
        expected = (0.5 * queries[0] @ grads[0].T + 2.0 * queries[1] @ grads[1].T) / 2 * keep
    torch.testing.assert_close(scores, expected)


def test_streamed_blocks_equal_the_dense_scores_whatever_the_shards_and_the_budget():
    g = _rows(11, 0)
    store, records = _store([g], [4, 1, 6])
    scorer = _scorer("graddot", store)
    queries = [_rows(3, 1)]
    for rows_per_block in (1, 3, 5, 11, 50):
        blocks = list(scorer.score_blocks(queries, records, rows_per_block))
        assert [start for start, _ in blocks] == list(range(0, 11, rows_per_block))
        assert all(block.shape[1] <= rows_per_block for _, block in blocks)
        torch.testing.assert_close(torch.cat([b for _, b in blocks], dim=1), queries[0] @ g.T)


@settings(deadline=None, max_examples=20)
@given(shards=st.lists(st.integers(1, 5), min_size=1, max_size=6), rows_per_block=st.integers(1, 7), world=st.integers(1, 4))
def test_the_ranks_shares_cover_every_row_once(shards, rows_per_block, world):
    n = sum(shards)
    g = _rows(n, 0)
    store, records = _store([g], shards)
    scorer = _scorer("graddot", store)
    seen = torch.zeros(n, dtype=torch.long)
    for rank in range(world):
        for start, block in scorer.score_blocks([torch.eye(5, dtype=torch.float64)], records, rows_per_block, (rank, world)):
            seen[start : start + block.shape[1]] += 1
            torch.testing.assert_close(block, g[start : start + block.shape[1]].T)
    assert seen.tolist() == [1] * n


def test_train_blocks_refuse_checkpoints_cached_from_other_batches():
    store, records = _store([_rows(4, 0)], [2, 2])
    other_store, other = _store([_rows(4, 0)], [1, 3])
    with pytest.raises(ValueError, match="checkpoint 1 was cached from different batches than checkpoint 0"):
        list(_scorer("graddot", store).train_blocks([records[0], other[0]], 8))


def test_trak_reads_the_stored_values():
    g, values = _rows(5, 0), torch.tensor([0.0, 1.0, 2.0, -1.0, 3.0], dtype=torch.float64)
    store, records = _store([g], [2, 3], [values])
    q = _rows(2, 1)
    (start, block), = _scorer("trak", store).score_blocks([q], records, 10)
    torch.testing.assert_close(block, q @ g.T * (1 - torch.sigmoid(values)))


# ---- self-influence ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, normalize", [("if", False), ("if", True), ("tracin", False), ("trak", False)])
def test_self_influence_is_the_diagonal_of_the_scores(method, normalize):
    grads = [_rows(6, 0), _rows(6, 1)]
    values = [torch.linspace(-1, 1, 6, dtype=torch.float64)] * 2
    store, records = _store(grads, [2, 4], values)
    scale = torch.tensor([1.0, 0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    scorer = _scorer(method, store, weights=(0.5, 2.0), scale=scale, normalize=normalize)
    features = QueryFeatures(grads, "sig")
    queries = scorer.prepared_queries(features, 0.1, records)
    diagonal = torch.diagonal(torch.cat([b for _, b in scorer.score_blocks(queries, records, 4)], dim=1))
    torch.testing.assert_close(scorer.self_influence(0.1, records, 4), diagonal)


def test_gradcos_self_influence_is_one_and_zero_for_a_zero_row_and_a_rank_fills_its_share():
    g = _rows(5, 0)
    g[2] = 0
    store, records = _store([g], [5])
    scorer = _scorer("gradcos", store)
    assert scorer.self_influence(0.0, records, 2).tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    first = scorer.self_influence(0.0, records, 2, part=(0, 2))  # blocks [0:2] [2:4] [4:5]: rank 0 takes the first
    assert first.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]


# ---- the running top-k ---------------------------------------------------------------------------------
def _reference(scores: torch.Tensor, k: int, largest: bool):
    """Best first, equal scores by the lower index."""
    out_v, out_i = [], []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda i: (-row[i] if largest else row[i], i))[:k]
        out_v.append([row[i] for i in order])
        out_i.append(order)
    return torch.tensor(out_v, dtype=scores.dtype), torch.tensor(out_i)


def test_top_k_takes_the_lower_index_among_ties_across_blocks():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0]])
    for split in ([6], [1, 5], [2, 2, 2], [5, 1], [1] * 6):
        best, start = TopK(3, True), 0
        for width in split:
            best.add(start, scores[:, start : start + width])
            start += width
        assert best.indices.tolist() == [[1, 2, 4]] and best.values.tolist() == [[3.0, 3.0, 3.0]]
    smallest = TopK(2, False)
    smallest.add(0, scores)
    assert smallest.indices.tolist() == [[0, 3]]


def test_top_k_with_more_k_than_rows_empty_blocks_and_explicit_indices():
    best = TopK(10, True)
    best.add(0, torch.zeros(2, 0))
    assert best.values is None
    best.add(5, torch.tensor([[1.0, 2.0], [2.0, 2.0]]))
    assert best.indices.tolist() == [[6, 5], [5, 6]]
    best.add(0, torch.tensor([[2.0], [2.0]]), torch.tensor([[9], [1]]))  # a merged rank's result
    assert best.indices.tolist() == [[6, 9, 5], [1, 5, 6]] and best.values.shape == (2, 3)


@settings(deadline=None, max_examples=25)
@given(data=st.data(), n=st.integers(1, 12), k=st.integers(1, 8), largest=st.booleans())
def test_top_k_of_any_block_split_equals_a_full_sort(data, n, k, largest):
    values = data.draw(st.lists(st.lists(st.integers(-2, 2), min_size=n, max_size=n), min_size=1, max_size=3))
    scores = torch.tensor(values, dtype=torch.float64)  # few distinct values: many ties
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1)) if n > 1 else [])
    best = TopK(k, largest)
    for lo, hi in zip([0] + cuts, cuts + [n]):
        best.add(lo, scores[:, lo:hi])
    expected_values, expected_indices = _reference(scores, k, largest)
    assert torch.equal(best.values, expected_values) and torch.equal(best.indices, expected_indices)
