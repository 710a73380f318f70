"""torch.func through the Python wrappers: vmap (real batching rules), grad, vjp, jacrev, jvp."""
import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import OP_CASES, factgrass_case, float_positions, inner_case, soft_mask_case
from torch import func

import grass_ops
from grass_ops.testing import dense_sjlt_matrix


def test_sjlt_transforms_match_the_dense_matrix():
    p, k = 12, 5
    idx, sign = grass_ops.sjlt_hash(p, k, 2, 0)
    dense = dense_sjlt_matrix(idx, sign, k)
    x = torch.randn(4, p, dtype=torch.float64)
    proj = lambda v: grass_ops.sjlt(v, idx, sign, k)  # noqa: E731
    loss = lambda v: (proj(v) ** 2).sum()  # noqa: E731
    torch.testing.assert_close(func.vmap(proj)(x), x @ dense.T)
    torch.testing.assert_close(func.vmap(proj, in_dims=1, out_dims=1)(x.T.contiguous()), (x @ dense.T).T)
    torch.testing.assert_close(func.grad(loss)(x[0]), 2 * dense.T @ dense @ x[0])
    torch.testing.assert_close(func.vmap(func.grad(loss))(x), 2 * x @ dense.T @ dense)
    torch.testing.assert_close(func.jacrev(proj)(x[0]), dense)
    torch.testing.assert_close(func.jacfwd(proj)(x[0]), dense)
    _, tangent = func.jvp(proj, (x[0],), (x[1],))
    torch.testing.assert_close(tangent, dense @ x[1])
    out, vjp_fn = func.vjp(proj, x[0])
    (cot,) = vjp_fn(torch.ones_like(out))
    torch.testing.assert_close(cot, dense.T @ torch.ones(k, dtype=torch.float64))
    # second order: hessian of a quadratic form is 2 S^T S
    torch.testing.assert_close(func.hessian(loss)(x[0]), 2 * dense.T @ dense)


def test_vmap_uses_the_batching_rule_not_the_fallback(monkeypatch):
    module = importlib.import_module("grass_ops.ops.sjlt")
    calls = []
    original = module.sjlt_rows

    def counting(rows, *args):
        calls.append(tuple(rows.shape))
        return original(rows, *args)

    monkeypatch.setattr(module, "sjlt_rows", counting)
    idx, sign = grass_ops.sjlt_hash(8, 4, 1, 0)
    x = torch.randn(6, 3, 8)
    func.vmap(lambda v: grass_ops.sjlt(v, idx, sign, 4))(x)
    assert calls == [(18, 8)]  # one kernel call on all 6 * 3 rows, not six per-sample calls


def _factgrass_fn(case):
    _, _, in_idx, out_idx, idx, sign, k = case
    return lambda x, g: grass_ops.factgrass(x, g, in_idx, out_idx, idx, sign, k)


def test_factgrass_vmap_grad_jvp_jacrev():
    case = factgrass_case(b=4, t=3)
    x_in, g_out = case[:2]
    fg = _factgrass_fn(case)
    full = fg(x_in, g_out)
    # per-sample vmap over the batch: each sample is a [1, T, d] call
    per_sample = func.vmap(lambda x, g: fg(x[None], g[None])[0])(x_in, g_out)
    torch.testing.assert_close(per_sample, full)
    # grad w.r.t. x_in equals autograd's
    weights = torch.randn_like(full)
    loss = lambda x, g: (fg(x, g) * weights).sum()  # noqa: E731
    gx, gg = func.grad(loss, argnums=(0, 1))(x_in, g_out)
    xr, gr = x_in.clone().requires_grad_(), g_out.clone().requires_grad_()
    loss(xr, gr).backward()
    torch.testing.assert_close(gx, xr.grad)
    torch.testing.assert_close(gg, gr.grad)
    # jvp is bilinear: f(x + e dx, g + e dg)' = f(dx, g) + f(x, dg)
    dx, dg = torch.randn_like(x_in), torch.randn_like(g_out)
    _, tangent = func.jvp(fg, (x_in, g_out), (dx, dg))
    torch.testing.assert_close(tangent, fg(dx, g_out) + fg(x_in, dg))
    # jacrev agrees with jacfwd
    jr = func.jacrev(fg, argnums=0)(x_in, g_out)
    jf = func.jacfwd(fg, argnums=0)(x_in, g_out)
    torch.testing.assert_close(jr, jf)
    # per-sample gradients: vmap(grad)
    per_sample_grad = func.vmap(func.grad(lambda x, g, w: (fg(x[None], g[None])[0] * w).sum()))(x_in, g_out, weights)
    torch.testing.assert_close(per_sample_grad, gx)


def test_factorized_mask_soft_transforms():
    x_in, g_out, s_in, s_out, tau = soft_mask_case()

    def loss(s_in, s_out):
        a, b = grass_ops.factorized_mask(x_in, g_out, s_in, s_out, tau)
        return (a**2).sum() + (b**3).sum()

    g_in, g_o = func.grad(loss, argnums=(0, 1))(s_in, s_out)
    si, so = s_in.clone().requires_grad_(), s_out.clone().requires_grad_()
    loss(si, so).backward()
    torch.testing.assert_close(g_in, si.grad)
    torch.testing.assert_close(g_o, so.grad)
    masked = lambda s: grass_ops.factorized_mask(x_in, g_out, s, s_out, tau)[0]  # noqa: E731
    torch.testing.assert_close(func.jacrev(masked)(s_in), func.jacfwd(masked)(s_in))
    batched = func.vmap(lambda x: grass_ops.factorized_mask(x, g_out[0], s_in, s_out, tau)[0])(x_in[0])
    torch.testing.assert_close(batched, x_in[0] * torch.sigmoid(s_in / tau))


def test_factorized_inner_transforms():
    x_a, g_a, x_b, g_b = inner_case()
    fi = grass_ops.factorized_inner
    dense = torch.einsum("ntd,nte->nde", x_a, g_a).flatten(1) @ torch.einsum("qud,que->qde", x_b, g_b).flatten(1).T
    torch.testing.assert_close(fi(x_a, g_a, x_b, g_b), dense)
    torch.testing.assert_close(func.vmap(lambda x, g: fi(x[None], g[None], x_b, g_b)[0])(x_a, g_a), dense)
    gx = func.grad(lambda x: fi(x, g_a, x_b, g_b).sum())(x_a)
    xr = x_a.clone().requires_grad_()
    fi(xr, g_a, x_b, g_b).sum().backward()
    torch.testing.assert_close(gx, xr.grad)
    dx = torch.randn_like(x_a)
    _, tangent = func.jvp(lambda x: fi(x, g_a, x_b, g_b), (x_a,), (dx,))
    torch.testing.assert_close(tangent, fi(dx, g_a, x_b, g_b))


RAW_PUBLIC_OPS = [c for c in OP_CASES if c[0] in ("sjlt", "sjlt_transpose", "factgrass", "factorized_mask-soft", "factorized_inner")]


@pytest.mark.parametrize("name, op, make", RAW_PUBLIC_OPS, ids=[c[0] for c in RAW_PUBLIC_OPS])
def test_forward_ad_through_the_raw_op_gives_the_true_tangent(name, op, make):
    """Dual tensors (torch.autograd.forward_ad) through torch.ops.grass.*: the tangent equals the
    central finite difference (exact for these multilinear ops up to rounding), never zero."""
    args = make(False)
    for i in float_positions(args):
        tangent = torch.randn_like(args[i])
        with fwAD.dual_level():
            dual_args = [fwAD.make_dual(a, tangent) if j == i else a for j, a in enumerate(args)]
            outputs = op(*dual_args)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            tangents = [fwAD.unpack_dual(o).tangent for o in outputs]
        eps = 1e-6
        plus = op(*[a + eps * tangent if j == i else a for j, a in enumerate(args)])
        minus = op(*[a - eps * tangent if j == i else a for j, a in enumerate(args)])
        plus, minus = (plus, minus) if isinstance(plus, tuple) else ((plus,), (minus,))
        assert any(float(((p - m) / (2 * eps)).abs().max()) > 0 for p, m in zip(plus, minus))  # a zero tangent cannot pass
        for t, p, m in zip(tangents, plus, minus):
            assert t is not None, f"{name}: no tangent for input {i}"
            torch.testing.assert_close(t, (p - m) / (2 * eps), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("transform", ["jvp", "grad", "jacrev", "jacfwd"])
def test_torch_func_over_the_raw_op_raises_a_clear_error(transform):
    """torch.func cannot see inside the dispatcher (torch <= 2.13): a clear error, never a zero tangent."""
    idx, sign = grass_ops.sjlt_hash(6, 3, 1, 0)
    x = torch.randn(6, dtype=torch.float64)
    f = lambda v: torch.ops.grass.sjlt(v, idx, sign, 3)  # noqa: E731
    run = {
        "jvp": lambda: func.jvp(f, (x,), (torch.ones_like(x),)),
        "grad": lambda: func.grad(lambda v: f(v).sum())(x),
        "jacrev": lambda: func.jacrev(f)(x),
        "jacfwd": lambda: func.jacfwd(f)(x),
    }[transform]
    with pytest.raises(RuntimeError, match=r"cannot differentiate grass::sjlt .* Call grass_ops.sjlt in eager mode"):
        run()
    torch.testing.assert_close(func.vmap(f)(x[None].expand(2, 6)), grass_ops.sjlt(x, idx, sign, 3).expand(2, 3))


def test_factorized_inner_vmap_over_either_side():
    x_a, g_a, x_b, g_b = inner_case(n_a=3, n_b=4)
    fi = grass_ops.factorized_inner
    full = fi(x_a, g_a, x_b, g_b)
    torch.testing.assert_close(func.vmap(lambda x, g: fi(x[None], g[None], x_b, g_b)[0])(x_a, g_a), full)
    torch.testing.assert_close(func.vmap(lambda x, g: fi(x_a, g_a, x[None], g[None])[:, 0], out_dims=1)(x_b, g_b), full)
    both = func.vmap(lambda xa, ga, xb, gb: fi(xa[None], ga[None], xb[None], gb[None])[0, 0])(x_a[:3], g_a[:3], x_b[:3], g_b[:3])
    torch.testing.assert_close(both, torch.diagonal(full[:, :3]))


WRAPPERS = {"sjlt": grass_ops.sjlt, "sjlt_transpose": grass_ops.sjlt_transpose, "factgrass": grass_ops.factgrass,
            "factorized_mask-soft": grass_ops.factorized_mask, "factorized_inner": grass_ops.factorized_inner}


def _first_output(fn):
    return lambda *a: (lambda out: out[0] if isinstance(out, tuple) else out)(fn(*a))


@pytest.mark.parametrize("name, op, make", RAW_PUBLIC_OPS, ids=[c[0] for c in RAW_PUBLIC_OPS])
def test_wrapper_jacobians_agree_with_finite_differences(name, op, make):
    """jacrev, jacfwd and jvp of each wrapper, for each float input, against a central-difference Jacobian."""
    args = make(False)
    wrapper = _first_output(WRAPPERS[name])
    for i in float_positions(args):
        f = lambda v: wrapper(*[v if j == i else a for j, a in enumerate(args)])  # noqa: E731, B023
        x = args[i]
        numeric = _finite_difference_jacobian(f, x)
        torch.testing.assert_close(func.jacrev(f)(x), numeric, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(func.jacfwd(f)(x), numeric, rtol=1e-6, atol=1e-8)
        tangent = torch.randn_like(x)
        _, jvp_out = func.jvp(f, (x,), (tangent,))
        torch.testing.assert_close(jvp_out, numeric.flatten(-x.dim()) @ tangent.flatten(), rtol=1e-6, atol=1e-8)


def _finite_difference_jacobian(f, x, eps=1e-6):
    """[*out.shape, *x.shape] central differences (float64)."""
    columns = []
    flat = x.detach().flatten()
    for j in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[j] = eps
        columns.append((f((flat + e).view_as(x)) - f((flat - e).view_as(x))) / (2 * eps))
    out_shape = columns[0].shape
    return torch.stack(columns, -1).reshape(*out_shape, *x.shape)


def test_factgrass_hessian_and_first_order_ops_refuse_second_order():
    x_in, g_out, in_idx, out_idx, idx, sign, k = factgrass_case(b=2, t=2, d_in=4, d_out=3, k_in=2, k_out=2, k=3)
    loss = lambda x: (grass_ops.factgrass(x, g_out, in_idx, out_idx, idx, sign, k) ** 2).sum()  # noqa: E731
    hessian = func.hessian(loss)(x_in)
    numeric = _finite_difference_jacobian(lambda x: func.grad(loss)(x), x_in)
    torch.testing.assert_close(hessian, numeric, rtol=1e-6, atol=1e-7)
    a, b, c, d = inner_case(n_a=2, n_b=2)
    with pytest.raises(RuntimeError, match="grass::factorized_inner_backward is not differentiable"):
        func.hessian(lambda x: grass_ops.factorized_inner(x, b, c, d).sum())(a)
