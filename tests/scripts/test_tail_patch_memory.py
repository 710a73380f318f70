"""scripts/tail_patch_memory.py on a tiny demo folder: the demo's tail-patch over the first questions, the resident
set after each, the peak; a folder without rankings and a count below one are refused by name."""
import json

import pytest
from demo_folder import tiny_demo_folder
from script_loader import load_script

pytest.importorskip("transformers", reason="the `llm` extra is not installed")


def test_each_question_is_measured_and_bad_inputs_are_named(tiny_llama, tmp_path, capsys):
    from attribution.llm import demo
    from grass_ops.benchmarking import release_freed_memory

    folder, _, _, corpus, queries = tiny_demo_folder(tiny_llama, tmp_path, fillers=9)
    ranking = [[d["id"] for d in corpus[::-1]]] * 3
    methods = [{"method": "m", "row": "default", "ranking": ranking}, {"method": "n", "row": "bm25", "ranking": ranking}]
    (folder / "facts.json").write_text(json.dumps({"queries": queries, "methods": methods}))
    script = load_script("tail_patch_memory")
    out = script.main(["--demo", str(folder), "--questions", "2", "--json", str(tmp_path / "memory.json")])
    assert json.loads((tmp_path / "memory.json").read_text()) == out
    assert (out["questions"], out["rows"], len(out["after_each_question_mib"])) == (2, 2, 2)
    assert out["peak_mib"] >= max(out["after_each_question_mib"]) > 0 and out["seconds"] > 0
    assert demo.release_freed_memory is release_freed_memory  # the demo's own trim is put back
    one = script.main(["--demo", str(folder), "--questions", "2", "--rows", " bm25"])
    assert (one["rows"], one["row_names"]) == (1, ["bm25"])
    with pytest.raises(SystemExit, match=r"--rows names \['store'\], which facts.json has no ranking for"):
        script.main(["--demo", str(folder), "--rows", "default,store"])
    with pytest.raises(SystemExit):
        script.main(["--demo", str(folder), "--questions", "0"])
    assert "--questions must be at least 1, got 0" in capsys.readouterr().err
    (folder / "facts.json").write_text(json.dumps({"queries": queries, "methods": [{"method": "m"}]}))
    with pytest.raises(SystemExit, match="keeps no ranking: run the demo with --tail-patch main or all"):
        script.main(["--demo", str(folder)])
