"""Small shared builders for the op tests."""
import torch

import grass_ops


def sjlt_case(batch=(3,), p=10, k=6, s=2, dtype=torch.float64, requires_grad=False, seed=0):
    idx, sign = grass_ops.sjlt_hash(p, k, s, seed)
    x = torch.randn(*batch, p, dtype=dtype, requires_grad=requires_grad)
    return x, idx, sign, k


def factgrass_case(b=2, t=3, d_in=6, d_out=5, k_in=3, k_out=2, k=4, s=1, dtype=torch.float64, requires_grad=False):
    x_in = torch.randn(b, t, d_in, dtype=dtype, requires_grad=requires_grad)
    g_out = torch.randn(b, t, d_out, dtype=dtype, requires_grad=requires_grad)
    in_idx, out_idx = grass_ops.random_mask(d_in, k_in, 0), grass_ops.random_mask(d_out, k_out, 1)
    idx, sign = grass_ops.sjlt_hash(k_in * k_out, k, s, 2)
    return x_in, g_out, in_idx, out_idx, idx, sign, k


def soft_mask_case(lead=(2, 3), d_in=6, d_out=5, dtype=torch.float64, requires_grad=False):
    x_in = torch.randn(*lead, d_in, dtype=dtype, requires_grad=requires_grad)
    g_out = torch.randn(*lead, d_out, dtype=dtype, requires_grad=requires_grad)
    s_in = torch.randn(d_in, dtype=dtype, requires_grad=requires_grad)
    s_out = torch.randn(d_out, dtype=dtype, requires_grad=requires_grad)
    return x_in, g_out, s_in, s_out, 0.7


def hard_mask_case(lead=(2, 3), d_in=6, d_out=5, dtype=torch.float64, requires_grad=False):
    x_in = torch.randn(*lead, d_in, dtype=dtype, requires_grad=requires_grad)
    g_out = torch.randn(*lead, d_out, dtype=dtype, requires_grad=requires_grad)
    return x_in, g_out, grass_ops.random_mask(d_in, 3, 0), grass_ops.random_mask(d_out, 2, 1), 1.0


def inner_case(n_a=3, n_b=2, t=2, u=3, d_in=4, d_out=5, dtype=torch.float64, requires_grad=False):
    shapes = [(n_a, t, d_in), (n_a, t, d_out), (n_b, u, d_in), (n_b, u, d_out)]
    return tuple(torch.randn(*s, dtype=dtype, requires_grad=requires_grad) for s in shapes)
