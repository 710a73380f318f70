"""Preconditioning stage: layer-wise (block-diagonal) Fisher information of compressed gradients.

F_b = (1/n) sum_i g_ib g_ib^T per block b, accumulated in float32 (float64 for float64 runs). The
inverse is kept as an eigendecomposition F_b = V diag(lam) V^T (computed in float64, stored in float32,
or float64 for float64 runs), so that (F_b + damping I)^-1 for any damping is
V diag(1 / (lam + damping)) V^T: changing the damping recomputes nothing. A relative damping
"<f>*mean" is f times the block's mean eigenvalue (see check_damping; used by every preconditioner).
Damping 0 needs an invertible preconditioner: eigenvalues within rounding of zero relative to the
largest count as zero (see check_invertible; used by every preconditioner).

The FIM is derived data: it is stored with the fingerprint of the shards it was computed from, and
recomputed whenever that fingerprint changes (a store that grew).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .store import CorruptStoreError


def check_damping(value, name: str = "damping") -> float | str:
    """A finite float >= 0 (absolute damping), or "<factor>*mean" (relative damping: factor times the mean
    eigenvalue of each block's preconditioner, e.g. "0.1*mean"), normalized; else a clear error naming ``name``."""
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        factor, star, unit = text.partition("*")
        try:
            number = float(factor) if factor else float("nan")
        except ValueError:
            number = float("nan")
        if not star:
            raise TypeError(f"{name} must be a real number >= 0 or '<factor>*mean' (e.g. '0.1*mean'), got {value!r}")
        if unit != "mean" or not math.isfinite(number) or number < 0:
            raise ValueError(f"{name} must be a number >= 0 or '<factor>*mean' with a finite factor >= 0 "
                             f"(e.g. '0.1*mean'), got {value!r}")
        return f"{number!r}*mean"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0 or '<factor>*mean', got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def absolute_damping(damping: float | str, mean_eigenvalue: float) -> float:
    """The damping added to a block's eigenvalues: ``damping`` itself, or factor * the block's mean
    eigenvalue for a relative damping "<factor>*mean" (from :func:`check_damping`)."""
    if isinstance(damping, str):
        return float(damping.partition("*")[0]) * float(mean_eigenvalue)
    return float(damping)


def check_invertible(eigvals: Tensor, damping: float, precision: torch.dtype, what: str) -> None:
    """Refuse damping 0 when ``what`` is singular: an eigenvalue at or below max(eigvals.shape) x eps of
    ``precision`` (the precision of the statistics) x the largest eigenvalue is rounding noise, i.e. zero."""
    if damping > 0:
        return
    largest = float(eigvals.max()) if eigvals.numel() else 0.0
    tolerance = max(eigvals.shape, default=1) * torch.finfo(precision).eps * largest
    if largest <= 0 or bool((eigvals <= tolerance).any()):
        raise ValueError(f"damping must be > 0: {what} is singular (eigenvalues at or below {tolerance:.3g}, the "
                         f"{precision} rounding level of its largest, {largest:.3g}, count as zero)")


class FIMAccumulator:
    """Running sum of g^T g for one block."""

    def __init__(self, k: int, device, dtype=torch.float32):
        self.acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.sum = torch.zeros(k, k, dtype=self.acc_dtype, device=device)

    def add(self, grads: Tensor, weights: Tensor | None = None) -> None:
        """grads [n, k]; optional per-row weights [n] (e.g. class probabilities for the true Fisher)."""
        g = grads.to(self.sum.device, self.acc_dtype)
        gw = g if weights is None else g * weights.to(g.device, self.acc_dtype).unsqueeze(1)
        self.sum.addmm_(gw.T, g)

    def mean(self, n: int) -> Tensor:
        """[k, k]: the sum over ``n`` samples divided by n (the per-example mean second moment)."""
        if n <= 0:
            raise ValueError("the FIM needs at least one training sample")
        return self.sum / n

    def finalize(self, n: int, store_dtype: torch.dtype = torch.float32) -> "DampedInverse":
        return DampedInverse.from_fim(self.mean(n), store_dtype)


# A FIM summed over n samples has rank <= n. When n + LOW_RANK_OVERSAMPLE <= k / LOW_RANK_SHARE, its
# eigendecomposition is computed in an (n + oversample)-dim subspace: measured on SmolLM2's 256-wide
# blocks, 12 ms instead of 200-600 ms (LAPACK's eigh is slow on the many zero eigenvalues) at n = 5, no
# faster from n ~ 100.
LOW_RANK_OVERSAMPLE = 8
LOW_RANK_SHARE = 4


def low_rank_eigh(sym: Tensor, width: int, tolerance: float) -> tuple[Tensor, Tensor] | None:
    """(eigvals, eigvecs) of a symmetric PSD [k, k] matrix of rank < ``width``: a seeded range finder, the
    eigendecomposition inside that range, and an orthonormal complement (eigenvalue 0). None when the
    matrix is not that of rank (residual above ``tolerance`` relative to its norm): use a full eigh."""
    k = sym.shape[0]
    probe = torch.randn(k, width, generator=torch.Generator().manual_seed(0), dtype=sym.dtype).to(sym.device)
    basis = torch.linalg.qr(sym @ probe).Q
    values, rotation = torch.linalg.eigh(basis.T @ sym @ basis)
    vectors = basis @ rotation
    if float((sym - (vectors * values) @ vectors.T).norm()) > tolerance * float(sym.norm()):
        return None
    complement = torch.linalg.qr(vectors, mode="complete").Q[:, width:]
    return (torch.cat([torch.zeros(k - width, dtype=values.dtype, device=values.device), values]),
            torch.cat([complement, vectors], dim=1))


@dataclass
class DampedInverse:
    eigvals: Tensor  # [k] float64, clamped at >= 0
    eigvecs: Tensor  # [k, k] float32 (float64 for float64 runs)

    @classmethod
    def from_fim(cls, fim: Tensor, store_dtype: torch.dtype = torch.float32, samples: int | None = None) -> "DampedInverse":
        """The eigendecomposition of ``fim``; ``samples`` (the number of gradients it sums, a bound on its
        rank) lets a small store use :func:`low_rank_eigh`, checked to the accumulation dtype's precision."""
        sym = (fim.double() + fim.double().T) / 2
        if not bool(torch.isfinite(sym).all()):
            raise FloatingPointError("the FIM holds non-finite values (the compressed gradients overflowed or are NaN); "
                                     "check the loss and use a float32 or float64 storage dtype")
        found = None
        if samples is not None and (samples + LOW_RANK_OVERSAMPLE) * LOW_RANK_SHARE <= sym.shape[0]:
            found = low_rank_eigh(sym, samples + LOW_RANK_OVERSAMPLE, 100 * torch.finfo(fim.dtype).eps)
        eigvals, eigvecs = found if found is not None else torch.linalg.eigh(sym)
        return cls(eigvals.clamp_min(0.0), eigvecs.to(store_dtype))

    def matrix(self, device=None) -> Tensor:
        """[k, k] float64: F = V diag(lam) V^T rebuilt from the eigendecomposition (on ``device``)."""
        v = self.eigvecs.to(device, torch.float64)
        return (v * self.eigvals.to(device, torch.float64)) @ v.T

    def apply(self, vectors: Tensor, damping: float | str) -> Tensor:
        """(F + damping I)^-1 applied to the rows of ``vectors`` [m, k]; returns vectors.dtype. A relative
        damping "<factor>*mean" is factor times the mean eigenvalue of this block's FIM."""
        damping = absolute_damping(damping, float(self.eigvals.mean()))
        check_invertible(self.eigvals, damping, self.eigvecs.dtype, "the FIM")
        v = self.eigvecs.to(vectors.device, torch.float64)
        scale = 1.0 / (self.eigvals.to(vectors.device, torch.float64) + damping)
        coeffs = vectors.double() @ v
        return ((coeffs * scale) @ v.T).to(vectors.dtype)

    def quadratic(self, vectors: Tensor, damping: float | str) -> Tensor:
        """[m]: v^T (F + damping I)^-1 v for the rows of ``vectors`` (float64)."""
        damping = absolute_damping(damping, float(self.eigvals.mean()))
        check_invertible(self.eigvals, damping, self.eigvecs.dtype, "the FIM")
        coeffs = vectors.double() @ self.eigvecs.to(vectors.device, torch.float64)
        return (coeffs.square() / (self.eigvals.to(vectors.device, torch.float64) + damping)).sum(1)


def to_arrays(fims: list[DampedInverse]) -> dict[str, np.ndarray]:
    arrays = {}
    for j, fim in enumerate(fims):
        arrays[f"block_{j:03d}.eigvals"] = fim.eigvals.cpu().numpy()
        arrays[f"block_{j:03d}.eigvecs"] = fim.eigvecs.cpu().numpy()
    return arrays


def from_arrays(arrays: dict[str, np.ndarray], widths: list[int], where: str) -> list[DampedInverse]:
    """The per-block inverses saved by :func:`to_arrays`, checked against the blocks' widths."""
    out = []
    for j, w in enumerate(widths):
        vals, vecs = arrays.get(f"block_{j:03d}.eigvals"), arrays.get(f"block_{j:03d}.eigvecs")
        if (vals is None or vecs is None or vals.shape != (w,) or vecs.shape != (w, w)
                or vals.dtype.kind != "f" or vecs.dtype.kind != "f"):
            raise CorruptStoreError(f"{where}: block {j}'s eigendecomposition is missing or malformed (expected "
                                    f"[{w}] and [{w}, {w}] floats); run cache() to recompute it")
        out.append(DampedInverse(torch.from_numpy(vals), torch.from_numpy(vecs)))
    return out


def block_fims(grads: Iterable[tuple[Tensor, Tensor | None]], split: Callable[[Tensor], list[Tensor]], widths: list[int],
               n: int, device, dtype: torch.dtype) -> list[DampedInverse]:
    """Per-block FIMs from (grads [r, columns], row weights [r] or None) pairs, normalized by n."""
    accs = [FIMAccumulator(w, device, dtype) for w in widths]
    for rows, weights in grads:
        for acc, block in zip(accs, split(rows)):
            acc.add(block, weights)
    store_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return [acc.finalize(n, store_dtype) for acc in accs]


class TrueFisherGradients:
    """Gradients for the true Fisher of a classifier: with labels drawn from the model
    (``fisher="true_sampled"``, one generator stream per FIM) or, for each class c, with label c
    weighted by p_c (``fisher="true"``, the exact expectation over classes).

    ``gradients(batch, loss)`` -> [B, columns] compressed per-sample gradients of ``loss``."""

    def __init__(self, fisher: str, logits_fn: Callable, gradients: Callable, device):
        self.fisher, self.logits_fn, self.gradients, self.device = fisher, logits_fn, gradients, device

    def logits(self, model: nn.Module, batch) -> Tensor:
        """logits_fn's [B, C] floating logits, or a clear error."""
        logits = self.logits_fn(model, batch)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point() or logits.shape[1] < 2:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"logits_fn must return floating-point logits [B, C] with C >= 2 classes, got {got}")
        return logits

    def loss(self, model: nn.Module, batch_and_labels) -> Tensor:
        """Cross-entropy of (batch, labels): the labels travel with the batch, so every slice of it is consistent."""
        batch, labels = batch_and_labels
        return nn.functional.cross_entropy(self.logits(model, batch), labels, reduction="none")

    def __call__(self, model: nn.Module, batch, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor | None]]:
        with torch.no_grad():
            logits = self.logits(model, batch).double()
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("logits_fn returned non-finite logits")
        probs = torch.softmax(logits, dim=-1)
        if self.fisher == "true_sampled":
            draws = [(torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(self.device), None)]
        else:
            draws = [(torch.full((probs.shape[0],), c, device=self.device), probs[:, c]) for c in range(probs.shape[1])]
        for labels, weights in draws:
            yield self.gradients((batch, labels), self.loss), weights
