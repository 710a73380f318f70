"""scripts/first_order_tail_patch.py on a tiny demo folder: each score is <-g_q, g_d / (sqrt(v) + eps) ** e> of the exact
gradients (checked against autograd for one pair); a score measured against labels equal to itself correlates
perfectly and picks the best candidates; a headroom file of another folder or answer is refused by name."""
import json

import pytest
import torch
from demo_folder import tiny_demo_folder
from script_loader import load_script

pytest.importorskip("transformers", reason="the `llm` extra is not installed")


@pytest.fixture
def folder(tiny_llama, tmp_path):
    path, _, _, corpus, queries = tiny_demo_folder(tiny_llama, tmp_path, fillers=4)  # 7 documents: odd-sized
    (path / "facts.json").write_text(json.dumps({"meta": {"answer": "true", "max_length": 16, "finetune_autocast": "none"},
                                                 "queries": queries, "methods": []}))
    return path, corpus, queries


def test_the_scores_are_the_exact_step_geometry(folder):
    from attribution import llm
    from attribution.evaluation import facts
    from attribution.llm.demo_run import DemoRun

    script = load_script("first_order_tail_patch")
    path, corpus, queries = folder
    run = DemoRun.read(path)
    model, tok = run.model()
    divisors = script.step_divisors(model, run.optimizer(model))
    answers = [facts.true_answer(q) for q in queries]
    found = script.exact_scores(model, tok, answers, corpus, divisors, max_length=16, autocast=None, chunk=2)
    assert tuple(found["scores"].shape) == (3, len(queries), len(corpus))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    (batch,) = llm.query_batches(tok, [answers[2]], 1, 16, pad_multiple=1)
    g_q = torch.autograd.grad(llm.chunked_sequence_loss(model, batch).sum(), [p for _, p in named])
    g_d = torch.autograd.grad(facts.training_loss(model, tok, [corpus[5]], 16), [p for _, p in named])
    for e in range(3):  # g_q of the answer's loss: a positive score raises the answer
        expected = sum(float((a * b / divisors[n].pow(e)).sum()) for (n, _), a, b in zip(named, g_q, g_d))
        assert found["scores"][e, 2, 5].item() == pytest.approx(expected, rel=1e-5)
        norm = sum(float((b * b / divisors[n].pow(e)).sum()) for (n, _), b in zip(named, g_d)) ** 0.5
        assert found["document_norms"][e, 5].item() == pytest.approx(norm, rel=1e-5)


def test_the_step_score_predicts_a_real_steps_change_of_the_answer(folder):
    """lr * the e = 1 score is what one AdamW step without momentum on the document does to the answer's log-probability
    (a long-run state with beta2 near 1, so that the step's own g**2 leaves v as it is; the weight decay's shift, the
    same for every document, cancels in the difference of two documents)."""
    from attribution.evaluation import facts
    from attribution.llm import demo
    from attribution.llm.demo_run import DemoRun

    script = load_script("first_order_tail_patch")
    path, corpus, queries = folder
    state = torch.load(path / demo.OPTIMIZER_FILE, weights_only=True)
    beta2 = 1 - 1e-6
    for entry in state["state"].values():
        v = entry["exp_avg_sq"]  # after one step: zero where that step's gradient was, e.g. unseen tokens' embeddings,
        entry["exp_avg_sq"] = v + v.mean()  # where lr / eps would be no small step: floored
        entry["step"] = torch.tensor(1e8)
    state["param_groups"] = [{**g, "betas": (0.9, beta2)} for g in state["param_groups"]]
    torch.save(state, path / demo.OPTIMIZER_FILE)
    run = DemoRun.read(path)
    model, tok = run.model()
    optimizer = run.optimizer(model)
    answer = facts.true_answer(queries[0])
    found = script.exact_scores(model, tok, [answer], corpus, script.step_divisors(model, optimizer), max_length=16,
                                autocast=None, chunk=1)
    lr = 1e-6  # small: the second order is negligible (Adam divides by sqrt(v): its steps are far larger than lr)
    moved = facts.tail_patch_rankings(model, optimizer, corpus, answer, {d["id"]: [d["id"]] for d in corpus[:4]},
                                      tokenizer=tok, ks=(1,), lr=lr, max_length=16)
    measured = [moved[d["id"]][1] for d in corpus[:4]]
    predicted = [lr * float(found["scores"][1, 0, j]) for j in range(4)]
    for j in range(1, 4):
        assert measured[j] - measured[0] == pytest.approx(predicted[j] - predicted[0], rel=0.03, abs=1e-7)


def test_a_score_against_itself_is_perfect_and_a_foreign_headroom_is_refused(folder, tmp_path):
    script = load_script("first_order_tail_patch")
    path, corpus, queries = folder
    ids = [d["id"] for d in corpus]
    scores = torch.arange(len(queries) * len(ids), dtype=torch.float64).reshape(len(queries), len(ids)) % 5
    singles = [{d: float(scores[q, j]) + 0.1 * j for j, d in enumerate(ids)} for q in range(len(queries))]
    labels = torch.tensor([[singles[q][d] for d in ids] for q in range(len(queries))])
    exact = script.against_tail_patch(labels, ids, singles)  # the labels as the score
    assert exact["spearman"] == pytest.approx(1.0) and exact["pearson"] == pytest.approx(1.0)
    best = [sorted(s.values(), reverse=True) for s in singles]
    assert exact["tail_patch_of_top1"] == pytest.approx(sum(b[0] for b in best) / len(best))
    assert exact["tail_patch_of_top5"] == pytest.approx(sum(sum(b[:5]) / 5 for b in best) / len(best))
    headroom = tmp_path / "headroom.json"
    headroom.write_text(json.dumps({"demo": str(tmp_path / "elsewhere"), "answer": "true", "single_document_tail_patch": []}))
    with pytest.raises(SystemExit, match="was measured on .*elsewhere.* not on --demo"):
        script.main(["--demo", str(path), "--headroom", str(headroom)])
    with pytest.raises(SystemExit):
        script.main(["--demo", str(path), "--chunk", "0"])


def test_the_whole_script_prints_every_score_and_the_steps_prediction(folder, tmp_path):
    script = load_script("first_order_tail_patch")
    path, corpus, queries = folder
    singles = [{d["id"]: float(i % 3) for i, d in enumerate(corpus)} for _ in queries]
    headroom = tmp_path / "headroom.json"
    headroom.write_text(json.dumps({"demo": str(path), "answer": "true", "single_document_tail_patch": singles}))
    out = script.main(["--demo", str(path), "--headroom", str(headroom), "--chunk", "2", "--json", str(tmp_path / "o.json")])
    assert [(r["divisor_exponent"], r["form"]) for r in out["rows"]] == [(e, f) for e in range(3) for f in ("raw", "cosine")]
    assert all(0 < r["mrr"] <= 1 and -1 <= r["spearman"] <= 1 for r in out["rows"])
    assert out["step_prediction"]["pairs"] == len(queries) * len(corpus)
    assert out["oracle"]["tail_patch_of_top1"] == 2.0 and len(out["step_top10"][0]) == min(10, len(corpus))
    assert json.loads((tmp_path / "o.json").read_text())["rows"] == out["rows"]
