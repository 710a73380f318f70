"""Scoring stage: the attribution methods, streamed over the store in row blocks.

score(z_test, z_i) = sum_c w_c <q_c, g_ic> over checkpoints c, per method:

* ``if``: q_c = (F_c + damping I)^-1 g_test (block-diagonal FIM, applied on the query side), w_c = 1;
* ``graddot``: q_c = g_test, w_c = 1;  ``gradcos``: the cosine of g_test and g_i, per checkpoint;
* ``tracin``: q_c = g_test, w_c = the checkpoint's learning rate;
* ``trak``: as ``if`` with the output function's gradients, averaged over checkpoints, times the
  mean over checkpoints of (1 - sigmoid(f_i)) (f_i the output function on z_i at caching time).

Training rows are read shard by shard (checked against the store's record) and cut into blocks of
at most ``rows_per_block``; every consumer (the full matrix, a running top-k, self-influence) sees
each block once, so the [n_test, n_train] matrix is only formed when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from .fim import DampedInverse
from .store import Completion

PRECONDITIONED = ("if", "trak")


@dataclass
class QueryFeatures:
    """Compressed query gradients, one [n_test, columns] tensor per checkpoint (from
    ``Attributor.query_features``); reusable across dampings."""

    grads: list[Tensor]
    signature: str = ""  # the configuration (and model) they were computed with

    @property
    def n_test(self) -> int:
        return self.grads[0].shape[0]


class Scorer:
    """The methods over one store. ``fims(c)`` -> the checkpoint's per-block DampedInverse list.
    ``precondition(c, record, features, damping) -> [n_test, columns]``, if given, replaces the FIM on the
    query side of "if" / "trak" (K-FAC, EK-FAC or no preconditioner; see attribution.kfac)."""

    def __init__(self, method: str, store, offsets: list[int], weights: list[float], dtype: torch.dtype,
                 device: torch.device, fims: Callable[[int, Completion], list[DampedInverse]],
                 precondition: Callable | None = None):
        self.method, self.store, self.offsets, self.weights = method, store, offsets, weights
        self.dtype, self.device, self.fims, self.precondition = dtype, device, fims, precondition

    # ---- queries -------------------------------------------------------------------------------
    def split(self, x: Tensor) -> list[Tensor]:
        """[n, columns] -> the per-block column slices."""
        return [x[:, a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def prepared_queries(self, features: QueryFeatures, damping: float, records: list[Completion]) -> list[Tensor]:
        """Per checkpoint, the query side of the inner product ([n_test, columns], on the device)."""
        out = []
        for c, q in enumerate(features.grads):
            q = q.to(self.device, self.dtype)
            if self.method in PRECONDITIONED and self.precondition is not None:
                q = self.precondition(c, records[c], features, damping)
            elif self.method in PRECONDITIONED:
                fims = self.fims(c, records[c])
                q = torch.cat([fim.apply(block, damping) for fim, block in zip(fims, self.split(q))], dim=1)
            elif self.method == "gradcos":
                q = q / q.double().norm(dim=1, keepdim=True).clamp_min(1e-30).to(q.dtype)
            out.append(q)
        return out

    # ---- training rows -------------------------------------------------------------------------
    def train_blocks(self, records: list[Completion], rows_per_block: int,
                     checkpoints: list[int] | None = None) -> Iterator[tuple[int, list[Tensor], list[Tensor]]]:
        """Yield (start row, [grads [r, columns] per checkpoint], [values [r] per checkpoint, TRAK only]).
        ``checkpoints``: the checkpoint index of each record (default 0, 1, ...)."""
        checkpoints = list(range(len(records))) if checkpoints is None else checkpoints
        first = records[0]
        for c, record in zip(checkpoints[1:], records[1:]):
            if [(s.rows, s.digest) for s in record.shards] != [(s.rows, s.digest) for s in first.shards]:
                raise ValueError(f"checkpoint {c} was cached from different batches than checkpoint {checkpoints[0]} "
                                 "(a shuffling loader?): cache into a new store with a loader that repeats its batches")
        start = 0
        for j, shard in enumerate(first.shards):
            grads = [self.store.read_shard(c, r.shards[j]) for c, r in zip(checkpoints, records)]
            values = ([torch.tensor(self.store.read_values(c, r.shards[j]), dtype=torch.float64)
                       for c, r in zip(checkpoints, records)] if self.method == "trak" else [])
            for s in range(0, shard.rows, rows_per_block):
                yield (start + s, [g[s : s + rows_per_block] for g in grads], [v[s : s + rows_per_block] for v in values])
            start += shard.rows

    def score_blocks(self, queries: list[Tensor], records: list[Completion], rows_per_block: int) -> Iterator[tuple[int, Tensor]]:
        """Yield (start row, scores [n_test, r]) over the whole training set."""
        m = len(queries)
        for start, grads, values in self.train_blocks(records, rows_per_block):
            total = None
            for c, (q, g) in enumerate(zip(queries, grads)):
                g = g.to(self.device, self.dtype)
                part = q @ g.T
                if self.method == "gradcos":
                    part = part / g.double().norm(dim=1).clamp_min(1e-30).to(part.dtype)
                weight = self.weights[c] if self.method == "tracin" else 1.0
                part = part * weight if weight != 1.0 else part
                total = part if total is None else total + part
            if self.method == "trak":
                keep = sum(1.0 - torch.sigmoid(v) for v in values) / m
                total = total / m * keep.to(total.device, total.dtype).unsqueeze(0)
            yield start, total

    def self_influence(self, damping: float, records: list[Completion], rows_per_block: int) -> Tensor:
        """[n_train] float64: each training row's score against itself (the diagonal of attribute(train))."""
        out = torch.zeros(records[0].samples, dtype=torch.float64)
        m = len(records)
        preconditioned = self.method in PRECONDITIONED and self.precondition is None
        fims = [self.fims(c, r) for c, r in enumerate(records)] if preconditioned else None
        for start, grads, values in self.train_blocks(records, rows_per_block):
            total = 0.0
            for c, g in enumerate(grads):
                g = g.to(self.device, self.dtype)
                if self.method == "gradcos":  # the cosine of a row with itself: 1 (0 for a zero row, as in score_blocks)
                    part = (g.double().square().sum(1) > 0).double()
                elif fims is not None:
                    part = sum(f.quadratic(b, damping) for f, b in zip(fims[c], self.split(g)))
                else:
                    part = g.double().square().sum(1)
                total = total + part * (self.weights[c] if self.method == "tracin" else 1.0)
            if self.method == "trak":
                keep = sum(1.0 - torch.sigmoid(v) for v in values) / m
                total = total / m * keep.to(total.device)
            out[start : start + grads[0].shape[0]] = total.cpu()
        return out


class TopK:
    """Running top-k along the training axis of streamed score blocks (largest or smallest).

    Exact and deterministic: among equal scores the lower training index wins, so the result does
    not depend on how the rows were split into blocks or ranks."""

    def __init__(self, k: int, largest: bool):
        self.k, self.largest = k, largest
        self.values: Tensor | None = None
        self.indices: Tensor | None = None

    def add(self, start: int, block: Tensor, indices: Tensor | None = None) -> None:
        """block [n_test, r] scores of training rows start..start+r (or of ``indices`` [n_test, r])."""
        if indices is None:
            indices = torch.arange(start, start + block.shape[1], device=block.device).expand(block.shape[0], -1)
        if self.values is not None:
            block = torch.cat([self.values.to(block.device), block], dim=1)
            indices = torch.cat([self.indices.to(block.device), indices], dim=1)
        key = block if self.largest else -block
        k = min(self.k, key.shape[1])
        values, pos = torch.topk(key, k, dim=1, sorted=False)
        kth = values.min(dim=1, keepdim=True).values
        tied = ((key == kth).sum(1) != (values == kth).sum(1)).nonzero().flatten()
        if tied.numel():  # the k-th score is shared beyond the cut: take the lowest indices among the ties
            by_index = indices[tied].argsort(dim=1, stable=True)
            order = torch.sort(key[tied].gather(1, by_index), dim=1, descending=True, stable=True).indices[:, :k]
            pos[tied] = by_index.gather(1, order)
            values[tied] = key[tied].gather(1, pos[tied])
        chosen = indices.gather(1, pos)
        by_index = chosen.argsort(dim=1, stable=True)
        values, chosen = values.gather(1, by_index), chosen.gather(1, by_index)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices
        values, chosen = values.gather(1, order), chosen.gather(1, order)
        self.values, self.indices = (values if self.largest else -values), chosen
