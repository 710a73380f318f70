"""What every launcher shares: the deterministic switch."""
from __future__ import annotations

import os

import torch


def deterministic_enabled(flag: bool | None = None) -> bool:
    """``flag`` when given; else ``torch.are_deterministic_algorithms_enabled()`` or ``GRASS_OPS_DETERMINISTIC=1``."""
    if flag is not None:
        return bool(flag)
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("GRASS_OPS_DETERMINISTIC") == "1"
