"""Per-sample compressed gradients from the training step's own forward and backward ("fused" recording).

During a recorded micro-batch's training forward every target layer's output carries its compressor's tap
(:mod:`attribution.capture`: a term that is zero, with a zero sketch z [B, k] per layer that requires grad), so
the Trainer's own backward leaves in z.grad the compressed per-sample gradients of the loss it differentiates.
That loss is s * L_model with L_model = sum_i L_i / D, L_i the per-sample summed cross-entropy over the labels,
D the model's normalizer (``num_items_in_batch``, else the micro-batch's label tokens) and s whatever scales
L_model before the backward (gradient accumulation, ranks, a loss scaler). s is read from the gradient that
reaches L_model, and D is checked against the model's own loss (L_model * D = sum_i L_i, L_i computed from the
logits), so the rows are z.grad * D / s: the gradients of each L_i, at no extra forward or backward.

Not for: params= blocks, gradient checkpointing (the recomputed forward carries no taps), a loss the model does
not compute (the Trainer's label smoothing, a custom compute_loss), auxiliary losses (MoE router losses: the check
fails). The training forward runs in train mode (dropout) and in the Trainer's precision; the callback compares
the first recorded row of each run with the eval-mode gradient and falls back to recomputing when they differ.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..compression import BatchCompressor

LOSS_RTOL = 1e-3  # L_model * D against sum_i L_i (both from the same logits)


class FusedUnavailable(RuntimeError):
    """The training step's backward cannot give this micro-batch's per-sample gradients (the reason says why)."""


@dataclass
class FusedMicroBatch:
    """One micro-batch's taps and what the backward leaves: zs {layer: z [B, k]}, the loss gradient s."""

    zs: dict[str, Tensor]
    rows: int
    autocast: bool
    denominator: float | None = None
    values: Tensor | None = None
    scale: list = field(default_factory=list)
    problem: str | None = None


def unavailable_reason(compress: BatchCompressor, model: nn.Module) -> str | None:
    """Why fused recording cannot serve this compressor and model (None: it can)."""
    if not compress.layers:
        return "no target layers (params= blocks only)"
    if compress.params:
        return "params= blocks need their own per-sample pass"
    if compress.return_factors:
        return "the preconditioner needs every layer's factors"
    if compress.scales:
        return "an optimizer normalization"
    if compress.autocast is not None:
        return "autocast= is set (the training step runs in the Trainer's precision)"
    flag = next((a for a in ("is_activation_checkpointing", "is_gradient_checkpointing") if hasattr(type(model), a)), None)
    if flag is not None and getattr(model, flag):
        return "gradient checkpointing (the recomputed forward carries no taps)"
    return None


class FusedRecorder:
    """Puts the taps on the target layers for one training forward (:meth:`begin` .. :meth:`end`) and turns what
    the backward left into rows (:meth:`rows`)."""

    def __init__(self, compress: BatchCompressor):
        self.compress, self.capture = compress, compress.capture
        self._stack: contextlib.ExitStack | None = None

    def begin(self, rows: int) -> FusedMicroBatch:
        """Called before the model's training forward of a micro-batch of ``rows`` samples."""
        c = self.compress
        zs = {n: torch.zeros(rows, c.blocks[n].out_features, dtype=c.sketch_dtype, device=c.device, requires_grad=True)
              for n in c.layers}
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.capture.hooks())
        self.capture.arm(c.taps, zs, rows)
        return FusedMicroBatch(zs, rows, torch.is_autocast_enabled(c.device.type))

    def end_interrupted(self) -> None:
        """Remove the taps of a forward that raised."""
        self.capture.disarm()
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def end(self, entry: FusedMicroBatch, batch: dict, kwargs: dict, output) -> None:
        """Called after that forward: removes the taps, checks the model's loss, and hooks its gradient."""
        called = set(self.capture.called_layers())
        self.end_interrupted()
        missing = [n for n in self.compress.layers if n not in called]
        loss = getattr(output, "loss", None) if not isinstance(output, dict) else output.get("loss")
        logits = getattr(output, "logits", None) if not isinstance(output, dict) else output.get("logits")
        if missing:
            entry.problem = f"the training forward did not call layers {missing[:3]}"
        elif "labels" not in batch or not isinstance(loss, Tensor) or not isinstance(logits, Tensor):
            entry.problem = "the model computed no loss from labels (label smoothing or a custom compute_loss?)"
        elif not loss.requires_grad:
            entry.problem = "the model's loss does not require grad"
        if entry.problem is not None:
            return
        with torch.no_grad():
            entry.values = summed_cross_entropy(logits, batch["labels"])
            labels = batch["labels"][:, 1:]
            items = kwargs.get("num_items_in_batch")
            entry.denominator = float(items) if items is not None else float((labels != -100).sum())
            total, model_loss = float(entry.values.sum()), float(loss.detach())
        if abs(model_loss * entry.denominator - total) > LOSS_RTOL * max(abs(total), 1e-6):
            entry.problem = (f"the model's loss ({model_loss:.6g}) is not the summed cross-entropy over its "
                             f"{entry.denominator:g} label tokens ({total:.6g}): an auxiliary loss or another normalization")
            return
        loss.register_hook(lambda g: entry.scale.append(g.detach().double().sum()))

    def rows(self, entry: FusedMicroBatch) -> tuple[Tensor, Tensor]:
        """(grads [B, columns] in the compressor's dtype, values [B]) of a micro-batch after the backward."""
        if entry.problem is not None:
            raise FusedUnavailable(entry.problem)
        if len(entry.scale) != 1 or any(entry.zs[n].grad is None for n in self.compress.layers):
            raise FusedUnavailable("the Trainer's backward did not differentiate the model's loss exactly once")
        scale = float(entry.scale[0])
        if scale == 0.0 or scale != scale:
            raise FusedUnavailable(f"the gradient reaching the model's loss is {scale} (a skipped step?)")
        factor = entry.denominator / scale
        grads = torch.cat([entry.zs[n].grad * factor for n in self.compress.layers], dim=1).to(self.compress.dtype)
        if not bool(torch.isfinite(grads).all()):
            raise FusedUnavailable("the training step's gradients are not finite (a float16 loss-scale overflow?)")
        return grads, entry.values


def summed_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """[B]: per-sample next-token cross-entropy summed over the labels that are not -100 (in float32, row by row)."""
    out = []
    for i in range(logits.shape[0]):
        row = logits[i, :-1].float()
        out.append(nn.functional.cross_entropy(row, labels[i, 1:], reduction="sum", ignore_index=-100))
    return torch.stack(out)
