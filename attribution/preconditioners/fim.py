"""preconditioner="fim" (the paper's): the block-diagonal Fisher information of the compressed gradients,
F_b = (1/n) sum_i g_ib g_ib^T per block b, kept as eigendecompositions (attribution.fim), so any damping
is applied without recomputing. The empirical Fisher is summed from the store by every rank
(attribution.collectives.empirical_fims); the true Fisher re-reads the loader through the model on rank 0."""
from __future__ import annotations

import functools
import time
from typing import Callable, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from .. import collectives
from ..batches import to_device
from ..fim import DampedInverse, TrueFisherGradients, block_fims, from_arrays, to_arrays
from ..process_group import rank_and_world
from ..scoring import split_columns
from ..store import Completion
from .base import Preconditioner, Setup


class FIMPreconditioner(Preconditioner):
    name = "fim"
    derived_names = ("fim",)

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.widths, self.offsets = self.gradients.widths, self.gradients.offsets
        self._loaded: dict[tuple[int, str], list[DampedInverse]] = {}
        config = self.config
        self._true_fisher = (TrueFisherGradients(config.fisher, config.logits_fn, self.gradients.relabelled, self.device)
                             if config.logits_fn is not None else None)

    # ---- derived data --------------------------------------------------------------------------
    def derive(self, ckpt: int, record: Completion, loader: Iterable, writer) -> None:
        """Collective: every rank takes part in the empirical FIM, rank 0 writes it."""
        if collectives.agreed(collectives.collectively(lambda: self.is_derived(ckpt, record))):
            return
        start = time.perf_counter()
        fims = self._compute(ckpt, record, loader)
        self.gradients.stats["fim_seconds"] += time.perf_counter() - start

        def save():
            if rank_and_world()[0] == 0:
                writer.ensure()
                self.store.save_derived(ckpt, "fim", to_arrays(fims), self.fingerprint(record),
                                        {"fisher": self.config.fisher, "blocks": len(fims), **self.meta()})

        collectives.collectively(save)
        if fims is not None:
            self._loaded[(ckpt, self.fingerprint(record))] = fims

    def _compute(self, ckpt: int, record: Completion, loader: Iterable) -> list[DampedInverse] | None:
        """Collective. The empirical FIM: every rank its own shards. The true Fisher re-reads the loader
        through the model: rank 0 alone (None on the other ranks)."""
        split = functools.partial(split_columns, offsets=self.offsets)
        if self.config.fisher == "empirical":
            return collectives.empirical_fims(self.store, ckpt, record, split, self.widths, self.setup.budget.rows(1),
                                           self.device, self.dtype)

        def true_fisher():
            if rank_and_world()[0] != 0:
                return None
            generator = torch.Generator().manual_seed(self.config.seed)  # one label stream for the whole FIM
            model = self.gradients.model
            batches = tqdm(loader, desc=f"true fisher ckpt {ckpt}", disable=not self.config.progress, leave=False)
            rows = (pair for batch in batches for pair in self._true_fisher(model, to_device(batch, self.device), generator))
            return block_fims(rows, split, self.widths, record.samples, self.device, self.dtype)

        return collectives.collectively(true_fisher)

    def inverses(self, ckpt: int, record: Completion) -> list[DampedInverse]:
        """Every block's FIM eigendecomposition for the data of ``record`` (loaded once)."""
        key = (ckpt, self.fingerprint(record))
        if key not in self._loaded:
            loaded = self.store.load_derived(ckpt, "fim", key[1])
            if loaded is None:
                raise RuntimeError(f"{self.store!r} has no FIM for its current data (checkpoint {ckpt}): call cache() to "
                                   "complete it")
            self._loaded = {k: v for k, v in self._loaded.items() if k[0] != ckpt}
            self._loaded[key] = from_arrays(loaded[0], self.widths, f"{self.store!r} (checkpoint {ckpt}) fim")
        return self._loaded[key]

    # ---- queries -------------------------------------------------------------------------------
    def apply(self, ckpt: int, record: Completion, q: Tensor, damping, blocks: Iterable[int] | None = None) -> Tensor:
        """q [n, columns] with ``blocks`` (default: all) replaced by (F_b + damping I)^-1 q_b, on the device."""
        return self.apply_inverses(self.inverses(ckpt, record), q, damping, blocks)

    def apply_inverses(self, fims: list[DampedInverse], q: Tensor, damping, blocks: Iterable[int] | None = None) -> Tensor:
        """q [n, columns] with ``blocks`` (default: all) replaced by (P_b + damping I)^-1 q_b, P_b the
        matrix of fims[b], on the device."""
        q, o = q.to(self.device, self.dtype).clone(), self.offsets
        for j in range(len(self.widths)) if blocks is None else blocks:
            q[:, o[j] : o[j + 1]] = fims[j].apply(q[:, o[j] : o[j + 1]], damping)
        return q

    def precondition(self, ckpt, record, features, damping) -> Tensor:
        return self.apply(ckpt, record, features.grads[ckpt], damping)

    def quadratic_form(self, ckpt, record, damping) -> Callable[[Tensor], Tensor]:
        fims = self.inverses(ckpt, record)
        return lambda g: sum(f.quadratic(b, damping) for f, b in zip(fims, split_columns(g, self.offsets)))
