"""Factorized masks for a linear layer's gradient factors: ``grass::factorized_mask``.

Schema: ``factorized_mask(Tensor x_in, Tensor g_out, Tensor in_mask, Tensor out_mask, float temperature=1.0)
-> (Tensor, Tensor)``. The masks' dtype picks the form:

* hard (int64/int32 masks, [k_in'] and [k_out'] distinct indices): returns the gathered factors
  x_in[..., in_mask] and g_out[..., out_mask] (what FactGraSS uses);
* soft (floating masks, logits S_in [d_in] and S_out [d_out]): returns x_in * sigmoid(S_in / temperature)
  and g_out * sigmoid(S_out / temperature), differentiable w.r.t. the logits (Selective Mask training).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _checks
from ._common import call_front, loop_vmap, to_front


def is_hard(mask: Tensor) -> bool:
    return mask.dtype in _checks.INDEX_DTYPES


def check_factorized_mask_args(x_in, g_out, in_mask, out_mask, temperature) -> None:
    _checks.check_float("x_in", x_in)
    _checks.check_float("g_out", g_out)
    torch._check_value(x_in.dim() >= 1 and g_out.dim() >= 1, lambda: "x_in and g_out must be [..., d] tensors")
    torch._check_value(
        is_hard(in_mask) == is_hard(out_mask),
        lambda: f"in_mask and out_mask must both be index masks or both logits, got {in_mask.dtype} and {out_mask.dtype}",
    )
    for name, mask, t in (("in_mask", in_mask, x_in), ("out_mask", out_mask, g_out)):
        torch._check_value(mask.dim() == 1, lambda: f"{name} must be 1-D, got shape {tuple(mask.shape)}")
        if not is_hard(mask):
            _checks.check_float(name, mask)
            torch._check_value(
                mask.shape[0] == t.shape[-1],
                lambda: f"{name} logits must have length {t.shape[-1]} (the factor's last dim), got {mask.shape[0]}",
            )
    torch._check_value(temperature > 0, lambda: f"temperature must be > 0, got {temperature}")
    _checks.check_same_device(x_in=x_in, g_out=g_out, in_mask=in_mask, out_mask=out_mask)


def soft_weights(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    return torch.sigmoid(logits.to(_checks.accumulation_dtype(dtype)) / temperature)


@torch.library.custom_op("grass::factorized_mask", mutates_args=())
def factorized_mask_op(
    x_in: Tensor, g_out: Tensor, in_mask: Tensor, out_mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    check_factorized_mask_args(x_in, g_out, in_mask, out_mask, temperature)
    if is_hard(in_mask):
        _checks.check_mask_values_cached("in_mask", in_mask, x_in.shape[-1])
        _checks.check_mask_values_cached("out_mask", out_mask, g_out.shape[-1])
        return x_in.index_select(-1, in_mask), g_out.index_select(-1, out_mask)
    w_in = soft_weights(in_mask, temperature, x_in.dtype)
    w_out = soft_weights(out_mask, temperature, g_out.dtype)
    return (x_in * w_in).to(x_in.dtype), (g_out * w_out).to(g_out.dtype)


def factorized_mask_backward_torch(grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature):
    """The torch implementation (any device) of ``grass::factorized_mask_backward``."""
    if is_hard(in_mask):
        gx = torch.zeros_like(x_in).index_copy_(-1, in_mask, grad_x.to(x_in.dtype))
        gg = torch.zeros_like(g_out).index_copy_(-1, out_mask, grad_g.to(g_out.dtype))
        return gx, gg, in_mask.new_empty(0, dtype=x_in.dtype), out_mask.new_empty(0, dtype=x_in.dtype)
    grads = []
    logit_grads = []
    for grad, t, logits in ((grad_x, x_in, in_mask), (grad_g, g_out, out_mask)):
        w = soft_weights(logits, temperature, t.dtype)
        grads.append((grad * w).to(t.dtype))
        per_coord = (grad.to(w.dtype) * t.to(w.dtype)).reshape(-1, t.shape[-1]).sum(0)
        logit_grads.append((per_coord * w * (1 - w) / temperature).to(logits.dtype))
    return grads[0], grads[1], logit_grads[0], logit_grads[1]


@torch.library.custom_op("grass::factorized_mask_backward", mutates_args=())
def factorized_mask_backward_op(
    grad_x: Tensor, grad_g: Tensor, x_in: Tensor, g_out: Tensor, in_mask: Tensor, out_mask: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (grad x_in, grad g_out, grad in_mask, grad out_mask); mask grads are empty [0] for hard masks.
    CUDA tensors use grass_ops.cuda's fused Triton reduction for the soft form."""
    return factorized_mask_backward_torch(grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature)


def _setup(ctx, inputs, output):
    x_in, g_out, in_mask, out_mask, temperature = inputs
    ctx.save_for_backward(x_in, g_out, in_mask, out_mask)
    ctx.temperature = temperature


def _backward(ctx, grad_x, grad_g):
    x_in, g_out, in_mask, out_mask = ctx.saved_tensors
    gx, gg, gi, go = factorized_mask_backward_op(grad_x, grad_g, x_in, g_out, in_mask, out_mask, ctx.temperature)
    if is_hard(in_mask):
        gi = go = None
    return gx, gg, gi, go, None


factorized_mask_op.register_autograd(_backward, setup_context=_setup)


@torch.library.register_vmap("grass::factorized_mask")
def _vmap(info, in_dims, x_in, g_out, in_mask, out_mask, temperature):
    if in_dims[2] is not None or in_dims[3] is not None:
        return loop_vmap(lambda *a: factorized_mask_op(*a, temperature), in_dims[:4], (x_in, g_out, in_mask, out_mask))
    n = info.batch_size
    x, g = to_front(x_in, in_dims[0], n), to_front(g_out, in_dims[1], n)
    return factorized_mask_op(x, g, in_mask, out_mask, temperature), (0, 0)


@torch.library.register_vmap("grass::factorized_mask_backward")
def _vmap_backward(info, in_dims, grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature):
    if in_dims[4] is not None or in_dims[5] is not None:
        return loop_vmap(lambda *a: factorized_mask_backward_op(*a, temperature), in_dims[:6],
                         (grad_x, grad_g, x_in, g_out, in_mask, out_mask))
    n = info.batch_size
    gx, gg, x, g = (to_front(t, d, n) for t, d in zip((grad_x, grad_g, x_in, g_out), in_dims[:4]))
    if is_hard(in_mask):
        grad_in, grad_out, _, _ = factorized_mask_backward_op(gx, gg, x, g, in_mask, out_mask, temperature)
        empty = x.new_empty(n, 0)
        return (grad_in, grad_out, empty, empty), (0, 0, 0, 0)
    results = []
    for grad, t, logits in ((gx, x, in_mask), (gg, g, out_mask)):  # per vmapped element: sum over its rows only
        w = soft_weights(logits, temperature, t.dtype)
        per_coord = (grad.to(w.dtype) * t.to(w.dtype)).reshape(n, -1, t.shape[-1]).sum(1)
        results.append(((grad * w).to(t.dtype), (per_coord * w * (1 - w) / temperature).to(logits.dtype)))
    return (results[0][0], results[1][0], results[0][1], results[1][1]), (0, 0, 0, 0)


class _FactorizedMask(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x_in, g_out, in_mask, out_mask, temperature):
        return factorized_mask_op(x_in, g_out, in_mask, out_mask, temperature)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x, grad_g):
        return _backward(ctx, grad_x, grad_g)

    @staticmethod
    def jvp(ctx, x_t, g_t, in_t, out_t, _):
        x_in, g_out, in_mask, out_mask = ctx.saved_tensors
        tangents = []
        for t, tan, mask, mask_tan in ((x_in, x_t, in_mask, in_t), (g_out, g_t, out_mask, out_t)):
            if is_hard(mask):
                tangents.append(tan.index_select(-1, mask) if tan is not None else t.new_zeros(*t.shape[:-1], mask.numel()))
                continue
            w = soft_weights(mask, ctx.temperature, t.dtype)
            out = tan * w if tan is not None else torch.zeros_like(t, dtype=w.dtype)
            if mask_tan is not None:
                out = out + t * (w * (1 - w) / ctx.temperature * mask_tan)
            tangents.append(out.to(t.dtype))
        return tuple(tangents)


def factorized_mask(
    x_in: Tensor, g_out: Tensor, in_mask: Tensor, out_mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Mask both factors of a linear layer's gradient.

    x_in [..., d_in], g_out [..., d_out]. Hard: in_mask [k_in'], out_mask [k_out'] int64 distinct indices
    -> ([..., k_in'], [..., k_out']). Soft: in_mask [d_in], out_mask [d_out] float logits S
    -> (x_in * sigmoid(S_in / temperature), g_out * sigmoid(S_out / temperature)), differentiable in S.
    """
    return call_front(_FactorizedMask, factorized_mask_op, x_in, g_out, in_mask, out_mask, float(temperature))
