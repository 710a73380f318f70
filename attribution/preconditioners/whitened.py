"""preconditioner="kfac-whitened" / "ekfac-whitened": both sides whitened before compression.

The store holds C((P + lambda I)^-1/2 g_i) for each layer's K-FAC / EK-FAC curvature P (see
attribution.whitening), the queries are compressed the same way, and

    score(z_test, z_i) = < C((P + lambda I)^-1/2 g_test), C((P + lambda I)^-1/2 g_i) >

needs no further curvature: the compressed error is spread evenly over the directions that matter,
instead of being amplified by P^-1 on the query side only ("kfac" / "ekfac"). The curvature is computed
before the cache (pass one, :meth:`prepare`) and pinned in the store with its damping.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from ..gradients import check_some_queries
from ..scoring import QueryFeatures
from ..store import Completion
from ..whitening import KINDS, Whitening
from .base import Preconditioner, Setup


class WhitenedPreconditioner(Preconditioner):
    whitened = True

    def __init__(self, setup: Setup):
        super().__init__(setup)
        gradients, config = self.gradients, self.config
        bases = {n: gradients.compressors[n] for n in gradients.layer_names}
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
        return QueryFeatures(grads, self.setup.signature)

    def precondition(self, ckpt: int, record: Completion, features: QueryFeatures, damping) -> Tensor:
        self.whitening.check_damping(ckpt, damping)
        return features.grads[ckpt].to(self.device, self.dtype)

    def quadratic_form(self, ckpt: int, record: Completion, damping) -> Callable[[Tensor], Tensor]:
        self.whitening.check_damping(ckpt, damping)
        return lambda g: g.double().square().sum(1)


class KFACWhitened(WhitenedPreconditioner):
    name = "kfac-whitened"


class EKFACWhitened(WhitenedPreconditioner):
    name = "ekfac-whitened"


assert set(KINDS) == {KFACWhitened.name, EKFACWhitened.name}
