"""grass::factorized_inner: GradDot of factorized gradients against the dense computation."""
import importlib

import pytest
import torch
from helpers import inner_case
from hypothesis import given
from hypothesis import strategies as st

import grass_ops


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


def test_factorized_inner_errors():
    x_a, g_a, x_b, g_b = inner_case()
    with pytest.raises(ValueError, match="must share d_in and d_out"):
        grass_ops.factorized_inner(x_a, g_a, x_b[..., :2], g_b)
    with pytest.raises(ValueError, match="must agree on"):
        grass_ops.factorized_inner(x_a, g_a[:1], x_b, g_b)
