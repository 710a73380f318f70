"""Fake kernels of ``grass::factgrass`` and ``grass::factgrass_backward``."""
from __future__ import annotations

import torch

from .. import _checks


@torch.library.register_fake("grass::factgrass")
def factgrass_fake(x_in, g_out, in_idx, out_idx, idx, sign, k):
    _checks.check_factgrass_args(x_in, g_out, in_idx, out_idx, idx, sign, k)
    return x_in.new_empty(x_in.shape[0], k)


@torch.library.register_fake("grass::factgrass_backward")
def factgrass_backward_fake(grad, x_in, g_out, in_idx, out_idx, idx, sign):
    _checks.check_factgrass_backward_args(grad, x_in, g_out, in_idx, out_idx, idx, sign)
    return x_in.new_empty(x_in.shape), g_out.new_empty(g_out.shape)
