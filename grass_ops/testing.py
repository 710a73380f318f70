"""Dense references and Hypothesis strategies for property-testing code built on grass_ops.

    from grass_ops.testing import sjlt_problems, dense_sjlt_matrix
    @given(sjlt_problems())
    def test_mine(problem): ...

Needs the ``hypothesis`` package (the ``test`` extra).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from ._hashing import random_mask, sjlt_hash

# (dtype, atol, rtol) for comparing an op against a float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (1e-1, 5e-2),
}


def dense_sjlt_matrix(idx: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
    """The [k, p] float64 matrix S of the SJLT defined by (idx, sign): sjlt(x) = x @ S.T."""
    p, s = idx.shape
    dense = torch.zeros(k, p, dtype=torch.float64)
    cols = torch.arange(p).unsqueeze(1).expand(p, s)
    dense.index_put_((idx.long().cpu(), cols), sign.double().cpu(), accumulate=True)
    return dense / s**0.5


def reference_sjlt(x: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
    return x.double().cpu() @ dense_sjlt_matrix(idx, sign, k).T


def masked_kron_gradient(x_in, g_out, in_idx, out_idx) -> torch.Tensor:
    """[B, k_in' * k_out'] float64: sum_t x_in[b, t, in_idx] (x) g_out[b, t, out_idx], row-major (i, j)."""
    x = x_in.double().cpu()
    g = g_out.double().cpu()
    if x.dim() == 2:
        x, g = x.unsqueeze(1), g.unsqueeze(1)
    kron = torch.einsum("bti,btj->bij", x[..., in_idx.cpu()], g[..., out_idx.cpu()])
    return kron.flatten(1)


def reference_factgrass(x_in, g_out, in_idx, out_idx, idx, sign, k) -> torch.Tensor:
    return reference_sjlt(masked_kron_gradient(x_in, g_out, in_idx, out_idx), idx, sign, k)


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, scale=None):
    """Compare with a float64 reference using the dtype's tolerance, relative to the reference's scale."""
    atol, rtol = TOLERANCES[dtype]
    if scale is None:
        scale = float(reference.abs().max()) if reference.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), reference, atol=atol * max(scale, 1.0), rtol=rtol)


@dataclass
class SJLTProblem:
    x: torch.Tensor
    idx: torch.Tensor
    sign: torch.Tensor
    k: int
    seed: int


@dataclass
class FactGraSSProblem:
    x_in: torch.Tensor
    g_out: torch.Tensor
    in_idx: torch.Tensor
    out_idx: torch.Tensor
    idx: torch.Tensor
    sign: torch.Tensor
    k: int
    seed: int

    @property
    def args(self):
        return self.x_in, self.g_out, self.in_idx, self.out_idx, self.idx, self.sign, self.k


seeds = st.integers(min_value=0, max_value=2**32 - 1)
float_dtypes = st.sampled_from([torch.float32, torch.float64])


def _tensor(shape, dtype, seed, zero_fraction=0.0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    if zero_fraction:
        t = t * (torch.rand(shape, generator=gen, dtype=torch.float64) >= zero_fraction)
    return t.to(dtype)


@st.composite
def sjlt_problems(draw, max_p=64, max_k=32, max_s=4, max_batch=4, dtypes=float_dtypes):
    """Random (x [*batch, p], idx, sign, k) with small bounded sizes; x may be sparse."""
    p = draw(st.integers(1, max_p))
    k = draw(st.integers(1, max_k))
    s = draw(st.integers(1, min(max_s, k)))
    seed = draw(seeds)
    batch = tuple(draw(st.lists(st.integers(0, max_batch), min_size=0, max_size=2)))
    zero_fraction = draw(st.sampled_from([0.0, 0.5, 0.9]))
    idx, sign = sjlt_hash(p, k, s, seed)
    x = _tensor((*batch, p), draw(dtypes), seed, zero_fraction)
    return SJLTProblem(x, idx, sign, k, seed)


@st.composite
def factgrass_problems(draw, max_b=3, max_t=4, max_d=12, max_k=32, max_s=3, dtypes=float_dtypes, allow_2d=True):
    """Random FactGraSS inputs: factors [B, T, d] (or [B, d]), masks, hash and k."""
    b = draw(st.integers(0, max_b))
    t = draw(st.integers(1, max_t))
    d_in, d_out = draw(st.integers(1, max_d)), draw(st.integers(1, max_d))
    k_in, k_out = draw(st.integers(1, d_in)), draw(st.integers(1, d_out))
    k = draw(st.integers(1, max_k))
    s = draw(st.integers(1, min(max_s, k)))
    seed = draw(seeds)
    dtype = draw(dtypes)
    two_d = allow_2d and draw(st.booleans())
    lead = (b,) if two_d else (b, t)
    x_in = _tensor((*lead, d_in), dtype, seed)
    g_out = _tensor((*lead, d_out), dtype, seed + 1)
    in_idx, out_idx = random_mask(d_in, k_in, seed), random_mask(d_out, k_out, seed + 1)
    idx, sign = sjlt_hash(k_in * k_out, k, s, seed)
    return FactGraSSProblem(x_in, g_out, in_idx, out_idx, idx, sign, k, seed)
