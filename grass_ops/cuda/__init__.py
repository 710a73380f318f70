"""GPU kernels (Triton) for the grass ops, registered for the CUDA device on the same ops.

One module per op, ``<op>_triton.py``: its ``@triton.jit`` kernels, its launcher (the op's arguments
plus ``deterministic=``), its :func:`register` for CUDA tensors and its ``AOT_VARIANTS`` table (every
specialization the launcher can produce; ``scripts/compile_kernels.py`` compiles them all).

The launchers ``grass_ops.cuda.sjlt``, ``grass_ops.cuda.factgrass`` and
``grass_ops.cuda.factorized_mask_backward`` (and ``deterministic_enabled``) import triton on first
use, so ``grass_ops`` itself imports without triton. :func:`register` attaches them to the ops for
CUDA tensors; ``grass_ops`` calls it at import when CUDA and triton are both available. They also run
on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported), which is how CI tests
the kernels' logic without a GPU.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

KERNEL_MODULES = ("sjlt_triton", "factgrass_triton", "factorized_mask_triton")
_LAUNCHERS = {
    "sjlt": "sjlt_triton",
    "factgrass": "factgrass_triton",
    "factorized_mask_backward": "factorized_mask_triton",
    "deterministic_enabled": "_launch",
}
_registered = False


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def __getattr__(name):
    if name in _LAUNCHERS:
        return getattr(importlib.import_module(f"{__name__}.{_LAUNCHERS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kernel_modules() -> list:
    """The per-op kernel modules (imports triton)."""
    return [importlib.import_module(f"{__name__}.{name}") for name in KERNEL_MODULES]


def register() -> bool:
    """Register the Triton kernels as the CUDA implementations of the ops (idempotent).
    Returns whether they are registered."""
    global _registered
    if _registered:
        return True
    if not (torch.cuda.is_available() and has_triton()):
        return False
    for module in kernel_modules():
        module.register()
    _registered = True
    return True
