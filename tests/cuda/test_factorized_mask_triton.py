"""grass_ops.cuda.factorized_mask_triton (the fused soft-mask backward), under TRITON_INTERPRET=1 (set in tests/conftest.py
before triton is imported): the kernels' logic on CPU tensors. Small shapes: each interpreted program
costs milliseconds."""
import torch
from helpers import interpreter_marks

import grass_ops

pytestmark = interpreter_marks()


def test_soft_mask_backward_kernel_matches_torch():
    from grass_ops.ops.factorized_mask import factorized_mask_backward_torch

    x_in, g_out = torch.randn(70, 9), torch.randn(70, 5)
    grad_x, grad_g = torch.randn(70, 9), torch.randn(70, 5)
    s_in, s_out = torch.randn(9), torch.randn(5)
    got = grass_ops.cuda.factorized_mask_backward(grad_x, grad_g, x_in, g_out, s_in, s_out, 0.5)
    want = factorized_mask_backward_torch(grad_x, grad_g, x_in, g_out, s_in, s_out, 0.5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
