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


@pytest.mark.parametrize("deterministic", [False, True])
def test_rows_past_the_grid_y_limit(deterministic):
    """1.1 M rows: more than 65535 row blocks of 16 (atomic) or 32 (ordered) rows, launched in chunks."""
    idx, sign = grass_ops.sjlt_hash(8, 4, 1, 0)
    x = torch.randn(1_100_000, 8)
    got = grass_ops.cuda.sjlt(x.cuda(), idx.cuda(), sign.cuda(), 4, deterministic=deterministic).cpu()
    expected = grass_ops.sjlt(x, idx, sign, 4)
    if deterministic:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_factgrass_small_batch_splits_tokens():
    """B = 1, k = 256 (one 32x32 tile): the tokens are split across grid z; same result."""
    case = factgrass_case(b=1, t=1024, d_in=512, d_out=512, k_in=32, k_out=32, k=256, s=1, dtype=torch.float32)
    x_in, g_out, in_idx, out_idx, idx, sign, k = case
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in case]
    got = grass_ops.cuda.factgrass(*args, deterministic=False).cpu()
    reference = reference_factgrass(x_in, g_out, in_idx, out_idx, idx, sign, k)
    assert_close_to_reference(got, reference, torch.float32, scale=max(float(reference.abs().max()), 10.0))


def test_cuda_graph_capture_caches_nothing():
    """Value checks skipped during capture and a CSR table made in the graph's pool are never reused:
    a hash captured unchecked (out of range) is refused by the next eager call."""
    from grass_ops import _checks

    idx, sign = (t.cuda() for t in grass_ops.sjlt_hash(64, 16, 2, 0))
    x = torch.randn(8, 64, device="cuda")
    grass_ops.cuda.sjlt(x, idx, sign, 16, deterministic=True)  # warm-up: compiles the kernels
    stream = torch.cuda.Stream()
    for valid in (True, False):
        captured_idx, captured_sign = idx.clone(), sign.clone()  # new tensors: nothing cached for them
        if not valid:
            captured_idx[0, 0] = 99  # the ordered kernel's CSR ignores it; the check cannot run while capturing
        before = len(_checks.validation_cache.entries)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            out = grass_ops.cuda.sjlt(x, captured_idx, captured_sign, 16, deterministic=True)
        assert len(_checks.validation_cache.entries) == before
        if valid:
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out.cpu(), grass_ops.sjlt(x.cpu(), idx.cpu(), sign.cpu(), 16))
        else:
            with pytest.raises(ValueError, match=r"idx values must lie in \[0, k=16\)"):
                grass_ops.cuda.sjlt(x, captured_idx, captured_sign, 16, deterministic=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_second_device():
    idx, sign = grass_ops.sjlt_hash(64, 16, 1, 0)
    x = torch.randn(8, 64)
    with torch.cuda.device(0):
        got = grass_ops.sjlt(x.to("cuda:1"), idx.to("cuda:1"), sign.to("cuda:1"), 16)
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), grass_ops.sjlt(x, idx, sign, 16), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize("spec", ["factgrass", "logra", "sjlt"])
def test_in_backward_compression_on_cuda_equals_the_cpu(spec, autocast):
    """The cache step on a small random Llama: in-backward compression on the GPU equals the factor path
    on the CPU (same weights, same batch, padded rows included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from attribution import llm
    from attribution.compression import BatchCompressor, build_compressors
    from attribution.layers import find_layers

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.clone()}
    infos = find_layers(model, None)
    blocks = build_compressors(spec, infos, 64, seed=5)
    reference = BatchCompressor(model, infos, [], blocks, torch.float32, torch.device("cpu"), compile=False,
                                return_factors=True, autocast=autocast)(batch, llm.sequence_loss)[0]
    gpu_model = model.cuda()
    gpu = BatchCompressor(gpu_model, infos, [], {n: c.cuda() for n, c in blocks.items()}, torch.float32,
                          torch.device("cuda"), compile=False, autocast=autocast)(batch, llm.sequence_loss)[0]
    error = float((gpu.cpu() - reference).norm() / reference.norm())
    assert error < (2e-2 if autocast else 1e-4), error  # bfloat16 matmuls round differently on each device
