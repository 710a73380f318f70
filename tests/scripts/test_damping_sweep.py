"""scripts/damping_sweep.py: every (preconditioner, damping, document normalization) setting is scored on the demo's
questions; with a damping that swamps the curvature, the whitened documents rank as the unit-normalized ones do."""
import json
import shutil

import pytest
from script_loader import load_script

pytest.importorskip("transformers", reason="the `llm` extra is not installed")


def test_the_sweep_scores_every_setting_and_whitening_meets_unit_norms_at_a_large_damping(tiny_llama, tmp_path):
    from attribution.llm import cli

    demo = tmp_path / "demo"
    shutil.copytree(tiny_llama, demo / "model")
    texts = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
             "python list data", "the list creates data"]
    corpus = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]
    (demo / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    queries = [{"id": "q0", "prompt": "the data", "completion": " privacy statement", "target": "d0"},
               {"id": "q1", "prompt": "a for", "completion": " loop list", "target": "d1"},
               {"id": "q2", "prompt": "lambda", "completion": " expression", "target": "d2"}]
    (demo / "facts.json").write_text(json.dumps({"queries": queries, "methods": []}))
    cli.run(["cache", "--store", str(demo / "store"), "--model", str(demo / "model"), "--corpus",
             str(demo / "corpus.jsonl"), "--limit", "all", "--k", "16", "--batch-size", "2", "--max-length", "8",
             "--layers", "model.layers.*", "--no-compile", "--masks", "random"])
    script = load_script("damping_sweep")
    report = script.main(["--demo", str(demo), "--dampings", "0.01*mean", "1e6*mean", "--preconditioners", "fim",
                          "mixed:0.5", "--json", str(tmp_path / "sweep.json")])
    assert json.loads((tmp_path / "sweep.json").read_text()) == report
    assert len(report["rows"]) == 2 * 2 * 3 and report["questions"] == 3 and report["documents"] == 6
    assert report["answer"] == "own"  # a facts.json without the demo's meta: written before --answer
    settings = {(r["preconditioner"], r["damping"], r["documents"]) for r in report["rows"]}
    assert len(settings) == 12 and all(0 < r["mrr"] <= 1 for r in report["rows"])
    by = {(r["preconditioner"], r["damping"], r["documents"]): r for r in report["rows"]}
    for name in ("fim", "mixed"):  # P ~ c I: g^T P^-1 g ~ |g|^2 / c, so each query ranks its documents alike
        assert by[(name, "1000000.0*mean", "whitened")]["mrr"] == by[(name, "1000000.0*mean", "unit")]["mrr"]
    assert report["best"] in report["rows"]
