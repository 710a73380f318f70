"""Models sharded with FSDP2 (issue 20, item 1): 2 gloo ranks cache and score a fully_shard-ed model, and every
stored gradient and score equals the unsharded model's in one process (which also reads the sharded run's store);
an odd number of batches of different shapes, a store that grows, and a partly sharded model refused;
`grass-attribute cache|attribute --fsdp` under torchrun give one process's report."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the `llm` extra is not installed")

from cli_runs import ROOT, single, torchrun  # noqa: E402
from fsdp_runs import BATCHES, attributor  # noqa: E402
from trainer_runs import QUERIES, tiny_model  # noqa: E402

from attribution.store import DiskStore  # noqa: E402


def _rows(store) -> torch.Tensor:
    opened = DiskStore(store)
    return torch.cat([opened.read_shard(0, s).float() for s in opened.require_complete(0).shards])


def test_two_sharded_ranks_store_and_score_what_one_unsharded_process_does(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(os.path.dirname(__file__), "fsdp_runs.py"), "--store", str(tmp_path / "sharded"),
                           "--report", str(tmp_path / "report.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = torch.load(tmp_path / "report.pt")
    assert "only partly sharded" in report["refused"] and "fully_shard(model)" in report["refused"]
    # one rank's error before its round's forward is raised by both ranks (no rank waits in a collective)
    assert "batch 3 differs from the one stored in shard 3" in report["changed"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = attributor(tiny_model(), tmp_path / "unsharded").cache(BATCHES)
        scores = reference.attribute(QUERIES)
        # the unsharded model reads the sharded run's store (the fingerprint gathers the shards whole)
        reread = attributor(tiny_model(), tmp_path / "sharded").attribute(QUERIES)
    finally:
        torch.set_num_threads(threads)
    assert report["rows"] == reference.n_train == sum(b["input_ids"].shape[0] for b in BATCHES)
    torch.testing.assert_close(_rows(tmp_path / "sharded"), _rows(tmp_path / "unsharded"), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(report["scores"], scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reread, scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(report["self"], reference.self_influence(), rtol=1e-4, atol=1e-4)
    assert torch.equal(report["top_k"][1], torch.topk(scores, 3, dim=1).indices)


def test_fsdp_outside_torchrun_is_a_usage_error(tiny_llama, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "d0", "text": "a for loop list"}) + "\n")
    with pytest.raises(SystemExit, match="--fsdp shards the model across the ranks of torchrun"):
        single("cache", "--store", str(tmp_path / "s"), "--model", tiny_llama, "--corpus", str(corpus), "--fsdp")
    assert not (tmp_path / "s").exists()


def test_torchrun_cache_and_attribute_with_fsdp_equal_one_process(tiny_llama, tmp_path):
    docs = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
            "python list data", "the function creates a list", "a list for the data"]  # 4 batches of 2, the last of 1
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(docs)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a for", "completion": " loop list"}) + "\n")
    flags = ["--model", tiny_llama, "--corpus", str(corpus), "--k", "16", "--batch-size", "2", "--max-length", "8",
             "--no-compile"]
    torchrun("cache", "--store", str(tmp_path / "sharded"), *flags, "--fsdp")
    single("cache", "--store", str(tmp_path / "single"), *flags)
    torchrun("attribute", "--store", str(tmp_path / "sharded"), "--prompts", str(prompts), "--top-k", "3", "--fsdp",
             "--out", str(tmp_path / "report_sharded"))
    single("attribute", "--store", str(tmp_path / "single"), "--prompts", str(prompts), "--top-k", "3",
           "--out", str(tmp_path / "report_single"))
    sharded, one = (json.loads((tmp_path / f"report_{n}" / "report.json").read_text())["queries"] for n in ("sharded", "single"))
    for a, b in zip(sharded, one):
        for side in ("helpful", "harmful"):
            assert [d["id"] for d in a[side]] == [d["id"] for d in b[side]]
            assert [d["score"] for d in a[side]] == pytest.approx([d["score"] for d in b[side]], rel=1e-3, abs=1e-4)
