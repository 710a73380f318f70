"""Rank statistics for evaluating attributions."""
from __future__ import annotations

import torch
from torch import Tensor


def rankdata(x: Tensor, dim: int = -1) -> Tensor:
    """Average ranks (ties share their mean rank) along ``dim``, float64."""
    x = x.double().movedim(dim, -1)
    order = x.argsort(dim=-1)
    ranks = torch.empty_like(x)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], dtype=torch.float64).expand_as(x).contiguous())
    sorted_x = x.gather(-1, order)
    # average the ranks of tied runs
    flat_sorted, flat_order, flat_ranks = sorted_x.reshape(-1, x.shape[-1]), order.reshape(-1, x.shape[-1]), ranks.reshape(-1, x.shape[-1])
    for row in range(flat_sorted.shape[0]):
        values, counts = torch.unique_consecutive(flat_sorted[row], return_counts=True)
        if counts.max() > 1:
            ends = counts.cumsum(0)
            mean_rank = (ends - 1 + ends - counts).double() / 2
            flat_ranks[row, flat_order[row]] = mean_rank.repeat_interleave(counts)
    return flat_ranks.reshape(ranks.shape).movedim(-1, dim)


def pearson(a: Tensor, b: Tensor, dim: int = -1) -> Tensor:
    a, b = a.double(), b.double()
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim)).clamp_min(1e-300)


def spearman(a: Tensor, b: Tensor, dim: int = -1) -> Tensor:
    """Spearman rank correlation along ``dim`` (ties averaged)."""
    return pearson(rankdata(a, dim), rankdata(b, dim), dim)


def mean_and_standard_error(values) -> tuple[float, float]:
    """(mean, standard error of the mean) of a non-empty sequence of numbers, in float64: the standard
    error is the sample standard deviation (n - 1 in the denominator) over sqrt(n); nan for one value."""
    x = torch.as_tensor(list(values) if not isinstance(values, Tensor) else values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("values is empty: no mean to take")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"values must be finite numbers, got {x.tolist()[:5]}")
    se = float(x.std(correction=1) / x.numel() ** 0.5) if x.numel() > 1 else float("nan")
    return float(x.mean()), se
