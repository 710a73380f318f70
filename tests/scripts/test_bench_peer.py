"""scripts/bench_peer.py: ours and the model-only floor run as fresh processes on the same corpus; --compile reaches
our cache command; the model-only floor differentiates to the input embeddings only."""
import json

import pytest
from script_loader import load_script

pytest.importorskip("transformers", reason="the `llm` extra is not installed")


def test_ours_and_the_model_only_floor_run_on_one_corpus(tiny_llama, tmp_path):
    script = load_script("bench_peer")
    out = script.compare(script.Path(tiny_llama), 3, 16, "fp32", 1, False, tmp_path, steady=False,
                         tools=("ours", "model"), compile="off")
    size = out["sizes"][3]
    assert size["tokens"] > 0
    summary = size["ours"]["runs"][0]["summary"]
    assert summary["documents"] == 3 and summary["compile"] == "off" and summary["compiled"] is False
    floor = size["model"]["runs"][0]
    assert 0 < floor["loop_seconds"] < floor["seconds"] and floor["peak_rss_mb"] > 0
    assert out["ours_whole_process_tokens_per_s"] > 0 and out["model_whole_process_tokens_per_s"] > 0
    assert "ours_steady_tokens_per_s" not in out  # one corpus size: no steady state


def test_the_floor_child_takes_one_gradient_per_batch(tiny_llama, tmp_path, capsys, monkeypatch):
    import torch

    script = load_script("bench_peer")
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i}", "text": "the data privacy statement " * (i + 1)}) + "\n"
                            for i in range(5)))
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda out, inputs, **kw: calls.append(inputs.shape) or grad(out, inputs, **kw))
    script._model_only_child(tiny_llama, str(data), "8", "bf16")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loop_seconds"] > 0
    assert len(calls) == 2 and all(s[-1] == 32 for s in calls)  # 5 documents in batches of 4; hidden size 32


def test_the_steady_state_leaves_our_compile_time_out():
    script = load_script("bench_peer")
    ours = {"seconds": 130.0, "runs": [{"summary": {"compile_seconds": 100.0}}, {"summary": {"compile_seconds": 110.0}}]}
    assert script._steady_seconds(ours) == 25.0  # the median wall time less the median compile
    assert script._steady_seconds({"seconds": 30.0, "runs": [{"seconds": 30.0}]}) == 30.0  # Bergson, the floor


def test_no_steady_state_when_one_size_compiled_and_the_other_did_not(tmp_path, monkeypatch):
    script = load_script("bench_peer")
    monkeypatch.setattr(script, "corpus", lambda path, folder, n, max_length, join: 100 * n)
    runs = iter([False, True])  # --compile auto: the larger corpus crossed the threshold

    def fake_ours(folder, data, n, max_length, precision, work, compile):
        return {"seconds": float(n), "peak_rss_mb": 1.0,
                "summary": {"compiled": next(runs), "compile_seconds": 0.0}}

    monkeypatch.setattr(script, "ours", fake_ours)
    out = script.compare(tmp_path, 2, 16, "fp32", 1, False, tmp_path, steady=True, tools=("ours",), compile="auto")
    assert out["ours_steady_tokens_per_s"] is None and "compiled" in out["ours_steady_note"]
