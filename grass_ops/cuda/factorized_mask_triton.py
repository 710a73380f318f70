"""Triton kernel for the soft factorized-mask backward: one pass over (grad, x) that writes
grad * w and the per-coordinate partial sums of grad * x (the logits' gradient), instead of torch's
materialized [N, d] product followed by a reduction. Partial sums are reduced in a fixed order.
Also the launcher :func:`factorized_mask_backward`, its CUDA registration and its ahead-of-time table
``AOT_VARIANTS``. Grid: column blocks (x) x at most 64 row splits (y)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from ..ops.factorized_mask import factorized_mask_backward_torch, soft_weights
from . import _launch

SOFT_MASK_CONFIG = dict(BLOCK_D=128, num_warps=4)
MAX_SPLITS = 64


@triton.jit(do_not_specialize=["n_rows", "rows_per_split"])
def _soft_mask_backward_kernel(
    grad_ptr, x_ptr, w_ptr, grad_x_ptr, partial_ptr,
    n_rows, d, rows_per_split,
    BLOCK_D: tl.constexpr,
):
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    mask_d = offs_d < d
    w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0)
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    row0 = split.to(tl.int64) * rows_per_split
    for i in range(rows_per_split):
        row = row0 + i
        live = mask_d & (row < n_rows)
        g = tl.load(grad_ptr + row * d + offs_d, mask=live, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * d + offs_d, mask=live, other=0.0).to(tl.float32)
        tl.store(grad_x_ptr + row * d + offs_d, (g * w).to(grad_x_ptr.dtype.element_ty), mask=live)
        total += g * x
    tl.store(partial_ptr + split.to(tl.int64) * d + offs_d, total, mask=mask_d)


def soft_mask_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """grad, x [..., d], w [d] float32 -> (grad * w in x.dtype, sum over rows of grad * x in float32 [d])."""
    d = x.shape[-1]
    grad2 = grad.reshape(-1, d).contiguous()
    x2 = x.reshape(-1, d).contiguous()
    n = x2.shape[0]
    grad_x = torch.empty_like(x2)
    block_d = SOFT_MASK_CONFIG["BLOCK_D"]
    splits = max(1, min(MAX_SPLITS, triton.cdiv(n, 64)))
    rows_per_split = triton.cdiv(max(n, 1), splits)
    partial = torch.zeros(splits, d, dtype=torch.float32, device=x.device)
    if n:
        with _launch.device_guard(x.device):
            _soft_mask_backward_kernel[(triton.cdiv(d, block_d), splits)](
                grad2, x2, w.contiguous(), grad_x, partial, n, d, rows_per_split, **SOFT_MASK_CONFIG
            )
    return grad_x.reshape(x.shape), partial.sum(0)


def factorized_mask_backward(grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature):
    """Backward of ``grass::factorized_mask``; the soft form runs the fused Triton reduction."""
    if _checks.is_hard_mask(in_mask) or x_in.dtype == torch.float64:
        return factorized_mask_backward_torch(grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature)
    _checks.check_factorized_mask_backward_args(grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature)
    results = []
    for grad, t, logits in ((grad_x, x_in, in_mask), (grad_g, g_out, out_mask)):
        w = soft_weights(logits, temperature, t.dtype)
        grad_t, per_coord = soft_mask_backward(grad, t, w)
        results.append((grad_t, (per_coord * w * (1 - w) / temperature).to(logits.dtype)))
    return results[0][0], results[1][0], results[0][1], results[1][1]


def register() -> None:
    torch.library.register_kernel("grass::factorized_mask_backward", "cuda", factorized_mask_backward)


def _aot_variants() -> list[_launch.AotVariant]:
    """Every dtype; d through each class Triton specializes on (n_rows and rows_per_split are not
    specialized) and unaligned inputs (views at an offset), one at a time."""
    from ._launch import FLOAT_DTYPES, INT_I64, INT_ODD, INT_ONE, AotVariant, TensorArg, one_at_a_time

    variants = []
    for dtype in FLOAT_DTYPES:
        for label, a in one_at_a_time(dict(d=INT_ODD, inputs=TensorArg(dtype)),
                                      dict(d=[INT_ONE, 4096, INT_I64], inputs=[TensorArg(dtype, aligned=False)])):
            args = (a["inputs"], a["inputs"], TensorArg(torch.float32), TensorArg(dtype), TensorArg(torch.float32),
                    INT_ODD, a["d"], 65)
            config = dict(SOFT_MASK_CONFIG)
            variants.append(AotVariant(_soft_mask_backward_kernel, args, config, config.pop("num_warps"),
                                       f"soft_mask_backward {dtype} {label}"))
    return variants


AOT_VARIANTS = _aot_variants()
