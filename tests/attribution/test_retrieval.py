"""Two-stage retrieval (attribution.retrieval): a candidate set re-ranked exactly is the exhaustive scores
restricted to it (values and order), with repeated candidates, fewer candidates than k, every method's scoring,
the rows checked against the index's CRC32s; the ANN index's candidates alone; bad candidate lists named."""
import numpy as np
import pytest
import torch
from attribution_problems import loss_fn, make_problem
from cli_usage import attribute_usage_error  # noqa: E402

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


# ---- the CLI: grass-attribute attribute --candidates bm25,index --candidates-k N --------------------------------
DOCS = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
        "python list data", "the function creates a list"]


@pytest.fixture
def cli_store(tiny_llama, tmp_path):
    pytest.importorskip("transformers", reason="the `llm` extra is not installed")
    import json

    from attribution.llm import cli

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(DOCS)))
    store = tmp_path / "store"
    cli.run(["cache", "--store", str(store), "--model", tiny_llama, "--corpus", str(corpus), "--k", "16", "--batch-size",
             "2", "--max-length", "8", "--layers", "model.layers.*", "--no-compile"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(q) for q in [{"id": "q0", "prompt": "a for", "completion": " loop list"},
                                                         {"id": "q1", "prompt": "the data", "completion": " privacy"}]))
    return store, prompts


def _attribute(store, prompts, out, *flags, capsys=None):
    import json

    from attribution.llm import cli

    results = cli.run(["attribute", "--store", str(store), "--prompts", str(prompts), "--top-k", "2", "--out", str(out),
                       *flags])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1]) if capsys is not None else None
    return results, json.loads((out / "report.json").read_text()), printed


def _lists(results):
    return [([(d["id"], s) for d, s in r.helpful], [(d["id"], s) for d, s in r.harmful]) for r in results]


def _same_top(got, want):
    """The same top documents in the same order, scores equal up to float32 summation order (another GEMM shape)."""
    for g, w in zip(got, want, strict=True):
        assert [d["id"] for d, _ in g.helpful] == [d["id"] for d, _ in w.helpful]
        assert [s for _, s in g.helpful] == pytest.approx([s for _, s in w.helpful], rel=1e-4)


def test_two_stage_flags_rerank_bm25_and_index_candidates(cli_store, tmp_path, capsys):
    import json

    from attribution.evaluation import facts
    from attribution.llm import cli

    store, prompts = cli_store
    plain, plain_report, plain_printed = _attribute(store, prompts, tmp_path / "plain", capsys=capsys)
    assert "two_stage" not in plain_report["meta"] and set(plain_printed) == {"reports", "method", "preconditioner", "queries"}
    assert all(set(q) == {"prompt", "completion", "top"} for q in plain_printed["queries"])
    assert all("candidates" not in q["query"] for q in plain_report["queries"])
    again, again_report, again_printed = _attribute(store, prompts, tmp_path / "again", capsys=capsys)
    assert _lists(again) == _lists(plain) and again_report == plain_report  # the same flags: the same output
    assert (tmp_path / "again" / "report.md").read_text() == (tmp_path / "plain" / "report.md").read_text()

    # every document a candidate: the exhaustive ranking, marked two-stage
    whole, report, printed = _attribute(store, prompts, tmp_path / "whole", "--candidates", "bm25", "--candidates-k", "6",
                                        capsys=capsys)
    _same_top(whole, plain)
    assert report["meta"]["two_stage"] == {"sources": ["bm25"], "candidates_k": 6, "candidates": [6, 6]}
    assert printed["two_stage"]["sources"] == ["bm25"] and [q["candidates"] for q in printed["queries"]] == [6, 6]
    assert "two-stage: the top 6 documents of bm25 per query (6 distinct candidates)" in (tmp_path / "whole" / "report.md").read_text()

    # bm25 alone, from 2 candidates: its top 2 documents, ordered by the exact score
    few, report, _ = _attribute(store, prompts, tmp_path / "few", "--candidates", "bm25", "--candidates-k", "2", capsys=capsys)
    texts = [f"{q['prompt']} {q['completion']}" for q in map(json.loads, prompts.read_text().splitlines())]
    lexical = facts.bm25_scores(texts, DOCS)
    for i, result in enumerate(few):
        chosen = {f"d{j}" for j in torch.argsort(-lexical[i], stable=True)[:2].tolist()}
        assert {d["id"] for d, _ in result.helpful} == chosen and not result.harmful
        scores = [s for _, s in result.helpful]
        assert scores == sorted(scores, reverse=True)
    assert report["meta"]["two_stage"]["candidates"] == [2, 2]

    # the index alone, and both: built first (a flat index over 6 rows: the exact top 6)
    assert cli.main(["attribute", "--store", str(store), "--prompts", str(prompts), "--candidates", "index", "--out",
                     str(tmp_path / "x")]) == 2
    assert "--candidates index needs the store's ANN index" in capsys.readouterr().err.splitlines()[-1]
    pytest.importorskip("faiss", reason="the `faiss` extra (faiss-cpu) is not installed")
    cli.run(["index", "--store", str(store), "--factory", "Flat", "--project", "0"])
    capsys.readouterr()
    indexed, report, _ = _attribute(store, prompts, tmp_path / "indexed", "--candidates", "index", "--candidates-k", "6",
                                    capsys=capsys)
    _same_top(indexed, plain)
    assert report["meta"]["two_stage"] == {"sources": ["index"], "candidates_k": 6, "candidates": [6, 6]}
    both, report, printed = _attribute(store, prompts, tmp_path / "both", "--candidates", "bm25,index", "--candidates-k",
                                       "1", capsys=capsys)
    for result, n in zip(both, report["meta"]["two_stage"]["candidates"]):
        assert 1 <= n <= 2 and len(result.helpful) == n
    assert report["meta"]["two_stage"]["sources"] == ["bm25", "index"]
    best = [h[0][0] for h, _ in _lists(plain)]  # the index's first candidate is the exact best: it stays first
    assert [r.helpful[0][0]["id"] for r in both] == best


@pytest.mark.parametrize("flags, message", [
    (["--candidates", "bogus"], "argument --candidates: must be a positive int (with --index) or candidate sources"),
    (["--candidates", "bm25,bm25"], "argument --candidates: must be"),
    (["--candidates", "0"], "argument --candidates: must be a positive int"),
    (["--candidates", "bm25", "--candidates-k", "0"], "argument --candidates-k: must be a positive int"),
    (["--candidates", "bm25", "--candidates-k", "x"], "argument --candidates-k: must be a positive int"),
    (["--candidates-k", "5"], "--candidates-k counts the candidates of --candidates bm25, index or bm25,index"),
    (["--candidates", "bm25", "--index"], "--candidates bm25 re-ranks its own candidates: drop --index"),
])
def test_bad_two_stage_values_exit_2_naming_the_flag(cli_store, tmp_path, capsys, flags, message):
    store, prompts = cli_store
    last = attribute_usage_error(store, prompts, tmp_path / "r", flags, capsys)
    assert message in last, last
