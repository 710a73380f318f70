"""grass_ops.meta: every op's fake kernel (the backward ops' included) gives the real kernel's output
metadata and runs the same structural checks, with the same message."""
import pytest
import torch
from helpers import OP_CASES
from torch._subclasses.fake_tensor import FakeTensorMode

import grass_ops  # noqa: F401


def _fake(mode, args):
    return [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name, op, make", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_fake_output_matches_the_real_kernel(name, op, make):
    args = make(False)
    real = _as_tuple(op(*args))
    with FakeTensorMode() as mode:
        fake = _as_tuple(op(*_fake(mode, args)))
    assert len(fake) == len(real)
    for f, r in zip(fake, real):
        assert (f.shape, f.dtype, f.device, f.is_contiguous()) == (r.shape, r.dtype, r.device, r.is_contiguous())


def _replace(args, i, value):
    return [value if j == i else a for j, a in enumerate(args)]


# one structurally wrong argument per op (the backward ops' included): (position, how, the message)
WRONG = {
    "sjlt": (0, lambda x: x[..., :-1], "last dimension"),
    "sjlt_transpose": (2, lambda sign: sign[:-1], "sign must have idx's shape"),
    "factgrass": (1, lambda g: g[:1], "must agree on"),
    "factgrass_backward": (0, lambda grad: grad[:1], r"grad must be \[B, k\]"),
    "factorized_mask-soft": (2, lambda logits: logits[:-1], "in_mask logits must have length"),
    "factorized_mask_backward-soft": (0, lambda grad_x: grad_x[..., :-1], "grad_x must have shape"),
    "factorized_inner": (2, lambda x_b: x_b[..., :-1], "must share d_in and d_out"),
    "factorized_inner_backward": (0, lambda grad: grad[:, :1], r"grad must be \[n_a, n_b\]"),
}
BAD = [c for c in OP_CASES if c[0] in WRONG]


@pytest.mark.parametrize("name, op, make", BAD, ids=[c[0] for c in BAD])
def test_fake_runs_the_real_kernels_checks(name, op, make):
    position, wrong, match = WRONG[name]
    args = make(False)
    args = _replace(args, position, wrong(args[position]))
    with pytest.raises(ValueError, match=match) as real:
        op(*args)
    with FakeTensorMode() as mode, pytest.raises(type(real.value)) as fake:
        op(*_fake(mode, args))
    assert str(fake.value) == str(real.value)
