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
from ._definition import batch_dim_first, define_op, vmap_by_slices

# CPU scatter backend: "auto" (default), "native" (Tensor.index_add_) or "torch_scatter" (the optional
# `scatter` extra). Both give bitwise-equal results. "auto" takes torch_scatter, when installed, for
# scatters of at least _TORCH_SCATTER_MIN elements: faster there, slower on small ones, where its
# Python-level setup dominates (BENCHMARKS.md, CPU section).
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
    # int64 whatever idx's dtype: index_add_ with int32 indices is ~3x slower on the CPU
    return (idx.to(torch.int64) + k * (sign < 0).to(torch.int64)).t().contiguous()


def signed_buckets(idx: Tensor, sign: Tensor, k: int) -> Tensor:
    """[s, p] int64 bucket ids in [0, 2k): idx + k for negative signs, one contiguous row per hash.
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


def sjlt_transpose_torch(y: Tensor, idx: Tensor, sign: Tensor) -> Tensor:
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


# Linear in x (in y): the backward of each is the other, and the tangent is the op of the tangent.
SJLT = define_op(
    "sjlt", "(Tensor x, Tensor idx, Tensor sign, SymInt k) -> Tensor", sjlt_torch,
    saved=("idx", "sign", "k"),
    backward=lambda saved, grad: {"x": SJLT_TRANSPOSE(grad, saved.idx, saved.sign)},
    jvp=lambda saved, tangents: SJLT(tangents.x, saved.idx, saved.sign, saved.k),
)
SJLT_TRANSPOSE = define_op(
    "sjlt_transpose", "(Tensor y, Tensor idx, Tensor sign) -> Tensor", sjlt_transpose_torch,
    saved=("y", "idx", "sign"),
    backward=lambda saved, grad: {"y": SJLT(grad, saved.idx, saved.sign, saved.y.shape[-1])},
    jvp=lambda saved, tangents: SJLT_TRANSPOSE(tangents.y, saved.idx, saved.sign),
)


# ---- vmap: a batched x is just more leading rows --------------------------------------------------
@torch.library.register_vmap("grass::sjlt")
def _vmap_sjlt(info, in_dims, x, idx, sign, k):
    if in_dims[1] is not None or in_dims[2] is not None:
        return vmap_by_slices(lambda *a: SJLT.op(*a, k), in_dims[:3], (x, idx, sign))
    return SJLT.op(batch_dim_first(x, in_dims[0], info.batch_size), idx, sign, k), 0


@torch.library.register_vmap("grass::sjlt_transpose")
def _vmap_sjlt_transpose(info, in_dims, y, idx, sign):
    if in_dims[1] is not None or in_dims[2] is not None:
        return vmap_by_slices(SJLT_TRANSPOSE.op, in_dims, (y, idx, sign))
    return SJLT_TRANSPOSE.op(batch_dim_first(y, in_dims[0], info.batch_size), idx, sign), 0


def sjlt(x: Tensor, idx: Tensor, sign: Tensor, k: int) -> Tensor:
    """Sparse JL projection. x [..., p] float; idx [p, s] int64/int32 in [0, k); sign [p, s] int8 +-1.

    Returns [..., k] in x.dtype (accumulated in float32, float64 for float64). Works under autograd
    (twice differentiable), forward-mode AD, torch.func (vmap, grad, vjp, jacrev, jvp, jacfwd, hessian)
    and torch.compile(fullgraph=True).
    """
    return SJLT(x, idx, sign, _checks.check_int("k", k))


def sjlt_transpose(y: Tensor, idx: Tensor, sign: Tensor) -> Tensor:
    """Adjoint of :func:`sjlt`: y [..., k] -> [..., p], so that <sjlt(x), y> = <x, sjlt_transpose(y)>."""
    return SJLT_TRANSPOSE(y, idx, sign)
