"""Capture stage: per-sample gradients of the target layers, compressed inside the
backward (:meth:`FactorCapture.sketches`) or as factors (:meth:`FactorCapture.factors`).

In-backward compression: each target layer's output y becomes ``tap(y, x_in, z)``, equal to y, where
z [B, k] is a zero "sketch" per layer and the tap is built so that the gradient of the summed loss
w.r.t. z is the layer's compressed per-sample gradient (see ``FactorizedCompressor.sketch_output``).
Autograd forms it as soon as the layer's output gradient exists; the backward keeps only what the
tap saved (FactGraSS: the k_in' masked input columns), and no output gradient outlives its layer.
Calls of one layer share its z, so their gradients add up like the weight gradient's.

For a batch with per-sample losses L_b, the gradient of sum_b L_b w.r.t. a zero probe added to a
layer's output is, row by row, the per-sample gradient w.r.t. that output (samples are independent
in eval mode). One gradient w.r.t. the probes (``torch.func.grad`` when traced by torch.compile,
``torch.autograd.grad`` in eager mode) therefore yields every layer's output gradients for the whole
batch, and since no parameter gradient is asked for, the weight-gradient GEMMs of the backward pass
are skipped entirely. Forward hooks record the layer inputs and add the probes.

* A layer that runs more than once in a forward pass (weight sharing, a block reused in a loop), or
  several modules that share one weight, get one probe per call; the weight gradient is the sum over
  calls, so the calls' inputs and output gradients are concatenated along the token axis: the factors
  are [B, T_1 + T_2 + ..., d].
* Every call must keep the batch's samples along dim 0 of its input and output ([B, ..., d]); a
  sequence-first layer ([T, B, d]) or one applied to batch-free tensors is refused, naming it.
* The probes' shapes come from a no-grad forward of the batch's first sample (cached per shape of
  the other dims), so a new batch size costs no extra forward pass.
* The hooks are registered only while a capture runs (:meth:`FactorCapture.hooks`), so any number of
  captures can share one model without stacking hooks or changing what torch.compile traces.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Callable

import torch
from torch import Tensor, nn

from grass_ops import _compat

from . import experts, sharding
from .batches import batch_size, batch_tensors, slice_rows
from .layers import LayerInfo

Shapes = dict[str, list[tuple[tuple[int, ...], torch.dtype]]]  # per layer, per call: (shape without dim 0, dtype)


def tokens_view(t: Tensor) -> Tensor:
    """[B, d] -> [B, 1, d]; [B, ..., d] -> [B, T, d] with every middle dim a token dim."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


class LayoutError(ValueError):
    """A target layer's input or output does not hold the batch's samples along dim 0."""


class CaptureError(RuntimeError):
    """The forward pass called the target layers differently from when their shapes were taken."""


class FactorCapture:
    """Forward hooks on the target layers (and the modules that share their weights), registered
    only inside :meth:`hooks`."""

    def __init__(self, model: nn.Module, layers: dict[str, LayerInfo]):
        self.model = model
        self.layers = layers
        modules = dict(model.named_modules(remove_duplicate=False))
        self.modules = {name: list({id(modules[m]): modules[m] for m in info.modules}.values())  # one hook per module
                        for name, info in layers.items()}
        # fused experts modules compute through their per-expert views while hooked (attribution.experts)
        self.experts = experts.owners(model, [m for info in layers.values() for m in info.modules])
        # layers of an MoE block that it calls on the flattened tokens [B * T, d] (a shared expert, its gate)
        self.flattened = experts.flattened_layers(model, layers)
        # one hook for every module, reading its layer from the module's slot: a compiled block (attribution.regional)
        # then traces the same hook code with no per-layer Python constant, so one graph serves every block
        self._slots = {id(m): _Slot(name, name in self.flattened) for name in layers for m in self.modules[name]}
        self._slot_key = f"_grass_capture_slot_{next(_captures)}"  # this capture's entry in a hooked module's __dict__
        self._hook = self._make_hook()
        self.probes: dict[str, list[Tensor]] | None = None
        self.called: list[str] = []  # the layers the last sketch pass called
        self.rows: int | None = None
        self.inputs: dict[str, list[Tensor]] = {}
        self.shapes: Shapes = {}
        self._hook_depth = 0
        # eager steps run with the parameters frozen (see frozen_parameters); not a sharded model's, whose
        # FSDP2 hooks are registered per parameter that requires a gradient
        self.freeze = not sharding.is_sharded(model)

    def _make_hook(self):
        key = self._slot_key

        def hook(module, args, output):
            slot = module.__dict__.get(key)
            if slot is None or (slot.tap is None and self.rows is None):  # not a capture (e.g. params= gradients): inert
                return None
            name = slot.name
            if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                raise LayoutError(f"layer {name} must be called with a tensor and return one")
            x = args[0]
            # in-backward compression: the samples are z's rows (no Python int: a compiled block does not specialize on B)
            rows = slot.tap[1].shape[0] if slot.tap is not None else self.rows
            if slot.flattened:  # called on an MoE block's flattened tokens [B * T, d]: seen as [B, T, d]
                unflattened = self._unflattened(x, output, rows)
                if unflattened is not None:
                    out = hook(module, (unflattened[0],), unflattened[1])
                    return None if out is None else out.reshape(output.shape)
            if x.dim() < 2 or output.dim() < 2 or x.shape[0] != rows or output.shape[0] != rows:
                raise LayoutError(f"layer {name} was called with input {tuple(x.shape)} and output {tuple(output.shape)}, "
                                  f"but the batch has {rows} samples: every target layer must keep the samples along "
                                  "dim 0 ([B, ..., d]); exclude sequence-first layers ([T, B, d]) and layers applied to "
                                  "tensors without a batch dimension")
            if slot.tap is not None:  # in-backward compression
                slot.calls += 1
                tap, z = slot.tap
                return tap(output, x, z)
            if self.probes is None:  # shape pass
                self.shapes.setdefault(name, []).append((tuple(output.shape[1:]), output.dtype))
                return None
            calls = self.inputs.setdefault(name, [])
            probes = self.probes[name]
            if len(calls) >= len(probes):
                raise CaptureError(f"layer {name} ran {len(calls) + 1} times in this forward pass, but {len(probes)} "
                                   "times when its output shapes were taken: the forward pass must not depend on the "
                                   "values in the batch")
            probe = probes[len(calls)]
            if output.shape != probe.shape:
                raise LayoutError(f"layer {name}'s output {tuple(output.shape)} differs from the shape {tuple(probe.shape)} "
                                  "seen on one sample of the batch: the forward pass must treat every sample alike")
            calls.append(x)
            return output + probe

        return hook

    @staticmethod
    def _unflattened(x: Tensor, output: Tensor, rows: int) -> tuple[Tensor, Tensor] | None:
        """(x [B, T, d_in], output [B, T, d_out]) of a layer an MoE block calls on its flattened tokens [B * T, d]
        (sample by sample, as transformers' MoE blocks flatten them), or None when it was not so called."""
        if x.dim() != 2 or output.dim() != 2 or x.shape[0] != output.shape[0] or x.shape[0] % rows:
            return None
        return x.reshape(rows, -1, x.shape[-1]), output.reshape(rows, -1, output.shape[-1])

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
        modules = [m for name in self.layers for m in self.modules[name]]
        handles = []
        self._hook_depth = 1
        try:
            for m in modules:
                m.__dict__[self._slot_key] = self._slots[id(m)]
                handles.append(m.register_forward_hook(self._hook))
            with experts.capturing(self.experts, lambda: self.rows):
                yield
        finally:
            self._hook_depth = 0
            for handle in handles:
                handle.remove()
            for m in modules:
                m.__dict__.pop(self._slot_key, None)

    def output_shapes(self, loss_fn: Callable, batch) -> Shapes:
        """One no-grad forward of the batch's first sample: each layer's output shape (without the
        sample dim) and dtype at every call."""
        self.shapes, self.probes, self.rows = {}, None, 1
        try:
            with torch.no_grad(), self.hooks():
                loss_fn(self.model, slice_rows(batch, 0, 1))
        finally:
            self.rows = None
        missing = [n for n in self.layers if n not in self.shapes]
        if missing:
            raise ValueError(f"layers {missing} were not called by the forward pass of loss_fn (a module whose weight "
                             "the model uses directly, like nn.MultiheadAttention's out_proj, cannot be captured: "
                             "exclude it with layers=...)")
        shapes, self.shapes = self.shapes, {}
        return shapes

    def zero_probes(self, shapes: Shapes, rows: int, device=None) -> dict[str, list[Tensor]]:
        """One zero probe [rows, *shape] per call of each layer, in the dtype of its output."""
        return {n: [torch.zeros((rows, *s), device=device, dtype=dtype) for s, dtype in calls] for n, calls in shapes.items()}

    def sketches(self, loss_fn: Callable, batch, taps: dict[str, Callable], zeros: dict[str, Tensor]):
        """-> (compressed per-sample gradients {name: [B, k]}, values [B]), formed inside the backward.
        Call inside :meth:`hooks`; ``taps[name](y, x_in, z)`` returns the layer output with its sketch
        term, ``zeros[name]`` is that layer's zero z [B, k]."""
        rows = batch_tensors(batch)[0].shape[0]

        def summed_loss(zs):
            self.arm(taps, zs, rows)
            try:
                values = loss_fn(self.model, batch)
                self.called = self.called_layers()  # read after the step (torch.compile replays this side effect)
            finally:
                self.disarm()
            _check_values(values)
            return values.sum(), values

        self.called = []
        with self.frozen_parameters():
            grads, values = probe_gradients(summed_loss, zeros)
        missing = [n for n in self.layers if n not in self.called]
        if missing:
            raise ValueError(f"layers {missing} were not called by the forward pass of loss_fn (a module whose weight "
                             "the model uses directly, like nn.MultiheadAttention's out_proj, cannot be captured: "
                             "exclude it with layers=...)")
        return grads, values.detach()

    def arm(self, taps: dict[str, Callable], zs: dict[str, Tensor], rows: int) -> None:
        """Put ``taps[name](y, x_in, z)`` with ``zs[name]`` [rows, k] on every target layer, for the forwards until
        :meth:`disarm` (inside :meth:`hooks`): :meth:`sketches`, or a training forward (the Trainer callback's
        fused recording)."""
        if not torch.compiler.is_compiling():  # a compiled block reads z from the slot: its batch dim stays symbolic
            for z in zs.values():
                _compat.maybe_mark_dynamic(z, 0)
        for slot in self._slots.values():
            slot.tap, slot.calls = (taps[slot.name], zs[slot.name]), 0
        self.rows = rows

    def called_layers(self) -> list[str]:
        """The target layers called since :meth:`arm`."""
        return sorted({slot.name for slot in self._slots.values() if slot.calls})

    @property
    def armed(self) -> bool:
        return any(slot.tap is not None for slot in self._slots.values())

    def disarm(self) -> None:
        """Take the taps off (idempotent)."""
        for slot in self._slots.values():
            slot.tap, slot.calls = None, 0
        self.rows = None

    def factors(self, loss_fn: Callable, batch, probes: dict[str, list[Tensor]]):
        """-> (inputs {name: [B, T, d_in]}, output grads {name: [B, T, d_out]}, values [B]).
        Call inside :meth:`hooks`; ``probes`` holds one zero tensor per call of each layer."""
        rows = batch_tensors(batch)[0].shape[0]  # batch_size() checked the others; no set of sizes (compile-friendly)

        def summed_loss(probes):
            self.probes, self.inputs, self.rows = probes, {}, rows
            try:
                values = loss_fn(self.model, batch)
                inputs = dict(self.inputs)
            finally:
                self.probes, self.inputs, self.rows = None, {}, None
            _check_values(values)
            return values.sum(), (values, inputs)

        with self.frozen_parameters():
            grads, (values, inputs) = probe_gradients(summed_loss, probes)
        short = [n for n in self.layers if len(inputs.get(n, [])) != len(probes[n])]
        if short:
            raise CaptureError(f"layers {short} ran fewer times than when their output shapes were taken")
        x = {n: _concat_calls([c.detach() for c in inputs[n]]) for n in self.layers}
        g = {n: _concat_calls(grads[n]) for n in self.layers}
        return x, g, values.detach()

    def frozen_parameters(self):
        """:func:`frozen_parameters` of the model, unless it is sharded (``freeze`` False)."""
        return frozen_parameters(self.model) if self.freeze else contextlib.nullcontext()

    def capture(self, loss_fn: Callable, batch, device=None):
        """Eager shapes + probes + factors of one batch: (inputs, output grads, values)."""
        probes = self.zero_probes(self.output_shapes(loss_fn, batch), batch_size(batch), device)
        with self.hooks():
            return self.factors(loss_fn, batch, probes)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """The model's parameters with ``requires_grad`` off while an eager step runs (each one's flag restored
    after, also on an error). The gradient is taken w.r.t. probes only, so no weight gradient is formed either
    way, but a parameter that requires one makes autograd save its layer's input for it: the whole x_in of every
    linear layer, held until the backward reaches it. Traced steps (torch.func.grad under no_grad) track no
    parameter already, so nothing changes while torch.compile traces. Leaves only (a parameter swapped for a
    computed tensor keeps its flag), and not inference tensors (their flag cannot be set back outside
    inference mode). Under autocast a frozen weight's low-precision copy is not cached: a layer called n
    times in one forward saves n copies instead of one (layers called once, the usual case, are unaffected)."""
    if torch.compiler.is_compiling():
        yield
        return
    params = [p for p in model.parameters() if p.requires_grad and p.is_leaf and not p.is_inference()]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


_captures = itertools.count()


class _Slot:
    """One hooked module's layer (``name``; ``flattened``: an MoE block calls it on flattened tokens) and, during
    :meth:`FactorCapture.sketches`, its ``tap`` (tap, z) and the ``calls`` made so far."""

    def __init__(self, name: str, flattened: bool):
        self.name, self.flattened = name, flattened
        self.tap: tuple[Callable, Tensor] | None = None
        self.calls = 0


def _check_values(values) -> None:
    if not isinstance(values, Tensor) or not values.is_floating_point():
        kind = values.dtype if isinstance(values, Tensor) else type(values).__name__
        raise TypeError(f"loss_fn must return a floating-point Tensor [B] of per-sample values, got {kind}")


def probe_gradients(summed_loss: Callable, wrt):
    """(d summed_loss / d wrt, aux) for ``summed_loss(wrt) -> (loss, aux)``, with a readable error for a
    loss that cannot be differentiated. Traced by torch.compile, or under inference mode: ``torch.func.grad``
    (no_grad outside, so no parameter is differentiated). Eager: ``torch.autograd.grad`` w.r.t. ``wrt`` only, the same numbers
    with a smaller working set (torch.func.grad's wrapped tensors hold more; BENCHMARKS.md, "Beside
    Bergson on the main job"). An input the loss does not use gets zeros, as
    torch.func.grad gives."""
    try:
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():  # autograd is off in inference mode
            with torch.no_grad():
                return torch.func.grad(summed_loss, has_aux=True)(wrt)
        leaves, spec = _compat.tree_flatten(wrt)
        leaves = [leaf.detach().requires_grad_(True) for leaf in leaves]
        with torch.enable_grad():
            loss, aux = summed_loss(_compat.tree_unflatten(leaves, spec))
            grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
        grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
        return _compat.tree_unflatten(grads, spec), _detached(aux)
    except RuntimeError as err:
        if type(err) is not RuntimeError or torch.compiler.is_compiling():
            raise
        raise RuntimeError(f"loss_fn failed while its per-sample gradients were taken (use differentiable torch "
                           "operations only: no .numpy() or .item() on tensors that depend on the model, no in-place "
                           f"changes of tensors it did not create): {err}") from err


def _detached(tree):
    """``tree`` with every tensor detached (the eager gradient's aux outputs, like torch.func.grad's)."""
    return _compat.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _concat_calls(calls: list[Tensor]) -> Tensor:
    parts = [tokens_view(c) for c in calls]
    if len({p.dtype for p in parts}) > 1:
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in parts])
        parts = [p.to(dtype) for p in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
