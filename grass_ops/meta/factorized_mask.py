"""Fake kernels of ``grass::factorized_mask`` and ``grass::factorized_mask_backward``."""
from __future__ import annotations

import torch

from .. import _checks


@torch.library.register_fake("grass::factorized_mask")
def factorized_mask_fake(x_in, g_out, in_mask, out_mask, temperature=1.0):
    _checks.check_factorized_mask_args(x_in, g_out, in_mask, out_mask, temperature)
    if _checks.is_hard_mask(in_mask):
        return x_in.new_empty(*x_in.shape[:-1], in_mask.shape[0]), g_out.new_empty(*g_out.shape[:-1], out_mask.shape[0])
    return x_in.new_empty(x_in.shape), g_out.new_empty(g_out.shape)


@torch.library.register_fake("grass::factorized_mask_backward")
def factorized_mask_backward_fake(grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature):
    _checks.check_factorized_mask_backward_args(grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature)
    grad_x_in, grad_g_out = x_in.new_empty(x_in.shape), g_out.new_empty(g_out.shape)
    if _checks.is_hard_mask(in_mask):  # index masks have no gradient: empty [0] in the factors' dtype
        return grad_x_in, grad_g_out, x_in.new_empty(0), x_in.new_empty(0)
    return grad_x_in, grad_g_out, in_mask.new_empty(in_mask.shape), out_mask.new_empty(out_mask.shape)
