"""The Triton kernels' logic on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py before
triton is imported). Small shapes: each interpreted program costs milliseconds."""
import os

import pytest
import torch
from helpers import factgrass_case
from hypothesis import given, settings
from hypothesis import strategies as st

import grass_ops
from grass_ops.testing import assert_close_to_reference, factgrass_problems, reference_factgrass, reference_sjlt, sjlt_problems

pytestmark = pytest.mark.interpreter
pytest.importorskip("triton", reason="triton is not installed (pip install grass_ops[gpu] or triton==3.7.1)")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the interpreter tests need TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

cuda = grass_ops.cuda
interp_dtypes = st.sampled_from([torch.float32, torch.float16])  # the interpreter has no bf16 arithmetic


@settings(max_examples=10)
@given(sjlt_problems(max_p=40, max_k=24, max_batch=3, dtypes=interp_dtypes), st.booleans())
def test_sjlt_kernels_match_reference(problem, deterministic):
    out = cuda.sjlt(problem.x, problem.idx, problem.sign, problem.k, deterministic=deterministic)
    assert out.shape == (*problem.x.shape[:-1], problem.k) and out.dtype == problem.x.dtype
    assert_close_to_reference(out, reference_sjlt(problem.x, problem.idx, problem.sign, problem.k), problem.x.dtype)


@settings(max_examples=10)
@given(sjlt_problems(max_p=40, max_k=24, max_batch=3, dtypes=interp_dtypes))
def test_ordered_kernel_is_bitwise_equal_to_cpu_op(problem):
    cpu = grass_ops.sjlt(problem.x, problem.idx, problem.sign, problem.k)
    ordered = cuda.sjlt(problem.x, problem.idx, problem.sign, problem.k, deterministic=True)
    assert torch.equal(ordered, cpu)


def test_odd_sizes_many_rows_and_int32_hash():
    idx, sign = grass_ops.sjlt_hash(300, 17, 3, 4)
    x = torch.randn(37, 300) * (torch.rand(37, 300) > 0.5)  # 37 rows: a partial row block
    expected = reference_sjlt(x, idx, sign, 17)
    assert_close_to_reference(cuda.sjlt(x, idx.int(), sign, 17, deterministic=False), expected, torch.float32)
    assert_close_to_reference(cuda.sjlt(x, idx, sign, 17, deterministic=True), expected, torch.float32)


def test_follows_torch_deterministic_setting(monkeypatch):
    from grass_ops.cuda import launchers

    monkeypatch.delenv("GRASS_OPS_DETERMINISTIC", raising=False)
    assert launchers.deterministic_enabled() is False
    monkeypatch.setenv("GRASS_OPS_DETERMINISTIC", "1")
    assert launchers.deterministic_enabled() is True
    monkeypatch.delenv("GRASS_OPS_DETERMINISTIC")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert launchers.deterministic_enabled() is True
        assert launchers.deterministic_enabled(False) is False  # an explicit argument wins
    finally:
        torch.use_deterministic_algorithms(previous)


@settings(max_examples=8)
@given(factgrass_problems(max_b=2, max_t=40, max_d=40, max_k=20, dtypes=interp_dtypes), st.booleans())
def test_factgrass_kernels_match_reference(problem, deterministic):
    out = cuda.factgrass(*problem.args, deterministic=deterministic)
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
    assert_close_to_reference(cuda.factgrass(*args, deterministic=False), reference_factgrass(*args), torch.float32)


def test_soft_mask_backward_kernel_matches_torch():
    from grass_ops.ops.factorized_mask import factorized_mask_backward_torch

    x_in, g_out = torch.randn(70, 9), torch.randn(70, 5)
    grad_x, grad_g = torch.randn(70, 9), torch.randn(70, 5)
    s_in, s_out = torch.randn(9), torch.randn(5)
    got = cuda.factorized_mask_backward(grad_x, grad_g, x_in, g_out, s_in, s_out, 0.5)
    want = factorized_mask_backward_torch(grad_x, grad_g, x_in, g_out, s_in, s_out, 0.5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


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
        cuda.factgrass(**args, deterministic=deterministic)


def test_launchers_validate_like_the_ops():
    idx, sign = grass_ops.sjlt_hash(10, 4, 1, 0)
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, k=4\)"):
        cuda.sjlt(torch.randn(2, 10), idx + 4, sign, 4)
    with pytest.raises(ValueError, match="last dimension"):
        cuda.sjlt(torch.randn(2, 11), idx, sign, 4)


def test_opaque_registration_passes_opcheck_in_the_interpreter():
    """Registering the launcher as an opaque kernel (what grass_ops.cuda.register does for CUDA) keeps
    the op's contract: opcheck on a scratch op that dispatches to the interpreted Triton launcher."""
    lib = torch.library.Library("grass_interp_test", "FRAGMENT")  # noqa: F841  (keeps the namespace alive)

    @torch.library.custom_op("grass_interp_test::sjlt", mutates_args=())
    def interp_sjlt(x: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
        return cuda.sjlt(x, idx, sign, k, deterministic=True)

    @interp_sjlt.register_fake
    def _(x, idx, sign, k):
        return x.new_empty(*x.shape[:-1], k)

    idx, sign = grass_ops.sjlt_hash(12, 5, 1, 0)
    torch.library.opcheck(interp_sjlt, (torch.randn(3, 12), idx, sign, 5), test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda x: interp_sjlt(x, idx, sign, 5).relu(), fullgraph=True)
    x = torch.randn(3, 12)
    torch.testing.assert_close(compiled(x), grass_ops.sjlt(x, idx, sign, 5).relu())
