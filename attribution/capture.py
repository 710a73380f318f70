"""Capture stage: per-sample gradient factors of the target layers with torch.func.

For a batch with per-sample losses L_b, the gradient of sum_b L_b w.r.t. a zero probe added to a
layer's output is, row by row, the per-sample gradient w.r.t. that output (samples are independent
in eval mode). One ``torch.func.grad`` w.r.t. the probes therefore yields every layer's output
gradients for the whole batch, and since no parameter is differentiated the weight-gradient GEMMs
of the backward pass are skipped entirely. Forward hooks record the layer inputs and add the probes.

A layer that runs more than once in a forward pass (weight sharing, a block reused in a loop) gets
one probe per call; its weight gradient is the sum over calls, so the calls' inputs and output
gradients are concatenated along the token axis: the factors are [B, T_1 + T_2 + ..., d].

The hooks are registered only while a capture runs (:meth:`FactorCapture.hooks`), so any number of
captures can share one model without stacking hooks or changing what torch.compile traces.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor, nn

from .layers import LayerInfo


def tokens_view(t: Tensor) -> Tensor:
    """[B, d] -> [B, 1, d]; [B, ..., d] -> [B, T, d] with every middle dim a token dim."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


class FactorCapture:
    """Forward hooks on the target layers, registered only inside :meth:`hooks`."""

    def __init__(self, model: nn.Module, layers: dict[str, LayerInfo]):
        self.model = model
        self.layers = layers
        modules = dict(model.named_modules())
        self.modules = {name: modules[name] for name in layers}
        self._hook_fns = {name: self._make_hook(name) for name in layers}  # stable objects: stable compile guards
        self.probes: dict[str, list[Tensor]] | None = None
        self.inputs: dict[str, list[Tensor]] = {}
        self.shapes: dict[str, list[torch.Size]] = {}
        self._hook_depth = 0

    def _make_hook(self, name: str):
        def hook(module, args, output):
            if self.probes is None:  # shape pass
                self.shapes.setdefault(name, []).append(output.shape)
                return None
            calls = self.inputs.setdefault(name, [])
            probes = self.probes[name]
            if len(calls) >= len(probes):
                raise RuntimeError(f"layer {name} ran {len(calls) + 1} times in this forward pass, but {len(probes)} "
                                   "times when its output shapes were taken: the forward pass must not depend on the "
                                   "values in the batch")
            calls.append(args[0])
            return output + probes[len(calls) - 1]

        return hook

    @contextlib.contextmanager
    def hooks(self):
        """Register the forward hooks for the duration of the block (re-entrant: registered once)."""
        if self._hook_depth:
            self._hook_depth += 1
            try:
                yield
            finally:
                self._hook_depth -= 1
            return
        handles = [self.modules[name].register_forward_hook(self._hook_fns[name]) for name in self.layers]
        self._hook_depth = 1
        try:
            yield
        finally:
            self._hook_depth = 0
            for handle in handles:
                handle.remove()

    def output_shapes(self, loss_fn: Callable, batch) -> dict[str, list[torch.Size]]:
        """One no-grad forward to learn each layer's output shape at every call, for this batch shape."""
        self.shapes, self.probes = {}, None
        with torch.no_grad(), self.hooks():
            loss_fn(self.model, batch)
        missing = [n for n in self.layers if n not in self.shapes]
        if missing:
            raise ValueError(f"layers {missing} were not called by the forward pass of loss_fn")
        shapes, self.shapes = self.shapes, {}
        return shapes

    def factors(self, loss_fn: Callable, batch, probes: dict[str, list[Tensor]]):
        """-> (inputs {name: [B, T, d_in]}, output grads {name: [B, T, d_out]}, values [B]).
        Call inside :meth:`hooks`; ``probes`` holds one zero tensor per call of each layer."""

        def summed_loss(probes):
            self.probes, self.inputs = probes, {}
            try:
                values = loss_fn(self.model, batch)
                inputs = dict(self.inputs)
            finally:
                self.probes, self.inputs = None, {}
            if not isinstance(values, Tensor) or not values.is_floating_point():
                kind = values.dtype if isinstance(values, Tensor) else type(values).__name__
                raise TypeError(f"loss_fn must return a floating-point Tensor [B] of per-sample values, got {kind}")
            return values.sum(), (values, inputs)

        # no_grad outside: parameters are not differentiated, so nothing links the results to them
        # (torch.func.grad enables grad for its own level).
        with torch.no_grad():
            grads, (values, inputs) = torch.func.grad(summed_loss, has_aux=True)(probes)
        short = [n for n in self.layers if len(inputs.get(n, [])) != len(probes[n])]
        if short:
            raise RuntimeError(f"layers {short} ran fewer times than when their output shapes were taken")
        x = {n: _concat_calls([c.detach() for c in inputs[n]]) for n in self.layers}
        g = {n: _concat_calls(grads[n]) for n in self.layers}
        return x, g, values.detach()

    def zero_probes(self, shapes: dict[str, list[torch.Size]], device=None) -> dict[str, list[Tensor]]:
        """One zero probe per call of each layer, in the model's parameter dtype."""
        dtype = next(self.model.parameters()).dtype
        return {n: [torch.zeros(s, device=device, dtype=dtype) for s in calls] for n, calls in shapes.items()}

    def capture(self, loss_fn: Callable, batch, device=None):
        """Eager shapes + probes + factors of one batch: (inputs, output grads, values)."""
        probes = self.zero_probes(self.output_shapes(loss_fn, batch), device)
        with self.hooks():
            return self.factors(loss_fn, batch, probes)


def _concat_calls(calls: list[Tensor]) -> Tensor:
    parts = [tokens_view(c) for c in calls]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
