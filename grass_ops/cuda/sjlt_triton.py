"""Triton SJLT: an atomic scatter (fast) and an ordered segment sum (bitwise reproducible), the
launcher :func:`sjlt` (the op's contract plus ``deterministic=``), its CUDA registration and its
ahead-of-time table ``AOT_VARIANTS``.

Atomic kernel: the grid covers blocks of input coordinates j (axis x) x blocks of rows (axis y, in
chunks that fit its 65535 limit); a program loads the hashes of its BLOCK_J coordinates once per r
and loops over its rows, adding sign * x / sqrt(s) into a float32 output with relaxed masked atomics
that skip zero inputs. Offsets are 64-bit.

Ordered kernel: one program per (signed bucket, row block) walks the bucket's coordinates in the
same order as the CPU kernel (hash r, then j ascending) and sums in float32, so with the shared
epilogue (positive minus negative half, times s^-1/2) it reproduces the CPU result bit for bit.
A program handles BLOCK_N = 32 rows with one warp (32 lanes, one row each).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from ..ops.sjlt import combine_signed, signed_buckets, sjlt_torch
from . import _launch

ATOMIC_CONFIG = dict(ROWS_PER_PROGRAM=16, BLOCK_J=256, num_warps=4)
ORDERED_CONFIG = dict(BLOCK_N=32, num_warps=1)


@triton.jit(do_not_specialize=["n_rows"])
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
    row0 = pid_n.to(tl.int64) * ROWS_PER_PROGRAM
    for r in range(s):
        bucket = tl.load(idx_ptr + hash_offs + r, mask=mask_j, other=0).to(tl.int64)
        weight = tl.load(sign_ptr + hash_offs + r, mask=mask_j, other=0).to(tl.float32) * scale
        for i in range(ROWS_PER_PROGRAM):
            row = row0 + i
            live = mask_j & (row < n_rows)
            value = tl.load(x_ptr + row * stride_row + offs_j, mask=live, other=0.0).to(tl.float32)
            tl.atomic_add(out_ptr + row * k + bucket, value * weight, mask=live & (value != 0.0), sem="relaxed")


@triton.jit(do_not_specialize=["n_rows"])
def _sjlt_ordered_kernel(
    x_ptr, rowptr_ptr, col_ptr, acc_ptr,
    n_rows, buckets, stride_row,
    BLOCK_N: tl.constexpr,
):
    h = tl.program_id(0)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
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
        # a CUDA graph is being captured (then it is not cached: see _checks.IdentityCache)
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
    idx, sign = idx.contiguous(), sign.contiguous()
    config = dict(ATOMIC_CONFIG)
    block_j, rows_per_program = config["BLOCK_J"], config["ROWS_PER_PROGRAM"]
    with _launch.device_guard(rows.device):
        for start, stop in _launch.row_chunks(n, rows_per_program):
            grid = (triton.cdiv(p, block_j), triton.cdiv(stop - start, rows_per_program))
            _sjlt_atomic_kernel[grid](
                rows[start:stop], idx, sign, out[start:stop], stop - start, p, k, s, rows.stride(0), float(s**-0.5),
                **config,
            )
    return out


def sjlt_rows_ordered(rows: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
    """[n, p] -> [n, k] float32 with a fixed summation order (bitwise equal to the CPU kernel)."""
    rowptr, cols = _bucket_csr(idx, sign, k)
    n = rows.shape[0]
    acc = torch.empty(n, 2 * k, dtype=torch.float32, device=rows.device)
    block_n = ORDERED_CONFIG["BLOCK_N"]
    with _launch.device_guard(rows.device):
        for start, stop in _launch.row_chunks(n, block_n):
            _sjlt_ordered_kernel[(2 * k, triton.cdiv(stop - start, block_n))](
                rows[start:stop], rowptr, cols, acc[start:stop], stop - start, 2 * k, rows.stride(0), **ORDERED_CONFIG
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
    if _launch.deterministic_enabled(deterministic):
        out = sjlt_rows_ordered(rows, idx, sign, k)
    else:
        out = sjlt_rows_atomic(rows, idx, sign, k)
    return out.to(x.dtype).reshape(*x.shape[:-1], k)


def register() -> None:
    torch.library.register_kernel("grass::sjlt", "cuda", lambda x, idx, sign, k: sjlt(x, idx, sign, k))


def _aot_variants() -> list[_launch.AotVariant]:
    """Every dtype x index dtype; each int argument through each class Triton specializes on, and
    unaligned pointers (x may be a view at an offset), one at a time. n_rows is not specialized and
    stays below 2**31 (row chunks), so it has one class."""
    from ._launch import FLOAT_DTYPES, INDEX_DTYPES, INT_DIV16, INT_I64, INT_ODD, INT_ONE, AotVariant, TensorArg, one_at_a_time

    variants = []
    ints = ("n_rows", "p", "k", "s", "stride_row")
    for dtype in FLOAT_DTYPES:
        for index_dtype in INDEX_DTYPES:
            base = dict(x=TensorArg(dtype), idx=TensorArg(index_dtype), n_rows=INT_ODD, p=INT_DIV16, k=1024, s=INT_ONE,
                        stride_row=INT_DIV16)
            alternatives = {} if index_dtype != torch.int64 else dict(
                x=[TensorArg(dtype, aligned=False)], p=[INT_ONE, INT_ODD, INT_I64],
                k=[INT_ONE, INT_ODD, INT_I64], s=[2, 16], stride_row=[INT_ONE, INT_ODD, INT_I64],
            )
            for label, a in one_at_a_time(base, alternatives):
                name = f"atomic {dtype} {index_dtype} {label}"
                args = (a["x"], a["idx"], TensorArg(torch.int8), TensorArg(torch.float32), *(a[n] for n in ints), 0.5)
                config = dict(ATOMIC_CONFIG)
                variants.append(AotVariant(_sjlt_atomic_kernel, args, config, config.pop("num_warps"), name))
        base = dict(x=TensorArg(dtype), n_rows=INT_ODD, buckets=2048, stride_row=INT_DIV16)
        alternatives = dict(x=[TensorArg(dtype, aligned=False)], buckets=[INT_ODD + 1, 2 * INT_I64],
                            stride_row=[INT_ONE, INT_ODD, INT_I64])
        for label, a in one_at_a_time(base, alternatives):
            args = (a["x"], TensorArg(torch.int64), TensorArg(torch.int64), TensorArg(torch.float32), a["n_rows"], a["buckets"],
                    a["stride_row"])
            config = dict(ORDERED_CONFIG)
            variants.append(AotVariant(_sjlt_ordered_kernel, args, config, config.pop("num_warps"), f"ordered {dtype} {label}"))
    return variants


AOT_VARIANTS = _aot_variants()
