"""`torchrun -m attribution.llm.cli cache|attribute|select|index`: two gloo ranks initialized from torchrun's
environment write the store one process writes and print the reports one process prints."""
import json

import pytest
from attribution_problems import store_files

pytest.importorskip("transformers", reason="the `llm` extra is not installed")

from cli_runs import single, torchrun  # noqa: E402

DOCS = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
        "python list data", "the function creates a list", "a list for the data"]  # 4 batches of 2, the last of 1


@pytest.fixture
def setup(tiny_llama, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(DOCS)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [{"prompt": "a for", "completion": " loop list"},
                                                         {"prompt": "the data", "completion": " privacy"}]))

    def cache_args(store):
        return ["cache", "--store", str(store), "--model", tiny_llama, "--corpus", str(corpus), "--k", "16",
                "--batch-size", "2", "--max-length", "8", "--layers", "model.layers.*", "--no-compile"]

    return tmp_path, cache_args, prompts


def _report(folder):
    return json.loads((folder / "report.json").read_text())["queries"]


@pytest.mark.slow
def test_torchrun_cache_attribute_select_equal_one_process(setup):
    tmp_path, cache_args, prompts = setup
    printed = torchrun(*cache_args(tmp_path / "dist"))
    assert len(printed) == 1 and printed[0]["documents"] == 7  # rank 0 alone prints
    single(*cache_args(tmp_path / "single"))
    assert store_files(tmp_path / "dist") == store_files(tmp_path / "single")
    for store in ("dist", "single"):
        run = torchrun if store == "dist" else single
        run("attribute", "--store", str(tmp_path / store), "--prompts", str(prompts), "--top-k", "3",
            "--out", str(tmp_path / f"report_{store}"))
        run("select", "--store", str(tmp_path / store), "--target", str(prompts), "--fraction", "0.5",
            "--out", str(tmp_path / f"selected_{store}.jsonl"))
    assert _report(tmp_path / "report_dist") == _report(tmp_path / "report_single")
    selected = (tmp_path / "selected_dist.jsonl").read_text()
    assert selected == (tmp_path / "selected_single.jsonl").read_text() and len(selected.splitlines()) == 4


@pytest.mark.slow
def test_torchrun_attribute_with_the_ann_index(setup):
    pytest.importorskip("faiss", reason="the `faiss` extra (faiss-cpu) is not installed")
    tmp_path, cache_args, prompts = setup
    store = tmp_path / "store"
    single(*cache_args(store))
    summary = torchrun("index", "--store", str(store), "--factory", "Flat")[0]
    assert summary["rows"] == 7 and summary["mode"] == "ip"  # what `attribute` scores by default
    torchrun("attribute", "--store", str(store), "--prompts", str(prompts), "--top-k", "3", "--index",
              "--out", str(tmp_path / "indexed"))
    single("attribute", "--store", str(store), "--prompts", str(prompts), "--top-k", "3", "--out", str(tmp_path / "exact"))
    indexed, exact = _report(tmp_path / "indexed"), _report(tmp_path / "exact")
    for a, b in zip(indexed, exact):
        for side in ("helpful", "harmful"):
            assert [d["id"] for d in a[side]] == [d["id"] for d in b[side]]
            assert [d["score"] for d in a[side]] == pytest.approx([d["score"] for d in b[side]], rel=1e-3, abs=1e-3)
            # float32 scores from other GEMM shapes (the full matrix vs re-ranked rows), summed over 14 layers
