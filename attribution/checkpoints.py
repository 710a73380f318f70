"""The model states an Attributor computes gradients at: the model as it is, or a list of state
dicts (TracIn's and TRAK's checkpoints) with their weights, swapped in one at a time."""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings

from torch import nn


class Checkpoints:
    def __init__(self, model: nn.Module, states: list[dict] | None, weights: list[float] | None, method: str):
        if states is not None and not isinstance(states, (list, tuple)):
            raise TypeError(f"checkpoints must be a list of state dicts, got {type(states).__name__}")
        if states is not None and not states:
            raise ValueError("checkpoints must hold at least one state dict (or be None for the model as it is)")
        if method == "tracin" and not states:
            warnings.warn("method='tracin' without checkpoints: using the current model alone (= GradDot)", stacklevel=3)
        self.model = model
        self.states = list(states) if states else [None]
        weights = [1.0] * len(self.states) if weights is None else list(weights)
        if len(weights) != len(self.states):
            raise ValueError(f"checkpoint_weights has {len(weights)} entries for {len(self.states)} checkpoints")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
                raise ValueError(f"checkpoint_weights must be finite numbers, got {w!r}")
        self.weights = [float(w) for w in weights]

    def __len__(self) -> int:
        return len(self.states)

    def state(self, index: int) -> dict:
        state = self.states[index]
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
                if state is not None:
                    self.model.load_state_dict(state)
                yield c

        try:
            yield indices()
        finally:
            if original is not None:
                self.model.load_state_dict(original)
            self.model.train(was_training)
