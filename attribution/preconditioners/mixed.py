"""preconditioner="mixed": TrackStar's task-aware curvature (Chang et al. 2024). Each block's training FIM
is mixed with the second moment of the query set, with w = ``task_weight`` in [0, 1):

    P_b = (1 - w) F_train,b + w F_query,b,    F_query,b = (1/n_test) sum_t q_tb q_tb^T

so that directions every query shares (e.g. a prompt template) get a large curvature and are damped in
the scores.

* F_query: from the compressed query gradients given to attribute / top_k / select (``features.grads``,
  the whole query set, per checkpoint). Each distinct query set gets its own mixed inverse, cached in
  memory under the sha256 of those gradients and the fingerprint of the training data, so a stale one is
  never used. Every rank computes it locally from the same features (checked by check_same_queries).
* Normalization: both matrices are per-example means, so w is the query set's share of the curvature
  whatever the sizes of the two sets.
* Damping: applied to the mixed matrix; a relative damping "<f>*mean" is f times the mean eigenvalue of P_b.
* F_train comes from the stored "fim" derived data (its eigendecomposition, rebuilt in float64): a store
  cached with "fim" serves "mixed" and the other way round. w = 0 uses those inverses as they are ("fim").
* self_influence is the diagonal of attribute(train): the query set is the training set, F_query =
  F_train, so P = F_train and the forms are those of "fim".
"""
from __future__ import annotations

import numbers

from torch import Tensor

from ..batches import batch_digest
from ..fim import DampedInverse, FIMAccumulator
from ..scoring import split_columns
from ..store import Completion
from .base import Setup
from .fim import FIMPreconditioner


class MixedPreconditioner(FIMPreconditioner):
    name = "mixed"

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.task_weight = float(self.config.task_weight)
        self._mixed: dict[tuple[int, str, str], list[DampedInverse]] = {}

    def meta(self) -> dict:
        return {**super().meta(), "preconditioner": FIMPreconditioner.name}  # what it stores: the training FIM

    def mixed_inverses(self, ckpt: int, record: Completion, queries: Tensor) -> list[DampedInverse]:
        """Every block's eigendecomposition of (1 - w) F_train + w F_query, F_query from ``queries``
        [n_test, columns] (checkpoint ``ckpt``'s compressed query gradients); one query set kept per checkpoint."""
        train = self.inverses(ckpt, record)
        if self.task_weight == 0.0:
            return train
        key = (ckpt, self.fingerprint(record), batch_digest(queries))
        if key not in self._mixed:
            self._mixed = {k: v for k, v in self._mixed.items() if k[0] != ckpt}
            self._mixed[key] = self._mix(train, queries)
        return self._mixed[key]

    def _mix(self, train: list[DampedInverse], queries: Tensor) -> list[DampedInverse]:
        w, n_test = self.task_weight, queries.shape[0]
        mixed = []
        for fim, block in zip(train, split_columns(queries, self.offsets)):
            query_moment = FIMAccumulator(block.shape[1], self.device, self.dtype)
            query_moment.add(block)
            matrix = (1.0 - w) * fim.matrix(self.device) + w * query_moment.mean(n_test).double()
            found = DampedInverse.from_fim(matrix, fim.eigvecs.dtype)
            mixed.append(DampedInverse(found.eigvals.cpu(), found.eigvecs.cpu()))
        return mixed

    def precondition(self, ckpt, record, features, damping) -> Tensor:
        queries = features.grads[ckpt]
        return self.apply_inverses(self.mixed_inverses(ckpt, record, queries), queries, damping)


def check_task_weight(value, preconditioner: str) -> float | None:
    """``task_weight`` as a float in [0, 1) for preconditioner "mixed" (which needs one), None for the others
    (which take none); else a ValueError naming task_weight."""
    if preconditioner != MixedPreconditioner.name:
        if value is not None:
            raise ValueError(f"task_weight mixes the query set into the curvature of preconditioner='mixed'; "
                             f"preconditioner={preconditioner!r} takes none (got task_weight={value!r})")
        return None
    if value is None:
        raise ValueError("preconditioner='mixed' needs task_weight, the query set's share of the curvature "
                         "(a float in [0, 1), e.g. 0.5)")
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else float("nan")
    if not 0.0 <= number < 1.0:  # NaN fails too
        raise ValueError(f"task_weight must be a finite float in [0, 1), got {value!r}")
    return number


__all__ = ["MixedPreconditioner", "check_task_weight"]
