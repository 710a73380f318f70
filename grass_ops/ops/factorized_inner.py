"""Inner products of factorized linear-layer gradients: ``grass::factorized_inner``.

    out[i, q] = < sum_t x_a[i, t] (x) g_a[i, t],  sum_u x_b[q, u] (x) g_b[q, u] >
              = sum_{t, u} <x_a[i, t], x_b[q, u]> * <g_a[i, t], g_b[q, u]>

This is GradDot between two sets of per-sample linear-layer gradients without forming any
[d_in * d_out] gradient (<a (x) b, c (x) d> = <a, c> <b, d>); Selective Mask training feeds it the
soft-masked factors from ``factorized_mask``. Memory is bounded by chunking over the rows of a.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ._definition import batch_dim_first, define_op, multilinear_jvp, vmap_by_slices
from ._factors import as_3d

_CHUNK_ELEMENTS = 1 << 24  # entries of the [rows_a * T, n_b * U] kernel matrices formed at once


def _chunks(x_a: Tensor, x_b: Tensor):
    n_a, t_a = x_a.shape[0], x_a.shape[1]
    step = max(1, _CHUNK_ELEMENTS // max(1, t_a * x_b.shape[0] * x_b.shape[1]))
    return range(0, n_a, step), step


def _kernels(xa: Tensor, ga: Tensor, xb: Tensor, gb: Tensor) -> tuple[Tensor, Tensor]:
    """[n, T, n_b, U] token-pair inner products of the inputs and of the output gradients."""
    n, t = xa.shape[:2]
    kx = (xa.reshape(n * t, -1) @ xb.reshape(-1, xb.shape[-1]).T).view(n, t, xb.shape[0], xb.shape[1])
    kg = (ga.reshape(n * t, -1) @ gb.reshape(-1, gb.shape[-1]).T).view(n, t, gb.shape[0], gb.shape[1])
    return kx, kg


def _acc(*ts: Tensor) -> list[Tensor]:
    dtype = _checks.accumulation_dtype(ts[0].dtype)
    return [as_3d(t).to(dtype) for t in ts]


def factorized_inner_torch(x_a: Tensor, g_a: Tensor, x_b: Tensor, g_b: Tensor) -> Tensor:
    """x_a [n_a, T, d_in], g_a [n_a, T, d_out], x_b [n_b, U, d_in], g_b [n_b, U, d_out] -> [n_a, n_b]."""
    _checks.check_once(_checks.check_factorized_inner_args, x_a, g_a, x_b, g_b)
    xa, ga, xb, gb = _acc(x_a, g_a, x_b, g_b)
    out = xa.new_empty(xa.shape[0], xb.shape[0])
    starts, step = _chunks(xa, xb)
    for s in starts:
        kx, kg = _kernels(xa[s : s + step], ga[s : s + step], xb, gb)
        out[s : s + step] = (kx * kg).sum((1, 3))
    return out.to(x_a.dtype)


def factorized_inner_backward_torch(
    grad: Tensor, x_a: Tensor, g_a: Tensor, x_b: Tensor, g_b: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum(grad * factorized_inner(...)) w.r.t. the four factors."""
    _checks.check_once(_checks.check_factorized_inner_backward_args, grad, x_a, g_a, x_b, g_b)
    xa, ga, xb, gb = _acc(x_a, g_a, x_b, g_b)
    grad = grad.to(xa.dtype)
    d_xa, d_ga = torch.empty_like(xa), torch.empty_like(ga)
    d_xb, d_gb = torch.zeros_like(xb), torch.zeros_like(gb)
    n_b, u = xb.shape[:2]
    starts, step = _chunks(xa, xb)
    for s in starts:
        kx, kg = _kernels(xa[s : s + step], ga[s : s + step], xb, gb)
        n, t = kx.shape[:2]
        w_x = (kg * grad[s : s + step, None, :, None]).reshape(n * t, n_b * u)  # d out / d kx
        w_g = (kx * grad[s : s + step, None, :, None]).reshape(n * t, n_b * u)
        d_xa[s : s + step] = (w_x @ xb.reshape(n_b * u, -1)).view(n, t, -1)
        d_ga[s : s + step] = (w_g @ gb.reshape(n_b * u, -1)).view(n, t, -1)
        d_xb += (w_x.T @ xa[s : s + step].reshape(n * t, -1)).view(n_b, u, -1)
        d_gb += (w_g.T @ ga[s : s + step].reshape(n * t, -1)).view(n_b, u, -1)
    return tuple(d.to(t.dtype).reshape(t.shape) for d, t in zip((d_xa, d_ga, d_xb, d_gb), (x_a, g_a, x_b, g_b)))


_ARGS = ("x_a", "g_a", "x_b", "g_b")
FACTORIZED_INNER = define_op(
    "factorized_inner", "(Tensor x_a, Tensor g_a, Tensor x_b, Tensor g_b) -> Tensor", factorized_inner_torch,
    saved=_ARGS,
    backward=lambda saved, grad: dict(zip(_ARGS, FACTORIZED_INNER_BACKWARD(grad, *(getattr(saved, n) for n in _ARGS)))),
    jvp=multilinear_jvp(lambda *a: FACTORIZED_INNER(*a), _ARGS, _ARGS),  # linear in each factor
    first_order=True,
)
# First order only: no backward rule, so double backward through factorized_inner is a clear error.
FACTORIZED_INNER_BACKWARD = define_op(
    "factorized_inner_backward",
    "(Tensor grad, Tensor x_a, Tensor g_a, Tensor x_b, Tensor g_b) -> (Tensor, Tensor, Tensor, Tensor)",
    factorized_inner_backward_torch,
)


@torch.library.register_vmap("grass::factorized_inner")
def _vmap(info, in_dims, x_a, g_a, x_b, g_b):
    a_batched = in_dims[0] is not None or in_dims[1] is not None
    b_batched = in_dims[2] is not None or in_dims[3] is not None
    if a_batched and b_batched:
        return vmap_by_slices(FACTORIZED_INNER.op, in_dims, (x_a, g_a, x_b, g_b))
    n = info.batch_size
    if a_batched:  # fold the vmapped dim into the rows of a: [n * n_a, n_b]
        xa, ga = (batch_dim_first(t, d, n).flatten(0, 1) for t, d in zip((x_a, g_a), in_dims[:2]))
        return FACTORIZED_INNER.op(xa, ga, x_b, g_b).unflatten(0, (n, -1)), 0
    xb, gb = (batch_dim_first(t, d, n).flatten(0, 1) for t, d in zip((x_b, g_b), in_dims[2:]))
    return FACTORIZED_INNER.op(x_a, g_a, xb, gb).unflatten(1, (n, -1)), 1


@torch.library.register_vmap("grass::factorized_inner_backward")
def _vmap_backward(info, in_dims, grad, x_a, g_a, x_b, g_b):
    return vmap_by_slices(FACTORIZED_INNER_BACKWARD.op, in_dims, (grad, x_a, g_a, x_b, g_b))


def factorized_inner(x_a: Tensor, g_a: Tensor, x_b: Tensor, g_b: Tensor) -> Tensor:
    """GradDot of factorized linear-layer gradients, [n_a, n_b], never forming a [d_in * d_out] gradient.

    x_a [n_a, T, d_in], g_a [n_a, T, d_out], x_b [n_b, U, d_in], g_b [n_b, U, d_out] (2-D inputs: T = 1).
    Differentiable in all four factors (first order; forward mode too).
    """
    return FACTORIZED_INNER(x_a, g_a, x_b, g_b)
