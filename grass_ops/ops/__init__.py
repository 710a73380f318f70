"""Custom-op definitions (namespace ``grass``), their CPU kernels, autograd and vmap rules."""
from .factgrass import factgrass
from .factorized_inner import factorized_inner
from .factorized_mask import factorized_mask
from .sjlt import sjlt, sjlt_transpose

__all__ = ["factgrass", "factorized_inner", "factorized_mask", "sjlt", "sjlt_transpose"]
