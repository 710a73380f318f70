"""scripts/bench_tail_patch.py on a tiny demo folder: both step forms timed and bit-equal, one question's tail-patch
timed per question asked."""
import json
import shutil

import pytest
import torch
from script_loader import load_script

pytest.importorskip("transformers", reason="the `llm` extra is not installed")


def test_the_step_forms_agree_and_each_question_is_timed(tiny_llama, tmp_path):
    from attribution import llm
    from attribution.evaluation import facts
    from attribution.llm import demo

    folder = tmp_path / "demo"
    shutil.copytree(tiny_llama, folder / "model")
    model, tok = llm.load_model(str(folder / "model"))
    words = "the a for loop lambda assert python list data privacy statement expression creates function".split()
    corpus = [{"id": f"d{i}", "text": " ".join(words[i:i + 4])} for i in range(10)]
    optimizer = facts.finetune_optimizer(model, demo.FINETUNE_LR)
    facts.training_loss(model, tok, corpus[:2], 16).backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), folder / demo.OPTIMIZER_FILE)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    queries = [{"id": f"q{i}", "prompt": "the data", "completion": " privacy statement", "target": f"d{i}"} for i in range(3)]
    ranking = [[d["id"] for d in corpus[::-1]]] * 3
    (folder / "facts.json").write_text(json.dumps({"queries": queries, "methods": [{"method": "m", "ranking": ranking}]}))
    out = load_script("bench_tail_patch").main(["--demo", str(folder), "--repeats", "2", "--questions", "2"])
    assert out["step_forms_bit_equal"] is True and out["rankings_per_question"] == 3
    assert all(len(v["all"]) == 2 and v["median"] > 0 for v in out["step_seconds"].values())
    assert len(out["tail_patch_seconds_per_question"]) == 2 and min(out["tail_patch_seconds_per_question"]) > 0
