"""Approximate nearest-neighbour retrieval over the stored training gradients (FAISS, the optional
``faiss`` extra: ``pip install 'grass_ops[faiss]'``), with exact re-ranking.

Every method's score is an inner product of a query vector with a per-example vector built from the
stored rows alone (concatenated over checkpoints):

* ``ip`` (if, graddot, tracin): the raw stored vectors. With IF the query is preconditioned first,
  (F + damping I)^-1 g_test, so the score is an inner product with the raw rows and maximum-inner-
  product search applies (any damping, no rebuild); TracIn weights the queries by the learning rates.
* ``cosine`` (gradcos): the normalized vectors, against normalized queries.
* ``trak``: the rows times the TRAK weight mean_c(1 - sigmoid(f_i)) / checkpoints.

Before indexing, the vectors are projected on the top ``project`` eigenvectors of their uncentered
second moment (the reduction that preserves inner products best; PCA would center them) and one
coordinate is appended that turns maximum inner product into nearest neighbour (:class:`Transform`),
so any FAISS index over L2 distances applies (``factory``, default "IVF4096,PQ64" over 255 + 1
dimensions). The index finds candidates (``candidates`` per query; the most harmful are the largest
scores of the negated query), then the candidates are re-ranked exactly: their rows are read from the store (one
positioned read per row, each checked against the CRC32 recorded for it when the index was built)
and scored by the same code as the exhaustive path.

The index is derived data of the store (``ckpt_000/index-<mode>/``: the FAISS index serialized with
``faiss.serialize_index`` into a uint8 .npy, never pickled, and the rows' CRC32s), tagged with the
fingerprint of the data it was built from: a stale index is refused, and ``cache()`` rebuilds an
existing index when the store grows.
"""
from __future__ import annotations

import hashlib
import math
import re
import time
import zlib
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .store import CorruptStoreError, Store, StoreError, to_numpy
from .streaming import plan_blocks, read_blocks

DEFAULT_FACTORY = None  # auto_factory(rows)
DEFAULT_PROJECT = 255  # + 1 augmented coordinate: 256 dimensions
MOMENT_ROWS = 65536  # rows sampled for the second moment behind the projection
EXACT_MOMENT_MAX_DIM = 8192  # above: a randomized range finder instead of the [dim, dim] moment
OVERSAMPLE = 64
MODES = ("ip", "cosine", "trak")


class StaleIndexError(StoreError):
    """The store's data changed after the ANN index was built."""


def require_faiss():
    try:
        import faiss
    except ImportError:
        raise ModuleNotFoundError("the ANN index needs FAISS: pip install 'grass_ops[faiss]' (or pip install faiss-cpu)") from None
    return faiss


def mode_of(method: str, normalize: bool = False) -> str:
    """The index a method's scores search: unit-normalized rows for gradcos and normalize=True."""
    return "cosine" if method == "gradcos" or normalize else "trak" if method == "trak" else "ip"


def derived_name(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return f"index-{mode}"


def data_fingerprint(records: Sequence) -> str:
    """The fingerprint of the data of every checkpoint (one checkpoint: its record's)."""
    if len(records) == 1:
        return records[0].fingerprint
    return hashlib.sha256("".join(r.fingerprint for r in records).encode()).hexdigest()[:32]


def auto_factory(n: int) -> str:
    """The default index for n rows: a flat scan below 20,000 rows; else inverted lists (about 4 sqrt(n),
    a power of two: 1,024 for 100,000 rows, 4,096 for a million) with float16 codes (the 8-bit ones
    lose candidates to the quantization of the distance coordinate, PQ codes more, and PQ training takes
    minutes: measured in BENCHMARKS.md)."""
    if n < 20_000:
        return "Flat"
    return f"IVF{2 ** round(math.log2(4 * math.sqrt(n)))},SQfp16"


def default_nprobe(factory: str) -> int | None:
    """An eighth of the inverted lists (None for an index without them)."""
    lists = [int(m) for m in re.findall(r"IVF(\d+)", factory)]
    return max(1, lists[0] // 8) if lists else None


def default_train_size(factory: str, n: int) -> int:
    """Training rows for ``factory``: 40 per IVF list (FAISS warns below 39), at least 10,000, at most n."""
    lists = [int(m) for m in re.findall(r"IVF(\d+)", factory)]
    return min(n, max(10_000, 40 * max(lists, default=0)))


def vectors(mode: str, grads: list[Tensor], values: list[Tensor]) -> Tensor:
    """Index vectors [r, checkpoints * columns] float32 of a block of stored rows (per checkpoint)."""
    parts = []
    for g in grads:
        g = g.float()
        if mode == "cosine":
            g = g / g.double().norm(dim=1, keepdim=True).clamp_min(1e-30).float()
        parts.append(g)
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    if mode == "trak":
        keep = sum(1.0 - torch.sigmoid(v) for v in values) / len(values) / len(grads)
        out = out * keep.float().unsqueeze(1)
    return out.contiguous()


class Transform:
    """Inner products to nearest neighbours: y = P v (P: the top eigenvectors of the uncentered second
    moment of the vectors, the reduction that best preserves inner products; PCA would center them and
    bias each score by a per-row term), then z = [y, sqrt(R^2 - |y|^2)] with R >= every |v| (Bachrach
    et al. 2014). A query q becomes [P q, 0], so |z_q - z_i|^2 = |P q|^2 + R^2 - 2 <P q, y_i>: the
    nearest neighbours are the largest inner products, and an L2 index partitions them well."""

    def __init__(self, projection: Tensor | None, radius: float):
        self.projection, self.radius = projection, float(radius)

    def rows(self, v: Tensor) -> np.ndarray:
        y = v if self.projection is None else v @ self.projection.T
        extra = (self.radius**2 - y.double().square().sum(1, keepdim=True)).clamp_min(0).sqrt().float()
        return torch.cat([y, extra], dim=1).numpy()

    def queries(self, q: Tensor) -> np.ndarray:
        y = q.float() if self.projection is None else q.float() @ self.projection.T
        return torch.cat([y, torch.zeros(y.shape[0], 1)], dim=1).numpy()


def row_crcs(grads: Tensor, storage: str) -> np.ndarray:
    """CRC32 of each stored row's bytes (as the shard file holds them)."""
    rows = to_numpy(grads, storage)
    return np.fromiter((zlib.crc32(memoryview(rows[i]).cast("B")) for i in range(rows.shape[0])), dtype=np.uint32,
                       count=rows.shape[0])


def _faiss_message(err: Exception) -> str:
    return str(err).strip().splitlines()[-1]


def _without_polysemous_training(index) -> None:
    """index_factory turns on polysemous training for 8-bit PQ codes: it only serves Hamming-threshold
    search (not used here) and costs most of the training time (BENCHMARKS.md)."""
    faiss = require_faiss()
    try:
        ivf = faiss.try_extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    for part in (ivf, index):
        if part is not None:
            inner = faiss.downcast_index(part)
            if hasattr(inner, "do_polysemous_training"):
                inner.do_polysemous_training = False


def build(store: Store, records: Sequence, checkpoints: Sequence[int], mode: str, factory: str | None = DEFAULT_FACTORY, *,
          project: int | None = DEFAULT_PROJECT, train_size: int | None = None, nprobe: int | None = None,
          seed: int = 0, rows_per_block: int = 16384) -> dict:
    """Build the index over every stored row and save it as derived data (the caller holds the writer).
    Three passes over the store: (1) every row's CRC32 and norm, and the second moment of a seeded
    random sample of rows (``project``: dimensions kept, None or 0 for none; above 8,192 dimensions a
    randomized range finder, Halko et al. 2011, with one more pass); (2) a seeded random sample of
    ``train_size`` transformed rows to train ``factory`` (FAISS, L2 over the transformed vectors; None:
    :func:`auto_factory`); (3) every row added in order (index id = training row). Returns the summary."""
    faiss = require_faiss()
    name = derived_name(mode)
    n = records[0].samples
    factory = auto_factory(n) if factory is None else factory
    nprobe = default_nprobe(factory) if nprobe is None else int(nprobe)
    disk = hasattr(store, "root")
    requested = train_size
    train_size = default_train_size(factory, n) if train_size is None else min(int(train_size), n)
    if not 1 <= train_size <= n:
        raise ValueError(f"train_size must be in [1, {n}], got {train_size}")
    dim = store.columns * len(records)
    project = min(int(project), dim) if project else None
    started = time.perf_counter()
    try:
        index = faiss.index_factory((project or dim) + 1, factory, faiss.METRIC_L2)
    except RuntimeError as err:
        raise ValueError(f"FAISS cannot build index factory {factory!r} over {(project or dim) + 1} dimensions: "
                         f"{_faiss_message(err)}") from None
    _without_polysemous_training(index)
    blocks = plan_blocks([s.rows for s in records[0].shards], rows_per_block)
    rng = np.random.default_rng(seed)
    moment_rows = np.sort(rng.choice(n, size=min(n, MOMENT_ROWS), replace=False)) if project else np.zeros(0, np.int64)
    picks = np.sort(rng.choice(n, size=train_size, replace=False))
    with_values = mode == "trak"

    def passes():
        return read_blocks(store, checkpoints, records, blocks, with_values)

    crcs = np.zeros((len(records), n if disk else 0), dtype=np.uint32)
    exact = project is not None and dim <= EXACT_MOMENT_MAX_DIM
    moment = torch.zeros(dim, dim, dtype=torch.float64) if exact else None
    if project and not exact:  # randomized: the sample's range through a Gaussian test matrix
        width = min(dim, project + OVERSAMPLE)
        omega = torch.randn(dim, width, generator=torch.Generator().manual_seed(seed))
        sketch = torch.zeros(len(moment_rows), width, dtype=torch.float64)
    radius = 0.0

    def sampled(block, v):
        lo, hi = np.searchsorted(moment_rows, [block.start, block.start + block.rows])
        return slice(lo, hi), v[torch.as_tensor(moment_rows[lo:hi] - block.start, dtype=torch.long)]

    for block, grads, values in passes():  # (1)
        v = vectors(mode, grads, values)
        radius = max(radius, float(v.double().norm(dim=1).max()))
        if project:
            where, chosen = sampled(block, v)
            if exact:
                moment.addmm_(chosen.double().T, chosen.double())
            else:
                sketch[where] = (chosen @ omega).double()
        if disk:
            for c, g in enumerate(grads):
                crcs[c, block.start : block.start + block.rows] = row_crcs(g, store.storage)
    projection = None
    if exact:
        eigvecs = torch.linalg.eigh(moment)[1]
        projection = eigvecs[:, -project:].flip(1).T.float().contiguous()  # [project, dim], largest first
        del moment, eigvecs
    elif project:  # B = Q^T X_sample, then the top right singular vectors of B
        basis = torch.linalg.qr(sketch).Q
        small = torch.zeros(basis.shape[1], dim, dtype=torch.float64)
        for block, grads, values in passes():  # (1b)
            where, chosen = sampled(block, vectors(mode, grads, values))
            small.addmm_(basis[where].T, chosen.double())
        projection = torch.linalg.svd(small, full_matrices=False).Vh[:project].float().contiguous()
        del sketch, basis, small
    transform = Transform(projection, radius * (1 + 1e-6) + 1e-30)
    sample = np.empty((train_size, (project or dim) + 1), dtype=np.float32)
    filled = 0
    for block, grads, values in passes():  # (2)
        lo, hi = np.searchsorted(picks, [block.start, block.start + block.rows])
        if hi > lo:
            rows = vectors(mode, grads, values)[torch.as_tensor(picks[lo:hi] - block.start)]
            sample[filled : filled + hi - lo] = transform.rows(rows)
            filled += hi - lo
    trained = time.perf_counter()
    try:
        index.train(sample)
    except RuntimeError as err:
        raise ValueError(f"FAISS could not train {factory!r} on {train_size} rows: {_faiss_message(err)}") from None
    del sample
    train_seconds = time.perf_counter() - trained
    added = time.perf_counter()
    for _, grads, values in passes():  # (3)
        index.add(transform.rows(vectors(mode, grads, values)))
    add_seconds = time.perf_counter() - added
    if index.ntotal != n:
        raise RuntimeError(f"internal: the index holds {index.ntotal} vectors, the store {n}")
    serialized = faiss.serialize_index(index)
    arrays = {"faiss": serialized, "row_crc32": crcs,
              "projection": projection.numpy() if projection is not None else np.zeros((0, dim), np.float32)}
    meta = {"factory": factory, "mode": mode, "dimension": dim, "project": project, "radius": transform.radius,
            "rows": n, "train_size": train_size, "train_size_requested": requested, "seed": seed,
            "nprobe": nprobe, "checkpoints": list(checkpoints),
            "bytes": int(serialized.nbytes), "train_seconds": train_seconds, "add_seconds": add_seconds,
            "build_seconds": time.perf_counter() - started, "faiss": faiss.__version__}
    store.save_derived(checkpoints[0], name, arrays, data_fingerprint(records), meta)
    return meta


class LoadedIndex:
    """A deserialized index with its transform, its rows' CRC32s and build record."""

    def __init__(self, index, transform: Transform, crcs: np.ndarray, meta: dict, fingerprint: str):
        self.index, self.transform, self.crcs, self.meta, self.fingerprint = index, transform, crcs, meta, fingerprint

    def search(self, queries: Tensor, candidates: int, nprobe: int | None = None) -> np.ndarray:
        """[n, candidates] training rows with the largest inner products with ``queries`` [n, dimension]
        (-1 where the index found fewer)."""
        faiss = require_faiss()
        nprobe = self.meta.get("nprobe") if nprobe is None else nprobe
        if nprobe is not None:
            try:
                faiss.ParameterSpace().set_index_parameter(self.index, "nprobe", int(nprobe))
            except RuntimeError:
                pass  # an index without inverted lists (e.g. HNSW, Flat) has no nprobe
        _, ids = self.index.search(np.ascontiguousarray(self.transform.queries(queries)), int(candidates))
        return ids


def load(store: Store, records: Sequence, checkpoints: Sequence[int], mode: str) -> LoadedIndex:
    """The store's index for ``mode``, refused if missing or built from other data."""
    faiss = require_faiss()
    name = derived_name(mode)
    fingerprint = data_fingerprint(records)
    found = store.load_derived(checkpoints[0], name, fingerprint)
    if found is None:
        recorded = store.derived_meta(checkpoints[0], name)
        if recorded is None:
            raise StoreError(f"{store!r} has no ANN index ({name}): build it with Attributor.build_index() or "
                             f"`grass-attribute index --store S --mode {mode}`")
        raise StaleIndexError(f"the ANN index {name} of {store!r} is stale: it was built from data {recorded[0]}, the store "
                              f"now holds data {fingerprint} (it grew); cache() rebuilds it, or rebuild it with "
                              "Attributor.build_index() / `grass-attribute index`")
    arrays, meta = found
    index = faiss.deserialize_index(np.ascontiguousarray(arrays["faiss"], dtype=np.uint8))
    projection = torch.from_numpy(arrays["projection"]) if arrays["projection"].shape[0] else None
    return LoadedIndex(index, Transform(projection, meta["radius"]), arrays["row_crc32"], meta, fingerprint)


def read_candidates(store: Store, records: Sequence, checkpoints: Sequence[int], rows: np.ndarray, crcs: np.ndarray,
                    with_values: bool) -> tuple[list[Tensor], list[Tensor]]:
    """The stored rows ``rows`` (sorted, distinct) per checkpoint [len(rows), columns] (and their values,
    for TRAK), each checked against its recorded CRC32 (disk stores)."""
    starts = np.asarray(records[0].starts())
    shard_of = np.searchsorted(starts, rows, side="right") - 1
    prefetch = getattr(store, "prefetch_rows", None)
    if prefetch is not None:  # every read queued before the first one blocks (cold page cache)
        for ckpt, record in zip(checkpoints, records):
            for j in np.unique(shard_of):
                prefetch(ckpt, record.shards[int(j)], rows[shard_of == j] - starts[j])
    grads, values = [], []
    for c, (ckpt, record) in enumerate(zip(checkpoints, records)):
        parts, vparts = [], []
        for j in np.unique(shard_of):
            local = rows[shard_of == j] - starts[j]
            shard = record.shards[int(j)]
            got = store.read_rows(ckpt, shard, local)
            if crcs.shape[1]:
                bad = np.nonzero(row_crcs(got, store.storage) != crcs[c, rows[shard_of == j]])[0]
                if bad.size:
                    raise CorruptStoreError(f"{store!r}: shard {shard.index} of checkpoint {ckpt}: rows "
                                            f"{local[bad][:5].tolist()} differ from the ones the ANN index was built from "
                                            "(the shard file was altered); run verify()")
            parts.append(got)
            if with_values:
                vparts.append(torch.tensor(store.read_values(ckpt, shard), dtype=torch.float64)[torch.as_tensor(local)])
        grads.append(torch.cat(parts))
        if with_values:
            values.append(torch.cat(vparts))
    return grads, values


def rerank(scorer, queries: list[Tensor], ids: np.ndarray, k: int, largest: bool, store: Store, records: Sequence,
           checkpoints: Sequence[int], crcs: np.ndarray, rows_per_block: int) -> tuple[Tensor, Tensor]:
    """Exact top-k among each query's candidates ``ids`` [n, candidates] (scores from the same code as the
    exhaustive path). Where fewer than k candidates were found, indices are -1 and values -inf (+inf
    for the smallest)."""
    from .scoring import TopK

    n, width = ids.shape
    k_out = min(k, records[0].samples)
    values_out = torch.full((n, k_out), -float("inf") if largest else float("inf"), dtype=scorer.dtype)
    indices_out = torch.full((n, k_out), -1, dtype=torch.long)
    chunk = max(1, rows_per_block // max(1, width))  # queries per chunk: their candidate rows fit the budget
    for lo in range(0, n, chunk):
        part = ids[lo : lo + chunk]
        rows = np.unique(part[part >= 0])
        if not rows.size:
            continue
        grads, values = read_candidates(scorer.store, records, checkpoints, rows, crcs, scorer.method == "trak")
        for i in range(part.shape[0]):
            found = part[i][part[i] >= 0]
            if not found.size:
                continue
            pos = torch.as_tensor(np.searchsorted(rows, found))
            scores = scorer.score_rows([q[lo + i : lo + i + 1] for q in queries], [g[pos] for g in grads],
                                       [v[pos] for v in values]).cpu()
            best = TopK(k, largest)
            best.add(0, scores, torch.as_tensor(found, dtype=torch.long).unsqueeze(0))
            m = best.values.shape[1]
            values_out[lo + i, :m] = best.values[0].to(values_out.dtype)
            indices_out[lo + i, :m] = best.indices[0]
    return values_out, indices_out
