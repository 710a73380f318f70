import importlib

import pytest
import torch
from helpers import hard_mask_case, inner_case, soft_mask_case
from hypothesis import given
from hypothesis import strategies as st

import grass_ops


def test_hard_mask_gathers_and_soft_mask_weights():
    x_in, g_out, in_idx, out_idx, _ = hard_mask_case()
    a, b = grass_ops.factorized_mask(x_in, g_out, in_idx, out_idx)
    torch.testing.assert_close(a, x_in[..., in_idx])
    torch.testing.assert_close(b, g_out[..., out_idx])
    x_in, g_out, s_in, s_out, tau = soft_mask_case()
    a, b = grass_ops.factorized_mask(x_in, g_out, s_in, s_out, tau)
    torch.testing.assert_close(a, x_in * torch.sigmoid(s_in / tau))
    torch.testing.assert_close(b, g_out * torch.sigmoid(s_out / tau))


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5))
def test_factorized_inner_equals_dense_gradient_inner_product(n_a, n_b, t, u, d_in, d_out):
    x_a, g_a, x_b, g_b = inner_case(n_a, n_b, t, u, d_in, d_out)
    grads_a = torch.einsum("ntd,nte->nde", x_a, g_a).flatten(1)
    grads_b = torch.einsum("ntd,nte->nde", x_b, g_b).flatten(1)
    torch.testing.assert_close(grass_ops.factorized_inner(x_a, g_a, x_b, g_b), grads_a @ grads_b.T)


def test_factorized_inner_chunking(monkeypatch):
    module = importlib.import_module("grass_ops.ops.factorized_inner")
    args = tuple(t.requires_grad_() for t in inner_case(n_a=7, n_b=3, t=2, u=2))
    full = grass_ops.factorized_inner(*args)
    full_grads = torch.autograd.grad(full.square().sum(), args)
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 12)  # one row of a per chunk
    chunked = grass_ops.factorized_inner(*args)
    torch.testing.assert_close(chunked, full)
    for c, f in zip(torch.autograd.grad(chunked.square().sum(), args), full_grads):
        torch.testing.assert_close(c, f)


def test_soft_mask_selects_nothing_at_low_temperature_for_negative_logits():
    x_in, g_out, s_in, s_out, _ = soft_mask_case()
    a, _ = grass_ops.factorized_mask(x_in, g_out, -torch.ones_like(s_in), s_out, 1e-3)
    assert float(a.abs().max()) < 1e-100


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: (a[0], a[1], a[2].float()[:6], a[3], 1.0), ValueError, "both be index masks or both logits"),
        (lambda a: (a[0], a[1], torch.tensor([0, 0]), a[3], 1.0), ValueError, "in_mask must hold distinct"),
        (lambda a: (a[0], a[1], a[2], torch.tensor([9]), 1.0), ValueError, r"out_mask values must lie in \[0, 5\)"),
        (lambda a: (a[0], a[1], a[2], a[3], 0.0), ValueError, "temperature must be > 0"),
        (lambda a: (a[0], a[1], torch.zeros(5), torch.zeros(5), 1.0), ValueError, "in_mask logits must have length 6"),
        (lambda a: (a[0].long(), a[1], a[2], a[3], 1.0), TypeError, "x_in must be float"),
    ],
)
def test_factorized_mask_errors(mutate, error, match):
    with pytest.raises(error, match=match):
        grass_ops.factorized_mask(*mutate(hard_mask_case()))


def test_factorized_inner_errors():
    x_a, g_a, x_b, g_b = inner_case()
    with pytest.raises(ValueError, match="must share d_in and d_out"):
        grass_ops.factorized_inner(x_a, g_a, x_b[..., :2], g_b)
    with pytest.raises(ValueError, match="must agree on"):
        grass_ops.factorized_inner(x_a, g_a[:1], x_b, g_b)
