"""GPU kernels (Triton) for the grass ops, registered for the CUDA device on the same ops.

``grass_ops.cuda.sjlt``, ``factgrass`` and ``factorized_mask_backward`` are the plain launchers
(same signatures as the ops, plus ``deterministic=``); they import triton on first use, so
``grass_ops`` itself imports without triton. :func:`register` attaches them to the ops for CUDA
tensors; ``grass_ops`` calls it at import when CUDA and triton are both available.
"""
from __future__ import annotations

import importlib.util

import torch

_LAUNCHERS = ("sjlt", "factgrass", "factorized_mask_backward", "deterministic_enabled")
_registered = False


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def __getattr__(name):
    if name in _LAUNCHERS:
        from . import launchers

        return getattr(launchers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> bool:
    """Register the Triton kernels as the CUDA implementations of the ops (idempotent).
    Returns whether they are registered."""
    global _registered
    if _registered:
        return True
    if not (torch.cuda.is_available() and has_triton()):
        return False
    from . import launchers

    torch.library.register_kernel("grass::sjlt", "cuda", lambda x, idx, sign, k: launchers.sjlt(x, idx, sign, k))
    torch.library.register_kernel(
        "grass::factgrass", "cuda",
        lambda x_in, g_out, in_idx, out_idx, idx, sign, k: launchers.factgrass(x_in, g_out, in_idx, out_idx, idx, sign, k),
    )
    torch.library.register_kernel("grass::factorized_mask_backward", "cuda", launchers.factorized_mask_backward)
    _registered = True
    return True
