"""Plain-function launchers of the Triton kernels, with the ops' signatures and checks.

They run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is
imported), which is how CI tests the kernels' logic without a GPU. float64 inputs use the torch
implementation (no float64 atomics path). ``deterministic=None`` follows
``torch.are_deterministic_algorithms_enabled()`` or ``GRASS_OPS_DETERMINISTIC=1``.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import _checks
from ..ops.factgrass import (
    _as_3d,
    check_factgrass_args,
    check_factgrass_values,
    factgrass_torch,
    masked_factors,
    masked_kron_rows,
)
from ..ops.factorized_mask import factorized_mask_backward_torch, is_hard, soft_weights
from ..ops.sjlt import sjlt_torch
from .factgrass_kernel import factgrass_fused
from .mask_kernel import soft_mask_backward
from .sjlt_kernel import sjlt_rows_atomic, sjlt_rows_ordered


def deterministic_enabled(flag: bool | None = None) -> bool:
    if flag is not None:
        return bool(flag)
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("GRASS_OPS_DETERMINISTIC") == "1"


def sjlt(x: Tensor, idx: Tensor, sign: Tensor, k: int, deterministic: bool | None = None) -> Tensor:
    """Triton SJLT, same contract as ``grass::sjlt``. deterministic=True: bitwise equal to the CPU op."""
    k = _checks.check_int("k", k)
    _checks.check_sjlt_args(x, idx, sign, k)
    if x.dtype == torch.float64:
        return sjlt_torch(x, idx, sign, k)
    rows = x.reshape(-1, idx.shape[0])
    if rows.shape[1] and rows.stride(1) != 1:
        rows = rows.contiguous()
    if deterministic_enabled(deterministic):
        out = sjlt_rows_ordered(rows, idx, sign, k)
    else:
        out = sjlt_rows_atomic(rows, idx, sign, k)
    return out.to(x.dtype).reshape(*x.shape[:-1], k)


def factgrass(x_in, g_out, in_idx, out_idx, idx, sign, k, deterministic: bool | None = None) -> Tensor:
    """Fused Triton FactGraSS, same contract as ``grass::factgrass``. deterministic=True: gather +
    bmm + the ordered SJLT kernel (reproducible run to run)."""
    k = _checks.check_int("k", k)
    check_factgrass_args(x_in, g_out, in_idx, out_idx, idx, sign, k)
    if x_in.dtype == torch.float64:
        return factgrass_torch(x_in, g_out, in_idx, out_idx, idx, sign, k)
    check_factgrass_values(x_in, g_out, in_idx, out_idx, idx, sign, k)
    if deterministic_enabled(deterministic):
        a, b = masked_factors(x_in, g_out, in_idx, out_idx)
        out = sjlt_rows_ordered(masked_kron_rows(a, b), idx, sign, k)
    else:
        x3, g3 = _as_3d(x_in), _as_3d(g_out)
        x3 = x3 if x3.stride(-1) == 1 else x3.contiguous()
        g3 = g3 if g3.stride(-1) == 1 else g3.contiguous()
        out = factgrass_fused(x3, g3, in_idx, out_idx, idx, sign, k)
    return out.to(x_in.dtype)


def factorized_mask_backward(grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature):
    """Backward of ``grass::factorized_mask``; the soft form runs the fused Triton reduction."""
    if is_hard(in_mask) or x_in.dtype == torch.float64:
        return factorized_mask_backward_torch(grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature)
    results = []
    for grad, t, logits in ((grad_x, x_in, in_mask), (grad_g, g_out, out_mask)):
        w = soft_weights(logits, temperature, t.dtype)
        grad_t, per_coord = soft_mask_backward(grad, t, w)
        results.append((grad_t, (per_coord * w * (1 - w) / temperature).to(logits.dtype)))
    return results[0][0], results[1][0], results[0][1], results[1][1]
