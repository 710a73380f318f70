"""torch.library.opcheck and float64 gradcheck (reverse and forward mode) for every op of the grass
namespace, the backward ops included, on representative and odd shapes."""
import pytest
import torch
from helpers import FIRST_ORDER_ONLY, OP_CASES, float_positions

import grass_ops  # noqa: F401

DIFFERENTIABLE = [c for c in OP_CASES if not c[0].startswith(FIRST_ORDER_ONLY)]
OPCHECK = [(*c, False) for c in OP_CASES] + [(*c, True) for c in DIFFERENTIABLE]


@pytest.mark.parametrize("name, op, make, requires_grad", OPCHECK, ids=[f"{c[0]}-grad{c[3]}" for c in OPCHECK])
def test_opcheck(name, op, make, requires_grad):
    torch.library.opcheck(op, make(requires_grad))


def _as_function_of_float_inputs(op, args):
    positions = float_positions(args)

    def fn(*diff):
        full = list(args)
        for i, d in zip(positions, diff):
            full[i] = d
        return op(*full)

    return fn, tuple(args[i].detach().double().requires_grad_() for i in positions)


GRAD_CASES = [c for c in DIFFERENTIABLE if "empty" not in c[0]]  # gradcheck needs non-empty inputs


@pytest.mark.parametrize("name, op, make", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_float64_reverse_and_forward_mode_on_the_raw_op(name, op, make):
    fn, inputs = _as_function_of_float_inputs(op, tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                                                        for a in make(False)))
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True)
    if name.startswith(("sjlt", "factgrass")):  # twice differentiable, forward-over-reverse too
        assert torch.autograd.gradgradcheck(fn, inputs, check_fwd_over_rev=True)


@pytest.mark.parametrize("name, op, make", [c for c in OP_CASES if c[0].startswith(FIRST_ORDER_ONLY)],
                         ids=list(FIRST_ORDER_ONLY))
def test_backward_of_first_order_ops_refuses_to_be_differentiated(name, op, make):
    fn, inputs = _as_function_of_float_inputs(op, make(False))
    with pytest.raises(RuntimeError, match=f"grass::{name.split('-')[0]} is not differentiable"):
        fn(*inputs)
