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


def _moments_of_factors(model, fn, batches, infos):
    """The reference: sums over every captured factor (all layers held at once)."""
    from attribution.gradients import captured_factors
    sums = {n: [0, 0] for n in infos}
    for _, x, g, _ in captured_factors(model, fn, batches, infos):
        for n in infos:
            sums[n][0] = sums[n][0] + x[n].double().square().sum((0, 1))
            sums[n][1] = sums[n][1] + g[n].double().square().sum((0, 1))
    return sums


def _moments_in_backward(model, fn, batches, infos):
    from attribution.gradients import factor_moments
    sums, samples = {n: [0, 0] for n in infos}, 0
    for _, per_layer, rows in factor_moments(model, fn, batches, infos):
        samples += rows
        for n, (x_sum, g_sum) in per_layer.items():
            sums[n][0], sums[n][1] = sums[n][0] + x_sum, sums[n][1] + g_sum
    return sums, samples


def test_second_moments_inside_the_backward_equal_the_sums_over_the_factors():
    """energy masks' moments: layers called three times and tied layers, odd batch sizes, a batch of one."""
    from attribution.layers import find_layers
    torch.manual_seed(0)
    model = SharedBlock().double()
    x, y = torch.randn(8, 4, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    batches = [(x[:5], y[:5]), (x[5:7], y[5:7]), (x[7:], y[7:])]
    infos = find_layers(model)
    reference = _moments_of_factors(model, loss_fn, batches, infos)
    moments, samples = _moments_in_backward(model, loss_fn, batches, infos)
    assert samples == 8 and set(moments) == set(infos)
    for n in infos:
        for got, want in zip(moments[n], reference[n]):
            assert got.dtype == torch.float64 and got.abs().sum() > 0
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was formed


def test_second_moments_of_a_padded_llm_batch_equal_the_sums_over_the_factors(tiny_llama):
    pytest.importorskip("transformers", reason="the `llm` extra is not installed")
    from attribution import llm
    from attribution.layers import find_layers
    model, tok = llm.load_model(tiny_llama)
    model = model.double()
    docs = [{"id": str(i), "text": t} for i, t in enumerate(["the data privacy statement", "a for loop", "lambda expression",
                                                                "assert statement python list data"])]
    batches, _ = llm.document_batches(tok, docs, 3, 8)
    infos = find_layers(model, ["model.layers.*"])
    reference = _moments_of_factors(model, llm.sequence_loss, batches, infos)
    moments, _ = _moments_in_backward(model, llm.sequence_loss, batches, infos)
    for n in infos:
        for got, want in zip(moments[n], reference[n]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_square_sums_match_float64_and_leave_their_input_alone(dtype):
    """The energy moments' per-sample sums over tokens of t**2 ([B, T, d] -> [B, d] float64), computed without a
    float64 copy for float32 / bfloat16 t: within float32 rounding of the float64 sums; t itself unchanged."""
    from attribution.gradients import _square_sums
    torch.manual_seed(0)
    t = (torch.randn(3, 37, 11) * torch.logspace(-3, 3, 11)).to(dtype)
    before = t.clone()
    sums = _square_sums(t)
    assert sums.dtype == torch.float64 and sums.shape == (3, 11)
    torch.testing.assert_close(sums, t.double().square().sum(1), rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)
    assert torch.equal(t, before)
    torch.testing.assert_close(_square_sums(t[:, 0]), t[:, 0].double().square(), rtol=1e-6, atol=0)  # [B, d]: T = 1
