"""torch.compile(fullgraph=True) on CPU (inductor): no graph break, eager numbers, forward and backward."""
import pytest
import torch
from helpers import factgrass_case

import grass_ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model_step(x, weight, x_in, g_out, masks):
    in_idx, out_idx, idx, sign, k, fidx, fsign = masks
    hidden = torch.relu(x @ weight)
    sketch = grass_ops.sjlt(hidden, fidx, fsign, 8)
    fact = grass_ops.factgrass(torch.tanh(x_in), g_out * 2.0, in_idx, out_idx, idx, sign, k)
    return (sketch.sin().sum() + fact.pow(2).sum() + fact.mean()) / 3.0


def test_compiled_matches_eager_forward_and_backward():
    x_in, g_out, in_idx, out_idx, idx, sign, k = factgrass_case(b=3, t=4, d_in=10, d_out=9, k_in=4, k_out=3, k=6, dtype=torch.float32)
    fidx, fsign = grass_ops.sjlt_hash(16, 8, 2, 5)
    masks = (in_idx, out_idx, idx, sign, k, fidx, fsign)
    x = torch.randn(5, 12)
    weight = torch.randn(12, 16, requires_grad=True)
    xin = x_in.clone().requires_grad_()
    compiled = torch.compile(_model_step, fullgraph=True, backend="inductor")

    eager_loss = _model_step(x, weight, xin, g_out, masks)
    eager_grads = torch.autograd.grad(eager_loss, (weight, xin))
    compiled_loss = compiled(x, weight, xin, g_out, masks)
    compiled_grads = torch.autograd.grad(compiled_loss, (weight, xin))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_no_graph_breaks():
    x_in, g_out, in_idx, out_idx, idx, sign, k = factgrass_case(dtype=torch.float32)
    fidx, fsign = grass_ops.sjlt_hash(16, 8, 2, 5)
    masks = (in_idx, out_idx, idx, sign, k, fidx, fsign)
    explanation = torch._dynamo.explain(_model_step)(torch.randn(5, 12), torch.randn(12, 16), x_in, g_out, masks)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_factorized_ops_compile():
    x_in = torch.randn(4, 3, 6)
    g_out = torch.randn(4, 3, 5)
    s_in = torch.zeros(6, requires_grad=True)
    s_out = torch.zeros(5, requires_grad=True)

    def objective(s_in, s_out):
        a, b = grass_ops.factorized_mask(x_in, g_out, s_in, s_out, 0.5)
        scores = grass_ops.factorized_inner(a, b, a[:2], b[:2])
        return scores.square().mean() - 0.01 * (torch.sigmoid(s_in).sum() + torch.sigmoid(s_out).sum())

    eager = torch.autograd.grad(objective(s_in, s_out), (s_in, s_out))
    compiled = torch.autograd.grad(torch.compile(objective, fullgraph=True)(s_in, s_out), (s_in, s_out))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


def test_vmap_compiles_fullgraph():
    idx, sign = grass_ops.sjlt_hash(10, 4, 2, 0)
    x_in, g_out, in_idx, out_idx, fidx, fsign, k = factgrass_case(b=3, t=2)

    def per_sample(x, g, v):
        return grass_ops.factgrass(x[None], g[None], in_idx, out_idx, fidx, fsign, k)[0] + grass_ops.sjlt(v, idx, sign, 4).sum()

    v = torch.randn(3, 10, dtype=torch.float64)
    compiled = torch.compile(torch.func.vmap(per_sample), fullgraph=True)
    torch.testing.assert_close(compiled(x_in, g_out, v), torch.func.vmap(per_sample)(x_in, g_out, v))


@pytest.mark.parametrize("transform", ["grad", "jvp", "jacrev", "jacfwd", "hessian"])
def test_torch_func_differentiation_inside_compile_is_a_clear_error(transform):
    """Dynamo inlines the wrapper down to the raw op, which torch.func cannot differentiate (torch <= 2.13):
    a clear error naming the eager alternative, never a wrong result (jvp used to return zeros here)."""
    idx, sign = grass_ops.sjlt_hash(6, 3, 2, 0)
    x = torch.randn(6, dtype=torch.float64)
    loss = lambda v: grass_ops.sjlt(v, idx, sign, 3).sin().sum()  # noqa: E731
    fn = {"grad": torch.func.grad(loss), "jvp": lambda v: torch.func.jvp(loss, (v,), (torch.ones_like(v),))[1],
          "jacrev": torch.func.jacrev(loss), "jacfwd": torch.func.jacfwd(loss), "hessian": torch.func.hessian(loss)}[transform]
    fn(x)  # eager works
    with pytest.raises(Exception, match=r"cannot differentiate grass::sjlt .* Call grass_ops.sjlt in eager mode"):
        torch.compile(fn, fullgraph=True)(x)
