"""SJLT, the sparse Johnson-Lindenstrauss transform: ``grass::sjlt`` and its adjoint ``grass::sjlt_transpose``.

    out[..., h] = s^(-1/2) * sum_{(j, r): idx[j, r] = h} sign[j, r] * x[..., j]

The CPU kernel folds the sign into the bucket ("signed buckets"): coordinate j goes to bucket
idx[j, r] + k * (sign[j, r] < 0) of a [rows, 2k] accumulator, so one ``index_add_`` over x itself
(no [rows, p*s] signed copy) does the scatter; the halves are subtracted at the end. The cost is
O(rows * p * s), independent of k.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from .. import _checks
from ._common import call_front, loop_vmap, to_front

# CPU scatter backend: "auto" (default), "native" (Tensor.index_add_) or "torch_scatter" (the optional
# `scatter` extra). Both give bitwise-equal results. "auto" takes torch_scatter, when installed, for
# scatters of at least _TORCH_SCATTER_MIN elements: measured ~5% faster there (64 x 131072), and
# ~30% slower on small ones (2 x 16384), where its Python-level setup dominates.
_BACKEND_ENV = "GRASS_OPS_SCATTER_BACKEND"
_TORCH_SCATTER_MIN = 1 << 20


@functools.cache
def _has_torch_scatter() -> bool:
    return importlib.util.find_spec("torch_scatter") is not None


def scatter_backend(elements: int | None = None) -> str:
    """The backend for a scatter of ``elements`` source values (None: a large one)."""
    backend = os.environ.get(_BACKEND_ENV, "auto")
    if backend == "auto":
        large = elements is None or elements >= _TORCH_SCATTER_MIN
        return "torch_scatter" if large and _has_torch_scatter() else "native"
    if backend not in ("native", "torch_scatter"):
        raise ValueError(f"{_BACKEND_ENV} must be 'auto', 'native' or 'torch_scatter', got {backend!r}")
    if backend == "torch_scatter" and not _has_torch_scatter():
        raise ImportError(f"{_BACKEND_ENV}=torch_scatter but torch_scatter is not installed (pip install grass_ops[scatter])")
    return backend


def _build_signed_buckets(idx: Tensor, sign: Tensor, k: int) -> Tensor:
    _checks.check_sjlt_values(idx, sign, k)
    return (idx + k * (sign < 0).to(idx.dtype)).t().contiguous()


def signed_buckets(idx: Tensor, sign: Tensor, k: int) -> Tensor:
    """[s, p] bucket ids in [0, 2k): idx + k for negative signs, one contiguous row per hash.
    Validates idx in [0, k) and sign in {-1, +1} (cached per unmodified hash tensors)."""
    return _checks.validation_cache.get((idx, sign), k, lambda: _build_signed_buckets(idx, sign, k))


def combine_signed(acc: Tensor, k: int, s: int) -> Tensor:
    """[n, 2k] signed-bucket sums -> [n, k]: positive half minus negative half, times s^(-1/2).
    Shared with the deterministic GPU kernel so both round identically."""
    out = acc[:, :k] - acc[:, k:]
    return out.mul_(s**-0.5) if s > 1 else out


def sjlt_rows(rows: Tensor, idx: Tensor, sign: Tensor, k: int) -> Tensor:
    """SJLT of a 2-D [n, p] tensor already in the accumulation dtype -> [n, k] in that dtype."""
    s = idx.shape[1]
    buckets = signed_buckets(idx, sign, k)
    acc = rows.new_zeros(rows.shape[0], 2 * k)
    if scatter_backend(rows.numel() * s) == "torch_scatter":
        import torch_scatter

        for r in range(s):
            torch_scatter.scatter_add(rows, buckets[r], dim=1, out=acc)
    else:
        for r in range(s):
            acc.index_add_(1, buckets[r], rows)
    return combine_signed(acc, k, s)


def sjlt_torch(x: Tensor, idx: Tensor, sign: Tensor, k: int) -> Tensor:
    """The torch implementation (any device): x [..., p] -> [..., k]; see the module docstring."""
    _checks.check_once(_checks.check_sjlt_args, x, idx, sign, k)
    p = idx.shape[0]
    rows = x.reshape(-1, p).to(_checks.accumulation_dtype(x.dtype))
    return sjlt_rows(rows, idx, sign, k).to(x.dtype).reshape(*x.shape[:-1], k)


@torch.library.custom_op("grass::sjlt", mutates_args=())
def sjlt_op(x: Tensor, idx: Tensor, sign: Tensor, k: int) -> Tensor:
    """x [..., p] -> [..., k]; see the module docstring. CUDA tensors use grass_ops.cuda's Triton kernel."""
    return sjlt_torch(x, idx, sign, k)


@torch.library.custom_op("grass::sjlt_transpose", mutates_args=())
def sjlt_transpose_op(y: Tensor, idx: Tensor, sign: Tensor) -> Tensor:
    """The adjoint (signed gather): y [..., k] -> [..., p], out[..., j] = s^(-1/2) sum_r sign[j, r] y[..., idx[j, r]]."""
    _checks.check_sjlt_transpose_args(y, idx, sign)
    k = y.shape[-1]
    _checks.check_sjlt_values_cached(idx, sign, k)
    p, s = idx.shape
    rows = y.reshape(-1, k).to(_checks.accumulation_dtype(y.dtype))
    out = rows.new_zeros(rows.shape[0], p)
    for r in range(s):
        out.addcmul_(rows.index_select(1, idx[:, r]), sign[:, r].to(rows.dtype))
    if s > 1:
        out.mul_(s**-0.5)
    return out.to(y.dtype).reshape(*y.shape[:-1], p)


# ---- autograd on the raw ops (plain autograd and torch.compile) ----------------------------------
def _setup_sjlt(ctx, inputs, output):
    _, idx, sign, k = inputs
    ctx.save_for_backward(idx, sign)
    ctx.k = k


def _backward_sjlt(ctx, grad):
    idx, sign = ctx.saved_tensors
    return sjlt_transpose_op(grad, idx, sign), None, None, None


def _setup_sjlt_transpose(ctx, inputs, output):
    y, idx, sign = inputs
    ctx.save_for_backward(idx, sign)
    ctx.k = y.shape[-1]


def _backward_sjlt_transpose(ctx, grad):
    idx, sign = ctx.saved_tensors
    return sjlt_op(grad, idx, sign, ctx.k), None, None


sjlt_op.register_autograd(_backward_sjlt, setup_context=_setup_sjlt)
sjlt_transpose_op.register_autograd(_backward_sjlt_transpose, setup_context=_setup_sjlt_transpose)


# ---- vmap: a batched x is just more leading rows --------------------------------------------------
@torch.library.register_vmap("grass::sjlt")
def _vmap_sjlt(info, in_dims, x, idx, sign, k):
    if in_dims[1] is not None or in_dims[2] is not None:
        return loop_vmap(lambda *a: sjlt_op(*a, k), in_dims[:3], (x, idx, sign))
    return sjlt_op(to_front(x, in_dims[0], info.batch_size), idx, sign, k), 0


@torch.library.register_vmap("grass::sjlt_transpose")
def _vmap_sjlt_transpose(info, in_dims, y, idx, sign):
    if in_dims[1] is not None or in_dims[2] is not None:
        return loop_vmap(sjlt_transpose_op, in_dims, (y, idx, sign))
    return sjlt_transpose_op(to_front(y, in_dims[0], info.batch_size), idx, sign), 0


# ---- torch.func fronts ----------------------------------------------------------------------------
class _SJLT(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, idx, sign, k):
        return sjlt_op(x, idx, sign, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, idx, sign, k = inputs
        ctx.save_for_backward(idx, sign)
        ctx.save_for_forward(idx, sign)
        ctx.k = k

    @staticmethod
    def backward(ctx, grad):
        idx, sign = ctx.saved_tensors
        return _SJLTTranspose.apply(grad, idx, sign), None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, *_):
        idx, sign = ctx.saved_tensors
        return sjlt_op(x_tangent, idx, sign, ctx.k)


class _SJLTTranspose(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(y, idx, sign):
        return sjlt_transpose_op(y, idx, sign)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, idx, sign = inputs
        ctx.save_for_backward(idx, sign)
        ctx.save_for_forward(idx, sign)
        ctx.k = y.shape[-1]

    @staticmethod
    def backward(ctx, grad):
        idx, sign = ctx.saved_tensors
        return _SJLT.apply(grad, idx, sign, ctx.k), None, None

    @staticmethod
    def jvp(ctx, y_tangent, *_):
        idx, sign = ctx.saved_tensors
        return sjlt_transpose_op(y_tangent, idx, sign)


def sjlt(x: Tensor, idx: Tensor, sign: Tensor, k: int) -> Tensor:
    """Sparse JL projection. x [..., p] float; idx [p, s] int64/int32 in [0, k); sign [p, s] int8 +-1.

    Returns [..., k] in x.dtype (accumulated in float32, float64 for float64). Works under autograd,
    torch.func (vmap, grad, vjp, jacrev, jvp) and torch.compile(fullgraph=True).
    """
    return call_front(_SJLT, sjlt_op, x, idx, sign, k, cpu_impl=sjlt_torch)


def sjlt_transpose(y: Tensor, idx: Tensor, sign: Tensor) -> Tensor:
    """Adjoint of :func:`sjlt`: y [..., k] -> [..., p], so that <sjlt(x), y> = <x, sjlt_transpose(y)>."""
    return call_front(_SJLTTranspose, sjlt_transpose_op, y, idx, sign)
