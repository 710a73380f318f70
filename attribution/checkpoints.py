"""The model states an Attributor computes gradients at: the model as it is, or a list of state
dicts (TracIn's and TRAK's checkpoints) with their weights, swapped in one at a time.

A checkpoint's tensors that share memory with the model (e.g. ``model.state_dict()`` itself) would
change when another checkpoint is loaded, so they are copied when the Attributor is built. ``None``
in the list means the model's own weights as they were when the swapping started. A callable
(no arguments -> state dict) is a lazy checkpoint: it is called, and its state checked, each time the
checkpoint is needed (swapped in or fingerprinted), so only one such checkpoint is in memory at a time."""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings

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
        original = {n: t.detach().clone() for n, t in self.model.state_dict().items()} if swapped else None
        self.model.eval()

        def indices():
            for c, state in enumerate(self.states):
                if swapped:
                    self.model.load_state_dict(original if state is None else self.state(c))
                yield c

        try:
            yield indices()
        finally:
            if original is not None:
                self.model.load_state_dict(original)
            self.model.train(was_training)
