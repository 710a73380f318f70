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

from .. import _checks
from .._checks import is_hard_mask
from ._definition import batch_dim_first, define_op, vmap_by_slices


def soft_weights(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    return torch.sigmoid(logits.to(_checks.accumulation_dtype(dtype)) / temperature)


def factorized_mask_torch(
    x_in: Tensor, g_out: Tensor, in_mask: Tensor, out_mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The torch implementation (any device) of ``grass::factorized_mask``."""
    _checks.check_once(_checks.check_factorized_mask_args, x_in, g_out, in_mask, out_mask, temperature)
    if is_hard_mask(in_mask):
        _checks.check_mask_values_cached("in_mask", in_mask, x_in.shape[-1])
        _checks.check_mask_values_cached("out_mask", out_mask, g_out.shape[-1])
        return x_in.index_select(-1, in_mask), g_out.index_select(-1, out_mask)
    w_in = soft_weights(in_mask, temperature, x_in.dtype)
    w_out = soft_weights(out_mask, temperature, g_out.dtype)
    return (x_in * w_in).to(x_in.dtype), (g_out * w_out).to(g_out.dtype)


def factorized_mask_backward_torch(grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature):
    """The torch implementation (any device) of ``grass::factorized_mask_backward``: -> (grad x_in,
    grad g_out, grad in_mask, grad out_mask); the mask grads are empty [0] for hard masks."""
    _checks.check_once(_checks.check_factorized_mask_backward_args, grad_x, grad_g, x_in, g_out, in_mask, out_mask,
                       temperature)
    if is_hard_mask(in_mask):
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


def _backward_rule(saved, grad_x, grad_g):
    gx, gg, gi, go = FACTORIZED_MASK_BACKWARD(grad_x, grad_g, saved.x_in, saved.g_out, saved.in_mask, saved.out_mask,
                                              saved.temperature)
    if is_hard_mask(saved.in_mask):
        gi = go = None
    return {"x_in": gx, "g_out": gg, "in_mask": gi, "out_mask": go}


def _jvp_rule(saved, tangents):
    """Hard: the gathered tangent. Soft: d(x * w(S)) = dx * w + x * w (1 - w) / tau * dS."""
    outputs = []
    for t, tan, mask, mask_tan in ((saved.x_in, tangents.x_in, saved.in_mask, tangents.in_mask),
                                   (saved.g_out, tangents.g_out, saved.out_mask, tangents.out_mask)):
        if is_hard_mask(mask):
            outputs.append(tan.index_select(-1, mask) if tan is not None else t.new_zeros(*t.shape[:-1], mask.numel()))
            continue
        w = soft_weights(mask, saved.temperature, t.dtype)
        out = tan * w if tan is not None else torch.zeros_like(t, dtype=w.dtype)
        if mask_tan is not None:
            out = out + t * (w * (1 - w) / saved.temperature * mask_tan)
        outputs.append(out.to(t.dtype))
    return tuple(outputs)


_ARGS = ("x_in", "g_out", "in_mask", "out_mask", "temperature")
FACTORIZED_MASK = define_op(
    "factorized_mask",
    "(Tensor x_in, Tensor g_out, Tensor in_mask, Tensor out_mask, float temperature=1.) -> (Tensor, Tensor)",
    factorized_mask_torch,
    saved=_ARGS,
    backward=_backward_rule,
    jvp=_jvp_rule,
    first_order=True,
)
# First order only: no backward rule, so double backward through factorized_mask is a clear error.
FACTORIZED_MASK_BACKWARD = define_op(
    "factorized_mask_backward",
    "(Tensor grad_x, Tensor grad_g, Tensor x_in, Tensor g_out, Tensor in_mask, Tensor out_mask, float temperature)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    factorized_mask_backward_torch,
)


@torch.library.register_vmap("grass::factorized_mask")
def _vmap(info, in_dims, x_in, g_out, in_mask, out_mask, temperature):
    if in_dims[2] is not None or in_dims[3] is not None:
        return vmap_by_slices(lambda *a: FACTORIZED_MASK.op(*a, temperature), in_dims[:4], (x_in, g_out, in_mask, out_mask))
    n = info.batch_size
    x, g = batch_dim_first(x_in, in_dims[0], n), batch_dim_first(g_out, in_dims[1], n)
    return FACTORIZED_MASK.op(x, g, in_mask, out_mask, temperature), (0, 0)


@torch.library.register_vmap("grass::factorized_mask_backward")
def _vmap_backward(info, in_dims, grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature):
    if in_dims[4] is not None or in_dims[5] is not None:
        return vmap_by_slices(lambda *a: FACTORIZED_MASK_BACKWARD.op(*a, temperature), in_dims[:6],
                              (grad_x, grad_g, x_in, g_out, in_mask, out_mask))
    n = info.batch_size
    gx, gg, x, g = (batch_dim_first(t, d, n) for t, d in zip((grad_x, grad_g, x_in, g_out), in_dims[:4]))
    if is_hard_mask(in_mask):
        grad_in, grad_out, _, _ = FACTORIZED_MASK_BACKWARD.op(gx, gg, x, g, in_mask, out_mask, temperature)
        empty = x.new_empty(n, 0)
        return (grad_in, grad_out, empty, empty), (0, 0, 0, 0)
    results = []
    for grad, t, logits in ((gx, x, in_mask), (gg, g, out_mask)):  # per vmapped element: sum over its rows only
        w = soft_weights(logits, temperature, t.dtype)
        per_coord = (grad.to(w.dtype) * t.to(w.dtype)).reshape(n, -1, t.shape[-1]).sum(1)
        results.append(((grad * w).to(t.dtype), (per_coord * w * (1 - w) / temperature).to(logits.dtype)))
    return (results[0][0], results[1][0], results[0][1], results[1][1]), (0, 0, 0, 0)


def factorized_mask(
    x_in: Tensor, g_out: Tensor, in_mask: Tensor, out_mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Mask both factors of a linear layer's gradient.

    x_in [..., d_in], g_out [..., d_out]. Hard: in_mask [k_in'], out_mask [k_out'] int64 distinct indices
    -> ([..., k_in'], [..., k_out']). Soft: in_mask [d_in], out_mask [d_out] float logits S
    -> (x_in * sigmoid(S_in / temperature), g_out * sigmoid(S_out / temperature)), differentiable in S
    (first order; forward mode too).
    """
    return FACTORIZED_MASK(x_in, g_out, in_mask, out_mask, float(temperature))
