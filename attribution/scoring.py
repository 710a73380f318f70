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
from typing import Iterator

import torch
from torch import Tensor

from .store import Completion, Store
from .streaming import Block, plan_blocks, read_blocks, share

PRECONDITIONED = ("if", "trak")


@dataclass
class QueryFeatures:
    """Compressed query gradients, one [n_test, columns] tensor per checkpoint (from
    ``Attributor.query_features``); reusable across dampings."""

    grads: list[Tensor]
    signature: str = ""  # the configuration (and model) they were computed with
    norms: list[Tensor] | None = None  # per checkpoint [n_test]: the raw queries' norms where grads are not raw

    def query_norms(self, c: int) -> Tensor:
        """[n_test] float64 norms of checkpoint c's raw compressed query gradients (for normalize)."""
        return self.norms[c] if self.norms is not None else _norms(self.grads[c])

    @property
    def n_test(self) -> int:
        return self.grads[0].shape[0]


def check_features(features, signature: str) -> QueryFeatures:
    """``features`` if they are QueryFeatures computed with ``signature`` (the same configuration and model)."""
    if not isinstance(features, QueryFeatures):
        raise TypeError(f"features must come from Attributor.query_features, got {type(features).__name__}")
    if features.signature != signature:
        raise ValueError("features were computed by an Attributor with another configuration or model (compressor, "
                         "seed, k, gradient function or weights differ); recompute them with this one")
    return features


class Scorer:
    """The methods over one store. ``preconditioner`` (attribution.preconditioners): the query side of
    "if" / "trak" (P^-1 g_test) and the quadratic forms of self-influence; "none" for the other methods.
    ``normalize``: unit-normalized gradients on both sides (per checkpoint, by their compressed norms),
    so no high-norm training example dominates every query: gradcos is GradDot normalized, and "if"
    becomes q^T (F + damping I)^-1 g / (|q| |g|) with F the FIM of the raw gradients."""

    def __init__(self, method: str, store: Store, offsets: list[int], weights: list[float], dtype: torch.dtype,
                 device: torch.device, preconditioner, normalize: bool = False):
        self.method, self.store, self.offsets, self.weights = method, store, offsets, weights
        self.dtype, self.device, self.preconditioner = dtype, device, preconditioner
        self.normalize = normalize or method == "gradcos"

    # ---- queries -------------------------------------------------------------------------------
    def split(self, x: Tensor) -> list[Tensor]:
        """[n, columns] -> the per-block column slices."""
        return split_columns(x, self.offsets)

    def prepared_queries(self, features: QueryFeatures, damping: float, records: list[Completion]) -> list[Tensor]:
        """Per checkpoint, the query side of the inner product ([n_test, columns], on the device)."""
        out = []
        for c in range(len(features.grads)):
            q = self.preconditioner.precondition(c, records[c], features, damping)
            if self.normalize:  # P^-1 (q / |q|) = (P^-1 q) / |q|
                q = q / features.query_norms(c).clamp_min(1e-30).to(q.device, q.dtype).unsqueeze(1)
            out.append(q)
        return out

    # ---- training rows -------------------------------------------------------------------------
    def plan(self, records: list[Completion], rows_per_block: int) -> list[Block]:
        """The row blocks over the whole training set (see streaming.plan_blocks)."""
        return plan_blocks([s.rows for s in records[0].shards], rows_per_block)

    def train_blocks(self, records: list[Completion], rows_per_block: int, checkpoints: list[int] | None = None,
                     part: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, list[Tensor], list[Tensor]]]:
        """Yield (start row, [grads [r, columns] per checkpoint], [values [r] per checkpoint, TRAK only]).
        ``checkpoints``: the checkpoint index of each record (default 0, 1, ...); ``part`` = (rank, world):
        only that rank's contiguous share of the blocks."""
        checkpoints = list(range(len(records))) if checkpoints is None else checkpoints
        first = records[0]
        for c, record in zip(checkpoints[1:], records[1:]):
            if [(s.rows, s.digest) for s in record.shards] != [(s.rows, s.digest) for s in first.shards]:
                raise ValueError(f"checkpoint {c} was cached from different batches than checkpoint {checkpoints[0]} "
                                 "(a shuffling loader?): cache into a new store with a loader that repeats its batches")
        blocks = self.plan(records, rows_per_block)
        mine = [blocks[i] for i in share(len(blocks), *part)]
        for block, grads, values in read_blocks(self.store, checkpoints, records, mine, self.method == "trak"):
            yield block.start, grads, values

    def score_rows(self, queries: list[Tensor], grads: list[Tensor], values: list[Tensor]) -> Tensor:
        """Scores [n_test, r] of the queries (from prepared_queries) against training rows (per checkpoint
        [r, columns]; values [r] per checkpoint for TRAK)."""
        m = len(queries)
        total = None
        for c, (q, g) in enumerate(zip(queries, grads)):
            g = g.to(self.device, self.dtype)
            part = q @ g.T
            if self.normalize:
                part = part / _norms(g).to(part.dtype)
            weight = self.weights[c]
            part = part * weight if weight != 1.0 else part
            total = part if total is None else total + part
        if self.method == "trak":
            keep = sum(1.0 - torch.sigmoid(v) for v in values) / m
            total = total / m * keep.to(total.device, total.dtype).unsqueeze(0)
        return total

    def score_blocks(self, queries: list[Tensor], records: list[Completion], rows_per_block: int,
                     part: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, Tensor]]:
        """Yield (start row, scores [n_test, r]) over the training set (this rank's share of it)."""
        for start, grads, values in self.train_blocks(records, rows_per_block, part=part):
            yield start, self.score_rows(queries, grads, values)

    def self_influence(self, damping: float, records: list[Completion], rows_per_block: int,
                       part: tuple[int, int] = (0, 1)) -> Tensor:
        """[n_train] float64: each training row's score against itself (the diagonal of attribute(train));
        with ``part`` = (rank, world), only that rank's rows are filled (the others are 0)."""
        out = torch.zeros(records[0].samples, dtype=torch.float64)
        m = len(records)
        forms = [self.preconditioner.quadratic_form(c, r, damping) for c, r in enumerate(records)]
        for start, grads, values in self.train_blocks(records, rows_per_block, part=part):
            total = 0.0
            for c, g in enumerate(grads):
                g = g.to(self.device, self.dtype)
                if self.method == "gradcos":  # the cosine of a row with itself: 1 (0 for a zero row, as in score_blocks)
                    part = (g.double().square().sum(1) > 0).double()
                else:
                    part = forms[c](g)
                if self.normalize and self.method != "gradcos":
                    part = part / _norms(g).square()
                total = total + part * self.weights[c]
            if self.method == "trak":
                keep = sum(1.0 - torch.sigmoid(v) for v in values) / m
                total = total / m * keep.to(total.device)
            out[start : start + grads[0].shape[0]] = total.cpu()
        return out


def split_columns(x: Tensor, offsets: list[int]) -> list[Tensor]:
    """[n, columns] -> the per-block column slices x[:, offsets[j]:offsets[j + 1]]."""
    return [x[:, a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _norms(x: Tensor) -> Tensor:
    """Row norms [r] in float64, clamped away from 0 (a zero row scores 0)."""
    return x.double().norm(dim=1).clamp_min(1e-30)


class TopK:
    """Running top-k along the training axis of streamed score blocks (largest or smallest).

    Exact and deterministic: among equal scores the lower training index wins, so the result does
    not depend on how the rows were split into blocks or ranks. Each block is reduced to its own
    top-k before it meets the running buffers, so memory is one block plus [n_test, 2k]."""

    def __init__(self, k: int, largest: bool):
        self.k, self.largest = k, largest
        self.values: Tensor | None = None
        self.indices: Tensor | None = None

    def add(self, start: int, block: Tensor, indices: Tensor | None = None) -> None:
        """block [n_test, r] scores of training rows start..start+r (or of ``indices`` [n_test, r])."""
        if block.shape[1] == 0:
            return
        values, pos = _select(block, indices, min(self.k, block.shape[1]), self.largest)
        chosen = pos + start if indices is None else indices.gather(1, pos)
        if self.values is not None:
            merged = torch.cat([self.values.to(values.device), values], dim=1)
            merged_idx = torch.cat([self.indices.to(chosen.device), chosen], dim=1)
            values, pos = _select(merged, merged_idx, min(self.k, merged.shape[1]), self.largest)
            chosen = merged_idx.gather(1, pos)
        by_index = chosen.argsort(dim=1, stable=True)  # best first, equal scores by index
        values, chosen = values.gather(1, by_index), chosen.gather(1, by_index)
        order = torch.sort(values, dim=1, descending=self.largest, stable=True).indices
        self.values, self.indices = values.gather(1, order), chosen.gather(1, order)


def _select(scores: Tensor, indices: Tensor | None, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """(values, positions) [n, k] of the k best scores per row; where the k-th best score is shared
    beyond the cut, the lowest ``indices`` (default: positions) among the ties are taken."""
    values, pos = torch.topk(scores, k, dim=1, largest=largest, sorted=False)
    kth = (values.min if largest else values.max)(dim=1, keepdim=True).values
    tied = ((scores == kth).sum(1) != (values == kth).sum(1)).nonzero().flatten()
    if tied.numel():
        sub = scores[tied]
        by_index = (torch.arange(sub.shape[1], device=sub.device).expand_as(sub) if indices is None
                    else indices[tied].argsort(dim=1, stable=True))
        order = torch.sort(sub.gather(1, by_index), dim=1, descending=largest, stable=True).indices[:, :k]
        pos[tied] = by_index.gather(1, order)
        values[tied] = sub.gather(1, pos[tied])
    return values, pos
