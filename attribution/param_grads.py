"""Per-sample gradients of arbitrary parameters with ``torch.func.vmap(grad(...))`` over
``functional_call`` — for parameters outside the targeted linear layers (embeddings, norms, convs),
which have no factorized form. Samples are processed in chunks to bound the [chunk, numel] memory.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch
from torch import Tensor, nn

from grass_ops._compat import tree_map

from .batches import batch_size, slice_rows


class _LossModule(nn.Module):
    """Wraps (model, loss_fn) so functional_call can swap the model's parameters by name."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def find_params(model: nn.Module, patterns: list[str] | str) -> dict[str, nn.Parameter]:
    """Parameters by exact name or glob pattern; unknown names raise, listing what exists."""
    named = dict(model.named_parameters())
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen: dict[str, nn.Parameter] = {}
    for pattern in patterns:
        matches = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise ValueError(f"params: {pattern!r} matches no parameter; available: {', '.join(list(named)[:20])}")
        chosen.update({n: named[n] for n in matches})
    return chosen


def loss_module(model: nn.Module, loss_fn: Callable) -> nn.Module:
    """The (model, loss_fn) wrapper that functional_call swaps parameters in; build it once per
    loss_fn (creating modules inside a compiled step makes Dynamo break the graph)."""
    return _LossModule(model, loss_fn)


def per_sample_grads(wrapper: nn.Module, batch, names: list[str], chunk: int = 64) -> dict[str, Tensor]:
    """{name: [B, numel]} per-sample gradients of the named parameters of ``wrapper.model``
    (``wrapper`` from :func:`loss_module`)."""
    model = wrapper.model
    params = {f"model.{n}": p.detach() for n, p in model.named_parameters() if n in names}

    def one_sample_loss(params, sample):
        batched = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, sample)
        return torch.func.functional_call(wrapper, params, (batched,)).sum()

    in_dims = tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch)
    grad_fn = torch.func.vmap(torch.func.grad(one_sample_loss), in_dims=(None, in_dims))
    n = batch_size(batch)
    parts = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            parts.append(grad_fn(params, slice_rows(batch, start, start + chunk)))
    return {name: torch.cat([p[f"model.{name}"].flatten(1) for p in parts]) for name in names}
