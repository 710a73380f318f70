"""grass_ops.cuda.sjlt_triton (atomic and ordered SJLT kernels), under TRITON_INTERPRET=1 (set in tests/conftest.py
before triton is imported): the kernels' logic on CPU tensors. Small shapes: each interpreted program
costs milliseconds."""
import pytest
import torch
from helpers import interpreter_marks
from hypothesis import given, settings
from hypothesis import strategies as st

import grass_ops
from grass_ops.testing import assert_close_to_reference, reference_sjlt, sjlt_problems

pytestmark = interpreter_marks()
interp_dtypes = st.sampled_from([torch.float32, torch.float16])  # the interpreter has no bf16 arithmetic


@settings(max_examples=10)
@given(sjlt_problems(max_p=40, max_k=24, max_batch=3, dtypes=interp_dtypes), st.booleans())
def test_sjlt_kernels_match_reference(problem, deterministic):
    out = grass_ops.cuda.sjlt(problem.x, problem.idx, problem.sign, problem.k, deterministic=deterministic)
    assert out.shape == (*problem.x.shape[:-1], problem.k) and out.dtype == problem.x.dtype
    assert_close_to_reference(out, reference_sjlt(problem.x, problem.idx, problem.sign, problem.k), problem.x.dtype)


@settings(max_examples=10)
@given(sjlt_problems(max_p=40, max_k=24, max_batch=3, dtypes=interp_dtypes))
def test_ordered_kernel_is_bitwise_equal_to_cpu_op(problem):
    cpu = grass_ops.sjlt(problem.x, problem.idx, problem.sign, problem.k)
    ordered = grass_ops.cuda.sjlt(problem.x, problem.idx, problem.sign, problem.k, deterministic=True)
    assert torch.equal(ordered, cpu)


def test_odd_sizes_many_rows_and_int32_hash():
    idx, sign = grass_ops.sjlt_hash(300, 17, 3, 4)
    x = torch.randn(37, 300) * (torch.rand(37, 300) > 0.5)  # 37 rows: a partial row block
    expected = reference_sjlt(x, idx, sign, 17)
    assert_close_to_reference(grass_ops.cuda.sjlt(x, idx.int(), sign, 17, deterministic=False), expected, torch.float32)
    assert_close_to_reference(grass_ops.cuda.sjlt(x, idx, sign, 17, deterministic=True), expected, torch.float32)


def test_follows_torch_deterministic_setting(monkeypatch):
    from grass_ops.cuda import _launch as launchers

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


def test_launchers_validate_like_the_ops():
    idx, sign = grass_ops.sjlt_hash(10, 4, 1, 0)
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, k=4\)"):
        grass_ops.cuda.sjlt(torch.randn(2, 10), idx + 4, sign, 4)
    with pytest.raises(ValueError, match="last dimension"):
        grass_ops.cuda.sjlt(torch.randn(2, 11), idx, sign, 4)


def test_opaque_registration_passes_opcheck_in_the_interpreter():
    """Registering the launcher as an opaque kernel (what grass_ops.cuda.register does for CUDA) keeps
    the op's contract: opcheck on a scratch op that dispatches to the interpreted Triton launcher."""
    lib = torch.library.Library("grass_interp_test", "FRAGMENT")  # noqa: F841  (keeps the namespace alive)

    @torch.library.custom_op("grass_interp_test::sjlt", mutates_args=())
    def interp_sjlt(x: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
        return grass_ops.cuda.sjlt(x, idx, sign, k, deterministic=True)

    @interp_sjlt.register_fake
    def _(x, idx, sign, k):
        return x.new_empty(*x.shape[:-1], k)

    idx, sign = grass_ops.sjlt_hash(12, 5, 1, 0)
    torch.library.opcheck(interp_sjlt, (torch.randn(3, 12), idx, sign, 5), test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda x: interp_sjlt(x, idx, sign, 5).relu(), fullgraph=True)
    x = torch.randn(3, 12)
    torch.testing.assert_close(compiled(x), grass_ops.sjlt(x, idx, sign, 5).relu())


@pytest.mark.parametrize("deterministic", [False, True])
def test_rows_past_the_grid_y_limit_are_launched_in_chunks(monkeypatch, deterministic):
    """Rows sit on grid axis y (at most 65535 blocks): the launcher cuts them into chunks. The limit is
    lowered to 16 blocks so that 600 rows need 3 chunks (atomic, 16-row blocks) or 2 (ordered, 32)."""
    from grass_ops.cuda import _launch, sjlt_triton

    monkeypatch.setattr(_launch, "MAX_GRID_Y", 16)
    launches = []
    kernel = sjlt_triton._sjlt_ordered_kernel if deterministic else sjlt_triton._sjlt_atomic_kernel
    original = type(kernel).__getitem__
    monkeypatch.setattr(type(kernel), "__getitem__", lambda self, grid: launches.append(grid) or original(self, grid))
    idx, sign = grass_ops.sjlt_hash(12, 5, 2, 3)
    x = torch.randn(600, 12)
    out = grass_ops.cuda.sjlt(x, idx, sign, 5, deterministic=deterministic)
    assert all(grid[1] <= 16 for grid in launches) and len(launches) == (2 if deterministic else 3)
    if deterministic:
        assert torch.equal(out, grass_ops.sjlt(x, idx, sign, 5))
    else:
        assert_close_to_reference(out, reference_sjlt(x, idx, sign, 5), torch.float32)


def test_launches_run_under_the_tensors_device(monkeypatch):
    """Every launcher enters torch.cuda.device(tensor.device) (a tensor on cuda:1 while cuda:0 is
    current); observed through the guard each launcher module calls."""
    from grass_ops.cuda import _launch

    seen = []
    original = _launch.device_guard
    monkeypatch.setattr(_launch, "device_guard", lambda device: seen.append(device) or original(device))
    idx, sign = grass_ops.sjlt_hash(8, 4, 1, 0)
    x = torch.randn(3, 8)
    grass_ops.cuda.sjlt(x, idx, sign, 4, deterministic=False)
    grass_ops.cuda.sjlt(x, idx, sign, 4, deterministic=True)
    masks = grass_ops.random_mask(6, 2, 0), grass_ops.random_mask(5, 2, 1), *grass_ops.sjlt_hash(4, 4, 1, 2)
    grass_ops.cuda.factgrass(torch.randn(2, 3, 6), torch.randn(2, 3, 5), *masks, 4, deterministic=False)
    grass_ops.cuda.factorized_mask_backward(torch.randn(4, 6), torch.randn(4, 5), torch.randn(4, 6), torch.randn(4, 5),
                                            torch.randn(6), torch.randn(5), 1.0)
    assert len(seen) == 5 and all(device == torch.device("cpu") for device in seen)  # factorized_mask: two factors


def test_ordered_kernel_keeps_every_lane_busy():
    """One row per lane: BLOCK_N rows on BLOCK_N / 32 warps (4 warps on 32 rows left 3 repeating work)."""
    from grass_ops.cuda.sjlt_triton import ORDERED_CONFIG

    assert ORDERED_CONFIG["BLOCK_N"] == 32 * ORDERED_CONFIG["num_warps"]
