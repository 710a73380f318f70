"""Helpers shared by the op definitions: torch.func fronting and vmap batching rules."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def call_front(function: type[torch.autograd.Function], op: Callable, *args, cpu_impl: Callable | None = None):
    """Call ``op`` through its autograd.Function front inside torch.func transforms (which need
    setup_context, vmap and jvp), and the raw custom op otherwise: plain autograd uses the op's
    register_autograd rule, and under torch.compile Dynamo cannot trace a custom jvp anyway.

    Fast path: in eager mode with no tensor needing grad and every tensor on the CPU, ``cpu_impl``
    (the op's own CPU kernel) is called directly, skipping ~40 us of dispatcher and autograd-wrapper
    overhead per call; the result is identical."""
    if torch.compiler.is_compiling():
        return op(*args)
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return function.apply(*args)
    if cpu_impl is not None and _plain_cpu(args):
        return cpu_impl(*args)
    return op(*args)


def _plain_cpu(args) -> bool:
    grad_on = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (a.device.type != "cpu" or (grad_on and a.requires_grad)):
            return False
    return True


def to_front(t: torch.Tensor, dim: int | None, size: int) -> torch.Tensor:
    """Move a vmapped dim to the front, or expand an unbatched tensor to ``size`` along a new front dim."""
    if dim is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(dim, 0)


def batch_size(args: Sequence, in_dims: Sequence) -> int:
    return next(a.shape[d] for a, d in zip(args, in_dims) if d is not None and isinstance(a, torch.Tensor))


def loop_vmap(op: Callable, in_dims: Sequence, args: Sequence):
    """Per-slice fallback for batched index/hash/mask arguments (rare: e.g. an ensemble of masks)."""
    n = batch_size(args, in_dims)
    results = []
    for b in range(n):
        sliced = [a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)]
        results.append(op(*sliced))
    if isinstance(results[0], tuple):
        stacked = tuple(torch.stack(parts) for parts in zip(*results))
        return stacked, (0,) * len(stacked)
    return torch.stack(results), 0
