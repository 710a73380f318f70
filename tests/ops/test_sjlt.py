import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import grass_ops
from grass_ops.testing import (
    assert_close_to_reference,
    dense_sjlt_matrix,
    reference_sjlt,
    sjlt_problems,
)


@given(sjlt_problems())
def test_matches_dense_reference(problem):
    out = grass_ops.sjlt(problem.x, problem.idx, problem.sign, problem.k)
    assert out.shape == (*problem.x.shape[:-1], problem.k) and out.dtype == problem.x.dtype
    assert_close_to_reference(out, reference_sjlt(problem.x, problem.idx, problem.sign, problem.k), problem.x.dtype)


@given(sjlt_problems(dtypes=st.just(torch.float64)), st.floats(-3, 3), st.floats(-3, 3))
def test_linearity(problem, alpha, beta):
    x, idx, sign, k = problem.x, problem.idx, problem.sign, problem.k
    y = torch.roll(x, 1, dims=-1) if x.numel() else x
    lhs = grass_ops.sjlt(alpha * x + beta * y, idx, sign, k)
    rhs = alpha * grass_ops.sjlt(x, idx, sign, k) + beta * grass_ops.sjlt(y, idx, sign, k)
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-10)


@given(sjlt_problems(dtypes=st.just(torch.float64)))
def test_adjoint_identity(problem):
    x, idx, sign, k = problem.x, problem.idx, problem.sign, problem.k
    y = torch.randn(*x.shape[:-1], k, dtype=torch.float64)
    lhs = (grass_ops.sjlt(x, idx, sign, k) * y).sum()
    rhs = (x * grass_ops.sjlt_transpose(y, idx, sign)).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-9, rtol=1e-9)


def test_jl_norm_is_preserved_in_expectation():
    """E||Sx||^2 = ||x||^2 over random hashes (mean over 400 seeds within 3 standard errors)."""
    x = torch.randn(200, dtype=torch.float64)
    ratios = torch.tensor(
        [float(grass_ops.sjlt(x, *grass_ops.sjlt_hash(200, 32, 2, seed), 32).norm() ** 2) for seed in range(400)]
    ) / float(x.norm() ** 2)
    assert abs(float(ratios.mean()) - 1.0) < 3 * float(ratios.std()) / math.sqrt(len(ratios))


def test_relative_distance_error_shrinks_with_k():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(20, 2000, generator=gen, dtype=torch.float64)
    true = torch.pdist(points)

    def mean_error(k):
        errors = []
        for seed in range(3):
            proj = grass_ops.sjlt(points, *grass_ops.sjlt_hash(2000, k, 1, seed), k)
            errors.append(float(((torch.pdist(proj) - true).abs() / true).mean()))
        return sum(errors) / len(errors)

    e_small, e_mid, e_large = mean_error(16), mean_error(128), mean_error(1024)
    assert e_small > e_mid > e_large
    assert e_large < 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_accumulate_in_float32(dtype):
    p, k = 4096, 8
    idx, sign = grass_ops.sjlt_hash(p, k, 1, 0)
    x = torch.ones(2, p, dtype=dtype)
    out = grass_ops.sjlt(x, idx, sign, k)
    assert out.dtype == dtype
    # 4096 additions of 1.0 in a bf16 accumulator would stall at 256; float32 accumulation is exact.
    expected = dense_sjlt_matrix(idx, sign, k).sum(1)
    assert_close_to_reference(out[0], expected, dtype)


def test_empty_batch_and_noncontiguous():
    idx, sign = grass_ops.sjlt_hash(10, 4, 2, 0)
    assert grass_ops.sjlt(torch.randn(0, 10), idx, sign, 4).shape == (0, 4)
    base = torch.randn(10, 6, dtype=torch.float64)
    x = base.t()  # [6, 10], non-contiguous
    torch.testing.assert_close(grass_ops.sjlt(x, idx, sign, 4), reference_sjlt(x, idx, sign, 4))
    idx_nc = idx.t().contiguous().t()  # same values, column-major strides
    assert not idx_nc.is_contiguous()
    torch.testing.assert_close(grass_ops.sjlt(x, idx_nc, sign, 4), reference_sjlt(x, idx, sign, 4))


def test_int32_index_is_accepted():
    idx, sign = grass_ops.sjlt_hash(10, 4, 1, 0)
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(grass_ops.sjlt(x, idx.int(), sign, 4), grass_ops.sjlt(x, idx, sign, 4))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x, i, s: (torch.randn(()), i, s, 4), ValueError, "at least 1 dimension"),
        (lambda x, i, s: (torch.randn(3, 11), i, s, 4), ValueError, r"last dimension \(11\) must equal idx's first dimension p \(10\)"),
        (lambda x, i, s: (x, i[:, 0], s, 4), ValueError, "idx must be 2-D"),
        (lambda x, i, s: (x, i + 4, s, 4), ValueError, r"idx values must lie in \[0, k=4\)"),
        (lambda x, i, s: (x, i - 1, s, 4), ValueError, r"idx values must lie in \[0, k=4\)"),
        (lambda x, i, s: (x, i.float(), s, 4), TypeError, "idx must be an int64"),
        (lambda x, i, s: (x, i, s.int(), 4), TypeError, "sign must be int8"),
        (lambda x, i, s: (x, i, s * 2, 4), ValueError, "sign values must be"),
        (lambda x, i, s: (x, i, s[:, :1], 4), ValueError, "sign must have idx's shape"),
        (lambda x, i, s: (x, i, s, 0), ValueError, r"k must be an int in \[1, 2\*\*63 - 1 \(int64\)\], got 0"),
        (lambda x, i, s: (x, i, s, 4.0), TypeError, "k must be an int, got float 4.0"),
        (lambda x, i, s: (x, i, s, True), TypeError, "k must be an int, got bool True"),
        (lambda x, i, s: (x, i, s, 2**63), ValueError, r"k must be an int in \[1, 2\*\*63 - 1 \(int64\)\], got 9223372036854775808"),
        (lambda x, i, s: (x, i[:, :0], s[:, :0], 4), ValueError, "s >= 1"),
        (lambda x, i, s: (x.int(), i, s, 4), TypeError, "x must be float16, bfloat16, float32 or float64"),
        (lambda x, i, s: (x, i.to("meta"), s, 4), ValueError, "one device"),
    ],
)
def test_bad_input_errors(make, error, match):
    idx, sign = grass_ops.sjlt_hash(10, 4, 2, 0)
    x = torch.randn(3, 10)
    with pytest.raises(error, match=match):
        grass_ops.sjlt(*make(x, idx, sign))


@pytest.mark.scatter
def test_torch_scatter_backend_is_bitwise_equal_to_native(monkeypatch):
    pytest.importorskip("torch_scatter", reason="the optional torch-scatter backend is not installed")
    idx, sign = grass_ops.sjlt_hash(3000, 50, 2, 1)
    x = torch.randn(17, 3000)
    monkeypatch.setenv("GRASS_OPS_SCATTER_BACKEND", "native")
    native = grass_ops.sjlt(x, idx, sign, 50)
    monkeypatch.setenv("GRASS_OPS_SCATTER_BACKEND", "torch_scatter")
    fast = grass_ops.sjlt(x, idx, sign, 50)
    assert torch.equal(native, fast)


def test_backend_variable_is_validated(monkeypatch):
    monkeypatch.setenv("GRASS_OPS_SCATTER_BACKEND", "bogus")
    idx, sign = grass_ops.sjlt_hash(10, 4, 1, 0)
    with pytest.raises(ValueError, match="GRASS_OPS_SCATTER_BACKEND must be"):
        grass_ops.sjlt(torch.randn(2, 10), idx, sign, 4)


