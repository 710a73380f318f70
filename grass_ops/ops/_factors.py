"""Layout of a linear layer's gradient factors, shared by the factor ops and the compressors."""
from __future__ import annotations

from torch import Tensor


def as_3d(t: Tensor) -> Tensor:
    """Factors [B, T, d] as they are; [B, d] (one token per sample) as [B, 1, d]."""
    return t.unsqueeze(1) if t.dim() == 2 else t
