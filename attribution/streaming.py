"""Streaming over the store in bounded memory: row blocks, the rank's share of them, and the
consumers that never form more than one block of scores at a time.

Blocks. The training rows are cut into blocks of exactly ``rows_per_block`` rows (the last one may be
shorter): consecutive small shards are coalesced (a store cached with batch size 8 holds 125,000
shards per million documents; scoring them one by one would be a matrix-vector product per shard) and
large shards are cut. The plan depends only on the shard sizes and the budget, so a block is the
same GEMM whichever rank computes it: under torch.distributed, rank r scores a contiguous range of
whole blocks (:func:`share`) and the merged results are bitwise those of one process (at the same
thread count).

Memory. A consumer holds one block of training rows (in the storage dtype and in the compute dtype),
one block of scores and its own buffers; the store is read shard by shard, each shard once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from grass_ops.atomic_files import commit_tmp, tmp_path

from .store import Store


@dataclass(frozen=True)
class Block:
    """Rows start..start+rows of the training set: ``pieces`` = ((shard position, lo, hi), ...), the
    rows lo..hi of the record's shard at that position, in order."""

    start: int
    rows: int
    pieces: tuple[tuple[int, int, int], ...]


def plan_blocks(shard_rows: Sequence[int], rows_per_block: int, shards: Sequence[int] | None = None) -> list[Block]:
    """Blocks of ``rows_per_block`` rows over the shards (``shards``: their positions in the record,
    default 0, 1, ...; ``shard_rows``: their sizes, in that order). ``start`` counts rows within this
    sequence of shards."""
    if rows_per_block < 1:
        raise ValueError(f"rows_per_block must be >= 1, got {rows_per_block}")
    shards = range(len(shard_rows)) if shards is None else shards
    blocks: list[Block] = []
    pieces: list[tuple[int, int, int]] = []
    filled, start = 0, 0
    for j, rows in zip(shards, shard_rows):
        lo = 0
        while lo < rows:
            take = min(rows - lo, rows_per_block - filled)
            pieces.append((j, lo, lo + take))
            filled, lo = filled + take, lo + take
            if filled == rows_per_block:
                blocks.append(Block(start, filled, tuple(pieces)))
                start, filled, pieces = start + filled, 0, []
    if filled:
        blocks.append(Block(start, filled, tuple(pieces)))
    return blocks


def share(n: int, rank: int, world: int) -> range:
    """The contiguous part of range(n) that rank ``rank`` of ``world`` takes (sizes differ by at most one)."""
    return range(n * rank // world, n * (rank + 1) // world)


@dataclass
class RowBudget:
    """Training rows per block, so that one block (its rows in the storage and the compute dtype for
    every checkpoint, and its [n_test, rows] scores) fits in ``memory_budget`` bytes."""

    memory_budget: int
    checkpoints: int
    columns: int
    stored_itemsize: int  # bytes of one stored number
    dtype: torch.dtype  # the compute dtype

    def rows(self, n_test: int) -> int:
        itemsize = torch.finfo(self.dtype).bits // 8
        per_row = self.checkpoints * self.columns * (self.stored_itemsize + itemsize) + n_test * (2 * itemsize + 1)
        return max(1, self.memory_budget // per_row)


def rank_rows(blocks: Sequence[Block], rank: int, world: int) -> tuple[int, int]:
    """(first row, end row) of the training rows that rank ``rank`` scores."""
    part = share(len(blocks), rank, world)
    bounds = [b.start for b in blocks] + [blocks[-1].start + blocks[-1].rows if blocks else 0]
    return bounds[part.start], bounds[part.stop]


def read_blocks(store: Store, checkpoints: Sequence[int], records: Sequence, blocks: Iterable[Block],
                with_values: bool = False) -> Iterator[tuple[Block, list[Tensor], list[Tensor]]]:
    """Yield (block, [rows [r, columns] per checkpoint, storage dtype], [values [r] per checkpoint, float64,
    when ``with_values``]). Each shard is read (and checked) once; only the shard being cut is kept."""
    held: dict[int, tuple[int, Tensor, Tensor | None]] = {}
    for block in blocks:
        grads, values = [], []
        for c, record in zip(checkpoints, records):
            parts, vparts = [], []
            for j, lo, hi in block.pieces:
                if c not in held or held[c][0] != j:
                    shard = record.shards[j]
                    v = (torch.tensor(store.read_values(c, shard), dtype=torch.float64) if with_values else None)
                    held[c] = (j, store.read_shard(c, shard), v)
                _, g, v = held[c]
                parts.append(g[lo:hi])
                if with_values:
                    vparts.append(v[lo:hi])
                if hi == record.shards[j].rows:
                    del held[c]  # this shard is done: keep nothing of it
            grads.append(parts[0] if len(parts) == 1 else torch.cat(parts))
            if with_values:
                values.append(vparts[0] if len(vparts) == 1 else torch.cat(vparts))
        yield block, grads, values


# ---- the score matrix on disk ----------------------------------------------------------------------
def tmp_path_for(path: Path) -> Path:
    """The tmp file that :func:`finish_npy` renames onto ``path`` (grass_ops.atomic_files' tmp name)."""
    return tmp_path(path)


def create_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """An .npy file of ``shape`` (zeros, sparse where the file system allows), written header first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    array.flush()
    del array


def write_columns(path: Path, blocks: Iterable[tuple[int, Tensor]]) -> None:
    """Write each (start, scores [n_test, r]) block into columns start..start+r of the .npy at ``path``
    (one positioned write per row segment: ranks writing other columns of the same file, even from
    other hosts of a shared file system, never touch these bytes)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        (n_test, n_train), _, dtype = read_header(f)
        offset = f.tell()
    fd = os.open(path, os.O_WRONLY)
    try:
        for start, block in blocks:
            rows = np.ascontiguousarray(block.detach().cpu().numpy(), dtype=dtype)
            if rows.shape[0] != n_test or start + rows.shape[1] > n_train:
                raise ValueError(f"internal: block {rows.shape} at column {start} does not fit {(n_test, n_train)}")
            for i in range(n_test):
                os.pwrite(fd, memoryview(rows[i]).cast("B"), offset + (i * n_train + start) * dtype.itemsize)
    finally:
        os.close(fd)


def finish_npy(tmp: Path, path: Path) -> None:
    """fsync the finished file and rename it into place (a reader never sees a partial matrix)."""
    commit_tmp(tmp, path)


def open_matrix(path: Path) -> Tensor:
    """The .npy at ``path`` as a tensor over a copy-on-write memory map (writes stay in memory)."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))
