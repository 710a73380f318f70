"""Fake kernels of ``grass::sjlt`` and ``grass::sjlt_transpose``."""
from __future__ import annotations

import torch

from .. import _checks


@torch.library.register_fake("grass::sjlt")
def sjlt_fake(x, idx, sign, k):
    _checks.check_sjlt_args(x, idx, sign, k)
    return x.new_empty(*x.shape[:-1], k)


@torch.library.register_fake("grass::sjlt_transpose")
def sjlt_transpose_fake(y, idx, sign):
    _checks.check_sjlt_transpose_args(y, idx, sign)
    return y.new_empty(*y.shape[:-1], idx.shape[0])
