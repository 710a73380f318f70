"""Fake (meta) kernels: output shapes, dtypes and strides for FakeTensor tracing and torch.compile.

Each one runs the same structural checks as the real kernel (``torch._check_*``), so a shape or
dtype error surfaces at trace time with the same message. All outputs are contiguous.
"""
from __future__ import annotations

import torch

from .. import _checks
from ..ops.factgrass import check_factgrass_args
from ..ops.factorized_inner import check_factorized_inner_args
from ..ops.factorized_mask import check_factorized_mask_args, is_hard


@torch.library.register_fake("grass::sjlt")
def _sjlt_fake(x, idx, sign, k):
    _checks.check_sjlt_args(x, idx, sign, k)
    return x.new_empty(*x.shape[:-1], k)


@torch.library.register_fake("grass::sjlt_transpose")
def _sjlt_transpose_fake(y, idx, sign):
    _checks.check_sjlt_transpose_args(y, idx, sign)
    return y.new_empty(*y.shape[:-1], idx.shape[0])


@torch.library.register_fake("grass::factgrass")
def _factgrass_fake(x_in, g_out, in_idx, out_idx, idx, sign, k):
    check_factgrass_args(x_in, g_out, in_idx, out_idx, idx, sign, k)
    return x_in.new_empty(x_in.shape[0], k)


@torch.library.register_fake("grass::factgrass_backward")
def _factgrass_backward_fake(grad, x_in, g_out, in_idx, out_idx, idx, sign):
    return torch.empty_like(x_in, memory_format=torch.contiguous_format), torch.empty_like(
        g_out, memory_format=torch.contiguous_format
    )


@torch.library.register_fake("grass::factorized_mask")
def _factorized_mask_fake(x_in, g_out, in_mask, out_mask, temperature=1.0):
    check_factorized_mask_args(x_in, g_out, in_mask, out_mask, temperature)
    if is_hard(in_mask):
        return x_in.new_empty(*x_in.shape[:-1], in_mask.shape[0]), g_out.new_empty(*g_out.shape[:-1], out_mask.shape[0])
    return x_in.new_empty(x_in.shape), g_out.new_empty(g_out.shape)


@torch.library.register_fake("grass::factorized_mask_backward")
def _factorized_mask_backward_fake(grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature):
    if is_hard(in_mask):
        return x_in.new_empty(x_in.shape), g_out.new_empty(g_out.shape), x_in.new_empty(0), x_in.new_empty(0)
    return x_in.new_empty(x_in.shape), g_out.new_empty(g_out.shape), in_mask.new_empty(in_mask.shape), out_mask.new_empty(out_mask.shape)


@torch.library.register_fake("grass::factorized_inner")
def _factorized_inner_fake(x_a, g_a, x_b, g_b):
    check_factorized_inner_args(x_a, g_a, x_b, g_b)
    return x_a.new_empty(x_a.shape[0], x_b.shape[0])


@torch.library.register_fake("grass::factorized_inner_backward")
def _factorized_inner_backward_fake(grad, x_a, g_a, x_b, g_b):
    return tuple(t.new_empty(t.shape) for t in (x_a, g_a, x_b, g_b))
