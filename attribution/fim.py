"""Layer-wise (block-diagonal) Fisher information of compressed gradients and its damped inverse.

F_l = (1/n) sum_i g_il g_il^T is accumulated in float32 (float64 for float64 gradients). The inverse
is kept as an eigendecomposition F_l = V diag(lam) V^T, so that (F_l + damping I)^-1 for any damping
is V diag(1 / (lam + damping)) V^T: changing the damping recomputes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class FIMAccumulator:
    """Running sum of g^T g for one layer."""

    def __init__(self, k: int, device, dtype=torch.float32):
        self.acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.sum = torch.zeros(k, k, dtype=self.acc_dtype, device=device)
        self.count = 0

    def add(self, grads: Tensor, weights: Tensor | None = None) -> None:
        """grads [n, k]; optional per-row weights [n] (e.g. class probabilities for the true Fisher)."""
        g = grads.to(self.acc_dtype)
        gw = g if weights is None else g * weights.to(self.acc_dtype).unsqueeze(1)
        self.sum.addmm_(gw.T, g)

    def finalize(self, n: int) -> "DampedInverse":
        if n <= 0:
            raise ValueError("the FIM needs at least one training sample")
        return DampedInverse.from_fim(self.sum / n)


@dataclass
class DampedInverse:
    eigvals: Tensor  # [k], clamped at >= 0
    eigvecs: Tensor  # [k, k]

    @classmethod
    def from_fim(cls, fim: Tensor) -> "DampedInverse":
        sym = (fim.double() + fim.double().T) / 2
        eigvals, eigvecs = torch.linalg.eigh(sym)
        return cls(eigvals.clamp_min(0.0), eigvecs)

    def apply(self, vectors: Tensor, damping: float) -> Tensor:
        """(F + damping I)^-1 applied to the rows of ``vectors`` [m, k]; returns vectors.dtype."""
        if damping <= 0 and bool((self.eigvals <= 0).any()):
            raise ValueError("damping must be > 0 when the FIM is singular")
        v = self.eigvecs.to(vectors.device)
        scale = 1.0 / (self.eigvals.to(vectors.device) + damping)
        coeffs = vectors.double() @ v
        return ((coeffs * scale) @ v.T).to(vectors.dtype)
