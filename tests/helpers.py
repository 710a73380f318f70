"""Small shared builders for the op tests."""
import torch

import grass_ops


def sjlt_case(batch=(3,), p=10, k=6, s=2, dtype=torch.float64, requires_grad=False, seed=0):
    idx, sign = grass_ops.sjlt_hash(p, k, s, seed)
    x = torch.randn(*batch, p, dtype=dtype, requires_grad=requires_grad)
    return x, idx, sign, k


def factgrass_case(b=2, t=3, d_in=6, d_out=5, k_in=3, k_out=2, k=4, s=1, dtype=torch.float64, requires_grad=False):
    x_in = torch.randn(b, t, d_in, dtype=dtype, requires_grad=requires_grad)
    g_out = torch.randn(b, t, d_out, dtype=dtype, requires_grad=requires_grad)
    in_idx, out_idx = grass_ops.random_mask(d_in, k_in, 0), grass_ops.random_mask(d_out, k_out, 1)
    idx, sign = grass_ops.sjlt_hash(k_in * k_out, k, s, 2)
    return x_in, g_out, in_idx, out_idx, idx, sign, k


def soft_mask_case(lead=(2, 3), d_in=6, d_out=5, dtype=torch.float64, requires_grad=False):
    x_in = torch.randn(*lead, d_in, dtype=dtype, requires_grad=requires_grad)
    g_out = torch.randn(*lead, d_out, dtype=dtype, requires_grad=requires_grad)
    s_in = torch.randn(d_in, dtype=dtype, requires_grad=requires_grad)
    s_out = torch.randn(d_out, dtype=dtype, requires_grad=requires_grad)
    return x_in, g_out, s_in, s_out, 0.7


def hard_mask_case(lead=(2, 3), d_in=6, d_out=5, dtype=torch.float64, requires_grad=False):
    x_in = torch.randn(*lead, d_in, dtype=dtype, requires_grad=requires_grad)
    g_out = torch.randn(*lead, d_out, dtype=dtype, requires_grad=requires_grad)
    return x_in, g_out, grass_ops.random_mask(d_in, 3, 0), grass_ops.random_mask(d_out, 2, 1), 1.0


def inner_case(n_a=3, n_b=2, t=2, u=3, d_in=4, d_out=5, dtype=torch.float64, requires_grad=False):
    shapes = [(n_a, t, d_in), (n_a, t, d_out), (n_b, u, d_in), (n_b, u, d_out)]
    return tuple(torch.randn(*s, dtype=dtype, requires_grad=requires_grad) for s in shapes)


def _grad_like(t, requires_grad):
    return torch.randn(t.shape, dtype=t.dtype, requires_grad=requires_grad)


def _backward_case(forward_case, make_grads):
    def make(requires_grad=False):
        args = forward_case(requires_grad)
        return (*make_grads(args, requires_grad), *args)
    return make


ops = torch.ops.grass

# (name, raw op, make(requires_grad) -> args): every op of the grass namespace, the backward ops included.
OP_CASES = [
    ("sjlt", ops.sjlt, lambda rg: sjlt_case(requires_grad=rg)),
    ("sjlt-odd", ops.sjlt, lambda rg: sjlt_case(batch=(2, 1, 3), p=7, k=5, s=3, requires_grad=rg)),
    ("sjlt-f32", ops.sjlt, lambda rg: sjlt_case(batch=(4,), p=33, k=8, s=1, dtype=torch.float32, requires_grad=rg)),
    ("sjlt-empty", ops.sjlt, lambda rg: sjlt_case(batch=(0,), requires_grad=rg)),
    ("sjlt_transpose", ops.sjlt_transpose,
     lambda rg: (torch.randn(3, 6, dtype=torch.float64, requires_grad=rg), *sjlt_case()[1:3])),
    ("factgrass", ops.factgrass, lambda rg: factgrass_case(requires_grad=rg)),
    ("factgrass-2d", ops.factgrass,
     lambda rg: tuple(a[:, 0] if i < 2 else a for i, a in enumerate(factgrass_case(requires_grad=rg)))),
    ("factgrass-odd", ops.factgrass,
     lambda rg: factgrass_case(b=1, t=5, d_in=7, d_out=3, k_in=7, k_out=1, k=3, s=2, requires_grad=rg)),
    ("factgrass_backward", ops.factgrass_backward,
     lambda rg: (torch.randn(2, 4, dtype=torch.float64, requires_grad=rg), *factgrass_case(requires_grad=rg)[:6])),
    ("factorized_mask-soft", ops.factorized_mask, lambda rg: soft_mask_case(requires_grad=rg)),
    ("factorized_mask-hard", ops.factorized_mask, lambda rg: hard_mask_case(requires_grad=rg)),
    ("factorized_mask_backward-soft", ops.factorized_mask_backward,
     _backward_case(lambda rg: soft_mask_case(requires_grad=rg), lambda a, rg: (_grad_like(a[0], rg), _grad_like(a[1], rg)))),
    ("factorized_inner", ops.factorized_inner, lambda rg: inner_case(requires_grad=rg)),
    ("factorized_inner-2d", ops.factorized_inner, lambda rg: tuple(t[:, 0] for t in inner_case(requires_grad=rg))),
    ("factorized_inner_backward", ops.factorized_inner_backward,
     lambda rg: (torch.randn(3, 2, dtype=torch.float64, requires_grad=rg), *inner_case(requires_grad=rg))),
]
# backward ops of first-order ops: differentiating them raises a clear error
FIRST_ORDER_ONLY = ("factorized_mask_backward", "factorized_inner_backward")


def float_positions(args) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]


def interpreter_marks() -> list:
    """pytestmark of the Triton-interpreter tests: the marker, and a skip naming what is missing."""
    import importlib.util
    import os

    import pytest

    return [
        pytest.mark.interpreter,
        pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                           reason="triton is not installed (pip install grass_ops[gpu] or triton==3.7.1)"),
        pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                           reason="the interpreter tests need TRITON_INTERPRET=1 before triton is imported"),
    ]
