"""preconditioner="none": P = I (GradDot-like inner products; the only one of graddot, gradcos, tracin)."""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from .base import Preconditioner


class NoPreconditioner(Preconditioner):
    name = "none"

    def precondition(self, ckpt, record, features, damping) -> Tensor:
        return features.grads[ckpt].to(self.device, self.dtype)

    def quadratic_form(self, ckpt, record, damping) -> Callable[[Tensor], Tensor]:
        return lambda g: g.double().square().sum(1)
