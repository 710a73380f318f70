"""scripts/trackstar_tail_patch.py: Bergson's inputs are the demo's own tokens (no chat template): every document
token a target, a question's answer tokens its only targets; a missing Bergson is named."""
import json

import pytest
from script_loader import load_script

pytest.importorskip("transformers", reason="the `llm` extra is not installed")


def test_bergsons_inputs_are_the_demos_tokens_with_the_answer_as_the_only_target(tiny_llama, tmp_path):
    from attribution import llm
    from attribution.llm.tokens import document_tokens, query_tokens

    script = load_script("trackstar_tail_patch")
    _, tok = llm.load_model(tiny_llama)
    demo = tmp_path / "demo"
    demo.mkdir()
    corpus = [{"id": "a", "text": "the data privacy statement"}, {"id": "b", "text": "a for loop list python data"}]
    queries = [{"id": "q", "prompt": "the data", "completion": " privacy statement", "target": "a"}]
    (demo / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (demo / "facts.json").write_text(json.dumps({"queries": queries, "methods": []}))
    got_corpus, got_queries = script.pretokenized(demo, tmp_path / "work", tok, 3)  # documents cut at 3 tokens
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
