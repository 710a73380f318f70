"""torch.library.opcheck and float64 gradcheck for every op, on representative and odd shapes."""
import pytest
import torch
from helpers import factgrass_case, hard_mask_case, inner_case, sjlt_case, soft_mask_case

import grass_ops  # noqa: F401

ops = torch.ops.grass

CASES = [
    ("sjlt", ops.sjlt, lambda rg: sjlt_case(requires_grad=rg)),
    ("sjlt-odd", ops.sjlt, lambda rg: sjlt_case(batch=(2, 1, 3), p=7, k=5, s=3, requires_grad=rg)),
    ("sjlt-f32", ops.sjlt, lambda rg: sjlt_case(batch=(4,), p=33, k=8, s=1, dtype=torch.float32, requires_grad=rg)),
    ("sjlt-empty", ops.sjlt, lambda rg: sjlt_case(batch=(0,), requires_grad=rg)),
    ("sjlt_transpose", ops.sjlt_transpose, lambda rg: (torch.randn(3, 6, dtype=torch.float64, requires_grad=rg), *sjlt_case()[1:3])),
    ("factgrass", ops.factgrass, lambda rg: factgrass_case(requires_grad=rg)),
    ("factgrass-2d", ops.factgrass, lambda rg: tuple(a[:, 0] if i < 2 else a for i, a in enumerate(factgrass_case(requires_grad=rg)))),
    ("factgrass-odd", ops.factgrass, lambda rg: factgrass_case(b=1, t=5, d_in=7, d_out=3, k_in=7, k_out=1, k=3, s=2, requires_grad=rg)),
    ("factorized_mask-soft", ops.factorized_mask, lambda rg: soft_mask_case(requires_grad=rg)),
    ("factorized_mask-hard", ops.factorized_mask, lambda rg: hard_mask_case(requires_grad=rg)),
    ("factorized_inner", ops.factorized_inner, lambda rg: inner_case(requires_grad=rg)),
    ("factorized_inner-2d", ops.factorized_inner, lambda rg: tuple(t[:, 0] for t in inner_case(requires_grad=rg))),
]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name, op, make", CASES, ids=[c[0] for c in CASES])
def test_opcheck(name, op, make, requires_grad):
    torch.library.opcheck(op, make(requires_grad))


def _differentiable_positions(args):
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]


GRAD_CASES = [c for c in CASES if "empty" not in c[0]]  # gradcheck needs non-empty inputs


@pytest.mark.parametrize("name, op, make", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_float64(name, op, make):
    args = tuple(
        a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in make(False)
    )
    positions = _differentiable_positions(args)

    def fn(*diff):
        full = list(args)
        for i, d in zip(positions, diff):
            full[i] = d
        return op(*full)

    inputs = tuple(args[i] for i in positions)
    assert torch.autograd.gradcheck(fn, inputs)
    if name.startswith(("sjlt", "factgrass")):
        assert torch.autograd.gradgradcheck(fn, inputs)
