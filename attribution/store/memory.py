"""The in-memory store (``store=None``): the same interface and checks as the disk store, nothing on disk."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor

from .records import STORAGE_DTYPES, Completion, ShardInfo, _check_against_record, _check_storage_range


class MemoryStore:
    """Everything in RAM (``store=None``); the same interface and checks as :class:`DiskStore`."""

    def __init__(self, columns: int, storage: str = "float32"):
        self.columns, self.storage = int(columns), storage
        self.shards: dict[int, dict[int, tuple[Tensor, dict]]] = {}
        self.records: dict[int, Completion] = {}
        self.derived: dict[tuple[int, str], tuple[str, dict, dict]] = {}

    def __repr__(self) -> str:
        return "MemoryStore()"

    @contextlib.contextmanager
    def writer(self):
        yield

    delegated_writer = writer

    def shard_meta(self, ckpt: int) -> dict[int, dict]:
        return {i: meta for i, (_, meta) in sorted(self.shards.get(ckpt, {}).items())}

    def write_shard(self, ckpt: int, index: int, grads: Tensor, meta: dict) -> None:
        stored = grads.detach().to("cpu", STORAGE_DTYPES[self.storage]).clone()
        _check_storage_range(stored, self.storage, index)
        self.shards.setdefault(ckpt, {})[index] = (stored, {**meta, "files": {}})

    def shard_info(self, ckpt: int, index: int, meta: dict) -> ShardInfo:
        return ShardInfo(index, int(meta["rows"]), meta["digest"], {})

    def completion(self, ckpt: int) -> Completion | None:
        return self.records.get(ckpt)

    def write_completion(self, ckpt: int, record: Completion) -> None:
        self.records[ckpt] = record

    def require_complete(self, ckpt: int) -> Completion:
        record = self.completion(ckpt)
        _check_against_record(set(self.shards.get(ckpt, {})), record, f"the in-memory store (checkpoint {ckpt})")
        return record

    def read_shard(self, ckpt: int, shard: ShardInfo) -> Tensor:
        return self.shards[ckpt][shard.index][0]

    def read_values(self, ckpt: int, shard: ShardInfo) -> list[float]:
        return self.shards[ckpt][shard.index][1]["values"]

    def read_rows(self, ckpt: int, shard: ShardInfo, rows) -> Tensor:
        return self.shards[ckpt][shard.index][0][torch.as_tensor(rows, dtype=torch.long)]

    def save_derived(self, ckpt: int, name: str, arrays: dict[str, np.ndarray], fingerprint: str, meta: dict) -> None:
        self.derived[(ckpt, name)] = (fingerprint, {k: np.array(v) for k, v in arrays.items()}, dict(meta))

    def has_derived(self, ckpt: int, name: str, fingerprint: str) -> bool:
        entry = self.derived.get((ckpt, name))
        return entry is not None and entry[0] == fingerprint

    def load_derived(self, ckpt: int, name: str, fingerprint: str):
        entry = self.derived.get((ckpt, name))
        if entry is None or entry[0] != fingerprint:
            return None
        return entry[1], entry[2]

    def derived_names(self, ckpt: int) -> list[str]:
        return sorted(name for c, name in self.derived if c == ckpt)

    def remove_derived(self, ckpt: int, name: str) -> None:
        self.derived.pop((ckpt, name), None)

    def derived_meta(self, ckpt: int, name: str) -> tuple[str, dict] | None:
        entry = self.derived.get((ckpt, name))
        return None if entry is None else (entry[0], dict(entry[2]))
