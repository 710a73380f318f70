"""preconditioner="kfac" / "ekfac": Kronecker-factored curvature of each target layer (attribution.kfac),
applied to a query in the full parameter space, then compressed like the training gradients:

    score(z_test, z_i) = < C((P + lambda I)^-1 g_test), C(g_i) >

The statistics come from the cache step's factors (rank 0 merges the ranks' partial sums and runs the
EK-FAC pass); params= blocks are preconditioned by their block FIM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor

from .. import collectives
from ..gradients import check_some_queries
from ..kfac import KroneckerBlock, KroneckerStatistics, per_sample_gradients
from ..process_group import rank_and_world
from ..scoring import QueryFeatures
from ..store import Completion
from .base import Preconditioner, Setup
from .fim import FIMPreconditioner


@dataclass
class KroneckerQueryFeatures(QueryFeatures):
    """Query features of a K-FAC / EK-FAC Attributor: the compressed gradients (``grads``, used by
    params= blocks) and, per checkpoint, every target layer's gradients in the Kronecker eigenbasis
    {layer: [n_test, d_in, d_out]}, from which any damping's queries are two d x d products per layer.
    They hold the queries' full layer gradients: n_test x (sum of d_in * d_out) numbers."""

    rotated: list[dict[str, Tensor]] = field(default_factory=list)


@dataclass
class PreconditionedQueries(QueryFeatures):
    """Queries already preconditioned (and compressed) with ``damping`` (streamed by attribute / top_k)."""

    damping: float | str = 0.0


class KroneckerPreconditioner(Preconditioner):
    """K-FAC (``name`` "kfac") or EK-FAC ("ekfac") of the target layers, the block FIM of params= blocks."""

    needs_factors = True
    full_query_gradients = True

    def __init__(self, setup: Setup):
        super().__init__(setup)
        gradients = self.gradients
        self.layers, self.compressors, self.offsets = gradients.layer_names, gradients.compressors, gradients.offsets
        self.statistics = KroneckerStatistics(self.name, self.layers, self.dtype, self.device, self.store,
                                              self.config.progress)
        self.params_fim = FIMPreconditioner(setup) if gradients.param_names else None
        self.param_blocks = range(len(self.layers), len(gradients.block_names))

    # ---- cache stage ---------------------------------------------------------------------------
    def observer(self, ckpt: int, writer):
        return self.statistics.observer(ckpt, writer)

    def derive(self, ckpt: int, record: Completion, loader: Iterable, writer) -> None:
        """Collective: rank 0 merges the ranks' K-FAC partials and runs the EK-FAC pass; then the params=
        blocks' FIM (every rank)."""
        collectives.collectively(lambda: rank_and_world()[0] == 0 and self.statistics.derive(
            ckpt, record, loader, writer, self.gradients.with_factors, self.meta()))
        if self.params_fim is not None:
            self.params_fim.derive(ckpt, record, loader, writer)

    # ---- queries -------------------------------------------------------------------------------
    def _params_preconditioned(self, ckpt: int, record: Completion, q: Tensor, damping) -> Tensor:
        """The params= blocks of queries [n, columns] preconditioned by their FIM (K-FAC covers the layers)."""
        if self.params_fim is None:
            return q
        return self.params_fim.apply(ckpt, record, q, damping, self.param_blocks)

    def _compressed(self, name: str, block: KroneckerBlock, rotated: Tensor, damping) -> Tensor:
        """C((P + lambda I)^-1 g) of one layer from its rotated gradients [B, d_in, d_out] -> [B, k]."""
        preconditioned = block.unrotate(block.scaled(rotated, damping, repr(name)))
        return self.compressors[name](preconditioned.to(self.dtype).flatten(1)).to(self.dtype)

    def _rotated(self, blocks: dict[str, KroneckerBlock], x: dict[str, Tensor], g: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per layer, the gradients in the Kronecker eigenbasis [B, d_in, d_out] (damping-free; in the run's dtype)."""
        return {n: blocks[n].rotate(per_sample_gradients(x[n], g[n]).double()).to(self.dtype) for n in self.layers}

    def _with_layers(self, grads: Tensor, layer_block) -> Tensor:
        """[B, columns]: ``grads`` with target layer j's block (the first blocks) replaced by layer_block(j, name)."""
        out = grads.to(self.device, self.dtype).clone()
        for j, name in enumerate(self.layers):
            out[:, self.offsets[j] : self.offsets[j + 1]] = layer_block(j, name)
        return out

    def query_features(self, test_loader: Iterable, records: list[Completion], damping=None) -> QueryFeatures:
        """Per checkpoint: damping None -> :class:`KroneckerQueryFeatures` (rotated, reusable across
        dampings); else :class:`PreconditionedQueries` for that damping, preconditioned and compressed
        one layer at a time (a query never holds more than one layer's full gradient)."""

        def per_batch(c: int, batch):
            blocks = self.statistics.blocks(c, records[c])
            g, _, x, go = self.gradients.with_factors(batch)
            if damping is None:
                return g.to(self.dtype), self._rotated(blocks, x, go), g.double().norm(dim=1).cpu()

            def layer(j, name):
                rotated = blocks[name].rotate(per_sample_gradients(x[name], go[name]).double())
                return self._compressed(name, blocks[name], rotated, damping)

            q = self._params_preconditioned(c, records[c], g, damping)
            return self._with_layers(q, layer), None, g.double().norm(dim=1).cpu()

        parts = self.gradients.per_checkpoint(test_loader, per_batch)
        grads = [torch.cat([p[0] for p in checkpoint]) for checkpoint in parts]
        check_some_queries(grads[0])
        if damping is None:
            rotated = [{n: torch.cat([p[1][n] for p in checkpoint]) for n in self.layers} for checkpoint in parts]
            return KroneckerQueryFeatures(grads, self.setup.signature, rotated=rotated)
        norms = [torch.cat([p[2] for p in checkpoint]) for checkpoint in parts]
        return PreconditionedQueries(grads, self.setup.signature, norms=norms, damping=damping)

    def precondition(self, ckpt: int, record: Completion, features: QueryFeatures, damping) -> Tensor:
        if isinstance(features, PreconditionedQueries):
            if features.damping != damping:
                raise ValueError(f"these queries were preconditioned with damping {features.damping!r}, not {damping!r}")
            return features.grads[ckpt].to(self.device, self.dtype)
        if not isinstance(features, KroneckerQueryFeatures) or len(features.rotated) != len(self.gradients.checkpoints):
            raise ValueError(f"preconditioner={self.name!r} needs features from this Attributor's query_features "
                             "(they hold the queries' gradients in the Kronecker eigenbasis)")
        blocks, rotated = self.statistics.blocks(ckpt, record), features.rotated[ckpt]
        q = self._params_preconditioned(ckpt, record, features.grads[ckpt], damping)
        return self._with_layers(q, lambda j, name: self._compressed(name, blocks[name], rotated[name].to(self.device),
                                                                       damping))

    def quadratic_form(self, ckpt, record, damping):
        raise ValueError(f"self_influence with preconditioner={self.name!r} needs each training gradient in full (the "
                         "store keeps them compressed): use the diagonal of attribute(train_loader), or "
                         "preconditioner='fim'")


class KFACPreconditioner(KroneckerPreconditioner):
    name = "kfac"
    derived_names = ("kfac",)


class EKFACPreconditioner(KroneckerPreconditioner):
    name = "ekfac"
    derived_names = ("kfac", "ekfac")
