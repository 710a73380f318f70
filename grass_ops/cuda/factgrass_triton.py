"""Fused FactGraSS Triton kernel (gather, Kronecker sum over tokens with tl.dot, signed SJLT scatter),
the launcher :func:`factgrass` (the op's contract plus ``deterministic=``), its CUDA registration and
its ahead-of-time table ``AOT_VARIANTS``.

One program per (tile of k_in' x tile of k_out' [grid x], row b [grid y, in chunks that fit its 65535
limit], range of tokens [grid z]): it gathers the masked columns of x_in and g_out tile by tile over
its tokens, accumulates sum_t a^T g in float32 with tl.dot, then adds each element of its
[BLOCK_I, BLOCK_J] tile to its SJLT bucket with its sign (relaxed atomics). The [B, k_in' * k_out']
intermediate never reaches global memory. Splitting the tokens keeps the GPU busy at small batch
(B = 1, k = 256 is one tile): the partial sums of the token ranges meet in the atomic adds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from ..ops._factors import as_3d
from ..ops.factgrass import factgrass_torch, masked_factors, masked_kron_rows
from . import _launch
from .sjlt_triton import sjlt_rows_ordered

FACTGRASS_CONFIG = dict(BLOCK_T=32, BLOCK_I=32, BLOCK_J=32, num_warps=4)
PROGRAMS_PER_SM = 2  # token splits are added until B * tiles * splits reaches this many programs per SM


@triton.jit(do_not_specialize=["T", "tokens_per_split"])
def _factgrass_kernel(
    x_ptr, g_ptr, in_idx_ptr, out_idx_ptr, idx_ptr, sign_ptr, out_ptr,
    T, tokens_per_split, k_in, k_out, k, s,
    stride_xb, stride_xt, stride_gb, stride_gt, scale,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, IEEE: tl.constexpr,
):
    tiles_j = tl.cdiv(k_out, BLOCK_J)
    tile_i = tl.program_id(0) // tiles_j
    tile_j = tl.program_id(0) % tiles_j
    b = tl.program_id(1).to(tl.int64)
    t_start = tl.program_id(2).to(tl.int64) * tokens_per_split
    t_stop = tl.minimum(t_start + tokens_per_split, T)
    offs_i = tile_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tile_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < k_in
    mask_j = offs_j < k_out
    cols_i = tl.load(in_idx_ptr + offs_i, mask=mask_i, other=0).to(tl.int64)
    cols_j = tl.load(out_idx_ptr + offs_j, mask=mask_j, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for t0 in range(t_start, t_stop, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_stop
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
    flat = offs_i.to(tl.int64)[:, None] * k_out + offs_j[None, :]  # 64-bit before the product: k_in' * k_out' may pass 2**31
    live = mask_i[:, None] & mask_j[None, :]
    for r in range(s):
        bucket = tl.load(idx_ptr + flat * s + r, mask=live, other=0).to(tl.int64)
        weight = tl.load(sign_ptr + flat * s + r, mask=live, other=0).to(tl.float32) * scale
        tl.atomic_add(out_ptr + b * k + bucket, acc * weight, mask=live, sem="relaxed")


def token_splits(n_rows: int, tiles: int, tokens: int, device: torch.device) -> int:
    """How many token ranges (grid z) to cut T into: enough that the grid reaches PROGRAMS_PER_SM
    programs per SM when B * tiles alone does not, at most one range per BLOCK_T tokens."""
    token_blocks = triton.cdiv(tokens, FACTGRASS_CONFIG["BLOCK_T"])
    wanted = triton.cdiv(PROGRAMS_PER_SM * _launch.multiprocessors(device), max(1, n_rows * tiles))
    return max(1, min(token_blocks, wanted, _launch.MAX_GRID_Y))


def factgrass_fused(x_in, g_out, in_idx, out_idx, idx, sign, k, splits: int | None = None) -> torch.Tensor:
    """x_in [B, T, d_in], g_out [B, T, d_out] (unit stride on d) -> [B, k] float32. ``splits``: token
    ranges on grid z (default :func:`token_splits`)."""
    n, t = x_in.shape[:2]
    k_in, k_out, s = in_idx.shape[0], out_idx.shape[0], idx.shape[1]
    out = torch.zeros(n, k, dtype=torch.float32, device=x_in.device)
    if n == 0 or t == 0:
        return out
    config = dict(FACTGRASS_CONFIG, IEEE=x_in.dtype == torch.float32)
    block_t = config["BLOCK_T"]
    tiles = triton.cdiv(k_in, config["BLOCK_I"]) * triton.cdiv(k_out, config["BLOCK_J"])
    splits = splits or token_splits(n, tiles, t, x_in.device)
    tokens_per_split = triton.cdiv(triton.cdiv(t, block_t), splits) * block_t
    splits = triton.cdiv(t, tokens_per_split)  # no empty range
    hash_args = (in_idx.contiguous(), out_idx.contiguous(), idx.contiguous(), sign.contiguous())
    with _launch.device_guard(x_in.device):
        for start, stop in _launch.row_chunks(n, 1):
            _factgrass_kernel[(tiles, stop - start, splits)](
                x_in[start:stop], g_out[start:stop], *hash_args, out[start:stop],
                t, tokens_per_split, k_in, k_out, k, s, x_in.stride(0), x_in.stride(1), g_out.stride(0), g_out.stride(1),
                float(s**-0.5), **config,
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
    if _launch.deterministic_enabled(deterministic):
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


def _aot_variants() -> list[_launch.AotVariant]:
    """Every dtype x index dtype (IEEE follows the dtype, as in the launcher); each int argument through
    each class Triton specializes on, and unaligned factors (views at an offset), one at a time.
    T and tokens_per_split are not specialized (one class: token counts stay below 2**31)."""
    from ._launch import FLOAT_DTYPES, INDEX_DTYPES, INT_DIV16, INT_I64, INT_ODD, INT_ONE, AotVariant, TensorArg, one_at_a_time

    variants = []
    ints = ("T", "tokens_per_split", "k_in", "k_out", "k", "s", "stride_xb", "stride_xt", "stride_gb", "stride_gt")
    for dtype in FLOAT_DTYPES:
        for index_dtype in INDEX_DTYPES:
            base = dict(x=TensorArg(dtype), g=TensorArg(dtype), T=INT_ODD, tokens_per_split=128, k_in=64, k_out=64,
                        k=INT_DIV16, s=INT_ONE, stride_xb=INT_DIV16 * 16, stride_xt=INT_DIV16, stride_gb=INT_DIV16 * 16,
                        stride_gt=INT_DIV16)
            alternatives = {} if index_dtype != torch.int64 else dict(
                x=[TensorArg(dtype, aligned=False)], g=[TensorArg(dtype, aligned=False)],
                k_in=[INT_ONE, INT_ODD], k_out=[INT_ONE, INT_ODD], k=[INT_ONE, INT_ODD, INT_I64], s=[2, 16],
                stride_xb=[INT_ODD, INT_I64], stride_xt=[INT_ONE, INT_ODD], stride_gb=[INT_ODD, INT_I64],
                stride_gt=[INT_ONE, INT_ODD],
            )
            for label, a in one_at_a_time(base, alternatives):
                indices = (TensorArg(index_dtype),) * 3
                args = (a["x"], a["g"], *indices, TensorArg(torch.int8), TensorArg(torch.float32), *(a[n] for n in ints), 0.5)
                config = dict(FACTGRASS_CONFIG, IEEE=dtype == torch.float32)
                variants.append(AotVariant(_factgrass_kernel, args, config, config.pop("num_warps"),
                                           f"factgrass {dtype} {index_dtype} {label}"))
    return variants


AOT_VARIANTS = _aot_variants()
