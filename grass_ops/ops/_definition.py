"""One definition per op: schema, torch kernel, backward and forward-mode rules, wired everywhere.

:func:`define_op` registers an op in the ``grass`` namespace and builds ONE ``torch.autograd.Function``
from the op's ``backward`` and ``jvp`` rules. That Function serves both ways of calling the op:

* the raw op ``torch.ops.grass.<name>``: its Autograd kernel applies the Function when an input requires
  grad or carries a forward-mode tangent (plain autograd, double backward, AOTAutograd under
  torch.compile, ``torch.autograd.forward_ad``) and otherwise runs the kernel below autograd;
* the Python wrapper (:meth:`GrassOp.__call__`, e.g. ``grass_ops.sjlt``): applies the Function *before*
  the dispatcher in the same cases. torch.func's grad, vjp, jacrev, jvp, jacfwd and hessian intercept
  ``autograd.Function.apply`` at that level; they cannot see a Function applied inside a dispatcher
  kernel, so over the raw op they raise an error that names the wrapper (torch <= 2.13 has no
  forward-mode or functorch hook for custom ops, pytorch/pytorch#179652).

vmap works on both through the op's batching rule (``torch.library.register_vmap``).
"""
from __future__ import annotations

import types
from typing import Callable, Sequence

import torch
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from .._compat import auto_dispatch_below_autograd

_LIBRARY = torch.library.Library("grass", "DEF")


def needs_autograd(args: Sequence) -> bool:
    """Whether a call must go through the autograd.Function: some tensor argument requires grad (with
    grad mode on) or carries a forward-mode tangent. Inside torch.func.grad the differentiated inputs
    require grad at their level; inside torch.func.jvp they carry tangents."""
    grad_mode = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            if grad_mode and a.requires_grad:
                return True
            if _has_tangent(a):
                return True
    return False


def _has_tangent(t: torch.Tensor) -> bool:
    try:
        return forward_ad.unpack_dual(t).tangent is not None
    except RuntimeError:  # a vmapped tensor inside a dual level (jacfwd, hessian): only the Function handles it
        return True


class GrassOp:
    """A ``grass::<name>`` op and its autograd.Function; calling it is the torch.func-aware entry point."""

    def __init__(self, name: str, op, function: type[torch.autograd.Function] | None):
        self.name = name
        self.op = op
        self.function = function
        # the dispatcher drops trailing arguments equal to their defaults; the Function needs them all
        self.defaults = [a.default_value if a.has_default_value() else None for a in op._schema.arguments]

    def __call__(self, *args):
        # Under torch.compile the raw op goes into the graph (Dynamo would inline the Function's forward and
        # drop its jvp); AOTAutograd then applies the Function through the op's Autograd kernel.
        if self.function is not None and not torch.compiler.is_compiling() and needs_autograd(args):
            return self.function.apply(*args)
        return self.op(*args)

    def autograd_kernel(self, *args):
        """The op's Autograd dispatch-key kernel."""
        args = (*args, *self.defaults[len(args):])
        if not needs_autograd(args):
            with auto_dispatch_below_autograd():
                return self.op(*args)
        if self.function is None:
            raise RuntimeError(
                f"grass::{self.name} is not differentiable: it is the backward of a first-order op "
                "(double backward and forward-over-reverse through it are not supported)"
            )
        try:
            return self.function.apply(*args)
        except NotImplementedError as error:
            if "custom_function_call" not in str(error):
                raise
            raise RuntimeError(
                f"torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, hessian) cannot differentiate grass::{self.name} "
                f"when it is reached as the raw op torch.ops.grass.{self.name} or inside torch.compile (torch <= 2.13 has no "
                f"functorch rule for custom ops). Call grass_ops.{self.name} in eager mode for torch.func; torch.autograd, "
                "torch.autograd.forward_ad, torch.func.vmap and torch.compile without torch.func work everywhere"
            ) from None


def define_op(
    name: str,
    schema: str,
    kernel: Callable,
    *,
    saved: Sequence[str] = (),
    backward: Callable | None = None,
    jvp: Callable | None = None,
    first_order: bool = False,
) -> GrassOp:
    """Define ``grass::<name><schema>`` with ``kernel`` (torch code, any device) and its autograd.

    ``saved`` names the inputs that the rules read (only those are kept alive for backward).
    ``backward(saved, *grads) -> {input name: grad}`` and ``jvp(saved, tangents) -> output tangent(s)``
    get ``saved`` as a namespace of those inputs and ``tangents`` as a namespace of every input's tangent
    (None where there is none). Without ``backward`` the op is not differentiable (a clear error).
    ``first_order=True``: the backward runs once-differentiable (differentiating it again raises).
    """
    _LIBRARY.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
    _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    op = getattr(torch.ops.grass, name).default
    arg_names = [a.name for a in op._schema.arguments]
    function = None if backward is None else _autograd_function(name, op, arg_names, tuple(saved), backward, jvp, first_order)
    grass_op = GrassOp(name, op, function)
    _LIBRARY.impl(name, grass_op.autograd_kernel, "Autograd")
    return grass_op


def _autograd_function(name, op, arg_names, saved_names, backward, jvp, first_order) -> type[torch.autograd.Function]:
    positions = [arg_names.index(n) for n in saved_names]

    def forward(*args):
        return op(*args)

    def setup_context(ctx, inputs, output):
        values = [inputs[i] for i in positions]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        ctx.constants = {n: v for n, v in zip(saved_names, values) if not isinstance(v, torch.Tensor)}

    def unpack(ctx) -> types.SimpleNamespace:
        tensors = iter(ctx.saved_tensors)
        return types.SimpleNamespace(**{n: ctx.constants[n] if n in ctx.constants else next(tensors) for n in saved_names})

    def backward_rule(ctx, *grads):
        by_name = backward(unpack(ctx), *grads)
        return tuple(by_name.get(n) for n in arg_names)

    def jvp_rule(ctx, *tangents):
        if jvp is None:
            raise RuntimeError(f"grass::{name} has no forward-mode (jvp) rule")
        return jvp(unpack(ctx), types.SimpleNamespace(**dict(zip(arg_names, tangents))))

    members = {
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(once_differentiable(backward_rule) if first_order else backward_rule),
        "jvp": staticmethod(jvp_rule),
    }
    return type(f"GrassAutograd_{name}", (torch.autograd.Function,), members)


def multilinear_jvp(grass_op: Callable, linear_args: Sequence[str], all_args: Sequence[str]) -> Callable:
    """The jvp of an op that is linear in each of ``linear_args`` separately (the others fixed):
    sum over the inputs with a tangent of the op with that input replaced by its tangent."""

    def jvp(saved, tangents):
        total = None
        for name in linear_args:
            tangent = getattr(tangents, name)
            if tangent is None:
                continue
            args = [tangent if n == name else getattr(saved, n) for n in all_args]
            term = grass_op(*args)
            total = term if total is None else _add(total, term)
        return total

    return jvp


def _add(a, b):
    if isinstance(a, tuple):
        return tuple(x + y for x, y in zip(a, b))
    return a + b


# ---- vmap helpers ---------------------------------------------------------------------------------
def batch_dim_first(t: torch.Tensor, dim: int | None, size: int) -> torch.Tensor:
    """Move a vmapped dim to the front, or expand an unbatched tensor to ``size`` along a new front dim."""
    if dim is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(dim, 0)


def vmap_by_slices(op: Callable, in_dims: Sequence, args: Sequence):
    """Per-slice fallback for batched index/hash/mask arguments (rare: e.g. an ensemble of masks)."""
    n = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None and isinstance(a, torch.Tensor))
    results = [op(*[a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)]) for b in range(n)]
    if isinstance(results[0], tuple):
        stacked = tuple(torch.stack(parts) for parts in zip(*results))
        return stacked, (0,) * len(stacked)
    return torch.stack(results), 0
