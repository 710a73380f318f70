"""Optimizer-aware normalization (Attributor(optimizer_state=...), cache --optimizer-state): each per-sample
gradient divided by sqrt(v) + eps before compression (flat compressors exactly, factorized ones with Adafactor's
rank-1 factors of v), the same for the cache and the queries, recorded in the store."""
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attribution_problems import block_scores, dense_grads, loss_fn, make_problem, one_thread  # noqa: F401
from torch import nn

from attribution import Attributor
from grass_ops import compressors as C

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
QUIET = {"compile": False, "progress": False, "dtype": torch.float64}


def trained_state(model, batches, steps=2, optimizer=torch.optim.AdamW, groups=None, **options):
    """The state_dict of ``optimizer`` after ``steps`` passes over ``batches`` on a copy of ``model`` (the model's
    own weights stay as they are); ``groups(copy)``: its parameter groups (default: copy.parameters())."""
    twin = copy.deepcopy(model)
    opt = optimizer(twin.parameters() if groups is None else groups(twin), lr=1e-2, **options)
    for _ in range(steps):
        for batch in batches:
            opt.zero_grad()
            loss_fn(twin, batch).mean().backward()
            opt.step()
    return opt.state_dict()


def v_hat(state, index):
    """Adam's bias-corrected second moment of parameter ``index``, float64."""
    entry = state["state"][index]
    beta2 = next(g for g in state["param_groups"] if index in g["params"])["betas"][1]
    return entry["exp_avg_sq"].double() / (1 - beta2 ** float(entry["step"]))


def bias_grads(model, batches, layer):
    """Per-sample gradients [n, d_out] of ``layer``'s bias."""
    rows = []
    for x, y in batches:
        for i in range(len(x)):
            rows.append(torch.autograd.grad(loss_fn(model, (x[i : i + 1], y[i : i + 1])).sum(), layer.bias)[0])
    return torch.stack(rows)


def compressed(attr, name, grads):
    return attr.compressors[name](grads)


def full_factgrass(layer, k, seed):
    """FactGraSS keeping every input and output coordinate (identity masks), k = d_in * d_out."""
    return C.FactGraSS(layer.d_in, layer.d_out, layer.params, layer.d_in, layer.d_out, seed)


@pytest.mark.parametrize("compressor, method", [("identity", "graddot"), ("identity", "if"), ("sjlt", "graddot")])
def test_flat_compressors_divide_every_gradient_exactly(compressor, method):
    model, train, test = make_problem()
    state = trained_state(model, train)
    eps = 1e-3  # large enough to matter next to sqrt(v)
    attr = Attributor(model, loss_fn, method=method, compressor=compressor, k=10**6 if compressor == "identity" else 32,
                      damping=1e-2, params=["0.bias"], param_compressor=compressor, optimizer_state=state,
                      optimizer_eps=eps, **QUIET)
    scores = attr.cache(train).attribute(test)
    divisors = [v_hat(state, 0).T.flatten().sqrt() + eps, v_hat(state, 2).T.flatten().sqrt() + eps,
                v_hat(state, 1).sqrt() + eps]  # model.parameters(): 0.weight, 0.bias, 2.weight, 2.bias
    names = ["0", "2", "param:0.bias"]
    raw = [dense_grads(model, part) + [bias_grads(model, part, model[0])] for part in (train, test)]
    expected = block_scores(*([compressed(attr, n, g / d) for n, g, d in zip(names, grads, divisors)] for grads in raw),
                            1e-2, method)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    plain = block_scores(*([compressed(attr, n, g) for n, g in zip(names, grads)] for grads in raw), 1e-2, method)
    assert not torch.allclose(scores, plain, rtol=1e-2)  # the division changes the scores


def factored_divisor(v, eps):
    """sqrt of Adafactor's rank-1 approximation of v + eps**2 ([d_in, d_out]): row x column means / mean."""
    w = v + eps**2
    return (torch.outer(w.mean(1), w.mean(0)) / w.mean()).sqrt()


@pytest.mark.parametrize("compressor", [full_factgrass, "logra"], ids=["factgrass-full", "logra"])
def test_factorized_compressors_divide_by_the_adafactor_factors(compressor):
    model, train, test = make_problem()
    state = trained_state(model, train)
    eps = 1e-3
    attr = Attributor(model, loss_fn, method="graddot", compressor=compressor, k=10**6 if callable(compressor) else 16,
                      optimizer_state=state, optimizer_eps=eps, **QUIET)
    scores = attr.cache(train).attribute(test)
    factored = [factored_divisor(v_hat(state, i).T, eps).flatten() for i in (0, 2)]
    exact = [v_hat(state, i).T.flatten().sqrt() + eps for i in (0, 2)]
    raw = [dense_grads(model, part) for part in (train, test)]

    def reference(divisors):
        return block_scores(*([compressed(attr, n, g / d) for n, g, d in zip("02", grads, divisors)] for grads in raw),
                            0, "graddot")

    assert torch.allclose(scores, reference(factored), rtol=1e-8, atol=1e-10)
    assert not torch.allclose(scores, reference(exact), rtol=1e-3)  # v is not rank 1: the factors approximate it


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_rank_one_second_moment_is_divided_exactly_by_its_factors(compile):
    model, train, test = make_problem()
    gen = torch.Generator().manual_seed(1)
    moments = {f"{i}.weight": torch.outer(torch.rand(m.out_features, generator=gen, dtype=torch.float64) + 0.1,
                                          torch.rand(m.in_features, generator=gen, dtype=torch.float64) + 0.1) * 1e-4
               for i, m in ((0, model[0]), (2, model[2]))}
    attr = Attributor(model, loss_fn, method="graddot", compressor=full_factgrass, k=10**6, optimizer_state=moments,
                      optimizer_eps=0.0, **{**QUIET, "compile": compile})
    scores = attr.cache(train).attribute(test)
    raw = [dense_grads(model, part) for part in (train, test)]
    divisors = [moments[f"{i}.weight"].T.flatten().sqrt() for i in (0, 2)]
    expected = block_scores(*([compressed(attr, n, g / d) for n, g, d in zip("02", grads, divisors)] for grads in raw),
                            0, "graddot")
    assert torch.allclose(scores, expected, rtol=1e-8, atol=1e-10)


def test_the_hugging_face_trainers_groups_are_matched_by_their_order():
    model, train, test = make_problem()

    def trainer_groups(twin):  # weights (decayed) first, then the biases, as Trainer.create_optimizer lists them
        named = list(twin.named_parameters())
        return [{"params": [p for n, p in named if "bias" not in n], "weight_decay": 0.01},
                {"params": [p for n, p in named if "bias" in n], "weight_decay": 0.0}]

    state = trained_state(model, train, groups=trainer_groups)
    kwargs = {"method": "graddot", "compressor": "sjlt", "k": 16, "params": ["2.bias"], **QUIET}
    scores = Attributor(model, loss_fn, optimizer_state=state, **kwargs).cache(train).attribute(test)
    by_name = {"0.weight": v_hat(state, 0), "2.weight": v_hat(state, 1), "2.bias": v_hat(state, 3)}
    assert torch.equal(scores, Attributor(model, loss_fn, optimizer_state=by_name, **kwargs).cache(train).attribute(test))


def _stacked_model():
    """Three equal 4 x 4 Linear layers: every layer's state has every other layer's shape."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)).double()


def _reversed_groups_state(model, named: bool):
    """A state whose groups list the layers last first (layer-wise learning rates), each layer with its own scale of
    gradient, so that every layer's second moment differs; ``named``: built from named_parameters()."""
    layers = [(str(i), model[i]) for i in (2, 1, 0)]
    groups = [{"params": list(layer.named_parameters(prefix=i)) if named else list(layer.parameters()),
               "lr": 1e-2 * 0.5 ** int(i)} for i, layer in layers]
    opt = torch.optim.AdamW(groups)
    for scale, layer in zip((1.0, 10.0, 100.0), model):
        layer.weight.grad, layer.bias.grad = torch.full_like(layer.weight, scale), torch.full_like(layer.bias, scale)
    opt.step()
    return opt, opt.state_dict()


def test_groups_in_another_order_are_matched_by_their_recorded_names_or_refused():
    from attribution import optimizer_state

    model = _stacked_model()
    opt, state = _reversed_groups_state(model, named=True)
    found = optimizer_state.match(model, state, ["0.weight", "1.bias", "2.weight"])
    for name, p in model.named_parameters():
        if name in found:
            assert torch.equal(found[name][0], opt.state[p]["exp_avg_sq"]), name
    assert found["0.weight"][0].flatten()[0] != found["2.weight"][0].flatten()[0]
    _, unnamed = _reversed_groups_state(model, named=False)  # the shapes fit any order: nothing says which it is
    with pytest.raises(ValueError, match=r"optimizer_state: its 3 parameter groups \(sizes \[2, 2, 2\]\) are not the "
                                         "Hugging Face Trainer's .*named_parameters"):
        optimizer_state.match(model, unnamed, ["0.weight"])
    renamed = copy.deepcopy(state)
    renamed["param_groups"][0]["param_names"][0] = "9.weight"
    with pytest.raises(ValueError, match=r"optimizer_state: it names parameters that the model does not have: "
                                         r"\['9.weight'\]"):
        optimizer_state.match(model, renamed, ["0.weight"])


def test_a_named_single_group_maps_a_tied_weight_under_either_name():
    from attribution import optimizer_state

    model = _stacked_model()
    model[2].weight = model[0].weight  # tied: named_parameters() lists it once, as 0.weight
    opt = torch.optim.AdamW([(n, p) for n, p in model.named_parameters(remove_duplicate=False) if n != "0.weight"][::-1])
    names = opt.state_dict()["param_groups"][0]["param_names"]
    assert "2.weight" in names and "0.weight" not in names  # recorded under its other name
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    found = optimizer_state.match(model, opt.state_dict(), ["0.weight", "1.weight"])
    assert torch.equal(found["0.weight"][0], opt.state[model[0].weight]["exp_avg_sq"])
    assert torch.equal(found["1.weight"][0], opt.state[model[1].weight]["exp_avg_sq"])


def test_power_one_half_scores_the_first_order_of_one_adam_step():
    """optimizer_power=0.5 with GradDot: score(q, d) = <g_q, g_d / (sqrt(v) + eps)>, exactly; and that is what one Adam
    step without momentum on document d does to the query's loss, to first order: -lr * score (every parameter
    covered: the weights as layers, the biases as params=; a long-run state with beta2 near 1, so that the step's own
    g**2 leaves v as it is)."""
    model, train, test = make_problem()
    state = trained_state(model, train)
    for index, entry in state["state"].items():  # v as it is (bias-corrected), after a long run: correction 1
        entry["exp_avg_sq"], entry["step"] = v_hat(state, index), torch.tensor(1e8, dtype=torch.float64)
    beta2 = 1 - 1e-6  # so the step's own (1 - beta2) g**2 leaves v as it is
    state["param_groups"] = [{**group, "betas": (0.9, beta2)} for group in state["param_groups"]]
    eps = 1e-3
    attr = Attributor(model, loss_fn, method="graddot", compressor="identity", k=10**6, params=["0.bias", "2.bias"],
                      param_compressor="identity", optimizer_state=state, optimizer_eps=eps, optimizer_power=0.5,
                      **QUIET)
    scores = attr.cache(train).attribute(test)
    by_name = dict(zip(["0.weight", "0.bias", "2.weight", "2.bias"], range(4)))  # model.parameters() order
    divisor = {n: v_hat(state, i).sqrt() + eps for n, i in by_name.items()}

    def grads(batch):
        model.zero_grad()
        loss_fn(model, batch).sum().backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    samples = [(x[i : i + 1], y[i : i + 1]) for x, y in train for i in range(len(x))]
    queries = [(x[i : i + 1], y[i : i + 1]) for x, y in test for i in range(len(x))]
    g_train, g_test = [grads(b) for b in samples], [grads(b) for b in queries]
    expected = torch.tensor([[sum(float((q[n] * d[n] / divisor[n]).sum()) for n in by_name) for d in g_train]
                             for q in g_test], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12 * float(expected.abs().max()))
    lr, moved = 1e-6, []
    for d in range(0, len(samples), 7):  # a real step, from a copy, on a few documents
        twin = copy.deepcopy(model)
        step = torch.optim.Adam(twin.parameters(), lr=lr, betas=(0.0, beta2), eps=eps)
        step.load_state_dict({**copy.deepcopy(state), "param_groups": [{**state["param_groups"][0], "lr": lr,
                                                                       "betas": (0.0, beta2), "eps": eps,
                                                                       "weight_decay": 0.0}]})
        step.zero_grad()
        loss_fn(twin, samples[d]).sum().backward()
        step.step()
        with torch.no_grad():
            moved.append((loss_fn(twin, queries[0]) - loss_fn(model, queries[0])).item() / -lr)
    torch.testing.assert_close(torch.tensor(moved, dtype=torch.float64), scores[0, ::7], rtol=1e-3, atol=0)
    power_one = Attributor(model, loss_fn, method="graddot", compressor="identity", k=10**6, params=["0.bias", "2.bias"],
                           param_compressor="identity", optimizer_state=state, optimizer_eps=eps, **QUIET)
    assert not torch.allclose(power_one.cache(train).attribute(test), scores, rtol=1e-2)  # TrackStar's: divisor squared


def test_the_power_scales_the_adafactor_factors_and_a_rank_one_moment_exactly():
    from attribution.optimizer_state import exact_scale, factored_scales

    gen = torch.Generator().manual_seed(2)
    rank_one = torch.outer(torch.rand(6, generator=gen, dtype=torch.float64) + 0.1,
                           torch.rand(5, generator=gen, dtype=torch.float64) + 0.1)
    for power in (0.5, 1.0, 2.0):
        x_scale, g_scale = factored_scales(rank_one, 0.0, power)
        torch.testing.assert_close(torch.outer(x_scale, g_scale), rank_one.pow(-power / 2), rtol=1e-12, atol=0)
        torch.testing.assert_close(exact_scale(rank_one, 1e-3, power), (rank_one.sqrt() + 1e-3).pow(-power),
                                   rtol=1e-12, atol=0)
    v = torch.rand(6, 5, generator=gen, dtype=torch.float64)
    half, whole = factored_scales(v, 1e-3, 0.5), factored_scales(v, 1e-3)
    for a, b in zip(half, whole):
        torch.testing.assert_close(a * a, b, rtol=1e-12, atol=0)  # the power-1/2 factors are the roots of TrackStar's


def test_a_store_records_its_power_and_refuses_another_and_bad_powers_are_named(tmp_path):
    model, train, test = make_problem()
    state = trained_state(model, train)
    kwargs = {"method": "graddot", "compressor": "factgrass", "k": 16, **QUIET}
    trackstar, half = tmp_path / "trackstar", tmp_path / "half"
    Attributor(model, loss_fn, store=trackstar, optimizer_state=state, **kwargs).cache(train)
    record = json.loads((trackstar / "manifest.json").read_text())["optimizer_state"]
    assert set(record) == {"sha256", "eps"}  # the default power is not recorded: older stores read back the same
    explicit = tmp_path / "explicit"
    Attributor(model, loss_fn, store=explicit, optimizer_state=state, optimizer_power=1, **kwargs).cache(train)
    assert json.loads((explicit / "manifest.json").read_text())["optimizer_state"] == record
    scores = Attributor(model, loss_fn, store=half, optimizer_state=state, optimizer_power=0.5, **kwargs).cache(
        train).attribute(test)
    halved = json.loads((half / "manifest.json").read_text())["optimizer_state"]
    assert halved["power"] == 0.5 and halved["sha256"] != record["sha256"]
    with pytest.raises(ValueError, match=r"optimizer_state: the store .* power 0.5; this one: .* power 1.0"):
        Attributor(model, loss_fn, store=half, optimizer_state=state, **kwargs)
    with pytest.raises(ValueError, match=r"optimizer_state: the store .* power 1.0; this one: .* power 0.25"):
        Attributor(model, loss_fn, store=trackstar, optimizer_state=state, optimizer_power=0.25, **kwargs)
    again = Attributor(model, loss_fn, store=half, optimizer_state=state, optimizer_power=0.5, **kwargs).attribute(test)
    assert torch.equal(again, scores)
    for power in (0, -1, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="optimizer_power must be a finite number > 0"):
            Attributor(model, loss_fn, optimizer_state=state, optimizer_power=power, **kwargs)
    with pytest.raises(ValueError, match="optimizer_power=0.5 needs an optimizer_state"):
        Attributor(model, loss_fn, optimizer_power=0.5, **kwargs)


FRESH = """
import sys, torch
sys.path.insert(0, {here!r})
from attribution_problems import make_problem, loss_fn
from attribution import Attributor
model, train, test = make_problem()
kwargs = dict(method="graddot", compressor="factgrass", k=16, compile=False, progress=False, dtype=torch.float64)
try:
    Attributor(model, loss_fn, store={store!r}, **kwargs)
except ValueError as err:
    print("refused:", err)
torch.save(Attributor(model, loss_fn, store={store!r}, optimizer_state={path!r}, **kwargs).attribute(test), {out!r})
"""


def test_a_store_refuses_another_optimizer_state_or_none(tmp_path):
    model, train, test = make_problem()
    state, other = trained_state(model, train), trained_state(model, train, steps=3)
    kwargs = {"method": "graddot", "compressor": "factgrass", "k": 16, **QUIET}
    store = tmp_path / "store"
    attr = Attributor(model, loss_fn, store=store, optimizer_state=state, **kwargs)
    scores = attr.cache(train).attribute(test)
    assert json.loads((store / "manifest.json").read_text())["optimizer_state"]["eps"] == 1e-8
    torch.save(state, tmp_path / "optimizer.pt")
    again = Attributor(model, loss_fn, store=store, optimizer_state=tmp_path / "optimizer.pt", **kwargs).attribute(test)
    assert torch.equal(scores, again)
    for refused, message in (({"optimizer_state": other}, "cached with another optimizer state"),
                             ({"optimizer_state": state, "optimizer_eps": 1e-6}, "cached with another optimizer state"),
                             ({}, "cached with an optimizer state .* give the same optimizer_state")):
        with pytest.raises(ValueError, match=f"optimizer_state: the store .*{message}"):
            Attributor(model, loss_fn, store=store, **refused, **kwargs)
    plain = tmp_path / "plain"
    without = Attributor(model, loss_fn, store=plain, **kwargs)
    without.cache(train)
    with pytest.raises(ValueError, match="optimizer_state: the store .* was cached without an optimizer state"):
        Attributor(model, loss_fn, store=plain, optimizer_state=state, **kwargs)
    with pytest.raises(ValueError, match="another configuration"):  # query features carry the normalization too
        without.attribute(features=attr.query_features(test))
    out = tmp_path / "fresh.pt"
    done = subprocess.run([sys.executable, "-c", FRESH.format(here=str(HERE), store=str(store), out=str(out),
                                                              path=str(tmp_path / "optimizer.pt"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "refused: optimizer_state: the store" in done.stdout and "cached with an optimizer state" in done.stdout
    assert torch.equal(torch.load(out), scores)


def test_bad_optimizer_states_are_refused_naming_the_argument(tmp_path):
    model, train, _ = make_problem()
    kwargs = {"method": "graddot", "compressor": "sjlt", "k": 16, **QUIET}
    other_model = nn.Sequential(nn.Linear(10, 30), nn.Tanh(), nn.Linear(30, 4)).double()
    ones = {"0.weight": torch.ones(24, 10), "2.weight": torch.ones(4, 24)}
    torch.save({"not": "a state"}, tmp_path / "junk.pt")
    (tmp_path / "text.pt").write_text("hello")
    cases = [
        (trained_state(other_model, train), ValueError, "optimizer_state: .*a state of another model"),
        (trained_state(model, train, optimizer=torch.optim.SGD, momentum=0.9), ValueError,
         r"optimizer_state: .*no 'exp_avg_sq' .*momentum_buffer"),
        ({**ones, "0.weight": -ones["0.weight"]}, ValueError, "optimizer_state: .*'0.weight' holds negative"),
        ({**ones, "0.weight": torch.full((24, 10), float("nan"))}, ValueError, "optimizer_state: .*non-finite"),
        ({"0.weight": ones["0.weight"]}, ValueError, "optimizer_state: .*no exp_avg_sq for parameter '2.weight'"),
        ({**ones, "2.weight": torch.ones(24, 4)}, ValueError, r"optimizer_state: exp_avg_sq of '2.weight' has shape \(24, 4\)"),
        (tmp_path / "missing.pt", FileNotFoundError, "optimizer_state: no file"),
        (tmp_path / "junk.pt", ValueError, "optimizer_state: expected an optimizer state_dict"),
        (tmp_path / "text.pt", ValueError, "optimizer_state: .* is not a file torch.load"),
        (3, TypeError, "optimizer_state must be None"),
    ]
    for state, error, message in cases:
        with pytest.raises(error, match=message):
            Attributor(model, loss_fn, optimizer_state=state, **kwargs)
    with pytest.raises(ValueError, match="optimizer_eps must be a finite number >= 0"):
        Attributor(model, loss_fn, optimizer_state=ones, optimizer_eps=-1.0, **kwargs)
    with pytest.raises(ValueError, match="optimizer_eps=0 with zeros"):
        Attributor(model, loss_fn, optimizer_state={**ones, "2.weight": torch.zeros(4, 24)}, optimizer_eps=0, **kwargs)
    with pytest.raises(ValueError, match="optimizer_state is not supported with preconditioner='kfac'"):
        Attributor(model, loss_fn, preconditioner="kfac", optimizer_state=ones, **{**kwargs, "method": "if"})


def tiny_llm_training(tiny_llama, tmp_path):
    """(corpus path, model, tokenizer, AdamW in the Trainer's two groups after one pass, its batches, the path of its
    saved state) on the tiny Llama's 4-document corpus."""
    pytest.importorskip("transformers", reason="the `llm` extra is not installed")
    from attribution import llm

    docs = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(docs)))
    model, tokenizer = llm.load_model(tiny_llama)
    named = list(model.named_parameters())
    norms = [p for n, p in named if "norm" in n]  # the Trainer's groups: decayed, then norms (not decayed)
    opt = torch.optim.AdamW([{"params": [p for n, p in named if "norm" not in n], "weight_decay": 0.01},
                             {"params": norms, "weight_decay": 0.0}], lr=1e-3)
    batches, _ = llm.document_batches(tokenizer, [{"id": "x", "text": t} for t in docs], 2, 8)
    for batch in batches:
        opt.zero_grad()
        llm.sequence_loss(model, batch).mean().backward()
        opt.step()
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    return corpus, model, tokenizer, opt, batches, path


def tiny_cache_flags(tiny_llama, store, corpus) -> list[str]:
    return ["cache", "--store", str(store), "--model", tiny_llama, "--corpus", str(corpus), "--k", "16", "--batch-size",
            "2", "--max-length", "8", "--layers", "model.layers.*", "--no-compile"]


def test_the_cli_caches_and_attributes_with_an_optimizer_state(tiny_llama, tmp_path, capsys):
    from attribution import llm
    from attribution.llm import cli

    corpus, model, tokenizer, opt, batches, path = tiny_llm_training(tiny_llama, tmp_path)
    store = tmp_path / "store"
    cache = tiny_cache_flags(tiny_llama, store, corpus)
    assert cli.run([*cache, "--optimizer-state", str(path)])["documents"] == 4
    assert json.loads((store / "cli.json").read_text())["flags"]["optimizer_state"] == str(path.resolve())
    assert set(json.loads((store / "manifest.json").read_text())["optimizer_state"]) == {"sha256", "eps"}
    # the energy masks are chosen in the normalized coordinates, so their record names the state
    assert json.loads((store / "masks" / "masks.json").read_text())["optimizer_state"] == json.loads(
        (store / "manifest.json").read_text())["optimizer_state"]
    attribute = ["attribute", "--store", str(store), "--prompt", "a for", "--generate", "2", "--top-k", "2", "--out"]
    results = cli.run([*attribute, str(tmp_path / "report")])
    assert len(results[0].helpful) == 2
    plain = tmp_path / "plain"
    cli.run(cache[:2] + [str(plain)] + cache[3:])
    assert "optimizer_state" not in json.loads((plain / "cli.json").read_text())["flags"]  # absent, as before the flag
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    llm.sequence_loss(model, batches[0]).mean().backward()
    sgd.step()
    torch.save(sgd.state_dict(), tmp_path / "sgd.pt")
    mlp, mlp_train, _ = make_problem()
    torch.save(trained_state(mlp, mlp_train[:1]), tmp_path / "mlp.pt")  # an Adam state of another model
    refusals = [([*cache, "--optimizer-state", str(tmp_path / "mlp.pt")], r"cached with other flags \(--optimizer-state"),
                ([*cache[:2], str(tmp_path / "s2"), *cache[3:], "--optimizer-state", str(tmp_path / "sgd.pt")],
                 "--optimizer-state .*sgd.pt: optimizer_state: the optimizer state holds no 'exp_avg_sq'"),
                ([*cache[:2], str(tmp_path / "s3"), *cache[3:], "--optimizer-state", str(tmp_path / "none.pt")],
                 "--optimizer-state .*none.pt: no such file"),
                ([*cache[:2], str(tmp_path / "s4"), *cache[3:], "--optimizer-state", str(tmp_path / "mlp.pt")],
                 "--optimizer-state .*mlp.pt: optimizer_state: .*a state of another model")]
    opt.step()  # the same file, another state: the store refuses it
    torch.save(opt.state_dict(), path)
    refusals.append(([*attribute, str(tmp_path / "r2")], "--optimizer-state .*cached with another optimizer state"))
    for argv, message in refusals:
        assert cli.main(argv) == 2, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("grass-attribute: error: ") and re.search(message, last), last


def test_the_cli_records_an_optimizer_power_that_a_fresh_process_reads_back(tiny_llama, tmp_path, capsys):
    """cache --optimizer-power 0.5 is recorded in cli.json and the manifest; a fresh process's attribute --method graddot
    reads it from the store alone; --optimizer-power 1 is the default, recorded as no flag; without --optimizer-state,
    or not a number > 0, it is refused by name."""
    from attribution.llm import cli

    corpus, _, _, _, _, path = tiny_llm_training(tiny_llama, tmp_path)
    half, one = tmp_path / "half", tmp_path / "one"
    assert cli.run([*tiny_cache_flags(tiny_llama, half, corpus), "--optimizer-state", str(path), "--optimizer-power",
                    "0.5"])["documents"] == 4
    assert json.loads((half / "cli.json").read_text())["flags"]["optimizer_power"] == 0.5
    assert json.loads((half / "manifest.json").read_text())["optimizer_state"]["power"] == 0.5
    cli.run([*tiny_cache_flags(tiny_llama, one, corpus), "--optimizer-state", str(path), "--optimizer-power", "1"])
    assert "optimizer_power" not in json.loads((one / "cli.json").read_text())["flags"]
    assert "power" not in json.loads((one / "manifest.json").read_text())["optimizer_state"]
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "attribution.llm.cli", "attribute", "--store", str(half), "--method",
                           "graddot", "--prompt", "a for", "--generate", "2", "--top-k", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert len(report["queries"][0]["helpful"]) == 2
    refusals = [([*tiny_cache_flags(tiny_llama, tmp_path / "s1", corpus), "--optimizer-power", "0.5"],
                 "--optimizer-power 0.5 is the power of --optimizer-state's division .* give --optimizer-state FILE"),
                ([*tiny_cache_flags(tiny_llama, half, corpus), "--optimizer-state", str(path)],
                 r"cached with other flags \(--optimizer-power")]
    for argv, message in refusals:
        assert cli.main(argv) == 2, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.search(message, last), last
    from attribution.llm import UsageError
    from attribution.llm.config import CacheConfig

    assert CacheConfig().power == 1.0 and CacheConfig(optimizer_state="s.pt", optimizer_power=0.5).power == 0.5
    for bad, message in (({"optimizer_state": "s.pt", "optimizer_power": 0}, "--optimizer-power: optimizer_power must"),
                         ({"optimizer_power": 0.5}, "--optimizer-power 0.5 without --optimizer-state")):
        with pytest.raises(UsageError, match=message):  # a configuration not made by the flags: named, not defaulted
            CacheConfig(**bad).power
    with pytest.raises(SystemExit):  # argparse's own refusal
        cli.main([*tiny_cache_flags(tiny_llama, tmp_path / "s2", corpus), "--optimizer-state", str(path),
                  "--optimizer-power", "0"])
    assert "argument --optimizer-power: must be a finite number > 0, got 0.0" in capsys.readouterr().err


def test_a_state_file_is_read_memory_mapped_or_whole_in_the_legacy_format(tmp_path):
    from attribution import optimizer_state

    model, train, _ = make_problem()
    state = trained_state(model, train)
    modern, legacy = tmp_path / "modern.pt", tmp_path / "legacy.pt"
    torch.save(state, modern)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)  # mmap cannot read it: read whole
    for path in (modern, legacy):
        found = optimizer_state.match(model, optimizer_state.load(path), ["0.weight", "2.weight"])
        assert torch.equal(found["0.weight"][0], state["state"][0]["exp_avg_sq"])
        assert torch.equal(found["2.weight"][0], state["state"][2]["exp_avg_sq"])


def test_an_absolute_damping_with_an_optimizer_state_is_warned_about(recwarn):
    model, train, _ = make_problem()
    ones = {"0.weight": torch.ones(24, 10), "2.weight": torch.ones(4, 24)}
    kwargs = {"compressor": "sjlt", "k": 16, **QUIET}
    with pytest.warns(UserWarning, match=r"damping=0.001 is absolute, and optimizer_state scales the gradients"):
        Attributor(model, loss_fn, method="if", optimizer_state=ones, damping=1e-3, **kwargs)
    recwarn.clear()
    Attributor(model, loss_fn, method="if", optimizer_state=ones, damping="0.01*mean", **kwargs)
    Attributor(model, loss_fn, method="graddot", optimizer_state=ones, damping=1e-3, **kwargs)  # no preconditioner
    Attributor(model, loss_fn, method="if", damping=1e-3, **kwargs)  # no optimizer state
    assert not [w for w in recwarn if "is absolute" in str(w.message)]


def test_recorded_names_under_a_wrappers_prefix_are_matched():
    from attribution import optimizer_state

    model = _stacked_model()
    opt, state = _reversed_groups_state(model, named=True)
    wrapped = copy.deepcopy(state)
    for group in wrapped["param_groups"]:  # as DistributedDataParallel or torch.compile names them
        group["param_names"] = [f"module._orig_mod.{n}" for n in group["param_names"]]
    found = optimizer_state.match(model, wrapped, ["0.weight", "2.weight"])
    assert torch.equal(found["0.weight"][0], opt.state[model[0].weight]["exp_avg_sq"])
    assert torch.equal(found["2.weight"][0], opt.state[model[2].weight]["exp_avg_sq"])
