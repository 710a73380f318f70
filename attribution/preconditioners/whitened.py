"""preconditioner="kfac-whitened" / "ekfac-whitened": both sides whitened before compression.

The store holds C((P + lambda I)^-1/2 g_i) for each layer's K-FAC / EK-FAC curvature P (see
attribution.whitening), the queries are compressed the same way, and

    score(z_test, z_i) = < C((P + lambda I)^-1/2 g_test), C((P + lambda I)^-1/2 g_i) >

needs no further curvature: the compressed error is spread evenly over the directions that matter,
instead of being amplified by P^-1 on the query side only ("kfac" / "ekfac"). The curvature is computed
before the cache (pass one, :meth:`prepare`) and pinned in the store with its damping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from ..gradients import check_some_queries
from ..scoring import QueryFeatures
from ..store import Completion
from ..whitening import KINDS, Whitening, check_whitenable
from .base import Preconditioner, Setup


@dataclass
class WhitenedQueries(QueryFeatures):
    """Query features compressed by a store's whitened compressors; ``whitening``: their fingerprints."""

    whitening: str = ""


class WhitenedPreconditioner(Preconditioner):
    whitened = True

    def __init__(self, setup: Setup):
        super().__init__(setup)
        gradients, config = self.gradients, self.config
        bases = {n: gradients.compressors[n] for n in gradients.layer_names}
        for name, base in bases.items():  # refused before any pass
            check_whitenable(base, name)
        self.whitening = Whitening(self.name, gradients.layer_names, bases, self.store, self.dtype, self.device,
                                   config.damping, config.whitening_masks, gradients.layer_factors, config.progress,
                                   gradients.stats)
        self._installed: int | None = None
        gradients.compress.block(f"preconditioner={self.name!r} compresses in the whitened eigenbasis of the store's "
                                 "curvature: cache(train_loader) computes it first (or an Attributor of a cached store loads it)")

    def install(self, ckpt: int) -> None:
        """Checkpoint ``ckpt``'s whitened compressors in the cache step's taps."""
        compressors = self.whitening.compressors(ckpt)
        if self._installed != ckpt or any(self.gradients.compress.blocks[n] is not c for n, c in compressors.items()):
            self.gradients.compress.install(compressors)
            self._installed = ckpt

    # ---- cache stage ---------------------------------------------------------------------------
    def prepare(self, ckpt: int, train_loader: Iterable, writer, curvature_loader: Iterable | None) -> None:
        """Collective, before checkpoint ``ckpt``'s cache: pass one (or the store's whitening), installed."""
        explicit = curvature_loader is not None
        self.whitening.prepare(ckpt, curvature_loader if explicit else train_loader, writer, explicit)
        self.install(ckpt)

    def meta(self) -> dict:
        return {"preconditioner": self.name, "damping": self.config.damping, "masks": self.config.whitening_masks}

    # ---- queries -------------------------------------------------------------------------------
    def query_features(self, test_loader: Iterable, records: list[Completion], damping=None) -> QueryFeatures:
        if damping is not None:
            for c in range(len(records)):
                self.whitening.check_damping(c, damping)

        def per_batch(c: int, batch) -> Tensor:
            self.install(c)
            return self.gradients(batch)[0]

        grads = [torch.cat(parts) for parts in self.gradients.per_checkpoint(test_loader, per_batch)]
        check_some_queries(grads[0])
        return WhitenedQueries(grads, self.setup.signature, whitening=self.whitening.signature(len(grads)))

    def features_of(self, grads: list[Tensor]) -> QueryFeatures:
        """Precomputed query gradients taken as compressed by this store's whitened compressors (compress_batch's)."""
        return WhitenedQueries(grads, self.setup.signature, whitening=self.whitening.signature(len(grads)))

    def precondition(self, ckpt: int, record: Completion, features: QueryFeatures, damping) -> Tensor:
        self.whitening.check_damping(ckpt, damping)
        n = len(self.gradients.checkpoints)
        if not isinstance(features, WhitenedQueries) or features.whitening != self.whitening.signature(n):
            raise ValueError(f"these query features were not whitened by this store's curvature (preconditioner="
                             f"{self.name!r}): compute them with this Attributor's query_features")
        return features.grads[ckpt].to(self.device, self.dtype)

    def quadratic_form(self, ckpt: int, record: Completion, damping) -> Callable[[Tensor], Tensor]:
        self.whitening.check_damping(ckpt, damping)
        return lambda g: g.double().square().sum(1)


class KFACWhitened(WhitenedPreconditioner):
    name = "kfac-whitened"


class EKFACWhitened(WhitenedPreconditioner):
    name = "ekfac-whitened"


assert set(KINDS) == {KFACWhitened.name, EKFACWhitened.name}
