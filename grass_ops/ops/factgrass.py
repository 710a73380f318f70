"""FactGraSS for linear layers: ``grass::factgrass`` and its backward ``grass::factgrass_backward``.

    G'[b, i, j] = sum_t x_in[b, t, in_idx[i]] * g_out[b, t, out_idx[j]]      ([B, k_in', k_out'])
    out[b]      = sjlt(G'[b].flatten(), idx, sign, k)                        (position i * k_out' + j)

The full [B, d_in * d_out] gradient is never formed. The CPU kernel gathers the masked columns,
forms G' with one bmm per row chunk (bounded memory) and runs the signed-bucket SJLT scatter on it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ._definition import batch_dim_first, define_op, multilinear_jvp, vmap_by_slices
from ._factors import as_3d
from .sjlt import SJLT_TRANSPOSE, sjlt_rows

# Rows of the [rows, k_in' * k_out'] intermediate formed at once (elements); bounds CPU memory.
_CHUNK_ELEMENTS = 1 << 24


def gather_columns(t: Tensor, columns: Tensor) -> Tensor:
    """t[..., columns] for t [B, T, d] -> [B, T, len(columns)]. ``torch.gather`` with a broadcast index
    is faster on CPU than ``index_select`` along the last dim of a 3-D tensor (BENCHMARKS.md)."""
    rows = t.reshape(-1, t.shape[-1])
    picked = torch.gather(rows, 1, columns.to(torch.int64).expand(rows.shape[0], -1))
    return picked.view(*t.shape[:-1], columns.shape[0])


def masked_factors(x_in: Tensor, g_out: Tensor, in_idx: Tensor, out_idx: Tensor) -> tuple[Tensor, Tensor]:
    """[B, T, k_in'] and [B, T, k_out'] gathered factors in the accumulation dtype."""
    acc = _checks.accumulation_dtype(x_in.dtype)
    return gather_columns(as_3d(x_in), in_idx).to(acc), gather_columns(as_3d(g_out), out_idx).to(acc)


def masked_kron_rows(a: Tensor, b: Tensor) -> Tensor:
    """[B, T, k_in'], [B, T, k_out'] -> [B, k_in' * k_out'] = sum_t a (x) b, row-major (i, j)."""
    return torch.bmm(a.transpose(1, 2), b).flatten(1)


def factgrass_torch(
    x_in: Tensor, g_out: Tensor, in_idx: Tensor, out_idx: Tensor, idx: Tensor, sign: Tensor, k: int
) -> Tensor:
    """The torch implementation (any device): x_in [B, T, d_in], g_out [B, T, d_out] -> [B, k]."""
    _checks.check_once(_checks.check_factgrass_args, x_in, g_out, in_idx, out_idx, idx, sign, k)
    _checks.check_factgrass_values(x_in, g_out, in_idx, out_idx, idx, sign, k)
    a, b = masked_factors(x_in, g_out, in_idx, out_idx)
    n = a.shape[0]
    out = a.new_empty(n, k)
    step = max(1, _CHUNK_ELEMENTS // max(1, idx.shape[0]))
    for start in range(0, n, step):
        a_c, b_c = a[start : start + step], b[start : start + step]
        out[start : start + step] = sjlt_rows(masked_kron_rows(a_c, b_c), idx, sign, k)
    return out.to(x_in.dtype)


def factgrass_backward_torch(
    grad: Tensor, x_in: Tensor, g_out: Tensor, in_idx: Tensor, out_idx: Tensor, idx: Tensor, sign: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of sum(grad * factgrass(...)) w.r.t. x_in and g_out (zero outside the masks)."""
    _checks.check_once(_checks.check_factgrass_backward_args, grad, x_in, g_out, in_idx, out_idx, idx, sign)
    a, b = masked_factors(x_in, g_out, in_idx, out_idx)
    g_inter = SJLT_TRANSPOSE.op(grad.to(a.dtype), idx, sign).reshape(-1, in_idx.shape[0], out_idx.shape[0])
    grad_a = torch.bmm(b, g_inter.transpose(1, 2))  # [B, T, k_in']
    grad_b = torch.bmm(a, g_inter)  # [B, T, k_out']
    grad_x = torch.zeros(as_3d(x_in).shape, dtype=x_in.dtype, device=x_in.device)
    grad_g = torch.zeros(as_3d(g_out).shape, dtype=g_out.dtype, device=g_out.device)
    grad_x.index_copy_(-1, in_idx, grad_a.to(x_in.dtype))
    grad_g.index_copy_(-1, out_idx, grad_b.to(g_out.dtype))
    return grad_x.reshape(x_in.shape), grad_g.reshape(g_out.shape)


_HASH = ("in_idx", "out_idx", "idx", "sign")


def _factgrass_backward_rule(saved, grad):
    grad_x, grad_g = FACTGRASS_BACKWARD(grad, saved.x_in, saved.g_out, *(getattr(saved, n) for n in _HASH))
    return {"x_in": grad_x, "g_out": grad_g}


def _factgrass_backward_vjp(saved, grad_grad_x, grad_grad_g):
    """factgrass_backward is bilinear in (grad, g_out) for grad_x and in (grad, x_in) for grad_g, so
    its VJPs are factgrass / factgrass_backward with the cotangents swapped in."""
    hash_args = [getattr(saved, n) for n in _HASH]
    k = saved.grad.shape[-1]
    d_grad = FACTGRASS(grad_grad_x, saved.g_out, *hash_args, k) + FACTGRASS(saved.x_in, grad_grad_g, *hash_args, k)
    d_x, d_g = FACTGRASS_BACKWARD(saved.grad, grad_grad_x, grad_grad_g, *hash_args)
    return {"grad": d_grad, "x_in": d_x, "g_out": d_g}


def _factgrass_backward_jvp(saved, tangents):
    """grad_x depends on (grad, g_out) and grad_g on (grad, x_in), each bilinearly."""
    hash_args = [getattr(saved, n) for n in _HASH]
    total = None
    if tangents.grad is not None:
        total = FACTGRASS_BACKWARD(tangents.grad, saved.x_in, saved.g_out, *hash_args)
    if tangents.x_in is not None or tangents.g_out is not None:
        x_t = torch.zeros_like(saved.x_in) if tangents.x_in is None else tangents.x_in
        g_t = torch.zeros_like(saved.g_out) if tangents.g_out is None else tangents.g_out
        term = FACTGRASS_BACKWARD(saved.grad, x_t, g_t, *hash_args)
        total = term if total is None else (total[0] + term[0], total[1] + term[1])
    return total


_FACTGRASS_ARGS = ("x_in", "g_out", *_HASH, "k")
FACTGRASS = define_op(
    "factgrass",
    "(Tensor x_in, Tensor g_out, Tensor in_idx, Tensor out_idx, Tensor idx, Tensor sign, SymInt k) -> Tensor",
    factgrass_torch,
    saved=_FACTGRASS_ARGS,
    backward=_factgrass_backward_rule,
    jvp=multilinear_jvp(lambda *a: FACTGRASS(*a), ("x_in", "g_out"), _FACTGRASS_ARGS),  # bilinear
)
FACTGRASS_BACKWARD = define_op(
    "factgrass_backward",
    "(Tensor grad, Tensor x_in, Tensor g_out, Tensor in_idx, Tensor out_idx, Tensor idx, Tensor sign) -> (Tensor, Tensor)",
    factgrass_backward_torch,
    saved=("grad", "x_in", "g_out", *_HASH),
    backward=_factgrass_backward_vjp,
    jvp=_factgrass_backward_jvp,
)


@torch.library.register_vmap("grass::factgrass")
def _vmap_factgrass(info, in_dims, x_in, g_out, in_idx, out_idx, idx, sign, k):
    if any(d is not None for d in in_dims[2:6]):
        return vmap_by_slices(lambda *a: FACTGRASS.op(*a, k), in_dims[:6], (x_in, g_out, in_idx, out_idx, idx, sign))
    n = info.batch_size
    x = batch_dim_first(x_in, in_dims[0], n)
    g = batch_dim_first(g_out, in_dims[1], n)
    out = FACTGRASS.op(x.flatten(0, 1), g.flatten(0, 1), in_idx, out_idx, idx, sign, k)
    return out.unflatten(0, (n, -1)), 0


@torch.library.register_vmap("grass::factgrass_backward")
def _vmap_factgrass_backward(info, in_dims, grad, x_in, g_out, in_idx, out_idx, idx, sign):
    if any(d is not None for d in in_dims[3:7]):
        return vmap_by_slices(FACTGRASS_BACKWARD.op, in_dims, (grad, x_in, g_out, in_idx, out_idx, idx, sign))
    n = info.batch_size
    flat = [batch_dim_first(t, d, n).flatten(0, 1) for t, d in zip((grad, x_in, g_out), in_dims[:3])]
    grad_x, grad_g = FACTGRASS_BACKWARD.op(*flat, in_idx, out_idx, idx, sign)
    return (grad_x.unflatten(0, (n, -1)), grad_g.unflatten(0, (n, -1))), (0, 0)


def factgrass(
    x_in: Tensor, g_out: Tensor, in_idx: Tensor, out_idx: Tensor, idx: Tensor, sign: Tensor, k: int
) -> Tensor:
    """Fused FactGraSS: SJLT_k of the factor-masked linear-layer gradient, never materializing it.

    x_in [B, T, d_in] layer inputs, g_out [B, T, d_out] output gradients (2-D [B, d] means T = 1);
    in_idx [k_in'] / out_idx [k_out'] distinct int64 masks; idx, sign [k_in' * k_out', s] an SJLT hash.
    Returns [B, k] in x_in.dtype. Twice differentiable in (x_in, g_out); works under torch.func and
    torch.compile(fullgraph=True).
    """
    return FACTGRASS(x_in, g_out, in_idx, out_idx, idx, sign, _checks.check_int("k", k))
