"""CUDA checks (run by scripts/gpu_check.sh with GRASS_OPS_GPU_TESTS=1): Triton kernels vs the CPU
ops, opcheck on CUDA, torch.compile with inductor and with reduce-overhead (CUDA graphs)."""
import pytest
import torch
from helpers import factgrass_case

import grass_ops
from grass_ops.testing import assert_close_to_reference, reference_factgrass, reference_sjlt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_triton_kernels_are_registered():
    assert grass_ops.cuda.register()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s", [1, 3])
def test_sjlt_cuda_matches_cpu(dtype, s):
    idx, sign = grass_ops.sjlt_hash(5000, 300, s, 1)
    x = (torch.randn(70, 5000) * (torch.rand(70, 5000) > 0.3)).to(dtype)
    got = grass_ops.sjlt(x.cuda(), idx.cuda(), sign.cuda(), 300).cpu()
    assert_close_to_reference(got, reference_sjlt(x, idx, sign, 300), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_cuda_is_bitwise_equal_to_cpu(dtype):
    idx, sign = grass_ops.sjlt_hash(4096, 256, 2, 7)
    x = torch.randn(33, 4096).to(dtype)
    cpu = grass_ops.sjlt(x, idx, sign, 256)
    gpu = grass_ops.cuda.sjlt(x.cuda(), idx.cuda(), sign.cuda(), 256, deterministic=True).cpu()
    assert torch.equal(gpu, cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_factgrass_cuda_matches_reference(dtype):
    case = factgrass_case(b=3, t=100, d_in=200, d_out=150, k_in=48, k_out=40, k=128, s=2, dtype=dtype)
    x_in, g_out, in_idx, out_idx, idx, sign, k = case
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in (x_in, g_out, in_idx, out_idx, idx, sign, k)]
    got = grass_ops.factgrass(*args).cpu()
    reference = reference_factgrass(x_in, g_out, in_idx, out_idx, idx, sign, k)
    assert_close_to_reference(got, reference, dtype, scale=max(float(reference.abs().max()), 10.0))


def test_large_offsets_do_not_overflow():
    """rows * p > 2^31: 64-bit offsets in the atomic kernel."""
    p, rows = 2**21, 1100
    idx, sign = grass_ops.sjlt_hash(p, 64, 1, 0)
    x = torch.zeros(rows, p, dtype=torch.bfloat16, device="cuda")
    x[-1, -5:] = 1.0
    out = grass_ops.sjlt(x, idx.cuda(), sign.cuda(), 64)
    expected = reference_sjlt(x[-1:].cpu().float(), idx, sign, 64)
    torch.testing.assert_close(out[-1:].float().cpu().double(), expected)


def test_opcheck_on_cuda():
    case = factgrass_case(dtype=torch.float32, requires_grad=True)
    cuda_case = tuple(
        a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in case
    )
    torch.library.opcheck(torch.ops.grass.factgrass, cuda_case)
    idx, sign = grass_ops.sjlt_hash(40, 8, 2, 0)
    torch.library.opcheck(torch.ops.grass.sjlt, (torch.randn(5, 40, device="cuda", requires_grad=True), idx.cuda(), sign.cuda(), 8))


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compile_on_cuda(mode):
    torch._dynamo.reset()
    case = factgrass_case(dtype=torch.float32, b=4, t=16, d_in=64, d_out=48, k_in=16, k_out=8, k=32)
    x_in, g_out, in_idx, out_idx, idx, sign, k = (a.cuda() if isinstance(a, torch.Tensor) else a for a in case)
    fidx, fsign = (t.cuda() for t in grass_ops.sjlt_hash(48, 16, 1, 3))

    def step(x, g):
        fact = grass_ops.factgrass(torch.tanh(x), g, in_idx, out_idx, idx, sign, k).sum(-1)
        return fact + grass_ops.sjlt(g.mean(1), fidx, fsign, 16).sum(-1)

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    eager = step(x_in, g_out)
    for _ in range(3):  # reduce-overhead records a CUDA graph on a later call
        got = compiled(x_in, g_out)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
