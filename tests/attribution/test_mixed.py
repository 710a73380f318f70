"""preconditioner="mixed" (TrackStar's task-aware curvature): (1 - w) F_train + w F_query per block, against a
dense reference from the compressed features; w = 0 is "fim"; a direction every query shares is damped; the
task_weight checks; a store read by a fresh process and two gloo ranks give the same scores."""
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from attribution_problems import loss_fn, make_problem, one_thread  # noqa: F401
from cli_usage import attribute_usage_error  # noqa: E402

from attribution import Attributor
from attribution.process_group import exit_now  # skips the shutdown where gloo aborts now and then

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FAST = dict(compressor="factgrass", k=16, seed=3, compile=False, progress=False)
SJLT = dict(compressor="sjlt", k=8, seed=1, dtype=torch.float64, compile=False, progress=False)


def _mixed_reference(attr, train, queries, task_weight, damping):
    """Dense [n_test, n_train] scores: per block, solve((1 - w) G^T G / n + w Q^T Q / m + lambda I, .) from the
    compressed training rows G and queries Q; lambda = f * trace / k for a relative damping "f*mean"."""
    rows = torch.cat([attr.compress_batch(batch)[0] for batch in train]).double()
    queries, offsets = queries.double(), attr.compress.offsets
    scores = torch.zeros(queries.shape[0], rows.shape[0], dtype=torch.float64)
    for start, end in zip(offsets[:-1], offsets[1:]):
        g, q = rows[:, start:end], queries[:, start:end]
        mixed = (1 - task_weight) * g.T @ g / g.shape[0] + task_weight * q.T @ q / q.shape[0]
        lam = float(damping.partition("*")[0]) * float(mixed.trace()) / (end - start) if isinstance(damping, str) else damping
        scores += q @ torch.linalg.solve(mixed + lam * torch.eye(end - start, dtype=torch.float64), g.T)
    return scores


@pytest.mark.parametrize("kwargs", [FAST, SJLT], ids=["factgrass-float32", "sjlt-float64"])
def test_task_weight_zero_is_fim_exactly(kwargs):
    model, train, test = make_problem(kwargs.get("dtype", torch.float32))
    fim = Attributor(model, loss_fn, damping="0.1*mean", **kwargs).cache(train)
    mixed = Attributor(model, loss_fn, damping="0.1*mean", preconditioner="mixed", task_weight=0.0, **kwargs).cache(train)
    assert torch.equal(mixed.attribute(test), fim.attribute(test))
    assert all(torch.equal(a, b) for a, b in zip(mixed.top_k(test, k=5), fim.top_k(test, k=5)))
    assert torch.equal(mixed.self_influence(), fim.self_influence())  # the query set of self-influence is the training set


@pytest.mark.parametrize("damping", [1e-3, "0.1*mean"])
def test_scores_equal_the_dense_mixed_reference_for_every_query_set(damping):
    model, train, test = make_problem(torch.float64)
    attr = Attributor(model, loss_fn, damping=damping, preconditioner="mixed", task_weight=0.7, **SJLT).cache(train)
    first = attr.query_features(test)
    expected = _mixed_reference(attr, train, first.grads[0], 0.7, damping)
    torch.testing.assert_close(attr.attribute(features=first), expected, rtol=1e-8, atol=1e-10)
    values, indices = attr.top_k(features=first, k=4)
    assert torch.equal(indices, expected.topk(4, dim=1).indices)
    other = attr.query_features([(b[0][:2], b[1][:2]) for b in train[:1]])  # another query set: its own mixed inverse
    torch.testing.assert_close(attr.attribute(features=other), _mixed_reference(attr, train, other.grads[0], 0.7, damping),
                               rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(attr.attribute(features=first), expected, rtol=1e-8, atol=1e-10)  # not a stale one
    twice = attr.features_from_gradients(first.grads[0].repeat(2, 1))  # per-example means: the size does not matter
    torch.testing.assert_close(attr.attribute(features=twice), expected.repeat(2, 1), rtol=1e-8, atol=1e-10)


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(2, 4, bias=False).double()  # identity compressor: one block of 8 columns


def test_a_direction_every_query_shares_is_damped_as_the_task_weight_grows():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    shared, other = torch.eye(8, dtype=torch.float64)[0], torch.eye(8, dtype=torch.float64)[1]
    queries = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    queries[:, 0] = 6.0  # every query carries the same large component along `shared` (a prompt template)
    along = []
    for weight in (0.0, 0.3, 0.6, 0.9):
        attr = Attributor(_linear(), lambda m, b: m(b).sum(1), compressor="identity", k=64, dtype=torch.float64,
                          compile=False, progress=False, damping=1e-3, preconditioner="mixed", task_weight=weight)
        attr.cache_gradients([train, torch.stack([shared, other])])  # rows 40 and 41: the probes
        scores = attr.attribute(features=attr.features_from_gradients(queries))
        along.append((scores[:, 40].abs().mean().item(), scores[:, 41].abs().mean().item()))
    assert all(a[0] > b[0] for a, b in zip(along, along[1:])), along  # the shared direction's scores shrink
    ratios = [s / o for s, o in along]
    assert all(a > b for a, b in zip(ratios, ratios[1:])), ratios  # and faster than those of a direction not shared


@pytest.mark.parametrize("task_weight", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.5", True, None])
def test_bad_task_weights_are_refused_naming_task_weight(task_weight):
    model, _, _ = make_problem()
    with pytest.raises(ValueError, match="task_weight"):
        Attributor(model, loss_fn, preconditioner="mixed", task_weight=task_weight, **FAST)


@pytest.mark.parametrize("kwargs", [dict(), dict(preconditioner="fim"), dict(preconditioner="none", method="graddot"),
                                    dict(method="graddot")])
def test_task_weight_without_the_mixed_preconditioner_is_refused(kwargs):
    model, _, _ = make_problem()
    with pytest.raises(ValueError, match="task_weight"):
        Attributor(model, loss_fn, task_weight=0.5, **{**FAST, **kwargs})


def test_mixed_needs_a_preconditioned_method_and_the_empirical_fisher():
    model, _, _ = make_problem()
    with pytest.raises(ValueError, match="method='graddot' uses no preconditioner"):
        Attributor(model, loss_fn, method="graddot", preconditioner="mixed", task_weight=0.5, **FAST)
    with pytest.raises(ValueError, match="fisher must be 'empirical'"):
        Attributor(model, loss_fn, preconditioner="mixed", task_weight=0.5, fisher="true",
                   logits_fn=lambda m, b: m(b[0]), **FAST)


FRESH = """
import sys, torch
sys.path.insert(0, {here!r})
from attribution_problems import make_problem, loss_fn
from attribution import Attributor
model, train, test = make_problem(torch.float32)
attr = Attributor(model, loss_fn, store={store!r}, preconditioner="mixed", task_weight=0.5, damping="0.1*mean",
                  compressor="factgrass", k=16, seed=3, compile=False, progress=False)
torch.save(attr.attribute(test), {out!r})
"""


def test_a_fresh_process_reads_the_store_and_gives_the_same_mixed_scores(tmp_path):
    model, train, test = make_problem(torch.float32)
    store, out = tmp_path / "store", tmp_path / "fresh.pt"
    Attributor(model, loss_fn, store=store, damping="0.1*mean", **FAST).cache(train)  # "fim" stores the training FIM
    mixed = Attributor(model, loss_fn, store=store, preconditioner="mixed", task_weight=0.5, damping="0.1*mean", **FAST)
    scores = mixed.cache(train).attribute(test)  # up to date: the same derived data serves "mixed"
    assert mixed.stats["fim_seconds"] == 0
    done = subprocess.run([sys.executable, "-c", FRESH.format(here=str(HERE), store=str(store), out=str(out))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(out), scores)


def _scores(root, tag):
    model, train, test = make_problem(torch.float32, n_train=37, batch=4)
    attr = Attributor(model, loss_fn, store=root / tag, preconditioner="mixed", task_weight=0.6, damping="0.1*mean",
                      memory_budget=3000, **FAST)
    attr.cache(train)
    return {"scores": attr.attribute(test), "top": attr.top_k(test, k=5), "self": attr.self_influence()}


def _worker(rank, world, init_file, root):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        torch.save(_scores(root, "dist"), root / f"out.{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_now(0)


def test_two_gloo_ranks_give_the_mixed_scores_of_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    single = _scores(tmp_path, "single")  # one_thread: the ranks' GEMMs, for bitwise equal results
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}.pt")
        assert torch.equal(got["scores"], single["scores"]), rank
        assert all(torch.equal(a, b) for a, b in zip(got["top"], single["top"])), rank
        assert torch.equal(got["self"], single["self"]), rank



# ---- the CLI: grass-attribute attribute --preconditioner mixed --task-weight W -----------------------------------
DOCS = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
        "python list data", "the function creates a list"]


@pytest.fixture
def cli_store(tiny_llama, tmp_path):
    pytest.importorskip("transformers", reason="the `llm` extra is not installed")
    from attribution.llm import cli

    corpus, store, prompts = tmp_path / "corpus.jsonl", tmp_path / "store", tmp_path / "prompts.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(DOCS)))
    cli.run(["cache", "--store", str(store), "--model", tiny_llama, "--corpus", str(corpus), "--k", "16", "--batch-size",
             "2", "--max-length", "8", "--layers", "model.layers.*", "--no-compile"])
    prompts.write_text("\n".join(json.dumps(q) for q in [{"id": "q0", "prompt": "a for", "completion": " loop list"},
                                                         {"id": "q1", "prompt": "the data", "completion": " privacy"}]))
    return store, prompts


def _report(store, prompts, out, *flags):
    from attribution.llm import cli

    results = cli.run(["attribute", "--store", str(store), "--prompts", str(prompts), "--top-k", "6", "--out", str(out),
                       *flags])
    return {r.query["id"]: {d["id"]: s for d, s in r.helpful} for r in results}, json.loads((out / "report.json").read_text())


def test_cli_mixed_preconditioner_records_its_weight_and_zero_is_the_fim(cli_store, tmp_path):
    store, prompts = cli_store
    plain, plain_report = _report(store, prompts, tmp_path / "plain")
    zero, zero_report = _report(store, prompts, tmp_path / "zero", "--preconditioner", "mixed", "--task-weight", "0")
    mixed, mixed_report = _report(store, prompts, tmp_path / "mixed", "--preconditioner", "mixed", "--task-weight", "0.5")
    assert zero == plain and "task_weight" not in plain_report["meta"]
    assert zero_report["meta"]["preconditioner"] == "mixed" and zero_report["meta"]["task_weight"] == 0.0
    assert mixed_report["meta"]["task_weight"] == 0.5 and mixed != plain
    assert all(set(mixed[q]) == set(plain[q]) for q in plain)  # every document listed, with other scores


@pytest.mark.parametrize("flags, message", [
    (["--task-weight", "0.5"], "--task-weight weights the query set in --preconditioner mixed"),
    (["--preconditioner", "mixed"], "--preconditioner mixed needs --task-weight W"),
    (["--preconditioner", "mixed", "--task-weight", "0.5", "--per-token"], "--per-token would add each token's row"),
    (["--preconditioner", "mixed", "--task-weight", "1"], "argument --task-weight: must be in [0, 1)"),
    (["--preconditioner", "mixed", "--task-weight", "nan"], "argument --task-weight: must be in [0, 1)"),
    (["--preconditioner", "mixed", "--task-weight", "x"], "argument --task-weight: must be a number in [0, 1)"),
    (["--preconditioner", "kfac"], "--preconditioner kfac needs its data"),
])
def test_bad_mixed_flags_exit_2_naming_the_flag(cli_store, tmp_path, capsys, flags, message):
    store, prompts = cli_store
    last = attribute_usage_error(store, prompts, tmp_path / "r", flags, capsys)
    assert message in last, last
