"""The model states an Attributor computes gradients at: the model as it is, or a list of state
dicts (TracIn's and TRAK's checkpoints) with their weights, swapped in one at a time.

A checkpoint's tensors that share memory with the model (e.g. ``model.state_dict()`` itself) would
change with the model (trained further, or another checkpoint copied in), so they are copied when the Attributor
is built: a checkpoint is the state it had then. ``None``
in the list means the model's own weights as they were when the swapping started. A callable
(no arguments -> state dict) is a lazy checkpoint: it is called, and its state checked, each time the
checkpoint is needed (swapped in or fingerprinted), so only one such checkpoint is in memory at a time."""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings

import torch
from torch import Tensor, nn


def check_state(model: nn.Module, state, index: int) -> dict:
    """``state`` checked to fit ``model`` (tensors, the model's names and shapes; errors name checkpoints[index]),
    its tensors that share memory with the model copied."""
    if not isinstance(state, dict):
        raise TypeError(f"checkpoints[{index}] must be a state dict (name -> Tensor), a callable returning one, or None, "
                        f"got {type(state).__name__}")
    expected = model.state_dict()
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"checkpoints[{index}] holds non-tensor values for {bad[:3]}: pass the model's state dict "
                        "(e.g. checkpoint['model']), not a training checkpoint")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoints[{index}] does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    shapes = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if shapes:
        k = shapes[0]
        raise ValueError(f"checkpoints[{index}][{k!r}] has shape {tuple(state[k].shape)}, the model's is {tuple(expected[k].shape)}")
    live = {t.untyped_storage().data_ptr() for t in expected.values() if t.numel()}
    return {k: v.detach().clone() if v.numel() and v.untyped_storage().data_ptr() in live else v for k, v in state.items()}


class Checkpoints:
    def __init__(self, model: nn.Module, states: list | None, weights: list[float] | None, method: str):
        if states is not None and not isinstance(states, (list, tuple)):
            raise TypeError(f"checkpoints must be a list of state dicts, got {type(states).__name__}")
        if states is not None and not states:
            raise ValueError("checkpoints must hold at least one state dict (or be None for the model as it is)")
        if method == "tracin" and not states:
            warnings.warn("method='tracin' without checkpoints: using the current model alone (= GradDot)", stacklevel=4)
        self.model = model
        self.states = [s if s is None or callable(s) else check_state(model, s, i) for i, s in enumerate(states or [None])]
        weights = [1.0] * len(self.states) if weights is None else list(weights)
        if len(weights) != len(self.states):
            raise ValueError(f"checkpoint_weights has {len(weights)} entries for {len(self.states)} checkpoints")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
                raise ValueError(f"checkpoint_weights must be finite numbers, got {w!r}")
        if method == "trak" and any(float(w) != 1.0 for w in weights):
            raise ValueError("checkpoint_weights: TRAK averages its checkpoints (an ensemble); the weights are for "
                             "'if', 'graddot', 'gradcos' and 'tracin', whose score is the weighted sum over checkpoints")
        self.weights = [float(w) for w in weights]

    def __len__(self) -> int:
        return len(self.states)

    def state(self, index: int) -> dict:
        state = self.states[index]
        if callable(state):
            return check_state(self.model, state(), index)
        return self.model.state_dict() if state is None else state

    @contextlib.contextmanager
    def each(self):
        """Yield an iterator over checkpoint indices with the model in eval mode and that checkpoint's
        weights loaded; restores the model's own weights and training mode afterwards."""
        was_training = self.model.training
        swapped = any(s is not None for s in self.states)
        swap = (WeightSwap(self.model) if WeightSwap.fits(self.model) else WeightCopy(self.model)) if swapped else None
        self.model.eval()

        def indices():
            for c, state in enumerate(self.states):
                if swap is not None:
                    if callable(state):  # the previous checkpoint's tensors let go before this one is read
                        swap.load(None)
                    swap.load(None if state is None else self.state(c))
                yield c

        try:
            yield indices()
        finally:
            if swap is not None:
                swap.restore()
            self.model.train(was_training)


class WeightSwap:
    """Checkpoints swapped into ``model`` by reference: each parameter's ``.data`` points at the checkpoint's
    tensor (a copy only where its dtype, device or strides differ from the parameter's, or where it is an
    inference-mode tensor, which autograd cannot save), the model's own parameter tensors are kept aside untouched
    and put back at the end, bit for bit. No copy of the weights is made: besides the model's own weights, one
    checkpoint's tensors (a copy-in kept the model's weights, a copy of them and the checkpoint being read: 3x the
    weights). Buffers (small) are copied in and restored from a copy. Nothing writes into the checkpoint's tensors.

    For a model whose state dict is its plain parameters and buffers under their own names, loaded by torch's
    default (``fits``); others use :class:`WeightCopy`: FSDP2's DTensors and other parameter subclasses, state
    dicts with other keys (quantization states, renaming hooks), modules with load hooks or their own
    ``_load_from_state_dict``."""

    @staticmethod
    def fits(model: nn.Module) -> bool:
        params = list(model.named_parameters(remove_duplicate=False))
        if any(type(p) is not nn.Parameter or type(p.data) is not Tensor for _, p in params):
            return False
        for module in model.modules():
            if module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks or not _loads_plainly(module):
                return False
        names = {name for name, _ in params} | {name for name, _ in model.named_buffers(remove_duplicate=False)}
        keys = set(model.state_dict())
        return keys <= names and all(name in keys for name, _ in params)

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = list(model.named_parameters(remove_duplicate=False))
        self.own = [p.data for _, p in self.params]
        names = {name for name, _ in self.params}
        self.buffers = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in names}

    def load(self, state: dict | None) -> None:
        """``state`` (checked by check_state) swapped in; None: the model's own weights."""
        for (name, p), own in zip(self.params, self.own):
            p.data = own if state is None else _as_parameter_data(state[name], own)
        if self.buffers:
            self.model.load_state_dict(self.buffers if state is None else {k: state[k] for k in self.buffers},
                                       strict=False)

    def restore(self) -> None:
        self.load(None)


def _loads_plainly(module: nn.Module) -> bool:
    """Whether ``module``'s ``_load_from_state_dict`` is torch's own (nn.Module's, or a torch.nn module's such as
    batch norm's, which only upgrades an old buffer), not a library's or a user's."""
    owner = next(c for c in type(module).__mro__ if "_load_from_state_dict" in vars(c))
    return owner is nn.Module or owner.__module__.startswith("torch.nn.modules.")


def _as_parameter_data(tensor: Tensor, own: Tensor) -> Tensor:
    """``tensor`` itself where it can stand in for the parameter whose own data is ``own`` (same dtype, device and
    strides: compiled graphs guard on strides; not an inference tensor), else a copy laid out as ``own``."""
    tensor = tensor.detach()
    if (tensor.dtype, tensor.device, tensor.stride()) == (own.dtype, own.device, own.stride()) and not tensor.is_inference():
        return tensor
    return torch.empty_like(own).copy_(tensor)


class WeightCopy:
    """Checkpoints copied into ``model`` (``load_state_dict``), its own weights kept as a copy and copied back."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.original = {n: t.detach().clone() for n, t in model.state_dict().items()}

    def load(self, state: dict | None) -> None:
        self.model.load_state_dict(self.original if state is None else state)

    def restore(self) -> None:
        self.load(None)
