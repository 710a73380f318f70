"""Two-stage retrieval (attribution.retrieval): a candidate set re-ranked exactly is the exhaustive scores
restricted to it (values and order), with repeated candidates, fewer candidates than k, every method's scoring,
the rows checked against the index's CRC32s; the ANN index's candidates alone; bad candidate lists named."""
import numpy as np
import pytest
import torch
from attribution_problems import loss_fn, make_problem

from attribution import Attributor, CorruptStoreError, retrieval

FAST = dict(compressor="factgrass", k=16, seed=3, compile=False, progress=False, memory_budget=6000)


def _expected(scores: torch.Tensor, candidates, k: int, largest: bool):
    """The exhaustive matrix restricted to each query's distinct candidates: top k, ties to the lower index."""
    values, indices = [], []
    for i, ids in enumerate(candidates):
        ids = sorted(set(int(j) for j in ids))
        s = scores[i, ids]
        order = sorted(range(len(ids)), key=lambda j: ((-s[j] if largest else s[j]).item(), ids[j]))[:k]
        values.append([s[j].item() for j in order])
        indices.append([ids[j] for j in order])
    return values, indices


@pytest.mark.parametrize("method, dtype", [("if", torch.float64), ("gradcos", torch.float64), ("graddot", torch.float32)])
def test_reranked_candidates_are_the_exact_scores_restricted_to_them(tmp_path, method, dtype):
    model, train, test = make_problem(dtype, n_train=60, batch=7)
    attr = Attributor(model, loss_fn, method=method, store=tmp_path, dtype=dtype, **FAST).cache(train)
    features = attr.query_features(test)
    scores = attr.attribute(features=features)
    n_test = scores.shape[0]
    rng = np.random.default_rng(0)
    candidates = [list(rng.choice(60, size=12, replace=False)) + [5, 5] for _ in range(n_test)]  # 5 given 3 times at most
    candidates[0] = [7, 3, 7]  # two distinct candidates, fewer than k
    for largest in (True, False):
        values, indices = retrieval.rerank_candidates(attr, candidates, k=4, features=features, largest=largest)
        assert values.shape == indices.shape == (n_test, 4) and values.dtype == dtype
        want_values, want = _expected(scores, candidates, 4, largest)
        assert indices[0].tolist() == want[0] + [-1, -1]
        assert values[0, 2:].tolist() == [-float("inf") if largest else float("inf")] * 2
        for i in range(n_test):
            assert indices[i, : len(want[i])].tolist() == want[i]
            torch.testing.assert_close(values[i, : len(want[i])], torch.tensor(want_values[i], dtype=dtype),
                                       rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-12 if dtype == torch.float64 else 1e-5)
    # every row a candidate: the exhaustive top-k itself
    every = retrieval.rerank_candidates(attr, [list(range(60))] * n_test, k=5, features=features)
    exact = attr.top_k(k=5, features=features)
    assert torch.equal(every[1], exact[1])
    torch.testing.assert_close(every[0], exact[0])
    padded = torch.tensor([[7, 3, 7] + [-1] * 11, *candidates[1:]])  # an array, -1 for none (the ANN index's form)
    as_array = retrieval.rerank_candidates(attr, padded, k=4, features=features)
    assert torch.equal(as_array[1], retrieval.rerank_candidates(attr, candidates, k=4, features=features)[1])


def test_bad_candidate_lists_are_named(tmp_path):
    model, train, test = make_problem(torch.float32, n_train=30, batch=7)
    attr = Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)
    features = attr.query_features(test)
    n_test = features.n_test
    for candidates, message in (([[1]] * (n_test + 1), f"candidates holds {n_test + 1} lists for {n_test} queries"),
                                ([[30]] * n_test, r"candidates\[0\] holds rows outside \[0, 30\): \[30\]"),
                                ([[-2]] * n_test, r"holds rows outside"),
                                ([[1.5]] * n_test, r"candidates\[0\] must hold training row indices")):
        with pytest.raises(ValueError, match=message):
            retrieval.rerank_candidates(attr, candidates, features=features)
    with pytest.raises(ValueError, match="k must be"):
        retrieval.rerank_candidates(attr, [[1]] * n_test, k=0, features=features)
    empty = retrieval.rerank_candidates(attr, [[]] * n_test, k=2, features=features)  # no candidate: nothing ranked
    assert (empty[1] == -1).all()


def test_index_candidates_and_the_rows_checked_against_the_index(tmp_path):
    pytest.importorskip("faiss", reason="the `faiss` extra (faiss-cpu) is not installed")
    model, train, test = make_problem(torch.float32, n_train=60, batch=7)
    attr = Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)
    features = attr.query_features(test)
    attr.build_index("Flat", project=None)
    found = retrieval.index_candidates(attr, 10, features=features)
    assert found.shape == (features.n_test, 10)
    exact = attr.top_k(k=10, features=features)[1]
    assert [sorted(r) for r in found.tolist()] == [sorted(r) for r in exact.tolist()]  # a flat index: the exact top 10
    assert retrieval.index_candidates(attr, 500, features=features).shape[1] == 60
    # a row altered after the index was built is caught on the re-rank's read
    shard = tmp_path / "ckpt_000" / "shards" / f"{0:08d}" / "grads.npy"
    data = bytearray(shard.read_bytes())
    data[-4] ^= 0x40  # the shard's last row (row 6)
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=r"shard 0 .*rows \[6\] differ from the ones the ANN index was built from"):
        retrieval.rerank_candidates(attr, [list(range(60))] * features.n_test, k=3, features=features)
