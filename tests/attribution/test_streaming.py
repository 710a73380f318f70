"""The attribute stage in bounded memory: coalesced row blocks, the running top-k, attribute(out=PATH),
streamed select and self-influence, and precomputed gradients cached through the store."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from attribution_problems import Interrupt, interrupting, loss_fn, make_problem, store_files
from hypothesis import given
from hypothesis import strategies as st

from attribution import Attributor, IncompleteStoreError
from attribution.scoring import Scorer, TopK
from attribution.streaming import plan_blocks, rank_rows, share

FAST = dict(compressor="factgrass", k=16, seed=5, compile=False, progress=False)
HERE = os.path.dirname(__file__)


@given(st.lists(st.integers(1, 9), min_size=1, max_size=12), st.integers(1, 20), st.integers(1, 5))
def test_blocks_cover_every_row_once_in_order_and_ranks_split_them(shard_rows, per_block, world):
    blocks = plan_blocks(shard_rows, per_block)
    rows = [(j, r) for b in blocks for j, lo, hi in b.pieces for r in range(lo, hi)]
    assert rows == [(j, r) for j, n in enumerate(shard_rows) for r in range(n)]
    assert all(b.rows == per_block for b in blocks[:-1]) and 0 < blocks[-1].rows <= per_block
    assert [b.start for b in blocks] == [sum(b.rows for b in blocks[:i]) for i in range(len(blocks))]
    parts = [share(len(blocks), r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(len(blocks)))
    bounds = [rank_rows(blocks, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == sum(shard_rows)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 12), st.booleans(), st.integers(1, 7), st.data())
def test_running_top_k_is_the_stable_sort_whatever_the_blocks(n_test, n_train, k, largest, cut, data):
    # few distinct values: many ties, which must go to the lower index
    scores = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=n_test * n_train, max_size=n_test * n_train)),
                          dtype=torch.float32).reshape(n_test, n_train)
    expected = torch.sort(scores, dim=1, descending=largest, stable=True)
    best = TopK(k, largest)
    for start in range(0, n_train, cut):
        best.add(start, scores[:, start : start + cut])
    assert torch.equal(best.indices, expected.indices[:, :k]) and torch.equal(best.values, expected.values[:, :k])
    merged = TopK(k, largest)  # merging per-"rank" results through explicit indices gives the same
    for start in range(0, n_train, cut):
        part = TopK(k, largest)
        part.add(start, scores[:, start : start + cut])
        merged.add(0, part.values, part.indices)
    assert torch.equal(merged.indices, best.indices) and torch.equal(merged.values, best.values)


def _record_blocks(monkeypatch):
    seen = []
    real = Scorer.score_blocks

    def spy(self, *args, **kwargs):
        for start, block in real(self, *args, **kwargs):
            seen.append(tuple(block.shape))
            yield start, block

    monkeypatch.setattr(Scorer, "score_blocks", spy)
    return seen


def test_top_k_select_and_self_influence_never_form_the_score_matrix(tmp_path, monkeypatch):
    model, train, test = make_problem(torch.float32, n_train=45, batch=4)  # 12 shards, the last of 1 row
    attr = Attributor(model, loss_fn, method="gradcos", store=tmp_path, memory_budget=8000, **FAST).cache(train)
    scores = attr.attribute(test)
    seen = _record_blocks(monkeypatch)
    values, indices = attr.top_k(test, k=4)
    budget = attr._row_budget(6)
    assert len(seen) > 1 and all(n == 6 and r <= budget for n, r in seen)  # several blocks of at most the budget
    expected = torch.sort(scores, dim=1, descending=True, stable=True)
    assert torch.equal(indices, expected.indices[:, :4]) and torch.equal(values, expected.values[:, :4])
    seen.clear()
    mean, keep = attr.select(test, n=7)
    assert len(seen) > 1 and all(r <= budget for _, r in seen)
    reference = scores.mean(0)
    assert torch.equal(keep, torch.sort(reference, descending=True, stable=True).indices[:7])
    torch.testing.assert_close(mean, reference[keep], rtol=1e-6, atol=1e-7)
    assert attr.select(test, n=10**6)[1].shape == (45,)
    torch.testing.assert_close(attr.self_influence(), torch.ones(45), rtol=1e-5, atol=1e-5)  # cos(g, g) = 1


def test_blocks_coalesce_small_shards(tmp_path):
    model, train, test = make_problem(torch.float32, n_train=45, batch=1)  # 45 one-row shards
    attr = Attributor(model, loss_fn, method="graddot", store=tmp_path, memory_budget=1 << 20, **FAST).cache(train)
    records = attr._records()
    blocks = attr.scorer.plan(records, attr._row_budget(6))
    assert len(blocks) == 1 and len(blocks[0].pieces) == 45  # one GEMM, not 45 matrix-vector products
    one = Attributor(model, loss_fn, method="graddot", store=tmp_path / "one", memory_budget=1 << 20, **FAST)
    one.cache([(torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train]))])
    torch.testing.assert_close(attr.attribute(test), one.attribute(test), rtol=1e-6, atol=1e-6)


def test_attribute_out_writes_an_npy_that_a_fresh_process_reads(tmp_path):
    model, train, test = make_problem(torch.float32, n_train=45, batch=8)
    attr = Attributor(model, loss_fn, store=tmp_path / "store", memory_budget=4000, **FAST).cache(train)
    expected = attr.attribute(test)
    out = tmp_path / "scores" / "matrix.npy"
    got = attr.attribute(test, out=out)
    assert torch.equal(got, expected) and got.dtype == torch.float32
    got[0, 0] = 123.0  # a copy-on-write map: the file keeps the scores
    script = f"import numpy as np; a = np.load({str(out)!r}, allow_pickle=False); print(a.shape, a.dtype)"
    printed = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert printed.strip() == "(6, 45) float32"
    assert torch.equal(torch.from_numpy(np.load(out)), expected)
    assert sorted(os.listdir(out.parent)) == ["matrix.npy"]


def test_an_interrupted_attribute_out_leaves_no_partial_matrix_and_a_rerun_completes(tmp_path, monkeypatch):
    model, train, test = make_problem(torch.float32, n_train=45, batch=8)
    attr = Attributor(model, loss_fn, store=tmp_path / "store", memory_budget=4000, **FAST).cache(train)
    out = tmp_path / "matrix.npy"
    real = Scorer.score_blocks

    def interrupted(self, *args, **kwargs):
        yield from interrupting(real(self, *args, **kwargs), after=2)

    monkeypatch.setattr(Scorer, "score_blocks", interrupted)
    with pytest.raises(Interrupt):
        attr.attribute(test, out=out)
    assert os.listdir(tmp_path) == ["store"]  # neither the matrix nor its temporary
    monkeypatch.undo()
    assert torch.equal(attr.attribute(test, out=out), attr.attribute(test))


def test_attribute_out_follows_a_store_that_grows_and_refuses_an_incomplete_one(tmp_path):
    model, train, test = make_problem(torch.float32, n_train=45, batch=8)
    attr = Attributor(model, loss_fn, store=tmp_path / "store", memory_budget=4000, **FAST)
    with pytest.raises(Interrupt):
        attr.cache(interrupting(train, after=3))
    with pytest.raises(IncompleteStoreError):
        attr.attribute(test, out=tmp_path / "m.npy")
    assert not (tmp_path / "m.npy").exists()
    attr.cache(train[:4])
    assert attr.attribute(test, out=tmp_path / "m.npy").shape == (6, 32)
    attr.cache(train)
    assert torch.equal(attr.attribute(test, out=tmp_path / "m.npy"), attr.attribute(test))


@pytest.mark.parametrize("rows", [1, 7])
def test_smallest_and_odd_query_batches(tmp_path, rows):
    model, train, test = make_problem(torch.float32, n_train=45, batch=8)
    x, y = test[0]
    queries = [(torch.cat([x, x])[:rows], torch.cat([y, y])[:rows])]
    attr = Attributor(model, loss_fn, store=tmp_path / "store", memory_budget=3000, **FAST).cache(train)
    scores = attr.attribute(queries)
    values, indices = attr.top_k(queries, k=3, largest=False)
    assert scores.shape == (rows, 45) and torch.equal(indices, torch.sort(scores, dim=1, stable=True).indices[:, :3])
    assert torch.equal(attr.attribute(queries, out=tmp_path / "m.npy"), scores)


def test_many_attributors_stream_one_store_in_one_process(tmp_path):
    model, train, test = make_problem(torch.float32, n_train=45, batch=8)
    first = Attributor(model, loss_fn, store=tmp_path, memory_budget=4000, **FAST).cache(train)
    expected = first.top_k(test, k=5)
    others = [Attributor(model, loss_fn, store=tmp_path, memory_budget=budget, **FAST) for budget in (600, 2000, 1 << 20)]
    for attr in others:
        values, indices = attr.top_k(test, k=5)
        assert torch.equal(indices, expected[1])
        torch.testing.assert_close(values, expected[0], rtol=1e-5, atol=1e-6)


def _synthetic(seed, n, columns=64, batch=7):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, columns, generator=gen)
    return [rows[i : i + batch] for i in range(0, n, batch)]


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 8, bias=False)  # identity compressor: 64 columns


def _linear_loss(model, batch):
    return model(batch).square().sum(1)


def test_precomputed_gradients_resume_grow_and_match_a_model_free_reference(tmp_path):
    batches = _synthetic(0, 40)
    kw = dict(compressor="identity", k=64, compile=False, progress=False, storage_dtype="bfloat16")
    with pytest.raises(Interrupt):
        Attributor(_linear(), _linear_loss, store=tmp_path / "a", **kw).cache_gradients(interrupting(batches, after=3))
    resumed = Attributor(_linear(), _linear_loss, store=tmp_path / "a", **kw).cache_gradients(batches[:4])
    resumed.cache_gradients(batches)  # grows: the FIM follows
    Attributor(_linear(), _linear_loss, store=tmp_path / "b", **kw).cache_gradients(batches)
    assert store_files(tmp_path / "a") == store_files(tmp_path / "b")
    rows = torch.cat(batches).bfloat16().double()
    fim = rows.T @ rows / rows.shape[0]
    queries = torch.randn(3, 64)
    features = resumed.features_from_gradients(queries)  # precomputed query gradients too
    expected = queries.double() @ torch.linalg.solve(fim + 1e-3 * torch.eye(64, dtype=torch.float64), rows.T)
    torch.testing.assert_close(resumed.attribute(features=features).double(), expected, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match=r"float tensor \[rows, 64\]"):
        Attributor(_linear(), _linear_loss, store=tmp_path / "c", **kw).cache_gradients([torch.zeros(2, 63)])
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {HERE!r})
        from test_streaming import _linear, _linear_loss
        from attribution import Attributor
        attr = Attributor(_linear(), _linear_loss, store={str(tmp_path / 'b')!r}, compressor="identity", k=64,
                          compile=False, progress=False, storage_dtype="bfloat16")
        print(attr.n_train, attr.self_influence().shape[0])
    """)
    printed = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert printed.split() == ["40", "40"]
