"""Triton SJLT: an atomic scatter (fast) and an ordered segment sum (bitwise reproducible), the
launcher :func:`sjlt` (the op's contract plus ``deterministic=``) and its CUDA registration.

Atomic kernel: the grid covers blocks of input coordinates j x blocks of rows; a program loads the
hashes of its BLOCK_J coordinates once per r and loops over its rows, adding sign * x / sqrt(s) into
a float32 output with masked atomics that skip zero inputs. Offsets are 64-bit.

Ordered kernel: one program per (signed bucket, row block) walks the bucket's coordinates in the
same order as the CPU kernel (hash r, then j ascending) and sums in float32, so with the shared
epilogue (positive minus negative half, times s^-1/2) it reproduces the CPU result bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from ..ops.sjlt import combine_signed, signed_buckets, sjlt_torch
from ._launch import deterministic_enabled


@triton.jit
def _sjlt_atomic_kernel(
    x_ptr, idx_ptr, sign_ptr, out_ptr,
    n_rows, p, k, s, stride_row, scale,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_j = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < p
    hash_offs = offs_j.to(tl.int64) * s
    row0 = pid_n * ROWS_PER_PROGRAM
    for r in range(s):
        bucket = tl.load(idx_ptr + hash_offs + r, mask=mask_j, other=0).to(tl.int64)
        weight = tl.load(sign_ptr + hash_offs + r, mask=mask_j, other=0).to(tl.float32) * scale
        for i in range(ROWS_PER_PROGRAM):
            row = (row0 + i).to(tl.int64)
            live = mask_j & (row < n_rows)
            value = tl.load(x_ptr + row * stride_row + offs_j, mask=live, other=0.0).to(tl.float32)
            tl.atomic_add(out_ptr + row * k + bucket, value * weight, mask=live & (value != 0.0))


@triton.jit
def _sjlt_ordered_kernel(
    x_ptr, rowptr_ptr, col_ptr, acc_ptr,
    n_rows, buckets, stride_row,
    BLOCK_N: tl.constexpr,
):
    h = tl.program_id(0)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < n_rows
    start = tl.load(rowptr_ptr + h)
    end = tl.load(rowptr_ptr + h + 1)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for e in range(start, end):
        j = tl.load(col_ptr + e)
        acc += tl.load(x_ptr + offs_n * stride_row + j, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(acc_ptr + offs_n * buckets + h, acc, mask=mask_n)


def _bucket_csr(idx: torch.Tensor, sign: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR over the 2k signed buckets; entries in CPU order (hash r, then j ascending)."""

    def build():
        table = signed_buckets(idx, sign, k)  # [s, p], validates
        sorted_buckets, order = torch.sort(table.reshape(-1), stable=True)
        cols = (order % idx.shape[0]).to(torch.int64)
        # bucket boundaries without a host sync (bincount would need one), so this also works while
        # a CUDA graph is being captured
        bounds = torch.arange(2 * k + 1, dtype=sorted_buckets.dtype, device=idx.device)
        rowptr = torch.searchsorted(sorted_buckets, bounds).to(torch.int64)
        return rowptr, cols

    return _checks.validation_cache.get((idx, sign), ("csr", k), build)


def sjlt_rows_atomic(rows: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
    """[n, p] (unit stride along p) -> [n, k] float32, atomic scatter."""
    _checks.check_sjlt_values_cached(idx, sign, k)
    n, p = rows.shape
    s = idx.shape[1]
    out = torch.zeros(n, k, dtype=torch.float32, device=rows.device)
    if n == 0:
        return out
    block_j, rows_per_program = 256, 16
    grid = (triton.cdiv(p, block_j), triton.cdiv(n, rows_per_program))
    _sjlt_atomic_kernel[grid](
        rows, idx.contiguous(), sign.contiguous(), out, n, p, k, s, rows.stride(0), float(s**-0.5),
        ROWS_PER_PROGRAM=rows_per_program, BLOCK_J=block_j,
    )
    return out


def sjlt_rows_ordered(rows: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
    """[n, p] -> [n, k] float32 with a fixed summation order (bitwise equal to the CPU kernel)."""
    rowptr, cols = _bucket_csr(idx, sign, k)
    n = rows.shape[0]
    acc = torch.empty(n, 2 * k, dtype=torch.float32, device=rows.device)
    if n:
        block_n = 32
        _sjlt_ordered_kernel[(2 * k, triton.cdiv(n, block_n))](
            rows, rowptr, cols, acc, n, 2 * k, rows.stride(0), BLOCK_N=block_n
        )
    return combine_signed(acc, k, idx.shape[1])


def sjlt(x: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor, k: int, deterministic: bool | None = None) -> torch.Tensor:
    """Triton SJLT, same contract as ``grass::sjlt``. deterministic=True: bitwise equal to the CPU op.
    float64 inputs use the torch implementation (no float64 atomics path)."""
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


def register() -> None:
    torch.library.register_kernel("grass::sjlt", "cuda", lambda x, idx, sign, k: sjlt(x, idx, sign, k))
