"""scripts/tail_patch_headroom.py on a tiny demo folder: the oracle's first document is the candidate whose own
step raises the attributed answer most, so on every question it is at least every row's first document; it steps
in the precision and token cut that facts.json records; the candidates merge the rows' top documents; bad arguments
and a folder without the rows' tail-patch are refused by name, before any step."""
import json

import pytest
from demo_folder import tiny_demo_folder
from script_loader import load_script

pytest.importorskip("transformers", reason="the `llm` extra is not installed")


def test_candidates_merge_the_rows_top_documents_rank_by_rank():
    script = load_script("tail_patch_headroom")
    rows = [{"ranking": [["a", "b", "c"]]}, {"ranking": [["b", "d", "a"]]}]
    assert script.candidates(rows, 0, 2, ["a", "b", "c", "d", "e"]) == ["a", "b", "d"]
    assert script.candidates(rows, 0, None, ["a", "b", "c", "d", "e"]) == ["a", "b", "c", "d", "e"]
    assert script.above_by_errors({"m": 1.0, "m_se": 0.2}, {"m": 0.5, "m_se": 0.2}, "m")
    assert not script.above_by_errors({"m": 1.0, "m_se": 0.3}, {"m": 0.5, "m_se": 0.3}, "m")
    assert not script.above_by_errors({"m": 0.5, "m_se": 0.0}, {"m": 1.0, "m_se": 0.0}, "m")  # one way: above


@pytest.fixture
def demo_folder(tiny_llama, tmp_path):
    """A demo folder as `demo --tail-patch main` leaves it, on 13 documents (odd-sized): the model, its optimizer
    state, the corpus, and facts.json with two rows' top-10 rankings, their tail-patch and the references'."""
    from attribution.llm import demo

    folder, model, tok, corpus, queries = tiny_demo_folder(tiny_llama, tmp_path)
    ids = [d["id"] for d in corpus]
    rows = [{"method": "default", "row": "default", "ranking": [ids[::-1][:10]] * 3},  # the demo keeps a top 10
            {"method": "BM25", "row": "bm25", "scoring": "bm25", "ranking": [(ids[1:] + ids[:1])[:10]] * 3}]
    held = demo.load_optimizer(folder, model, first_moment=False)
    references = demo.tail_patch_rows(model, held, tok, corpus, queries, rows, seed=0, max_length=128,
                                      autocast=demo.finetune_autocast(), progress=False)
    meta = {"answer": "true", "finetune_autocast": demo.precision_name(demo.finetune_autocast()), "max_length": 128}
    record = {"meta": meta, "queries": queries, "methods": [*rows, *references]}
    (folder / "facts.json").write_text(json.dumps(record))
    return folder, record, rows


def test_the_oracle_bounds_every_rows_first_document(demo_folder, tmp_path):
    folder, _, rows = demo_folder
    script = load_script("tail_patch_headroom")
    args = ["--demo", str(folder), "--rows", "default, bm25"]  # names may be spaced
    out = script.main([*args, "--pool", "6", "--questions", "2", "--json", str(tmp_path / "h.json")])
    assert json.loads((tmp_path / "h.json").read_text()) == out  # a fresh reader gets the printed figures
    assert (out["answer"], out["questions"], out["pool"], out["rows_pooled"]) == ("true", 2, 6, ["default", "bm25"])
    assert out["candidates_per_question"] == [12, 12]  # two disjoint top-6 lists
    oracle = out["oracle_per_query"]
    for i, single in enumerate(out["single_document_tail_patch"]):
        assert oracle["1"][i] == pytest.approx(max(single.values()), abs=1e-5)  # the same step, measured twice
        for row in rows:  # every row's first document is a candidate: the oracle's first is at least as good
            assert oracle["1"][i] >= row["tail_patch_true_per_query"]["1"][i] - 1e-5
    by_row = {r["row"]: r for r in out["rows"]}
    assert set(by_row) == {"oracle", "default", "bm25", "random", "source"}  # the references listed beside them
    assert "tail_patch@5_true" not in by_row["source"] and "above_bm25_by_errors@5" not in by_row["source"]
    assert "above_bm25_by_errors@5" not in by_row["bm25"] and "above_bm25_by_errors@5" in by_row["default"]
    bm25_first_two = rows[1]["tail_patch_true_per_query"]["5"][:2]
    assert by_row["bm25"]["tail_patch@5_true"] == pytest.approx(sum(bm25_first_two) / 2)  # cut to the 2 questions
    assert by_row["oracle"]["tail_patch@5_true_minus_bm25"] == pytest.approx(
        sum(o - b for o, b in zip(oracle["5"], bm25_first_two)) / 2)


def test_every_document_a_candidate_in_the_recorded_precision_and_cut(demo_folder, monkeypatch):
    from attribution.evaluation import facts

    folder, record, _ = demo_folder
    record["meta"].update(finetune_autocast="none", max_length=48)  # as a run on a CPU without fast bfloat16 records
    (folder / "facts.json").write_text(json.dumps(record))
    seen, real = [], facts.tail_patch_rankings

    def spy(*args, **kwargs):
        seen.append((kwargs["autocast"], kwargs["max_length"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(facts, "tail_patch_rankings", spy)
    out = load_script("tail_patch_headroom").main(["--demo", str(folder), "--rows", "default", "--pool", "all",
                                                   "--questions", "2"])
    assert out["candidates_per_question"] == [13, 13] and out["pool"] == "all"
    assert seen and set(seen) == {(None, 48)} and (out["finetune_autocast"], out["max_length"]) == ("none", 48)


def test_bad_arguments_are_named_before_any_step(demo_folder, capsys):
    folder, record, rows = demo_folder
    script = load_script("tail_patch_headroom")
    args = ["--demo", str(folder), "--rows", "default,bm25"]
    for bad, message in ((["--pool", "0"], "--pool must be a positive number of documents or 'all', got '0'"),
                         (["--pool", "ten"], "--pool must be a positive number of documents or 'all', got 'ten'"),
                         (["--pool", "11"], "--pool must be at most 10 (facts.json keeps each row's top 10)"),
                         (["--questions", "1"], "--questions must be at least 2")):
        with pytest.raises(SystemExit):
            script.main([*args, *bad])
        assert message in capsys.readouterr().err
    record["methods"][0]["ranking"] = [record["methods"][1]["ranking"][0]] * 3  # the same top 10 as BM25's
    (folder / "facts.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match=r"questions \['fact/.*'\] have fewer than k = 10 candidates: raise --pool"):
        script.main([*args, "--pool", "5"])
    with pytest.raises(SystemExit, match=r"have fewer than k = 10 candidates"):  # by default: the main rows it has
        script.main(["--demo", str(folder), "--pool", "5"])  # (no two-stage nor influence row here), not a refusal
    with pytest.raises(SystemExit, match="has no tail-patched row 'two-stage' with its ranking"):
        script.main(["--demo", str(folder), "--rows", "default,two-stage"])  # a row named is required
    record["methods"] = rows[:1]
    (folder / "facts.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="has no tail-patched row 'bm25' with its ranking"):
        script.main(["--demo", str(folder), "--rows", "default"])
