"""The next optimizer step without changing the optimizer (attribution.evaluation.optimizer_step, tail-patch's step):
the direct Adam / AdamW form equals torch's own step on deep copies bit for bit, over hyperparameters, gradient
scales, momentum on and off and slice sizes that cut tensors anywhere; other optimizers and unstepped parameters
take the copied step; the model and the optimizer are left as they were."""
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attribution.evaluation import optimizer_step


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3, bias=False))


def _trained(kind: str, **hyper):
    """A model and its optimizer after two steps (moments and step counts in the state); its last layer's bias-free
    weight and its first layer are stepped, nothing else."""
    model = _model()
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind](
        model.parameters(), **hyper)
    for seed in (1, 2):
        optimizer.zero_grad()
        model(torch.randn(4, 7, generator=torch.Generator().manual_seed(seed))).pow(2).sum().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def _grads(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def _reference(model, optimizer, grads, momentum: bool, scale: float):
    """The definition: deep copies of the model and the optimizer (the momentum off: beta1 / momentum 0), the
    gradients set, one torch step."""
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[names[id(p)]] for p in g["params"]]}
              for g in optimizer.param_groups]
    step = type(optimizer)(groups)
    step.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for group in step.param_groups if not momentum else []:
        group.update(optimizer_step.without_momentum(group))
    for name, p in params.items():
        p.grad = grads[name] * scale
    step.step()
    return {n: p.detach() for n, p in params.items()}


def _unchanged(model, optimizer):
    """A check that ``model``'s weights and ``optimizer``'s state are as they are now, bit for bit."""
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())

    def check():
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        now = optimizer.state_dict()
        assert now["param_groups"] == state["param_groups"]
        for i, s in state["state"].items():
            assert all(torch.equal(v, now["state"][i][k]) if torch.is_tensor(v) else v == now["state"][i][k]
                       for k, v in s.items())
    return check


@given(kind=st.sampled_from(["adam", "adamw"]), decay=st.sampled_from([0.0, 0.1]),
       betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]), momentum=st.booleans(),
       scale=st.sampled_from([1.0, 0.37]), chunk=st.sampled_from([1, 3, 16, 1 << 18]))
def test_the_direct_adam_step_equals_torch_on_deep_copies_bit_for_bit(kind, decay, betas, momentum, scale, chunk):
    model, optimizer = _trained(kind, lr=0.01, betas=betas, weight_decay=decay)
    grads = _grads(model)
    unchanged = _unchanged(model, optimizer)
    saved = optimizer_step.CHUNK
    optimizer_step.CHUNK = chunk  # slices of any size, cutting tensors anywhere
    try:
        got = optimizer_step.stepped_parameters(model, optimizer, grads, None, momentum, scale)
    finally:
        optimizer_step.CHUNK = saved
    want = _reference(model, optimizer, grads, momentum, scale)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    unchanged()


def test_the_direct_form_is_the_one_taken_for_adam_and_others_take_the_copied_step(monkeypatch):
    model, adamw = _trained("adamw", lr=0.01)
    calls = []
    real = optimizer_step._adam_step
    monkeypatch.setattr(optimizer_step, "_adam_step", lambda *a: calls.append(1) or real(*a))
    optimizer_step.stepped_parameters(model, adamw, _grads(model), None)
    assert len(calls) == len(list(model.parameters()))
    calls.clear()
    for kind, hyper in (("adamw", {"amsgrad": True}), ("sgd", {"momentum": 0.9})):
        model, optimizer = _trained(kind, lr=0.01, **hyper)
        got = optimizer_step.stepped_parameters(model, optimizer, _grads(model), None, momentum=True)
        want = _reference(model, optimizer, _grads(model), True, 1.0)
        assert not calls and all(torch.equal(got[n], want[n]) for n in want), kind


def test_a_parameter_the_optimizer_never_stepped_takes_the_copied_step_and_one_without_gradient_keeps_its_value():
    model, optimizer = _trained("adamw", lr=0.01)
    extra = torch.nn.Parameter(torch.ones(2))
    model.register_parameter("extra", extra)
    optimizer.add_param_group({"params": [extra]})  # no state yet: torch initializes it on the step
    grads = _grads(model)
    grads["extra"] = torch.full((2,), 0.5)
    del grads["0.bias"]
    got = optimizer_step.stepped_parameters(model, optimizer, grads, None, momentum=True)
    assert "0.bias" not in got
    want = _reference(model, optimizer, {**grads, "0.bias": torch.zeros(5)}, True, 1.0)  # 0.bias: not compared
    assert torch.equal(got["extra"], want["extra"]) and not torch.equal(got["extra"], extra.detach())
    assert all(torch.equal(got[n], want[n]) for n in got)


def test_a_foreign_optimizer_and_lbfgs_are_refused():
    model, _ = _trained("adamw", lr=0.01)
    with pytest.raises(ValueError, match="not the model's"):
        optimizer_step.stepped_parameters(model, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]), {}, None)
    with pytest.raises(ValueError, match="optimizer: LBFGS"):
        optimizer_step.stepped_parameters(model, torch.optim.LBFGS(model.parameters()), {}, None)


def test_without_momentum_adam_needs_no_first_moment_and_with_it_a_missing_one_is_named():
    model, optimizer = _trained("adamw", lr=0.01, weight_decay=0.1)
    grads = _grads(model)
    want = optimizer_step.stepped_parameters(model, optimizer, grads, None, momentum=False)
    for state in optimizer.state.values():
        del state["exp_avg"]  # what the demo's load_optimizer(first_moment=False) holds
    got = optimizer_step.stepped_parameters(model, optimizer, grads, None, momentum=False)
    assert all(torch.equal(got[n], want[n]) for n in want)
    with pytest.raises(ValueError, match=r"the state of parameter '0.weight' has no 'exp_avg'.*momentum=False"):
        optimizer_step.stepped_parameters(model, optimizer, grads, None, momentum=True)


@pytest.mark.parametrize("kind", ["adamw", "sgd", None])
def test_stepping_each_module_in_its_forward_equals_the_whole_stepped_copy(tiny_llama, kind):
    pytest.importorskip("transformers", reason="the `llm` extra is not installed")
    from attribution import llm
    from attribution.evaluation import facts

    model, tok = llm.load_model(tiny_llama)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's: two modules share one weight
    optimizer = None
    if kind is not None:
        optimizer = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind](model.parameters(), lr=1e-2,
                                                                              **({"momentum": 0.9} if kind == "sgd" else {}))
        for text in ("a for loop list", "python list data"):
            optimizer.zero_grad()
            facts.training_loss(model, tok, [{"text": text}], 16).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    check = _unchanged(model, optimizer) if optimizer is not None else (lambda: None)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: g for n, g in zip([n for n, _ in model.named_parameters()], torch.autograd.grad(
        facts.training_loss(model, tok, [{"text": "the data privacy statement"}], 16),
        list(model.parameters())))}
    query = {"prompt": "the data privacy", "completion": " statement"}
    whole = optimizer_step.stepped_parameters(model, optimizer, grads, 0.5 if optimizer is None else None, False, 0.7)
    params = dict(model.named_parameters())
    kept = {n: params[n].data for n in whole}
    for n, value in whole.items():
        params[n].data = value
    want = facts.answer_log_prob(model, tok, query)
    for n, value in kept.items():
        params[n].data = value
    with optimizer_step.stepped_in_forward(model, optimizer, grads, 0.5 if optimizer is None else None, False, 0.7):
        got = optimizer_step.check_stepped_result(facts.answer_log_prob(model, tok, query))
    assert got == want and got != facts.answer_log_prob(model, tok, query)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # restored
    check()


def test_a_parameter_read_outside_its_module_gives_an_error_not_the_unstepped_value():
    class ReadsAWeightDirectly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.inner(x) + x @ self.inner.weight  # the second read is outside inner's forward

    torch.manual_seed(0)
    model = ReadsAWeightDirectly()
    grads = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"stepped_in_forward: the model read parameter 'inner.weight' outside its "
                                           r"own module's forward \(matmul\)"):
        with optimizer_step.stepped_in_forward(model, None, grads, 0.1), torch.no_grad():
            model(torch.ones(1, 3))
    with pytest.raises(RuntimeError, match="stepped_in_forward: the result is NaN"):
        optimizer_step.check_stepped_result(float("nan"))
    with torch.no_grad():
        assert torch.isfinite(model.inner.weight).all() and torch.isfinite(model(torch.ones(1, 3))).all()  # restored
