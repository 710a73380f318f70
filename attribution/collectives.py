"""Every stage under torch.distributed: the FIM from per-rank partials, merged top-k, gathered scores,
the score matrix written by every rank into one file.

A single process is the world of one: the same code runs, without communication.

FIM. Rank r accumulates the Gram matrices of its own shards (those it cached, i % world == r) and
no rank reads the whole store. To make the sum independent of the number of ranks (the store is
byte for byte the one a single process writes), it is a fixed binary tree over ``FIM_LEAVES`` leaves:
leaf p sums, in order, the shards i with i % FIM_LEAVES == bitreverse(p). For a power-of-two world
size up to FIM_LEAVES, rank r's leaves are one subtree, so it sums them locally and the ranks'
subtree sums are added in the tree's order (float addition is commutative, only the grouping
matters). Another world size sums each rank's shards in order and the ranks in rank order
(deterministic for that world size, equal to one process's up to rounding). The per-block sums are
gathered on the block's owner (block j on rank j % world), which computes its eigendecomposition;
the results are broadcast to every rank.

Errors: each local phase runs under :func:`collectively`, so if one rank fails every rank raises
together (no rank is left waiting in a collective).
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from . import streaming
from .fim import DampedInverse
from .process_group import all_gather_objects, broadcast_object, first_error, rank_and_world
from .scoring import TopK
from .store import Store
from .streaming import Block, plan_blocks, read_blocks

ScoreBlocks = Iterator[tuple[int, Tensor]]  # (first training row, scores [n_test, rows]) of this rank's share

FIM_LEAVES = 16


def collectively(step: Callable[[], object]):
    """Run ``step`` on this rank; if any rank fails, every rank raises (the first failing rank's error)."""
    result, error = None, None
    try:
        result = step()
    except (Exception, SystemExit) as err:  # noqa: BLE001 - re-raised below, on every rank (SystemExit: CLI errors)
        error = err
    error = first_error(error)
    if error is not None:
        raise error
    return result


def require_agreement(values: dict) -> None:
    """Collective: every rank must hold the same ``values`` ({what: value}); else every rank raises the
    same ValueError, naming the first thing they disagree on and each rank's value."""
    _, world = rank_and_world()
    if world == 1:
        return
    seen = all_gather_objects(values)
    for key in dict.fromkeys(k for ranks_values in seen for k in ranks_values):
        got = [ranks_values.get(key) for ranks_values in seen]
        if any(value != got[0] for value in got):
            detail = ", ".join(f"rank {r}: {value!r}" for r, value in enumerate(got))
            raise ValueError(f"ranks disagree on {key} ({detail}): under torch.distributed every rank must run the "
                             "same command on the same data")


def agreed(value):
    """Rank 0's ``value`` on every rank (for decisions every rank must take alike)."""
    return broadcast_object(value)


def _bits(n: int) -> int:
    return n.bit_length() - 1


def _bitreverse(x: int, bits: int) -> int:
    return int(format(x, f"0{bits}b")[::-1], 2) if bits else 0


def tree_world(world: int) -> bool:
    """Whether ``world`` ranks reproduce one process's FIM bit for bit (a power of two <= FIM_LEAVES)."""
    return world & (world - 1) == 0 and world <= FIM_LEAVES


def leaf_shards(n_shards: int, position: int) -> range:
    """The shards of leaf ``position`` of the FIM tree, in summation order."""
    return range(_bitreverse(position, _bits(FIM_LEAVES)), n_shards, FIM_LEAVES)


def rank_leaves(rank: int, world: int) -> range:
    """Leaf positions of rank ``rank``: those holding its shards (i % world == rank), one subtree."""
    per = FIM_LEAVES // world
    s = _bitreverse(rank, _bits(world))
    return range(s * per, (s + 1) * per)


def _add(left: list[Tensor] | None, right: list[Tensor] | None) -> list[Tensor] | None:
    if left is None or right is None:
        return left if right is None else right
    for a, b in zip(left, right):
        a.add_(b)
    return left


def _tree_sum(items: Iterable[list[Tensor] | None]) -> list[Tensor] | None:
    """Pairwise sum over a power-of-two number of items: ((0 + 1) + (2 + 3)) + ..."""
    stack: list[tuple[int, list[Tensor] | None]] = []
    for item in items:
        level = 0
        while stack and stack[-1][0] == level:
            item = _add(stack.pop()[1], item)
            level += 1
        stack.append((level, item))
    assert len(stack) == 1, "internal: the tree needs a power-of-two number of items"
    return stack[0][1]


class ShardGram:
    """Per-block sums of g^T g over a sequence of shards, read in row blocks."""

    def __init__(self, store: Store, ckpt: int, record, split: Callable[[Tensor], list[Tensor]], widths: list[int],
                 rows_per_block: int, device, acc_dtype: torch.dtype):
        self.store, self.ckpt, self.record, self.split, self.widths = store, ckpt, record, split, widths
        self.rows_per_block, self.device, self.acc_dtype = rows_per_block, device, acc_dtype

    def __call__(self, shards: Sequence[int]) -> list[Tensor] | None:
        if not len(shards):
            return None
        sums = [torch.zeros(w, w, dtype=self.acc_dtype, device=self.device) for w in self.widths]
        blocks = plan_blocks([self.record.shards[j].rows for j in shards], self.rows_per_block, list(shards))
        for _, (grads,), _ in read_blocks(self.store, [self.ckpt], [self.record], blocks):
            rows = grads.to(self.device, self.acc_dtype)
            for acc, block in zip(sums, self.split(rows)):
                acc.addmm_(block.T, block)
        return sums


def local_partial(gram: ShardGram, n_shards: int, rank: int, world: int) -> list[Tensor] | None:
    """This rank's part of the FIM sum: its subtree (tree_world) or its shards in order."""
    if tree_world(world):
        return _tree_sum(gram(leaf_shards(n_shards, p)) for p in rank_leaves(rank, world))  # one leaf at a time
    return gram(range(rank, n_shards, world))


def _combine(parts: list[Tensor], world: int) -> Tensor:
    """The ranks' partial sums of one block (indexed by rank), added in the canonical order."""
    if tree_world(world):
        order = sorted(range(world), key=lambda r: _bitreverse(r, _bits(world)))
        return _tree_sum([[parts[r]] for r in order])[0]
    total = parts[0]
    for p in parts[1:]:
        total = total.add_(p)
    return total


def empirical_fims(store: Store, ckpt: int, record, split: Callable[[Tensor], list[Tensor]], widths: list[int],
                   rows_per_block: int, device, dtype: torch.dtype, progress: bool = False) -> list[DampedInverse]:
    """The per-block FIMs (1/n) sum_i g_i g_i^T of checkpoint ``ckpt``'s shards, computed by every rank
    together (collective); every rank returns all blocks. ``progress``: a bar over the blocks on rank 0."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    store_dtype = acc_dtype
    gram = ShardGram(store, ckpt, record, split, widths, rows_per_block, device, acc_dtype)
    partial = collectively(lambda: local_partial(gram, len(record.shards), rank, world))
    results: dict[int, DampedInverse] = {}

    def owned(j: int) -> bool:
        return j % world == rank

    def decompose(j: int, total: Tensor) -> None:
        results[j] = DampedInverse.from_fim(total / record.samples, store_dtype, samples=record.samples)

    error = None
    for j, w in enumerate(tqdm(widths, desc=f"FIM eigendecompositions ckpt {ckpt}", disable=not progress or rank != 0,
                               leave=False)):
        mine = partial[j] if partial is not None else torch.zeros(w, w, dtype=acc_dtype, device=device)
        if world > 1:
            parts = [torch.empty_like(mine) for _ in range(world)] if owned(j) else None
            dist.gather(mine, parts, dst=j % world)
        else:
            parts = [mine]
        if owned(j) and error is None:
            try:
                decompose(j, _combine(parts, world))
            except Exception as err:  # noqa: BLE001 - raised on every rank below
                error = err
        del parts
    error = first_error(error)
    if error is not None:
        raise error
    fims = []
    for j, w in enumerate(widths):
        if world > 1:
            eigvals = results[j].eigvals if owned(j) else torch.empty(w, dtype=torch.float64, device=device)
            eigvecs = results[j].eigvecs if owned(j) else torch.empty(w, w, dtype=store_dtype, device=device)
            eigvals, eigvecs = eigvals.to(device).contiguous(), eigvecs.to(device).contiguous()
            dist.broadcast(eigvals, src=j % world)
            dist.broadcast(eigvecs, src=j % world)
            fims.append(DampedInverse(eigvals.cpu(), eigvecs.cpu()))
        else:
            fims.append(DampedInverse(results[j].eigvals.cpu(), results[j].eigvecs.cpu()))
    return fims


# ---- attribute stage ---------------------------------------------------------------------------------
def check_same_queries(queries: list[Tensor]) -> None:
    """Under torch.distributed every rank must score the same queries (each rank scores its share of
    the training rows against all of them)."""
    _, world = rank_and_world()
    if world == 1:
        return
    digest = 0
    for q in queries:
        digest = zlib.crc32(q.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), digest)
    seen = all_gather_objects((tuple(queries[0].shape), digest))
    if len(set(seen)) != 1:
        raise ValueError(f"ranks hold different queries ({seen}): under torch.distributed attribute/top_k/select are "
                         "collective, give every rank the same test loader (or features)")


def merge_top_k(values: Tensor | None, indices: Tensor | None, n_test: int, k: int, largest: bool,
                device) -> tuple[Tensor, Tensor]:
    """Every rank's running top-k merged: the same (values, indices) on every rank, exactly what one
    process streaming all the rows finds (ties to the lower index)."""
    _, world = rank_and_world()
    if world == 1:
        if values is None:
            raise ValueError("the store holds no training rows")
        return values, indices
    local = None if values is None else (values.cpu(), indices.cpu())
    merged = TopK(k, largest)
    for part in all_gather_objects(local):
        if part is not None:
            merged.add(0, part[0].to(device), part[1].to(device))
    return merged.values, merged.indices


def share_columns(matrix: Tensor, bounds: list[tuple[int, int]]) -> Tensor:
    """Every rank's columns bounds[r] of ``matrix`` [n, N] (or entries of a vector [N]) sent to every
    rank, in place: afterwards all ranks hold the whole matrix, bitwise."""
    import torch.distributed as dist

    _, world = rank_and_world()
    if world == 1:
        return matrix
    for src, (lo, hi) in enumerate(bounds):
        if hi > lo:
            part = matrix[..., lo:hi].contiguous()
            dist.broadcast(part, src=src)
            matrix[..., lo:hi] = part
    return matrix


def rank_bounds(blocks: Sequence[Block]) -> list[tuple[int, int]]:
    """Every rank's (first, end) training rows under the streamed plan ``blocks`` (one rank: the whole set)."""
    world = rank_and_world()[1]
    return [streaming.rank_rows(blocks, r, world) for r in range(world)]


def score_matrix(blocks: ScoreBlocks, n_test: int, n_train: int, bounds: list[tuple[int, int]], dtype: torch.dtype,
                 device) -> Tensor:
    """[n_test, n_train]: this rank's score blocks, then every rank's columns (``bounds``) on every rank."""
    scores = torch.zeros(n_test, n_train, dtype=dtype, device=device)

    def fill():
        for start, block in blocks:
            scores[:, start : start + block.shape[1]] = block

    collectively(fill)
    return share_columns(scores, bounds)


def write_score_matrix(path: Path, blocks: ScoreBlocks, n_test: int, n_train: int, dtype: torch.dtype) -> Tensor:
    """Every rank writes its score blocks into one .npy at ``path`` (rank 0 creates it and renames it into
    place when complete; a failure removes the temporary); the matrix over a copy-on-write memory map."""
    rank = rank_and_world()[0]
    tmp = Path(agreed(str(streaming.tmp_path_for(path))))
    numpy_dtype = np.dtype("<f8" if dtype == torch.float64 else "<f4")
    try:
        collectively(lambda: rank == 0 and streaming.create_npy(tmp, (n_test, n_train), numpy_dtype))
        collectively(lambda: streaming.write_columns(tmp, blocks))
        collectively(lambda: rank == 0 and streaming.finish_npy(tmp, path))
    except BaseException:
        if rank == 0:
            tmp.unlink(missing_ok=True)
        raise
    return streaming.open_matrix(path)


def top_k(blocks: ScoreBlocks, n_test: int, k: int, largest: bool, device,
          reduce: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(values, indices) [n_test, min(k, n_train)] of the score blocks of every rank (``reduce``: applied to
    each block first, e.g. its mean over the queries), the same on every rank."""
    best = TopK(k, largest)
    collectively(lambda: [best.add(start, block if reduce is None else reduce(block)) for start, block in blocks])
    return merge_top_k(best.values, best.indices, n_test, k, largest, device)
