"""attribution.llm.demo_run.DemoRun, the demo folder that the tail-patch scripts read: a folder without the demo's
files, or with a facts.json that is not a demo record, is refused by name; the token cut and precision come from the
run's record (older records: 128 tokens and this CPU's precision, the own answer); the model and optimizer load as
the demo's tail-patch holds them, in a fresh reader of what the demo folder's writer left."""
import json

import pytest
import torch
from demo_folder import tiny_demo_folder

pytest.importorskip("transformers", reason="the `llm` extra is not installed")


def test_a_folder_without_the_demos_files_is_refused_by_name(tmp_path):
    from attribution.llm.demo_run import DemoRun

    with pytest.raises(FileNotFoundError, match=r"holds no facts.json, corpus.jsonl, model, optimizer.pt"):
        DemoRun.read(tmp_path)
    for name in ("model",):
        (tmp_path / name).mkdir()
    (tmp_path / "optimizer.pt").write_bytes(b"")
    (tmp_path / "corpus.jsonl").write_text('{"id": "a", "text": "x"}\n')
    with pytest.raises(FileNotFoundError, match=r"holds no facts.json: give the --out folder"):
        DemoRun.read(tmp_path)
    (tmp_path / "facts.json").write_text(json.dumps({"queries": []}))
    with pytest.raises(ValueError, match=r"facts.json is not a demo record \(its keys: \['queries'\]\)"):
        DemoRun.read(tmp_path)


def test_the_step_follows_the_record_and_older_records_read_with_their_defaults(tmp_path):
    from attribution.llm import demo
    from attribution.llm.demo_run import DemoRun

    recorded = DemoRun(tmp_path, {"meta": {"answer": "true", "finetune_autocast": "none", "max_length": 64},
                                  "queries": [], "methods": []}, [])
    assert (recorded.answer, recorded.autocast, recorded.max_length) == ("true", None, 64)
    older = DemoRun(tmp_path, {"queries": [], "methods": []}, [])  # a record without a meta: every default
    assert (older.answer, older.autocast, older.max_length) == ("own", demo.finetune_autocast(), 128)
    assert recorded.step_options("tok") == {"tokenizer": "tok", "max_length": 64, "autocast": None}
    assert recorded.step_options("tok", 16)["max_length"] == 16  # a script's --max-length overrides the record's
    with pytest.raises(ValueError, match="finetune_autocast must be one of"):
        DemoRun(tmp_path, {"meta": {"finetune_autocast": "fp8"}, "queries": [], "methods": []}, []).autocast


def test_a_fresh_reader_loads_the_folder_the_demo_wrote(tiny_llama, tmp_path):
    from attribution import llm
    from attribution.llm.demo_run import DemoRun

    folder, _, _, corpus, queries = tiny_demo_folder(tiny_llama, tmp_path, fillers=5)  # 8 documents: odd-sized
    written, _ = llm.load_model(str(tiny_llama))  # the weights the folder's model holds (the helper steps its copy)
    record = {"meta": {"answer": "true", "max_length": 32}, "queries": queries, "methods": [{"method": "default"}]}
    (folder / "facts.json").write_text(json.dumps(record))
    run = DemoRun.read(folder)
    assert run.corpus == corpus and run.queries == queries and run.methods == record["methods"]
    loaded, _ = run.model()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), written.state_dict().values()))
    held = run.optimizer(loaded)
    state = next(iter(held.state.values()))
    assert "exp_avg_sq" in state and "exp_avg" not in state  # as the demo's tail-patch holds it: no first moment
    assert "exp_avg" in next(iter(run.optimizer(loaded, first_moment=True).state.values()))
