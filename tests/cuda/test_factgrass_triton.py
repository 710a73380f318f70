"""grass_ops.cuda.factgrass_triton (the fused FactGraSS kernel), under TRITON_INTERPRET=1 (set in tests/conftest.py
before triton is imported): the kernels' logic on CPU tensors. Small shapes: each interpreted program
costs milliseconds."""
import pytest
import torch
from helpers import factgrass_case, interpreter_marks
from hypothesis import given, settings
from hypothesis import strategies as st

import grass_ops
from grass_ops.testing import assert_close_to_reference, factgrass_problems, reference_factgrass

pytestmark = interpreter_marks()
interp_dtypes = st.sampled_from([torch.float32, torch.float16])  # the interpreter has no bf16 arithmetic


@settings(max_examples=8)
@given(factgrass_problems(max_b=2, max_t=40, max_d=40, max_k=20, dtypes=interp_dtypes), st.booleans())
def test_factgrass_kernels_match_reference(problem, deterministic):
    out = grass_ops.cuda.factgrass(*problem.args, deterministic=deterministic)
    assert out.shape == (problem.x_in.shape[0], problem.k) and out.dtype == problem.x_in.dtype
    reference = reference_factgrass(*problem.args)
    scale = float(reference.abs().max()) if reference.numel() else 1.0
    # fp16 products of O(1) factors summed over T tokens: tolerance scales with sqrt(T) and the magnitudes
    assert_close_to_reference(out, reference, problem.x_in.dtype, scale=max(scale, problem.x_in.shape[-2] ** 0.5))


def test_factgrass_fused_multi_tile():
    """k_in', k_out' > one 32-wide tile and T > one 32-token tile; non-contiguous input."""
    x_in = torch.randn(2, 70, 90)
    g_out = torch.randn(2, 70, 80).transpose(0, 1).contiguous().transpose(0, 1)
    in_idx, out_idx = grass_ops.random_mask(90, 40, 1), grass_ops.random_mask(80, 33, 2)
    idx, sign = grass_ops.sjlt_hash(40 * 33, 64, 2, 3)
    args = (x_in, g_out, in_idx, out_idx, idx, sign, 64)
    assert_close_to_reference(grass_ops.cuda.factgrass(*args, deterministic=False), reference_factgrass(*args), torch.float32)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "idx": a["idx"] + a["k"]}, r"idx values must lie in \[0, k=4\)"),
        (lambda a: {**a, "idx": a["idx"] * 0 - 1}, r"idx values must lie in \[0, k=4\)"),
        (lambda a: {**a, "sign": a["sign"] * 2}, "sign values must be"),
        (lambda a: {**a, "in_idx": a["in_idx"] + 100}, r"in_idx values must lie in \[0, 6\)"),
    ],
)
def test_fused_factgrass_validates_hash_and_masks_like_the_cpu_path(mutate, match, deterministic):
    """An out-of-range idx used to reach the kernel unchecked (memory corruption: "double free or
    corruption" in the interpreter)."""
    names = ["x_in", "g_out", "in_idx", "out_idx", "idx", "sign", "k"]
    args = mutate(dict(zip(names, factgrass_case(dtype=torch.float32))))
    with pytest.raises(ValueError, match=match):
        grass_ops.cuda.factgrass(**args, deterministic=deterministic)


@pytest.mark.parametrize("splits", [2, 3])
def test_token_ranges_on_grid_z_add_up(splits):
    """Small batches split T across grid z; the ranges' partial sums meet in the atomic adds."""
    from grass_ops.cuda.factgrass_triton import factgrass_fused

    x_in, g_out, in_idx, out_idx, idx, sign, k = factgrass_case(b=2, t=70, d_in=9, d_out=7, k_in=4, k_out=3, k=8, s=2,
                                                               dtype=torch.float32)
    out = factgrass_fused(x_in, g_out, in_idx, out_idx, idx, sign, k, splits=splits)
    assert_close_to_reference(out, reference_factgrass(x_in, g_out, in_idx, out_idx, idx, sign, k), torch.float32,
                              scale=70**0.5)


def test_token_splits_fill_the_gpu_only_at_small_batch(monkeypatch):
    from grass_ops.cuda import _launch, factgrass_triton

    monkeypatch.setattr(_launch, "multiprocessors", lambda device: 132)  # H100/H200
    assert factgrass_triton.token_splits(1, 1, 1024, torch.device("cpu")) == 32  # one tile, B=1: every 32-token block
    assert factgrass_triton.token_splits(1, 4, 7168, torch.device("cpu")) == 66  # 264 programs wanted
    assert factgrass_triton.token_splits(64, 16, 1024, torch.device("cpu")) == 1  # already 1024 programs
    assert factgrass_triton.token_splits(1, 1, 5, torch.device("cpu")) == 1


def test_rows_past_the_grid_y_limit_are_launched_in_chunks(monkeypatch):
    from grass_ops.cuda import _launch

    monkeypatch.setattr(_launch, "MAX_GRID_Y", 16)  # 40 samples: 3 chunks of at most 16 rows on grid y
    args = factgrass_case(b=40, t=2, d_in=5, d_out=4, k_in=2, k_out=2, k=3, dtype=torch.float32)
    assert_close_to_reference(grass_ops.cuda.factgrass(*args, deterministic=False), reference_factgrass(*args), torch.float32)
