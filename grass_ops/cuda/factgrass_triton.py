"""Fused FactGraSS Triton kernel (gather, Kronecker sum over tokens with tl.dot, signed SJLT scatter),
the launcher :func:`factgrass` (the op's contract plus ``deterministic=``) and its CUDA registration.

One program per (row b, tile of k_in', tile of k_out'): it gathers the masked columns of x_in and
g_out tile by tile over T, accumulates sum_t a^T g in float32 with tl.dot, then adds each element
of its [BLOCK_I, BLOCK_J] tile to its SJLT bucket with its sign. The [B, k_in' * k_out'] intermediate
never reaches global memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from ..ops._factors import as_3d
from ..ops.factgrass import factgrass_torch, masked_factors, masked_kron_rows
from ._launch import deterministic_enabled
from .sjlt_triton import sjlt_rows_ordered


@triton.jit
def _factgrass_kernel(
    x_ptr, g_ptr, in_idx_ptr, out_idx_ptr, idx_ptr, sign_ptr, out_ptr,
    T, k_in, k_out, k, s,
    stride_xb, stride_xt, stride_gb, stride_gt, scale,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < k_in
    mask_j = offs_j < k_out
    cols_i = tl.load(in_idx_ptr + offs_i, mask=mask_i, other=0).to(tl.int64)
    cols_j = tl.load(out_idx_ptr + offs_j, mask=mask_j, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask_t = offs_t < T
        a = tl.load(
            x_ptr + b * stride_xb + offs_t[:, None] * stride_xt + cols_i[None, :],
            mask=mask_t[:, None] & mask_i[None, :], other=0.0,
        )
        g = tl.load(
            g_ptr + b * stride_gb + offs_t[:, None] * stride_gt + cols_j[None, :],
            mask=mask_t[:, None] & mask_j[None, :], other=0.0,
        )
        if IEEE:
            acc += tl.dot(tl.trans(a), g, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), g)
    flat = (offs_i[:, None] * k_out + offs_j[None, :]).to(tl.int64)
    live = mask_i[:, None] & mask_j[None, :]
    for r in range(s):
        bucket = tl.load(idx_ptr + flat * s + r, mask=live, other=0).to(tl.int64)
        weight = tl.load(sign_ptr + flat * s + r, mask=live, other=0).to(tl.float32) * scale
        tl.atomic_add(out_ptr + b * k + bucket, acc * weight, mask=live)


def factgrass_fused(x_in, g_out, in_idx, out_idx, idx, sign, k) -> torch.Tensor:
    """x_in [B, T, d_in], g_out [B, T, d_out] (unit stride on d) -> [B, k] float32."""
    n, t = x_in.shape[:2]
    k_in, k_out, s = in_idx.shape[0], out_idx.shape[0], idx.shape[1]
    out = torch.zeros(n, k, dtype=torch.float32, device=x_in.device)
    if n == 0:
        return out
    block_t, block_i, block_j = 32, 32, 32
    grid = (n, triton.cdiv(k_in, block_i), triton.cdiv(k_out, block_j))
    _factgrass_kernel[grid](
        x_in, g_out, in_idx.contiguous(), out_idx.contiguous(), idx.contiguous(), sign.contiguous(), out,
        t, k_in, k_out, k, s, x_in.stride(0), x_in.stride(1), g_out.stride(0), g_out.stride(1), float(s**-0.5),
        BLOCK_T=block_t, BLOCK_I=block_i, BLOCK_J=block_j, IEEE=x_in.dtype == torch.float32,
    )
    return out


def factgrass(x_in, g_out, in_idx, out_idx, idx, sign, k, deterministic: bool | None = None) -> torch.Tensor:
    """Fused Triton FactGraSS, same contract as ``grass::factgrass``. deterministic=True: gather +
    bmm + the ordered SJLT kernel (reproducible run to run). float64 uses the torch implementation."""
    k = _checks.check_int("k", k)
    _checks.check_factgrass_args(x_in, g_out, in_idx, out_idx, idx, sign, k)
    if x_in.dtype == torch.float64:
        return factgrass_torch(x_in, g_out, in_idx, out_idx, idx, sign, k)
    _checks.check_factgrass_values(x_in, g_out, in_idx, out_idx, idx, sign, k)
    if deterministic_enabled(deterministic):
        a, b = masked_factors(x_in, g_out, in_idx, out_idx)
        out = sjlt_rows_ordered(masked_kron_rows(a, b), idx, sign, k)
    else:
        x3, g3 = as_3d(x_in), as_3d(g_out)
        x3 = x3 if x3.stride(-1) == 1 else x3.contiguous()
        g3 = g3 if g3.stride(-1) == 1 else g3.contiguous()
        out = factgrass_fused(x3, g3, in_idx, out_idx, idx, sign, k)
    return out.to(x_in.dtype)


def register() -> None:
    torch.library.register_kernel(
        "grass::factgrass", "cuda",
        lambda x_in, g_out, in_idx, out_idx, idx, sign, k: factgrass(x_in, g_out, in_idx, out_idx, idx, sign, k),
    )
