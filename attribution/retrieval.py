"""Two-stage retrieval: candidates from elsewhere (BM25, the ANN index, any id lists), re-ranked by the
exact gradient score.

:func:`rerank_candidates` scores only each query's candidate rows, read from the store (one positioned
read per row, checked against the CRC32s of the method's ANN index when it is current), with the code of
the exhaustive path (``index.rerank``, ``Scorer.score_rows``): the result is the exhaustive scores
restricted to the candidates. :func:`index_candidates` gives the ANN index's candidates alone. The
sources that need text (BM25) live in the application (``attribution.llm``, ``attribution.evaluation``),
which passes their ids in. Collective under torch.distributed: every rank ranks every query.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from torch import Tensor

from . import collectives
from . import index as index_module
from .config import check_int


def candidate_rows(candidates, n_test: int, n_train: int) -> np.ndarray:
    """[n_test, width] int64: each query's distinct candidate rows, ascending, padded with -1.

    ``candidates``: one sequence of training row indices per query (ints in [0, n_train); -1 entries, the
    ANN index's "none found", are dropped; repeats count once), or an [n_test, m] array / tensor of them."""
    if isinstance(candidates, (Tensor, np.ndarray)):
        candidates = np.asarray(candidates.cpu() if isinstance(candidates, Tensor) else candidates).tolist()
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
        raise TypeError(f"candidates must be one sequence of training row indices per query, got {type(candidates).__name__}")
    if len(candidates) != n_test:
        raise ValueError(f"candidates holds {len(candidates)} lists for {n_test} queries (one per query)")
    rows = []
    for i, ids in enumerate(candidates):
        ids = list(ids)
        if any(isinstance(j, bool) or not isinstance(j, (int, np.integer)) for j in ids):
            raise ValueError(f"candidates[{i}] must hold training row indices (ints), got {ids[:5]!r}")
        found = np.asarray(ids, dtype=np.int64)
        found = found[found != -1]
        bad = found[(found < 0) | (found >= n_train)]
        if bad.size:
            raise ValueError(f"candidates[{i}] holds rows outside [0, {n_train}): {bad[:5].tolist()}")
        rows.append(np.unique(found))
    out = np.full((n_test, max([1, *(r.size for r in rows)])), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : r.size] = r
    return out


def index_candidates(attributor, n: int, *, test_loader: Iterable | None = None, features=None,
                     damping: float | None = None, largest: bool = True, nprobe: int | None = None) -> np.ndarray:
    """[n_test, min(n, n_train)] training rows from the store's ANN index for ``attributor``'s method (built
    with ``Attributor.build_index``), not re-ranked; -1 where the index finds fewer."""
    n = check_int("n", n)
    nprobe = None if nprobe is None else check_int("nprobe", nprobe)
    records, _, queries = attributor._queries(test_loader, damping, features)
    return attributor.ann.search(queries, records, min(n, records[0].samples), largest, nprobe)


def rerank_candidates(attributor, candidates, k: int = 10, *, test_loader: Iterable | None = None, features=None,
                      damping: float | None = None, largest: bool = True) -> tuple[Tensor, Tensor]:
    """(values, indices) [n_test, min(k, n_train)]: each query's k best (``largest=False``: lowest)
    candidates by ``attributor``'s exact score, best first, equal scores to the lower index: the
    exhaustive scores (``Attributor.attribute``) restricted to the candidates. Only the candidate rows are
    read from the store. Where a query has fewer than k distinct candidates, the rest of its row is
    index -1 with value -inf (+inf for the lowest). ``candidates``: see :func:`candidate_rows`."""
    k = check_int("k", k)
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {largest!r}")
    records, feats, queries = attributor._queries(test_loader, damping, features)
    ids = candidate_rows(candidates, feats.n_test, records[0].samples)
    crcs = collectives.collectively(lambda: attributor.ann.recorded_crcs(records))

    def ranked():
        return index_module.rerank(attributor.scorer, queries, ids, k, largest, attributor.store, records,
                                   list(range(len(records))), crcs, attributor.budget.rows(1))

    values, indices = collectives.collectively(ranked)
    return values.to(attributor.device), indices.to(attributor.device)


__all__ = ["candidate_rows", "index_candidates", "rerank_candidates"]
