"""Per-sample gradient factors of target layers with torch.func.

For a batch with per-sample losses L_b, the gradient of sum_b L_b w.r.t. a zero probe added to a
layer's output is, row by row, the per-sample gradient w.r.t. that output (samples are independent
in eval mode). One ``torch.func.grad`` w.r.t. the probes therefore yields every layer's output
gradients for the whole batch, and since no parameter is differentiated the weight-gradient GEMMs
of the backward pass are skipped entirely. Forward hooks record the layer inputs and add the probes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .layers import LayerInfo


class FactorCapture:
    """Forward hooks on the target layers; inert unless :meth:`factors` is running."""

    def __init__(self, model: nn.Module, layers: dict[str, LayerInfo]):
        self.model = model
        self.layers = layers
        self.probes: dict[str, Tensor] | None = None
        self.inputs: dict[str, Tensor] = {}
        self.shapes: dict[str, torch.Size] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str):
        def hook(module, args, output):
            if self.probes is None:
                self.shapes[name] = output.shape
                return None
            self.inputs[name] = args[0]
            return output + self.probes[name]

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def output_shapes(self, loss_fn: Callable, batch) -> dict[str, torch.Size]:
        """One no-grad forward to learn the layers' output shapes for this batch shape."""
        self.shapes = {}
        with torch.no_grad():
            loss_fn(self.model, batch)
        missing = [n for n in self.layers if n not in self.shapes]
        if missing:
            raise ValueError(f"layers {missing} were not called by loss_fn's forward pass")
        return dict(self.shapes)

    def factors(self, loss_fn: Callable, batch, probes: dict[str, Tensor]):
        """-> (inputs {name: [B, ..., d_in]}, output grads {name: [B, ..., d_out]}, losses [B])."""

        def summed_loss(probes):
            self.probes, self.inputs = probes, {}
            try:
                losses = loss_fn(self.model, batch)
                inputs = dict(self.inputs)
            finally:
                self.probes, self.inputs = None, {}
            return losses.sum(), (losses, inputs)

        # no_grad outside: parameters are not differentiated, so nothing links the results to them
        # (torch.func.grad enables grad for its own level).
        with torch.no_grad():
            grads, (losses, inputs) = torch.func.grad(summed_loss, has_aux=True)(probes)
        return inputs, grads, losses
