"""Fake kernels of ``grass::factorized_inner`` and ``grass::factorized_inner_backward``."""
from __future__ import annotations

import torch

from .. import _checks


@torch.library.register_fake("grass::factorized_inner")
def factorized_inner_fake(x_a, g_a, x_b, g_b):
    _checks.check_factorized_inner_args(x_a, g_a, x_b, g_b)
    return x_a.new_empty(x_a.shape[0], x_b.shape[0])


@torch.library.register_fake("grass::factorized_inner_backward")
def factorized_inner_backward_fake(grad, x_a, g_a, x_b, g_b):
    _checks.check_factorized_inner_backward_args(grad, x_a, g_a, x_b, g_b)
    return tuple(t.new_empty(t.shape) for t in (x_a, g_a, x_b, g_b))
