"""grass_ops: GraSS / FactGraSS gradient compression as PyTorch custom ops (namespace ``grass``).

Ops (eager, autograd, torch.func and torch.compile(fullgraph=True)):
    sjlt(x [..., p], idx [p, s], sign [p, s], k)                      -> [..., k]
    sjlt_transpose(y [..., k], idx, sign)                             -> [..., p]
    factgrass(x_in [B, T, d_in], g_out [B, T, d_out], in_idx, out_idx, idx, sign, k) -> [B, k]
    factorized_mask(x_in, g_out, in_mask, out_mask, temperature=1.0) -> (x_in', g_out')
    factorized_inner(x_a, g_a, x_b, g_b)                              -> [n_a, n_b]
"""
from . import meta as _meta  # noqa: F401  (registers the fake kernels)
from ._checks import clear_caches
from ._hashing import derive_seed, random_mask, sjlt_hash
from .compressors import (
    FJLT,
    SJLT,
    Compressor,
    FactGraSS,
    FactorizedCompressor,
    Gaussian,
    GraSS,
    Identity,
    LoGra,
    Rademacher,
    RandomMask,
    SelectiveMask,
    from_spec,
)
from .cuda import register as _register_cuda
from .ops import factgrass, factorized_inner, factorized_mask, sjlt, sjlt_transpose

_register_cuda()  # Triton kernels for CUDA tensors, when CUDA and triton are present

__version__ = "0.1.0"

__all__ = [
    "FJLT",
    "SJLT",
    "Compressor",
    "FactGraSS",
    "FactorizedCompressor",
    "Gaussian",
    "GraSS",
    "Identity",
    "LoGra",
    "Rademacher",
    "RandomMask",
    "SelectiveMask",
    "from_spec",
    "clear_caches",
    "derive_seed",
    "factgrass",
    "factorized_inner",
    "factorized_mask",
    "random_mask",
    "sjlt",
    "sjlt_hash",
    "sjlt_transpose",
]
