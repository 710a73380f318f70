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
from ._common import call_front, loop_vmap, to_front
from .sjlt import sjlt_rows, sjlt_transpose_op

# Rows of the [rows, k_in' * k_out'] intermediate formed at once (elements); bounds CPU memory.
_CHUNK_ELEMENTS = 1 << 24


def check_factgrass_args(x_in, g_out, in_idx, out_idx, idx, sign, k) -> None:
    _checks.check_factors(x_in, g_out)
    _checks.check_index("in_idx", in_idx, 1)
    _checks.check_index("out_idx", out_idx, 1)
    torch._check_value(
        idx.dim() == 2 and idx.shape[0] == in_idx.shape[0] * out_idx.shape[0],
        lambda: f"idx must be [k_in' * k_out', s] = [{in_idx.shape[0] * out_idx.shape[0]}, s], got {tuple(idx.shape)}",
    )
    _checks.check_hash(idx, sign, k)
    _checks.check_same_device(x_in=x_in, g_out=g_out, in_idx=in_idx, out_idx=out_idx, idx=idx, sign=sign)


def check_factgrass_values(x_in, g_out, in_idx, out_idx) -> None:
    """Mask values (the hash is validated when its signed buckets are built)."""
    _checks.check_mask_values_cached("in_idx", in_idx, x_in.shape[-1])
    _checks.check_mask_values_cached("out_idx", out_idx, g_out.shape[-1])


def _as_3d(t: Tensor) -> Tensor:
    return t.unsqueeze(1) if t.dim() == 2 else t


def gather_columns(t: Tensor, columns: Tensor) -> Tensor:
    """t[..., columns] for t [B, T, d] -> [B, T, len(columns)]. ``torch.gather`` with a broadcast index
    is several times faster on CPU than ``index_select`` along the last dim of a 3-D tensor."""
    rows = t.reshape(-1, t.shape[-1])
    picked = torch.gather(rows, 1, columns.to(torch.int64).expand(rows.shape[0], -1))
    return picked.view(*t.shape[:-1], columns.shape[0])


def masked_factors(x_in: Tensor, g_out: Tensor, in_idx: Tensor, out_idx: Tensor) -> tuple[Tensor, Tensor]:
    """[B, T, k_in'] and [B, T, k_out'] gathered factors in the accumulation dtype."""
    acc = _checks.accumulation_dtype(x_in.dtype)
    return gather_columns(_as_3d(x_in), in_idx).to(acc), gather_columns(_as_3d(g_out), out_idx).to(acc)


def masked_kron_rows(a: Tensor, b: Tensor) -> Tensor:
    """[B, T, k_in'], [B, T, k_out'] -> [B, k_in' * k_out'] = sum_t a (x) b, row-major (i, j)."""
    return torch.bmm(a.transpose(1, 2), b).flatten(1)


def factgrass_torch(
    x_in: Tensor, g_out: Tensor, in_idx: Tensor, out_idx: Tensor, idx: Tensor, sign: Tensor, k: int
) -> Tensor:
    """The torch implementation (any device): x_in [B, T, d_in], g_out [B, T, d_out] -> [B, k]."""
    _checks.check_once(check_factgrass_args, x_in, g_out, in_idx, out_idx, idx, sign, k)
    check_factgrass_values(x_in, g_out, in_idx, out_idx)
    a, b = masked_factors(x_in, g_out, in_idx, out_idx)
    n = a.shape[0]
    out = a.new_empty(n, k)
    step = max(1, _CHUNK_ELEMENTS // max(1, idx.shape[0]))
    for start in range(0, n, step):
        a_c, b_c = a[start : start + step], b[start : start + step]
        out[start : start + step] = sjlt_rows(masked_kron_rows(a_c, b_c), idx, sign, k)
    return out.to(x_in.dtype)


@torch.library.custom_op("grass::factgrass", mutates_args=())
def factgrass_op(
    x_in: Tensor, g_out: Tensor, in_idx: Tensor, out_idx: Tensor, idx: Tensor, sign: Tensor, k: int
) -> Tensor:
    """x_in [B, T, d_in], g_out [B, T, d_out] (or 2-D, T = 1) -> [B, k] in x_in.dtype.
    CUDA tensors use grass_ops.cuda's fused Triton kernel."""
    return factgrass_torch(x_in, g_out, in_idx, out_idx, idx, sign, k)


@torch.library.custom_op("grass::factgrass_backward", mutates_args=())
def factgrass_backward_op(
    grad: Tensor, x_in: Tensor, g_out: Tensor, in_idx: Tensor, out_idx: Tensor, idx: Tensor, sign: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of sum(grad * factgrass(...)) w.r.t. x_in and g_out (zero outside the masks)."""
    a, b = masked_factors(x_in, g_out, in_idx, out_idx)
    g_inter = sjlt_transpose_op(grad.to(a.dtype), idx, sign).reshape(-1, in_idx.shape[0], out_idx.shape[0])
    grad_a = torch.bmm(b, g_inter.transpose(1, 2))  # [B, T, k_in']
    grad_b = torch.bmm(a, g_inter)  # [B, T, k_out']
    grad_x = torch.zeros(_as_3d(x_in).shape, dtype=x_in.dtype, device=x_in.device)
    grad_g = torch.zeros(_as_3d(g_out).shape, dtype=g_out.dtype, device=g_out.device)
    grad_x.index_copy_(-1, in_idx, grad_a.to(x_in.dtype))
    grad_g.index_copy_(-1, out_idx, grad_b.to(g_out.dtype))
    return grad_x.reshape(x_in.shape), grad_g.reshape(g_out.shape)


def _setup(ctx, inputs, output):
    x_in, g_out, in_idx, out_idx, idx, sign, _ = inputs
    ctx.save_for_backward(x_in, g_out, in_idx, out_idx, idx, sign)


def _backward(ctx, grad):
    grad_x, grad_g = factgrass_backward_op(grad, *ctx.saved_tensors)
    return grad_x, grad_g, None, None, None, None, None


def _setup_double(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.k = inputs[0].shape[-1]


def double_backward(forward, backward, saved, k, grad_grad_x, grad_grad_g):
    """VJP of factgrass_backward. It is bilinear in (grad, g_out) for grad_x and in (grad, x_in) for
    grad_g, so its VJPs are factgrass / factgrass_backward with the cotangents swapped in.
    ``forward`` / ``backward`` are the op-level or front-level callables."""
    grad, x_in, g_out, in_idx, out_idx, idx, sign = saved
    d_grad = forward(grad_grad_x, g_out, in_idx, out_idx, idx, sign, k)
    d_grad = d_grad + forward(x_in, grad_grad_g, in_idx, out_idx, idx, sign, k)
    d_x, d_g = backward(grad, grad_grad_x, grad_grad_g, in_idx, out_idx, idx, sign)
    return d_grad, d_x, d_g, None, None, None, None


def _backward_double(ctx, grad_grad_x, grad_grad_g):
    return double_backward(factgrass_op, factgrass_backward_op, ctx.saved_tensors, ctx.k, grad_grad_x, grad_grad_g)


factgrass_op.register_autograd(_backward, setup_context=_setup)
factgrass_backward_op.register_autograd(_backward_double, setup_context=_setup_double)


@torch.library.register_vmap("grass::factgrass")
def _vmap_factgrass(info, in_dims, x_in, g_out, in_idx, out_idx, idx, sign, k):
    if any(d is not None for d in in_dims[2:6]):
        return loop_vmap(lambda *a: factgrass_op(*a, k), in_dims[:6], (x_in, g_out, in_idx, out_idx, idx, sign))
    n = info.batch_size
    x = to_front(x_in, in_dims[0], n)
    g = to_front(g_out, in_dims[1], n)
    out = factgrass_op(x.flatten(0, 1), g.flatten(0, 1), in_idx, out_idx, idx, sign, k)
    return out.unflatten(0, (n, -1)), 0


@torch.library.register_vmap("grass::factgrass_backward")
def _vmap_factgrass_backward(info, in_dims, grad, x_in, g_out, in_idx, out_idx, idx, sign):
    if any(d is not None for d in in_dims[3:7]):
        return loop_vmap(factgrass_backward_op, in_dims, (grad, x_in, g_out, in_idx, out_idx, idx, sign))
    n = info.batch_size
    flat = [to_front(t, d, n).flatten(0, 1) for t, d in zip((grad, x_in, g_out), in_dims[:3])]
    grad_x, grad_g = factgrass_backward_op(*flat, in_idx, out_idx, idx, sign)
    return (grad_x.unflatten(0, (n, -1)), grad_g.unflatten(0, (n, -1))), (0, 0)


class _FactGraSS(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x_in, g_out, in_idx, out_idx, idx, sign, k):
        return factgrass_op(x_in, g_out, in_idx, out_idx, idx, sign, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x_in, g_out, in_idx, out_idx, idx, sign, k = inputs
        ctx.save_for_backward(x_in, g_out, in_idx, out_idx, idx, sign)
        ctx.save_for_forward(x_in, g_out, in_idx, out_idx, idx, sign)
        ctx.k = k

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_g = _FactGraSSBackward.apply(grad, *ctx.saved_tensors)
        return grad_x, grad_g, None, None, None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, g_tangent, *_):
        # Bilinear: d factgrass(x, g) = factgrass(dx, g) + factgrass(x, dg).
        x_in, g_out, in_idx, out_idx, idx, sign = ctx.saved_tensors
        total = None
        if x_tangent is not None:
            total = factgrass_op(x_tangent, g_out, in_idx, out_idx, idx, sign, ctx.k)
        if g_tangent is not None:
            term = factgrass_op(x_in, g_tangent, in_idx, out_idx, idx, sign, ctx.k)
            total = term if total is None else total + term
        return total


class _FactGraSSBackward(torch.autograd.Function):
    """factgrass_backward as a torch.func-visible function (double backward through factgrass)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, x_in, g_out, in_idx, out_idx, idx, sign):
        return factgrass_backward_op(grad, x_in, g_out, in_idx, out_idx, idx, sign)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_double(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_grad_x, grad_grad_g):
        return double_backward(
            _FactGraSS.apply, _FactGraSSBackward.apply, ctx.saved_tensors, ctx.k, grad_grad_x, grad_grad_g
        )


def factgrass(
    x_in: Tensor, g_out: Tensor, in_idx: Tensor, out_idx: Tensor, idx: Tensor, sign: Tensor, k: int
) -> Tensor:
    """Fused FactGraSS: SJLT_k of the factor-masked linear-layer gradient, never materializing it.

    x_in [B, T, d_in] layer inputs, g_out [B, T, d_out] output gradients (2-D [B, d] means T = 1);
    in_idx [k_in'] / out_idx [k_out'] distinct int64 masks; idx, sign [k_in' * k_out', s] an SJLT hash.
    Returns [B, k] in x_in.dtype.
    """
    return call_front(_FactGraSS, factgrass_op, x_in, g_out, in_idx, out_idx, idx, sign, k, cpu_impl=factgrass_torch)
