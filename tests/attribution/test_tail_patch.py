"""Tail-patch (TrackStar's influence metric, attribution.facts.tail_patch): one training step on a method's top
documents raises the answer's log-probability when they state it, leaves the caller's model and optimizer bit for
bit, is deterministic, refuses empty or unknown inputs by name; and its aggregation over queries."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the `llm` extra is not installed")

from attribution import facts, llm  # noqa: E402  (attribution.facts: the old name of attribution.evaluation.facts)
from attribution.evaluation import metrics  # noqa: E402

QUERY = {"id": "q", "prompt": "the data privacy", "completion": " statement"}
ANSWER_DOC = {"id": "answer", "text": "the data privacy statement"}
OTHER_DOC = {"id": "other", "text": "lambda expression creates function"}
CORPUS = [ANSWER_DOC, OTHER_DOC, {"id": "d2", "text": "a for loop list"}, {"id": "d3", "text": "python list data"},
          {"id": "d4", "text": "assert statement"}]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    model, tok = llm.load_model(tiny_llama)
    return model.double(), tok


def _trained_adamw(model, tok):
    """An AdamW that has taken two steps on the model (so it holds moments and step counts)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for docs in ([CORPUS[2]], [CORPUS[3]]):
        optimizer.zero_grad()
        facts.training_loss(model, tok, docs, 16).backward()
        optimizer.step()
    optimizer.zero_grad()
    return optimizer


def test_the_old_module_name_has_it():
    from attribution.facts import tail_patch

    import attribution.evaluation.facts as new

    assert tail_patch is new.tail_patch and facts is new


def test_a_step_on_the_answer_raises_its_log_probability_more_than_an_unrelated_step(tiny):
    model, tok = tiny
    on_answer = facts.tail_patch(model, None, [ANSWER_DOC], QUERY, tokenizer=tok, lr=0.5)
    unrelated = facts.tail_patch(model, None, [OTHER_DOC["text"]], QUERY, tokenizer=tok, lr=0.5)  # a text works too
    assert on_answer > 0.5 and on_answer > unrelated + 0.5, (on_answer, unrelated)


def test_the_model_and_the_optimizer_are_unchanged_bit_for_bit_and_the_result_is_deterministic(tiny):
    model, tok = tiny
    optimizer = _trained_adamw(model, tok)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in optimizer.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    first = facts.tail_patch(model, optimizer, [ANSWER_DOC, OTHER_DOC], QUERY, tokenizer=tok)
    second = facts.tail_patch(model, optimizer, [ANSWER_DOC, OTHER_DOC], QUERY, tokenizer=tok)
    assert first == second and first != 0.0
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert {id(p) for p in optimizer.state} == set(state)
    for p, s in optimizer.state.items():
        assert s.keys() == state[id(p)].keys()
        assert all(torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k] for k, v in s.items())
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups
    # the learning rate is the optimizer's: another one gives another number
    optimizer.param_groups[0]["lr"] = 1e-3
    assert facts.tail_patch(model, optimizer, [ANSWER_DOC, OTHER_DOC], QUERY, tokenizer=tok) != first


def test_empty_or_unknown_inputs_are_named(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="docs is empty"):
        facts.tail_patch(model, None, [], QUERY, tokenizer=tok, lr=0.1)
    with pytest.raises(ValueError, match="its completion is empty"):
        facts.tail_patch(model, None, [ANSWER_DOC], {**QUERY, "completion": " "}, tokenizer=tok, lr=0.1)
    with pytest.raises(ValueError, match="lr must be a positive"):
        facts.tail_patch(model, None, [ANSWER_DOC], QUERY, tokenizer=tok)
    with pytest.raises(ValueError, match=r"ranked holds ids that are not in the corpus: \['nope'\]"):
        facts.tail_patch_ranking(model, None, CORPUS, QUERY, ["answer", "nope"], tokenizer=tok, ks=(1,), lr=0.1)
    with pytest.raises(ValueError, match="ks must be positive"):
        facts.tail_patch_ranking(model, None, CORPUS, QUERY, ["answer"], tokenizer=tok, ks=(0,), lr=0.1)
    with pytest.raises(ValueError, match="fewer than k = 5"):
        facts.tail_patch_ranking(model, None, CORPUS, QUERY, ["answer", "other"], tokenizer=tok, ks=(1, 5), lr=0.1)
    with pytest.raises(ValueError, match="source 'nope' is not a document id"):
        facts.tail_patch_references(model, None, CORPUS, QUERY, "nope", tokenizer=tok, ks=(1,), lr=0.1)
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="not the model's"):
        facts.tail_patch(model, other, [ANSWER_DOC], QUERY, tokenizer=tok)


def test_a_ranking_and_its_references(tiny):
    model, tok = tiny
    ranked = ["answer", "d4", "other", "d2", "d3"]
    got = facts.tail_patch_ranking(model, None, CORPUS, QUERY, ranked, tokenizer=tok, ks=(1, 5), lr=0.5)
    assert set(got) == {1, 5}
    assert got[1] == pytest.approx(facts.tail_patch(model, None, [ANSWER_DOC], QUERY, tokenizer=tok, lr=0.5), rel=1e-6)
    refs = facts.tail_patch_references(model, None, CORPUS, QUERY, "answer", tokenizer=tok, ks=(1, 5), lr=0.5, seed=3)
    assert refs["source"] == pytest.approx(got[1], rel=1e-6) and set(refs["random"]) == {1, 5}
    order = facts.random_ranking([d["id"] for d in CORPUS], seed=3)
    assert refs["random"][5] == pytest.approx(got[5])  # all five documents, in another order: the same batch
    assert refs["random"][1] == pytest.approx(facts.tail_patch(
        model, None, [next(d for d in CORPUS if d["id"] == order[0])], QUERY, tokenizer=tok, lr=0.5), rel=1e-6)
    assert order == facts.random_ranking([d["id"] for d in CORPUS], seed=3)  # seeded
    assert sorted(order) == sorted(d["id"] for d in CORPUS)


def test_the_aggregation_matches_numpy():
    values = [0.5, -1.25, 3.0, 2.0, 0.125]
    mean, se = metrics.mean_and_standard_error(values)
    assert mean == pytest.approx(np.mean(values), abs=1e-15)
    assert se == pytest.approx(np.std(values, ddof=1) / np.sqrt(len(values)), abs=1e-15)
    one_mean, one_se = metrics.mean_and_standard_error([2.5])
    assert one_mean == 2.5 and np.isnan(one_se)
    with pytest.raises(ValueError, match="values is empty"):
        metrics.mean_and_standard_error([])
    summary = facts.tail_patch_summary([{1: v, 5: 2 * v} for v in values])
    assert summary[1]["n"] == 5 and summary[5]["mean"] == pytest.approx(2 * np.mean(values))
    assert summary[5]["se"] == pytest.approx(2 * np.std(values, ddof=1) / np.sqrt(5))
    with pytest.raises(ValueError, match="per_query is empty"):
        facts.tail_patch_summary([])
    with pytest.raises(ValueError, match="the same ks"):
        facts.tail_patch_summary([{1: 0.0}, {5: 0.0}])


def _reference_tail_patch(model, optimizer, docs, query, tok, max_length=128, momentum=True):
    """The definition, spelled out: deep copies of the model and the optimizer, one step on the copy (without
    momentum: Adam's beta1 and SGD's momentum 0)."""
    import copy

    clone = copy.deepcopy(model).eval()
    names = {id(p): n for n, p in model.named_parameters()}
    params = dict(clone.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[names[id(p)]] for p in g["params"]]}
              for g in optimizer.param_groups]
    step = type(optimizer)(groups)
    step.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for group in step.param_groups if not momentum else []:
        if "betas" in group:
            group["betas"] = (0.0, group["betas"][1])
        if "momentum" in group:
            group["momentum"] = 0.0
    before = facts.answer_log_prob(clone, tok, query, max_length)
    facts.training_loss(clone, tok, docs, max_length).backward()
    step.step()
    return facts.answer_log_prob(clone, tok, query, max_length) - before


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("kind", ["adamw", "sgd-momentum"])
def test_the_memory_light_step_equals_a_step_on_deep_copies(tiny, kind, momentum):
    model, tok = tiny
    if kind == "adamw":
        optimizer = _trained_adamw(model, tok)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
        facts.training_loss(model, tok, [CORPUS[3]], 16).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    docs = [ANSWER_DOC, OTHER_DOC, CORPUS[4]]
    got = facts.tail_patch(model, optimizer, docs, QUERY, tokenizer=tok, momentum=momentum)
    want = _reference_tail_patch(model, optimizer, docs, QUERY, tok, momentum=momentum)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (got, want)
    other = _reference_tail_patch(model, optimizer, docs, QUERY, tok, momentum=not momentum)
    assert abs(got - other) > 1e-6  # the momentum matters: the test can tell the two steps apart
    before = facts.answer_log_prob(model, tok, QUERY)
    assert facts.tail_patch(model, optimizer, docs, QUERY, tokenizer=tok, before=before, momentum=momentum) == got


def test_an_optimizer_that_steps_parameters_jointly_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="optimizer: LBFGS"):
        facts.tail_patch(model, torch.optim.LBFGS(model.parameters()), [ANSWER_DOC], QUERY, tokenizer=tok)


def test_a_ranking_accumulates_its_prefixes_and_equals_a_step_on_each_batch(tiny):
    """The ranking's one-backward-per-document form equals tail_patch on the batch of each prefix (to the float32
    precision of the model's RMSNorm, which computes in float32 even in a float64 model), with AdamW
    (state, weight decay) and documents of different lengths (padding)."""
    model, tok = tiny
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    facts.training_loss(model, tok, [CORPUS[2]], 16).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ranked = ["d4", "answer", "other", "d2", "d3"]
    got = facts.tail_patch_ranking(model, optimizer, CORPUS, QUERY, ranked, tokenizer=tok, ks=(1, 2, 5))
    by_id = {d["id"]: d for d in CORPUS}
    for k in (1, 2, 5):
        want = facts.tail_patch(model, optimizer, [by_id[r] for r in ranked[:k]], QUERY, tokenizer=tok)
        assert got[k] == pytest.approx(want, rel=1e-6, abs=1e-9), (k, got[k], want)


def test_rankings_of_one_query_step_on_each_set_of_documents_once(tiny):
    """Several rankings in one call equal each ranking alone; a prefix whose documents another ranking already
    stepped on (the same set in another order) reuses that number, and a ranking with no new prefix runs no
    forward; the caller's .grad are put back."""
    model, tok = tiny
    optimizer = _trained_adamw(model, tok)
    rankings = {"a": ["answer", "d4", "other", "d2", "d3"], "b": ["answer", "other", "d4", "d3", "d2"],
                "c": ["d2", "d3", "answer", "other", "d4"]}
    alone = {name: facts.tail_patch_ranking(model, optimizer, CORPUS, QUERY, r, tokenizer=tok, ks=(1, 5))
             for name, r in rankings.items()}
    forwards = []
    hook = model.get_decoder().register_forward_hook(lambda *_: forwards.append(1))
    marker = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, m in zip(model.parameters(), marker):
        p.grad = m
    try:
        together = facts.tail_patch_rankings(model, optimizer, CORPUS, QUERY, rankings, tokenizer=tok, ks=(1, 5))
    finally:
        hook.remove()
    assert all(p.grad is m for p, m in zip(model.parameters(), marker))
    for p in model.parameters():
        p.grad = None
    assert together.keys() == alone.keys()
    for name in rankings:
        assert together[name][1] == pytest.approx(alone[name][1], rel=1e-6, abs=1e-9)
        assert together[name][5] == pytest.approx(alone[name][5], rel=1e-6, abs=1e-9)
    # one shared top-1 and one shared top-5 set: b adds nothing, c its top 1 and then its top 5 reused
    assert together["b"] == together["a"] and together["c"][5] == together["a"][5]
    # forwards: the answer before, a: 2 backward segments + 2 evaluations; b: none; c: 1 segment + 1 evaluation
    assert len(forwards) == 1 + 4 + 2
    with pytest.raises(ValueError, match="ks must be positive"):
        facts.tail_patch_rankings(model, None, CORPUS, QUERY, rankings, tokenizer=tok, ks={"a": (1,), "b": (0,), "c": (1,)},
                                  lr=0.1)
    with pytest.raises(ValueError, match="lr must be a positive learning rate when optimizer is None"):
        facts.tail_patch_rankings(model, None, CORPUS, QUERY, rankings, tokenizer=tok, ks=(1,))
    with pytest.raises(ValueError, match="rankings must be a non-empty dict"):
        facts.tail_patch_rankings(model, None, CORPUS, QUERY, {}, tokenizer=tok, lr=0.1)


def test_the_demo_reads_the_optimizer_back_without_the_first_moment_and_steps_alike(tiny, tmp_path):
    from attribution.llm import demo

    model, tok = tiny
    optimizer = facts.finetune_optimizer(model, demo.FINETUNE_LR)
    for docs in ([CORPUS[2]], [CORPUS[3]]):
        optimizer.zero_grad()
        facts.training_loss(model, tok, docs, 16).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.save(optimizer.state_dict(), tmp_path / demo.OPTIMIZER_FILE)
    light, full = demo.load_optimizer(tmp_path, model, first_moment=False), demo.load_optimizer(tmp_path, model)
    assert light.state and all("exp_avg" not in s and "exp_avg_sq" in s for s in light.state.values())
    assert all("exp_avg" in s for s in full.state.values())
    docs = [ANSWER_DOC, OTHER_DOC]
    assert facts.tail_patch(model, light, docs, QUERY, tokenizer=tok) == facts.tail_patch(model, full, docs, QUERY,
                                                                                          tokenizer=tok)



def test_a_segment_cut_into_one_backward_per_document_steps_alike(tiny, monkeypatch):
    model, tok = tiny
    optimizer = _trained_adamw(model, tok)
    ranked = ["answer", "d4", "other", "d2", "d3"]
    whole = facts.tail_patch_ranking(model, optimizer, CORPUS, QUERY, ranked, tokenizer=tok, ks=(1, 5))
    assert [len(p) for p in facts._backward_parts(tok, [facts._patch_documents([d])[0] for d in CORPUS], 16)] == [5]
    monkeypatch.setattr(facts, "BACKWARD_TOKENS", 1)  # every document its own backward
    assert [len(p) for p in facts._backward_parts(tok, CORPUS, 16)] == [1] * 5
    parts = facts.tail_patch_ranking(model, optimizer, CORPUS, QUERY, ranked, tokenizer=tok, ks=(1, 5))
    assert parts[1] == whole[1] and parts[5] == pytest.approx(whole[5], rel=1e-9, abs=1e-12)


def test_prompt_completion_documents_are_cut_into_parts_and_stepped_on(tiny):
    model, tok = tiny
    corpus = [{"id": "a", "prompt": "lambda expression", "completion": " creates function"}, ANSWER_DOC]
    patches = facts.tail_patch_ranking(model, None, corpus, QUERY, ["a", "answer"], tokenizer=tok, ks=(1, 2), lr=0.1)
    assert set(patches) == {1, 2} and all(v == v for v in patches.values())
    assert [len(p) for p in facts._backward_parts(tok, corpus, 16)] == [2]


def test_a_stepped_evaluation_with_a_gradient_is_refused(tiny):
    from attribution.evaluation import optimizer_step

    model, tok = tiny
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    (batch,) = facts.llm.query_batches(tok, [QUERY], 1, 16, pad_multiple=1)
    with pytest.raises(RuntimeError, match="stepped_in_forward evaluates without a gradient"):
        with optimizer_step.stepped_in_forward(model, None, grads, 0.1):
            facts.llm.sequence_loss(model, batch)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # restored


def test_several_answers_are_measured_after_the_same_steps_in_one_forward_each(tiny):
    """A list of queries: each value a list (one per query), equal to each query alone up to the batch's float
    rounding, with the same forwards as one query (both answers in one batch); a single query still gives floats."""
    from attribution.llm.tokens import query_tokens

    model, tok = tiny
    optimizer = _trained_adamw(model, tok)
    other = {"id": "q2", "prompt": "a for loop", "completion": " list data python"}  # longer: padded in the batch
    assert [len(ids) for ids, _ in (query_tokens(tok, q, 16) for q in (QUERY, other))] == [4, 6]
    assert facts.answer_log_probs(model, tok, [QUERY, other]) == pytest.approx(
        [facts.answer_log_prob(model, tok, QUERY), facts.answer_log_prob(model, tok, other)], rel=1e-9)
    rankings = {"a": ["answer", "d4", "other", "d2", "d3"], "c": ["d2", "d3", "answer", "other", "d4"]}
    alone = [facts.tail_patch_rankings(model, optimizer, CORPUS, q, rankings, tokenizer=tok, ks=(1, 5))
             for q in (QUERY, other)]
    forwards = []
    hook = model.get_decoder().register_forward_hook(lambda *_: forwards.append(1))
    try:
        both = facts.tail_patch_rankings(model, optimizer, CORPUS, [QUERY, other], rankings, tokenizer=tok, ks=(1, 5))
    finally:
        hook.remove()
    assert len(forwards) == 1 + 4 + 2  # before; a: 2 backward segments + 2 evaluations; c: 1 + 1 (its top 5 is a's)
    for name in rankings:
        assert isinstance(alone[0][name][1], float)
        for k in (1, 5):
            assert both[name][k] == pytest.approx([alone[0][name][k], alone[1][name][k]], rel=1e-6, abs=1e-9)
    assert both["a"][1][0] != both["a"][1][1]
    with pytest.raises(ValueError, match="query: an empty list"):
        facts.tail_patch_rankings(model, optimizer, CORPUS, [], rankings, tokenizer=tok, ks=(1,))


def test_the_true_answer_is_the_planted_facts_whatever_the_model_said():
    fact = facts.FACTS[3]
    query = {"id": fact.id, "prompt": facts.question_prompt(fact), "completion": " something else", "target": fact.id}
    true = facts.true_answer(query)
    assert true == {"id": fact.id, "prompt": query["prompt"], "completion": " " + fact.answer, "target": fact.id}
    with pytest.raises(ValueError, match="its target 'nope' is not a planted fact's id"):
        facts.true_answer({**query, "target": "nope"})


def test_the_models_answer_is_its_kept_answer_or_the_query_itself():
    fact = facts.FACTS[2]
    query = {"id": "q", "prompt": "p", "completion": " attributed", "target": fact.id}
    assert facts.model_answer(query) is query  # written before `demo --answer`: the completion was the model's
    said = {**query, "model_answer": " said"}
    assert facts.model_answer(said) == {**said, "completion": " said"} and said["completion"] == " attributed"
    silent = {**query, "model_answer": " "}  # an empty answer is scored as the planted fact's, as --answer own has it
    assert facts.model_answer(silent)["completion"] == facts.true_answer(silent)["completion"] == " " + fact.answer
    assert facts.tail_patch_answers(said) == [facts.model_answer(said), facts.true_answer(said)]


@pytest.mark.parametrize("answer", ["own", "true"])
def test_the_demo_attributes_the_chosen_answer_and_keeps_the_models(tiny, answer):
    """demo.answer_queries: the model's first line is kept as "model_answer" and checked ("correct"); the attributed
    completion is it (own) or the planted fact's answer (true), for every fact; another choice is named."""
    from attribution.llm import demo

    model, tok = tiny
    queries = demo.answer_queries(model, tok, max_new_tokens=3, answer=answer)
    assert [q["target"] for q in queries] == [f.id for f in facts.FACTS]
    for q, fact in zip(queries, facts.FACTS):
        assert q["correct"] == facts.answered(fact, q["model_answer"])
        chosen = facts.model_answer(q) if answer == "own" else facts.true_answer(q)
        assert q["completion"] == chosen["completion"] and q["completion"].strip()
    assert answer == "true" or any(q["completion"] == q["model_answer"] for q in queries)  # the model's own words
    assert [q["model_answer"] for q in queries] == [q["model_answer"] for q in demo.answer_queries(
        model, tok, max_new_tokens=3, answer="own" if answer == "true" else "true")]  # the same generation either way
    with pytest.raises(ValueError, match=r"answer must be one of \('true', 'own'\), got 'gold'"):
        demo.answer_queries(model, tok, max_new_tokens=3, answer="gold")


def test_the_demo_rows_summarize_all_questions_the_answered_ones_and_keep_each_value(tiny, monkeypatch):
    """demo.tail_patch_rows: every row's mean and standard error over all questions and over those answered right, on
    the model's answer and on the true one, and its per-question values, each equal to facts.tail_patch_summary of
    the values the step returned for them."""
    from attribution.llm import demo

    model, tok = tiny
    fact = facts.FACTS[0]
    queries = [{**QUERY, "id": f"q{i}", "target": fact.id, "correct": i % 2 == 0} for i in range(5)]
    value = {"row 0": 0.5, "random": -0.25, "source": -3.0}
    asked = []

    def stepped(model, optimizer, corpus, query, rankings, *, ks, **kwargs):  # known values per (ranking, question, k)
        asked.append(query)
        i = int(query[0]["id"][1:])
        return {name: {k: [value[name] * (i + 1) ** 2 + k, value[name] * 10 - i - k] for k in ks[name]}
                for name in rankings}

    monkeypatch.setattr(facts, "tail_patch_rankings", stepped)
    row = {"method": "m", "ranking": [["answer", "other"]] * 5}
    random_row, source_row = demo.tail_patch_rows(model, None, tok, CORPUS, queries, [row], seed=0, max_length=16,
                                                  progress=False)
    assert [q for q, _ in asked] == queries and all(t == facts.true_answer(q) for q, t in asked)
    asked.clear()  # the true answer attributed (`demo --answer true`): the steps are still measured on the model's
    said = [{**q, "completion": facts.true_answer(q)["completion"], "model_answer": " said"} for q in queries]
    demo.tail_patch_rows(model, None, tok, CORPUS, said, [{"method": "m", "ranking": [["answer", "other"]] * 5}], seed=0,
                         max_length=16, progress=False)
    assert [own["completion"] for own, _ in asked] == [" said"] * 5
    assert [true for _, true in asked] == [facts.true_answer(q) for q in said]
    for got, name, ks in ((row, "row 0", facts.TAIL_PATCH_KS), (random_row, "random", facts.TAIL_PATCH_KS),
                          (source_row, "source", (1,))):
        per_query = [{k: value[name] * (i + 1) ** 2 + k for k in ks} for i in range(5)]
        per_query_true = [{k: value[name] * 10 - i - k for k in ks} for i in range(5)]
        every, answered = facts.tail_patch_summary(per_query), facts.tail_patch_summary(per_query[::2])
        true = facts.tail_patch_summary(per_query_true)
        for k in ks:
            assert (got[f"tail_patch@{k}"], got[f"tail_patch@{k}_se"]) == (every[k]["mean"], every[k]["se"])
            assert got[f"tail_patch@{k}_answered"] == answered[k]["mean"] != every[k]["mean"]
            assert got[f"tail_patch@{k}_answered_se"] == answered[k]["se"]
            assert (got[f"tail_patch@{k}_true"], got[f"tail_patch@{k}_true_se"]) == (true[k]["mean"], true[k]["se"])
            assert got["tail_patch_per_query"][str(k)] == [v[k] for v in per_query]
            assert got["tail_patch_true_per_query"][str(k)] == [v[k] for v in per_query_true]
    for right in (0, 1):  # a mean with its standard error needs two questions answered right
        few = [{**q, "correct": i < right} for i, q in enumerate(queries)]
        row = {"method": "m", "ranking": [["answer", "other"]] * 5}
        demo.tail_patch_rows(model, None, tok, CORPUS, few, [row], seed=0, max_length=16, progress=False)
        assert "tail_patch@5" in row and "tail_patch@5_true" in row and "tail_patch@5_answered" not in row
