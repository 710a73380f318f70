"""The Attributor's ANN index stage (the index itself: attribution.index): build it into the store,
rebuild it when the store grows, and answer top-k queries from it with exact re-ranking. Every
function here is collective under torch.distributed: rank 0 builds, the ranks split the queries."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import collectives, streaming
from . import index as index_module
from .config import check_int
from .process_group import all_gather_objects, rank_and_world
from .store import Completion
from .streaming import RowBudget


class AnnIndex:
    """The index of an Attributor's scores (``scorer``: method, store, dtype) over its ``store``."""

    def __init__(self, scorer, weights: list[float], budget: RowBudget, device):
        self.scorer, self.store, self.budget, self.device = scorer, scorer.store, budget, device
        self.mode = index_module.mode_of(scorer.method, scorer.normalize)
        self.weights = weights  # each checkpoint's weight scales its query columns
        self._loaded: dict = {}

    def build(self, records: list[Completion], factory: str | None, project: int | None, train_size: int | None,
              nprobe: int | None, seed: int) -> dict:
        """Build and save the index for this method's scores (see Attributor.build_index); its summary."""
        if factory is not None and (not isinstance(factory, str) or not factory):
            raise TypeError(f"factory must be a FAISS index_factory string, got {factory!r}")
        train_size = None if train_size is None else check_int("train_size", train_size)
        project = None if project is None else check_int("project", project, 0)
        nprobe = None if nprobe is None else check_int("nprobe", nprobe)
        seed = check_int("seed", seed, 0, 2**32)

        def build():
            if rank_and_world()[0] != 0:
                return None
            with self.store.writer():
                return index_module.build(self.store, records, list(range(len(records))), self.mode, factory,
                                          project=project, train_size=train_size, nprobe=nprobe, seed=seed,
                                          rows_per_block=self.budget.rows(1))

        return collectives.agreed(collectives.collectively(build))

    def refresh(self, records: list[Completion], writer) -> None:
        """Rebuild every index of the store that was built from older data (the store grew), with its
        recorded parameters."""
        fingerprint = index_module.data_fingerprint(records)
        stale = collectives.agreed(collectives.collectively(lambda: [
            (mode, found[1]) for mode in index_module.MODES
            if (found := self.store.derived_meta(0, index_module.derived_name(mode))) is not None
            and found[0] != fingerprint]))

        def rebuild():
            if rank_and_world()[0] != 0:
                return
            for mode, meta in stale:
                writer.ensure()
                index_module.build(self.store, records, list(range(len(records))), mode, meta["factory"],
                                   project=meta.get("project"), train_size=meta.get("train_size_requested"),
                                   nprobe=meta.get("nprobe"), seed=meta.get("seed", 0), rows_per_block=self.budget.rows(1))

        if stale:
            collectives.collectively(rebuild)

    def _load(self, records: list[Completion]) -> index_module.LoadedIndex:
        key = (self.mode, index_module.data_fingerprint(records))
        if key not in self._loaded:
            self._loaded = {key: index_module.load(self.store, records, list(range(len(records))), self.mode)}
        return self._loaded[key]

    def _vectors(self, queries: list[Tensor]) -> Tensor:
        """The index's query vectors [n_test, checkpoints * columns] (TracIn: weighted), on the CPU."""
        weights = self.weights or [1.0] * len(queries)
        return torch.cat([q.float() * w for q, w in zip(queries, weights)], dim=1).cpu()

    def search(self, queries: list[Tensor], records: list[Completion], candidates: int, largest: bool,
               nprobe: int | None) -> np.ndarray:
        """[n_test, candidates] training rows the index finds for the prepared ``queries`` (-1 where it finds
        fewer), not re-ranked; every rank searches every query (the same answer on each)."""
        loaded = collectives.collectively(lambda: self._load(records))
        vectors = self._vectors(queries)
        return collectives.collectively(lambda: loaded.search(vectors if largest else -vectors, candidates, nprobe))

    def recorded_crcs(self, records: list[Completion]) -> np.ndarray:
        """The rows' CRC32s recorded by this method's index when it is current ([checkpoints, n_train]), so
        that rows read for a re-rank are checked; else [checkpoints, 0] (no per-row check)."""
        found = self.store.load_derived(0, index_module.derived_name(self.mode), index_module.data_fingerprint(records))
        crcs = None if found is None else found[0]["row_crc32"]
        return crcs if crcs is not None and crcs.shape[1] else np.zeros((len(records), 0), dtype=np.uint32)

    def top_k(self, queries: list[Tensor], records: list[Completion], n_test: int, k: int, largest: bool,
              candidates: int, nprobe: int | None) -> tuple[Tensor, Tensor]:
        """(values, indices) [n_test, min(k, n_train)] from ``candidates`` per query (prepared ``queries``,
        per checkpoint [n_test, columns]), re-ranked exactly; every rank returns them all."""
        loaded = collectives.collectively(lambda: self._load(records))
        vectors = self._vectors(queries)
        rank, world = rank_and_world()
        mine = streaming.share(n_test, rank, world)  # the ranks split the queries

        def local():
            part = vectors[mine.start : mine.stop]
            ids = loaded.search(part if largest else -part, candidates, nprobe)
            return index_module.rerank(self.scorer, [q[mine.start : mine.stop] for q in queries], ids, k, largest,
                                       self.store, records, list(range(len(records))), loaded.crcs, self.budget.rows(1))

        values, indices = collectives.collectively(local)
        if world > 1:
            parts = all_gather_objects((values, indices))
            values, indices = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return values.to(self.device), indices.to(self.device)
