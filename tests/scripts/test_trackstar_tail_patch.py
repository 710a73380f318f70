"""scripts/trackstar_tail_patch.py: Bergson's inputs are the demo's own tokens (no chat template): every document
token a target, a question's answer tokens its only targets; a missing Bergson is named."""
import json

import pytest
from script_loader import load_script

pytest.importorskip("transformers", reason="the `llm` extra is not installed")


def test_bergsons_inputs_are_the_demos_tokens_with_the_answer_as_the_only_target(tiny_llama, tmp_path):
    from attribution import llm
    from attribution.llm.demo_run import DemoRun
    from attribution.llm.tokens import document_tokens, query_tokens

    script = load_script("trackstar_tail_patch")
    _, tok = llm.load_model(tiny_llama)
    demo = tmp_path / "demo"
    demo.mkdir()
    corpus = [{"id": "a", "text": "the data privacy statement"}, {"id": "b", "text": "a for loop list python data"}]
    queries = [{"id": "q", "prompt": "the data", "completion": " privacy statement", "target": "a"}]
    run = DemoRun(demo, {"meta": {}, "queries": queries, "methods": []}, corpus)
    got_corpus, got_queries = script.pretokenized(run, tmp_path / "work", tok, 3)  # documents cut at 3 tokens
    assert got_corpus == corpus and got_queries == queries
    rows = [json.loads(line) for line in (tmp_path / "work" / "corpus.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    for row, (ids, _) in zip(rows, document_tokens(tok, corpus, 3)):
        assert row["input_ids"] == ids and len(ids) <= 3 and row["labels"] == ids  # every token a target
    (query,) = [json.loads(line) for line in (tmp_path / "work" / "queries.jsonl").read_text().splitlines()]
    ids, targets = query_tokens(tok, queries[0], 3)
    assert query["input_ids"] == ids and 0 < sum(targets) < len(ids)
    assert query["labels"] == [t if m else -100 for t, m in zip(ids, targets)]
    assert tok.decode([t for t in query["labels"] if t != -100]).strip() == "privacy statement"


def test_a_missing_bergson_is_named(tmp_path, monkeypatch):
    script = load_script("trackstar_tail_patch")
    monkeypatch.setattr(script, "VENV", tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="Bergson is not installed at .*nowhere.*bergson-venv.sh"):
        script.main(["--demo", str(tmp_path)])


def test_a_run_is_reused_only_for_the_same_inputs(tmp_path, monkeypatch):
    """Bergson's scores are reused for the same pre-tokenized corpus, questions and optimizer state; other questions
    (the demo rerun with another --answer) or a failed run start it anew."""
    script = load_script("trackstar_tail_patch")
    demo, work = tmp_path / "demo", tmp_path / "work"
    demo.mkdir()
    work.mkdir()
    (demo / "optimizer.pt").write_bytes(b"state")
    (work / "corpus.jsonl").write_text("corpus\n")
    (work / "queries.jsonl").write_text("the true answers\n")
    runs = []

    def bergson(cmd, status=0):
        runs.append(cmd)
        (work / "run" / "scores").mkdir(parents=True, exist_ok=True)
        (work / "run" / "scores" / "scores.bin").write_bytes(b"scores")
        return {"status": status, "seconds": 1.0, "peak_rss_bytes": 2**20, "stderr_tail": "failed"}

    monkeypatch.setattr(script, "run_measured", bergson)
    assert script.run_trackstar(demo, work, rerun=False)["seconds"] == 1.0 and len(runs) == 1
    assert script.run_trackstar(demo, work, rerun=False) == {"reused": True} and len(runs) == 1
    (work / "queries.jsonl").write_text("the model's answers\n")
    assert "seconds" in script.run_trackstar(demo, work, rerun=False) and len(runs) == 2
    assert script.run_trackstar(demo, work, rerun=True)["seconds"] == 1.0 and len(runs) == 3
    monkeypatch.setattr(script, "run_measured", lambda cmd: bergson(cmd, status=1))
    (work / "queries.jsonl").write_text("other questions\n")
    with pytest.raises(RuntimeError, match="bergson trackstar failed: failed"):
        script.run_trackstar(demo, work, rerun=False)
    monkeypatch.setattr(script, "run_measured", bergson)  # scores.bin of the failed run is not taken for these inputs
    assert "seconds" in script.run_trackstar(demo, work, rerun=False) and len(runs) == 5
