"""Bad input to the Attributor gets a clear error naming the argument; misuse never a silent answer."""
import math

import pytest
import torch
from attribution_problems import dense_grads, loss_fn, make_problem
from torch import nn

from attribution import Attributor

FAST = dict(compressor="sjlt", k=16, compile=False, progress=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"layers": ["nope"]}, ValueError, "'nope' matches no nn.Linear"),
        ({"device": "meta"}, ValueError, "the model is on cpu but device=meta"),
        ({"method": "xx"}, ValueError, "method must be one of"),
        ({"compressor": "bogus"}, ValueError, "compressor must be one of"),
        ({"method": "trak"}, ValueError, "needs a callable output_fn"),
        ({"fisher": "true"}, ValueError, "needs a callable logits_fn"),
        ({"damping": float("nan")}, ValueError, "damping must be a finite number >= 0, got nan"),
        ({"damping": float("inf")}, ValueError, "damping must be a finite number >= 0, got inf"),
        ({"damping": -1e-3}, ValueError, "damping must be a finite number >= 0"),
        ({"damping": "0.1"}, TypeError, "damping must be a real number"),
        ({"k": True}, TypeError, "k must be an int, got True"),
        ({"k": 16.0}, TypeError, "k must be an int, got 16.0"),
        ({"k": 0}, ValueError, "k must be >= 1"),
        ({"seed": -1}, ValueError, r"seed must be in \[0, "),
        ({"seed": 2**63}, ValueError, r"seed must be in \[0, "),
        ({"memory_budget": 0}, ValueError, "memory_budget must be >= 1"),
        ({"storage_dtype": "int8"}, ValueError, "storage_dtype must be one of"),
        ({"checkpoint_weights": [float("nan")]}, ValueError, "checkpoint_weights must be finite"),
        ({"checkpoints": []}, ValueError, "checkpoints must hold at least one"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    model, _, _ = make_problem(torch.float32)
    with pytest.raises(error, match=match):
        Attributor(model, loss_fn, **{**FAST, **kwargs})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_damping_is_checked_everywhere(bad):
    model, train, test = make_problem(torch.float32)
    attr = Attributor(model, loss_fn, **FAST).cache(train)
    for call in (lambda: attr.attribute(test, damping=bad), lambda: attr.top_k(test, damping=bad),
                 lambda: attr.self_influence(damping=bad)):
        with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
            call()
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        attr.damping = bad
    assert attr.damping == 1e-3


@pytest.mark.parametrize("returns, error, match", [
    (lambda m, b: loss_fn(m, b).mean(), ValueError, r"shape \[B\] = \[16\]"),
    (lambda m, b: m(b[0]).argmax(1), TypeError, "floating-point"),
    (lambda m, b: (loss_fn(m, b) * 0).long(), TypeError, "floating-point"),
    (lambda m, b: float(m(b[0]).sum()), TypeError, "floating-point"),
])
@pytest.mark.parametrize("compile", [False, True])
def test_loss_fn_must_return_per_sample_floats(returns, error, match, compile):
    model, train, _ = make_problem(torch.float32)
    attr = Attributor(model, returns, **{**FAST, "compile": compile})
    with pytest.raises(error, match=match):
        attr.cache(train)


def test_misuse_of_the_attribute_stage():
    model, train, test = make_problem(torch.float32)
    attr = Attributor(model, loss_fn, **FAST)
    with pytest.raises(RuntimeError, match=r"holds no cached gradients: call cache\(train_loader\)"):
        attr.attribute(test)
    with pytest.raises(ValueError, match="yielded no batches"):
        attr.cache([])
    attr.cache(train)
    with pytest.raises(ValueError, match="give test_loader or features"):
        attr.attribute()
    with pytest.raises(ValueError, match="test_loader yielded no batches"):
        attr.attribute([])
    with pytest.raises(TypeError, match="k must be an int"):
        attr.top_k(test, k=2.5)
    with pytest.raises(TypeError, match="features must come from Attributor.query_features"):
        attr.attribute(features=[[torch.zeros(2, 32)]])
    other = Attributor(model, loss_fn, **{**FAST, "k": 8}).cache(train)
    with pytest.raises(ValueError, match="another configuration"):
        attr.attribute(features=other.query_features(test))
    with pytest.raises(ValueError, match="share the leading"):
        attr.attribute([(test[0][0], test[0][1][:2])])


def test_true_sampled_fisher_draws_one_label_stream_per_fim():
    model, train, test = make_problem()
    logits_fn = lambda m, b: m(b[0])  # noqa: E731
    kwargs = dict(compressor="identity", k=10**6, damping=1e-2, dtype=torch.float64, compile=False, progress=False)
    batches = [train[0], train[0]]  # the same batch twice: per-batch reseeding would draw the same labels twice
    scores = Attributor(model, loss_fn, fisher="true_sampled", logits_fn=logits_fn, seed=5, **kwargs).cache(batches).attribute(test)
    generator = torch.Generator().manual_seed(5)
    fims = 0
    for x, _ in batches:
        probs = torch.softmax(model(x).detach().double(), -1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        g = dense_grads(model, [(x, labels)])
        fims = [f + gi.T @ gi for f, gi in zip(fims or [0, 0], g)]
    g_train, g_test = dense_grads(model, batches), dense_grads(model, test)
    expected = sum(q @ torch.linalg.solve(f / 32 + 1e-2 * torch.eye(f.shape[0], dtype=torch.float64), g.T)
                   for f, g, q in zip(fims, g_train, g_test))
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-9)


def test_inference_mode_is_not_needed_but_works():
    model, train, test = make_problem(torch.float32)
    with torch.inference_mode():
        scores = Attributor(model, loss_fn, compressor="factgrass", k=16, compile=False, progress=False).cache(train).attribute(test)
    assert bool(torch.isfinite(scores).all()) and not math.isnan(float(scores.sum()))


def test_a_model_without_parameters_is_refused():
    with pytest.raises(ValueError, match="no parameters"):
        Attributor(nn.Tanh(), loss_fn, **FAST)
