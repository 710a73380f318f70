"""Capture stage: exact per-sample factors for layers called more than once, hooks only while capturing."""
import pytest
import torch
from attribution_problems import loss_fn, make_problem
from torch import nn

from attribution import Attributor

EXACT = dict(method="graddot", compressor="identity", k=10**6, dtype=torch.float64, compile=False, progress=False)


class SharedBlock(nn.Module):
    """``block`` runs three times per forward (a loop), once on tokens [B, T, 8] and twice pooled [B, 8];
    ``tied`` is one Linear used as two layers."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.block = nn.Linear(8, 8)
        self.tied = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):  # x [B, T, 5]
        h = torch.tanh(self.block(torch.tanh(self.inp(x))))  # call 1 of block: [B, T, 8]
        h = h.mean(1)
        for _ in range(2):  # calls 2 and 3: [B, 8]
            h = torch.tanh(self.block(h))
        h = torch.tanh(self.tied(torch.tanh(self.tied(h))))
        return self.out(h)


def _dense(model, x, y, names):
    modules = dict(model.named_modules())
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        rows.append(torch.cat([modules[n].weight.grad.T.flatten() for n in names]))
    return torch.stack(rows)


@pytest.mark.parametrize("compile", [False, True])
def test_layers_called_several_times_get_exact_per_sample_gradients(compile):
    torch.manual_seed(0)
    model = SharedBlock().double()
    x, y = torch.randn(7, 4, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    attr = Attributor(model, loss_fn, **{**EXACT, "compile": compile})
    scores = attr.cache(batches).attribute(batches)
    g = _dense(model, x, y, attr.layer_names)
    torch.testing.assert_close(scores, g @ g.T, rtol=1e-7, atol=1e-9)


def test_hooks_exist_only_while_capturing_and_do_not_stack():
    model, train, test = make_problem()
    seen = []
    probe = model[0].register_forward_hook(lambda m, a, o: seen.append(len(m._forward_hooks)))
    attrs = [Attributor(model, loss_fn, **EXACT) for _ in range(5)]
    assert len(model[0]._forward_hooks) == 1  # only the test's own probe hook
    for attr in attrs:
        attr.cache(train)
        attr.attribute(test)
    assert len(model[0]._forward_hooks) == 1
    assert seen and max(seen) == 2  # the probe hook plus one capture hook, never five
    probe.remove()
    reference = attrs[0].attribute(test)
    for attr in attrs[1:]:
        torch.testing.assert_close(attr.attribute(test), reference, rtol=0, atol=0)


class DataDependent(nn.Module):
    """Runs ``lin`` once or twice, by the sign of the batch's sum."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        if bool((x.sum() > 0).item()):
            h = self.lin(h)
        return h


def test_a_forward_pass_that_changes_with_the_data_gets_exact_gradients():
    """In-backward compression sums a layer's calls into one sketch, however many there are."""
    torch.manual_seed(0)
    model = DataDependent().double()
    x = torch.randn(2, 3, dtype=torch.float64).abs()
    y = torch.tensor([0, 1])
    attr = Attributor(model, loss_fn, **EXACT)
    for batch_x in (x, -x):  # two calls of lin, then one
        grads = attr.compress_batch((batch_x, y))[0]
        torch.testing.assert_close(grads, _dense(model, batch_x, y, ["lin"]), rtol=1e-10, atol=1e-12)


def test_a_forward_pass_that_changes_with_the_data_is_refused_by_the_factor_capture():
    """K-FAC captures each call's factors with probes shaped on one sample: a batch that calls the layer
    a different number of times is refused, not mixed up."""
    torch.manual_seed(0)
    model = DataDependent().double()
    x = torch.ones(2, 3, dtype=torch.float64)
    batches = [(x, torch.tensor([0, 1])), (-x, torch.tensor([0, 1]))]  # same shapes, different call counts
    attr = Attributor(model, loss_fn, **{**EXACT, "method": "if", "preconditioner": "kfac", "k": 9})
    attr._with_factors(batches[0], "loss")  # the shapes: two calls
    with pytest.raises(RuntimeError, match="ran fewer times|ran 2 times"):
        attr._with_factors(batches[1], "loss")
