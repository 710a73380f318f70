"""Batches as the user's loader yields them: any nest of tuples, lists and dicts of tensors whose
dim 0 is the sample dimension. Helpers shared by every stage: their tensors, size, device moves,
padding (compiled steps) and digests (resume checks)."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from grass_ops._compat import tree_map


def batch_tensors(batch) -> list[Tensor]:
    """The batch's tensors in a fixed (pytree) order."""
    out: list[Tensor] = []
    tree_map(lambda t: out.append(t) if isinstance(t, Tensor) else None, batch)
    return out


def batch_size(batch) -> int:
    """The shared leading (sample) dimension of every tensor in a batch."""
    tensors = batch_tensors(batch)
    if not tensors:
        raise ValueError(f"a batch must hold at least one tensor with samples along dim 0, got {type(batch).__name__}")
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    if len(sizes) != 1 or None in sizes:
        raise ValueError("every tensor in a batch must share the leading (sample) dimension, got shapes "
                         f"{[tuple(t.shape) for t in tensors]}")
    return sizes.pop()


def to_device(batch, device):
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)


def slice_rows(batch, start: int, stop: int):
    return tree_map(lambda t: t[start:stop] if isinstance(t, Tensor) else t, batch)


def shape_key(batch) -> tuple:
    """Shapes and dtypes of the batch's tensors (what a compiled step specializes on)."""
    return tuple((tuple(t.shape), t.dtype) for t in batch_tensors(batch))


def batch_digest(batch) -> str:
    """sha256 of a batch's structure, shapes, dtypes and bytes (tensors hashed without copying on the CPU)."""
    h = hashlib.sha256()

    def visit(obj):
        if isinstance(obj, Tensor):
            t = obj.detach()
            t = (t if t.device.type == "cpu" else t.cpu()).contiguous()
            h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(obj, dict):
            h.update(f"D{len(obj)}".encode())
            for key in sorted(obj, key=repr):
                h.update(repr(key).encode())
                visit(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)}".encode())
            for item in obj:
                visit(item)
        else:
            h.update(repr(obj).encode())

    visit(batch)
    return h.hexdigest()[:24]
