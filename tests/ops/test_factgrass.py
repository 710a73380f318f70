import importlib

import pytest
import torch
from helpers import factgrass_case
from hypothesis import given

import grass_ops
from grass_ops.testing import (
    assert_close_to_reference,
    factgrass_problems,
    masked_kron_gradient,
    reference_factgrass,
)


@given(factgrass_problems())
def test_matches_reference(problem):
    out = grass_ops.factgrass(*problem.args)
    assert out.shape == (problem.x_in.shape[0], problem.k) and out.dtype == problem.x_in.dtype
    assert_close_to_reference(out, reference_factgrass(*problem.args), problem.x_in.dtype)


@given(factgrass_problems())
def test_equals_sjlt_of_masked_kronecker_sum(problem):
    """factgrass == sjlt(flatten(sum_t masked outer products)), computed through the sjlt op."""
    kron = masked_kron_gradient(problem.x_in, problem.g_out, problem.in_idx, problem.out_idx)
    via_sjlt = grass_ops.sjlt(kron.to(problem.x_in.dtype), problem.idx, problem.sign, problem.k)
    assert_close_to_reference(grass_ops.factgrass(*problem.args), via_sjlt.double(), problem.x_in.dtype)


def test_equals_compressing_the_full_weight_gradient():
    """On a real nn.Linear: the FactGraSS of (inputs, output grads) equals masking + SJLT of W.grad."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 7, bias=False).double()
    x = torch.randn(1, 5, 12, dtype=torch.float64)
    y = layer(x)
    y.retain_grad()
    (y.sin().sum()).backward()
    in_idx, out_idx = grass_ops.random_mask(12, 4, 1), grass_ops.random_mask(7, 3, 2)
    idx, sign = grass_ops.sjlt_hash(12, 5, 1, 3)
    out = grass_ops.factgrass(x, y.grad, in_idx, out_idx, idx, sign, 5)
    weight_grad = layer.weight.grad.T  # [d_in, d_out]: position i * d_out + j
    masked = weight_grad[in_idx][:, out_idx].reshape(1, -1)
    torch.testing.assert_close(out, grass_ops.sjlt(masked, idx, sign, 5))


def test_chunked_intermediate_matches(monkeypatch):
    module = importlib.import_module("grass_ops.ops.factgrass")

    problem_args = factgrass_case(b=7, t=3, d_in=9, d_out=8, k_in=5, k_out=4, k=6)
    full = grass_ops.factgrass(*problem_args)
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 40)  # 2 rows of the 20-wide intermediate per chunk
    torch.testing.assert_close(grass_ops.factgrass(*problem_args), full)


def test_empty_batch_and_noncontiguous():
    x_in, g_out, in_idx, out_idx, idx, sign, k = factgrass_case()
    assert grass_ops.factgrass(x_in[:0], g_out[:0], in_idx, out_idx, idx, sign, k).shape == (0, k)
    x_nc = x_in.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_nc.is_contiguous()
    torch.testing.assert_close(
        grass_ops.factgrass(x_nc, g_out, in_idx, out_idx, idx, sign, k),
        reference_factgrass(x_in, g_out, in_idx, out_idx, idx, sign, k),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    args = factgrass_case(b=3, t=64, d_in=16, d_out=16, k_in=8, k_out=8, k=32, dtype=dtype)
    out = grass_ops.factgrass(*args)
    assert out.dtype == dtype
    assert_close_to_reference(out, reference_factgrass(*args), dtype)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: {**a, "x_in": a["x_in"][0, 0]}, ValueError, r"x_in must be \[B, T, d_in\]"),
        (lambda a: {**a, "g_out": a["g_out"][:, 0]}, ValueError, "g_out must have x_in's rank"),
        (lambda a: {**a, "g_out": a["g_out"][:, :2]}, ValueError, "must agree on"),
        (lambda a: {**a, "g_out": a["g_out"].float()}, TypeError, "share a dtype"),
        (lambda a: {**a, "in_idx": torch.tensor([0, 0, 1])}, ValueError, "in_idx must hold distinct"),
        (lambda a: {**a, "out_idx": torch.tensor([0, 5])}, ValueError, r"out_idx values must lie in \[0, 5\)"),
        (lambda a: {**a, "in_idx": a["in_idx"].float()}, TypeError, "in_idx must be an int64"),
        (lambda a: {**a, "idx": a["idx"][:-1], "sign": a["sign"][:-1]}, ValueError, r"idx must be \[k_in' \* k_out', s\]"),
        (lambda a: {**a, "k": -1}, ValueError, r"k must be an int in \[1, "),
        (lambda a: {**a, "k": 4.0}, TypeError, "k must be an int, got float"),
        (lambda a: {**a, "k": True}, TypeError, "k must be an int, got bool"),
        (lambda a: {**a, "sign": a["sign"] * 2}, ValueError, "sign values must be"),
        (lambda a: {**a, "idx": a["idx"] + 10}, ValueError, r"idx values must lie in \[0, k=4\)"),
        (lambda a: {**a, "x_in": a["x_in"].long()}, TypeError, "x_in must be float16"),
    ],
)
def test_bad_input_errors(mutate, error, match):
    names = ["x_in", "g_out", "in_idx", "out_idx", "idx", "sign", "k"]
    args = mutate(dict(zip(names, factgrass_case())))
    with pytest.raises(error, match=match):
        grass_ops.factgrass(**args)
