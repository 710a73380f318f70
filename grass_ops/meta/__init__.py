"""Fake (meta) kernels: output shapes, dtypes and strides for FakeTensor tracing and torch.compile.

One module per op (its backward op included). Every fake runs the same structural checks as the
real kernel (``grass_ops._checks.check_<op>_args``), so a shape or dtype error surfaces at trace time
with the same message. All outputs are contiguous.
"""
from .. import ops as _ops  # noqa: F401  (the ops must exist before their fakes)
from . import factgrass, factorized_inner, factorized_mask, sjlt  # noqa: F401  (registers the fakes)
