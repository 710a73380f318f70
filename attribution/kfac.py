"""Kronecker-factored preconditioners (K-FAC, EK-FAC) of linear layers, applied to the queries.

Every compressor C here is linear in the gradient, so a query can be preconditioned in the full
parameter space and then compressed like the training gradients:

    score(z_test, z_i) = < C(P^-1 g_test), C(g_i) >  ~=  g_test^T P^-1 g_i

The store keeps the compressed training gradients exactly as for ``preconditioner="fim"``; P lives
beside them as derived data (``ckpt_XXX/kfac``, ``ckpt_XXX/ekfac``), tagged with the fingerprint of the
shards it came from, so a grown store recomputes it and no preconditioner needs a new cache.

Statistics of a linear layer (factors x [B, T, d_in], g [B, T, d_out]; per-sample gradient
G_n = sum_t x_nt g_nt^T, d_in x d_out, row-major as everywhere in grass_ops):

* A = (1 / #tokens) sum_{n,t} x_nt x_nt^T  and  G = (1 / N) sum_{n,t} g_nt g_nt^T.
  The sums are exact (float64 accumulators, one GEMM per batch in the run's dtype). The normalization
  makes A (x) G estimate the per-sample empirical Fisher F = (1/N) sum_n vec(G_n) vec(G_n)^T at its own
  scale: dropping the cross-token terms of vec(G_n) vec(G_n)^T = sum_{t,s} (x_t x_s^T) (x) (g_t g_s^T)
  and assuming inputs and output gradients independent gives sum_t E[x x^T] (x) E[g g^T] = A (x) G.
  With T = 1 this is the classic K-FAC of the empirical Fisher; absolute dampings mean the same for
  "fim", "kfac" and "ekfac". Every token counts in A (padding tokens too: their g is 0, so they add
  nothing to G or to the gradient, but they do to A).
* K-FAC: P = A (x) G with A = Q_A diag(a) Q_A^T, G = Q_G diag(b) Q_G^T (float64 eigendecompositions,
  eigenvalues clamped at 0), so (P + lambda I)^-1 vec(M) = vec(Q_A [(Q_A^T M Q_G) / (a b^T + lambda)] Q_G^T).
* EK-FAC (George et al. 2018): same eigenbasis, eigenvalues replaced by the exact second moments of
  the per-sample gradients in it, Lambda_ij = (1/N) sum_n ((Q_A^T G_n Q_G)_ij)^2: one more pass over
  the training factors, after A and G are known.
* A relative damping "<f>*mean" is f times the mean of a layer's eigenvalue matrix (a b^T for
  K-FAC, Lambda for EK-FAC), as kronfluence's heuristic (0.1 x the mean).

Interruption and growth: A and G are summed from the factors that the cache step computes anyway
(no extra pass). The sums, with the shards they cover ({index: digest}, added only after the shard
is written), are saved every ``SAVE_SECONDS`` and when this rank's batches are done; the final result
keeps its coverage too. Completing the cache merges disjoint coverages (every rank's, an earlier
completed result when the store grew) and recomputes only the uncovered shards' statistics. The
EK-FAC pass saves its partial sums the same way and resumes after its last save.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .batches import batch_digest
from .fim import absolute_damping, check_invertible
from .process_group import rank_and_world
from .store import Store

SAVE_SECONDS = 30.0  # how often partial statistics are saved during a pass (0: after every batch)
_PARTIAL = "kfac_partial."  # + "rank<r>" (cache stage) or "merged" (completion)
_EK_PARTIAL = "ekfac_partial"


def check_finite(t: Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"{what} holds non-finite values (NaN or inf in the layer's inputs or output gradients "
                                 "of the training data); check the model, the loss and the data")


def eigh64(matrix: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric matrix in float64 (eigenvalues clamped at 0); a clear error
    naming ``what`` for non-finite input or a failed decomposition."""
    sym = matrix.double()
    sym = (sym + sym.T) / 2
    check_finite(sym, what)
    try:
        values, vectors = torch.linalg.eigh(sym)
    except RuntimeError as err:  # torch.linalg.LinAlgError
        raise FloatingPointError(f"the eigendecomposition of {what} failed ({err})") from None
    return values.clamp_min(0.0), vectors


# ---- statistics with the shards they cover ---------------------------------------------------------
@dataclass
class Sums:
    """Running float64 sums per layer with the shards they cover ({shard index: batch digest}).
    ``counts``: per-name counters (samples, tokens per layer)."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    covered: dict[int, str] = field(default_factory=dict)

    def add(self, other: "Sums") -> None:
        for key, value in other.sums.items():
            if key in self.sums:
                self.sums[key] += value.to(self.sums[key].device)
            else:
                self.sums[key] = value.clone()
        for key, value in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + int(value)
        self.covered.update(other.covered)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {key: value.cpu().numpy() for key, value in self.sums.items()}

    def meta(self, **extra) -> dict:
        return {"counts": self.counts, "covered": {str(i): d for i, d in sorted(self.covered.items())}, **extra}

    @classmethod
    def from_derived(cls, loaded, device) -> "Sums":
        arrays, meta = loaded
        sums = {key[4:]: torch.from_numpy(np.array(value)).to(device) for key, value in arrays.items() if key.startswith("sum.")}
        return cls(sums, {k: int(v) for k, v in meta.get("counts", {}).items()},
                   {int(i): str(d) for i, d in meta.get("covered", {}).items()})


def factor_sums(x: dict[str, Tensor], g: dict[str, Tensor]) -> Sums:
    """One batch's K-FAC sums: sum_{n,t} x x^T ("<layer>.A"), sum_{n,t} g g^T ("<layer>.G"), tokens, samples."""
    out = Sums()
    for name in x:
        xs, gs = x[name].reshape(-1, x[name].shape[-1]), g[name].reshape(-1, g[name].shape[-1])
        out.sums[f"{name}.A"] = (xs.T @ xs).double()
        out.sums[f"{name}.G"] = (gs.T @ gs).double()
        out.counts[f"{name}.tokens"] = xs.shape[0]
        out.counts["samples"] = x[name].shape[0]
    return out


def per_sample_gradients(x: Tensor, g: Tensor) -> Tensor:
    """[B, d_in, d_out]: sum_t x_t g_t^T of factors [B, T, d]."""
    return torch.bmm(x.transpose(1, 2), g)


# ---- the preconditioner of one layer ---------------------------------------------------------------
@dataclass
class KroneckerBlock:
    """One layer's K-FAC eigendecomposition; ``corrected`` [d_in, d_out] holds EK-FAC's eigenvalues."""

    a_vals: Tensor  # [d_in] float64
    a_vecs: Tensor  # [d_in, d_in] float32 (float64 for float64 runs)
    g_vals: Tensor  # [d_out] float64
    g_vecs: Tensor  # [d_out, d_out]
    corrected: Tensor | None = None  # [d_in, d_out] float64

    def eigenvalues(self) -> Tensor:
        """[d_in, d_out] float64: a b^T (K-FAC) or the corrected eigenvalues (EK-FAC)."""
        return self.corrected if self.corrected is not None else torch.outer(self.a_vals, self.g_vals)

    def mean_eigenvalue(self) -> float:
        if self.corrected is not None:
            return float(self.corrected.mean())
        return float(self.a_vals.mean() * self.g_vals.mean())

    def rotate(self, m: Tensor) -> Tensor:
        """Q_A^T M Q_G for M [B, d_in, d_out], in M's dtype."""
        return self.a_vecs.to(m.device, m.dtype).T @ m @ self.g_vecs.to(m.device, m.dtype)

    def unrotate(self, r: Tensor) -> Tensor:
        return self.a_vecs.to(r.device, r.dtype) @ r @ self.g_vecs.to(r.device, r.dtype).T

    def scaled(self, rotated: Tensor, damping: float | str, name: str = "the layer") -> Tensor:
        """(P + lambda I)^-1 of a rotated gradient, still in the eigenbasis (float64)."""
        eig = self.eigenvalues().to(rotated.device)
        lam = absolute_damping(damping, self.mean_eigenvalue())
        check_invertible(eig, lam, self.a_vecs.dtype, f"the Kronecker-factored curvature of {name}")
        return rotated.double() / (eig + lam)

    def apply(self, m: Tensor, damping: float | str) -> Tensor:
        """(P + lambda I)^-1 M for per-sample gradients M [B, d_in, d_out] (float64)."""
        return self.unrotate(self.scaled(self.rotate(m.double()), damping))


def blocks_to_arrays(blocks: dict[str, KroneckerBlock]) -> dict[str, np.ndarray]:
    out = {}
    for name, b in blocks.items():
        out.update({f"eig.{name}.a_vals": b.a_vals.cpu().numpy(), f"eig.{name}.a_vecs": b.a_vecs.cpu().numpy(),
                    f"eig.{name}.g_vals": b.g_vals.cpu().numpy(), f"eig.{name}.g_vecs": b.g_vecs.cpu().numpy()})
    return out


def blocks_from_arrays(arrays: dict[str, np.ndarray], names: list[str]) -> dict[str, KroneckerBlock]:
    t = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    return {n: KroneckerBlock(t[f"eig.{n}.a_vals"], t[f"eig.{n}.a_vecs"], t[f"eig.{n}.g_vals"], t[f"eig.{n}.g_vecs"])
            for n in names}


def kfac_blocks(sums: Sums, names: list[str], store_dtype: torch.dtype) -> dict[str, KroneckerBlock]:
    """A = sum x x^T / tokens, G = sum g g^T / samples per layer, eigendecomposed in float64."""
    samples = sums.counts.get("samples", 0)
    if samples <= 0:
        raise ValueError("the K-FAC factors need at least one training sample")
    blocks = {}
    for name in names:
        a_vals, a_vecs = eigh64(sums.sums[f"{name}.A"] / sums.counts[f"{name}.tokens"], f"the K-FAC input factor A of layer {name!r}")
        g_vals, g_vecs = eigh64(sums.sums[f"{name}.G"] / samples, f"the K-FAC gradient factor G of layer {name!r}")
        blocks[name] = KroneckerBlock(a_vals, a_vecs.to(store_dtype), g_vals, g_vecs.to(store_dtype))
    return blocks


def correction_sums(blocks: dict[str, KroneckerBlock], x: dict[str, Tensor], g: dict[str, Tensor],
                    chunk_elements: int = 1 << 24) -> Sums:
    """One batch's EK-FAC sums: sum_n (Q_A^T G_n Q_G)^2 per layer ("<layer>.L"), and the samples."""
    out = Sums()
    for name, block in blocks.items():
        xs, gs = x[name], g[name]
        a, b = block.a_vecs.to(xs.device, xs.dtype), block.g_vecs.to(gs.device, gs.dtype)
        xr, gr = xs @ a, gs @ b  # rotate the factors: Q_A^T G_n Q_G = sum_t (Q_A^T x_t)(Q_G^T g_t)^T
        step = max(1, chunk_elements // (a.shape[0] * b.shape[0]))
        total = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=xs.device)
        for s in range(0, xs.shape[0], step):
            total += per_sample_gradients(xr[s : s + step], gr[s : s + step]).double().square().sum(0)
        out.sums[f"{name}.L"] = total
        out.counts["samples"] = xs.shape[0]
    return out


def add_missing(loader: Iterable, digests: dict[int, str], sums: Sums, saver: Saver, batch_sums: Callable,
                factors: Callable, desc: str, progress: bool, changed: str, short: str) -> None:
    """Add batch_sums(x, g) of every batch of ``digests`` ({index: digest}) that ``sums`` does not cover yet,
    ``factors(batch) -> (x, g)``; saved by ``saver`` as it goes (the caller saves the result). ``changed`` / ``short``: the
    messages (formatted with ``index`` / ``missing``) of a batch whose digest differs and of batches not yielded."""
    missing = set(digests) - set(sums.covered)
    if not missing:
        return
    bar = tqdm(total=len(missing), desc=desc, disable=not progress, leave=False)
    for index, batch in enumerate(loader):
        if index not in missing:
            continue
        if batch_digest(batch) != digests[index]:
            raise ValueError(f"batch {index} " + changed.format(index=index))
        part = batch_sums(*factors(batch))
        part.covered = {index: digests[index]}
        sums.add(part)
        saver.maybe(sums)
        bar.update(1)
        if len(sums.covered) == len(digests):
            break
    bar.close()
    left = set(digests) - set(sums.covered)
    if left:
        raise ValueError(short.format(missing=sorted(left)[:5]))


def corrected_eigenvalues(sums: Sums, layers: list[str]) -> dict[str, np.ndarray]:
    """{"corrected.<layer>": EK-FAC's eigenvalues [d_in, d_out]} from the correction sums (per sample)."""
    out = {}
    for name in layers:
        lam = sums.sums[f"{name}.L"] / sums.counts.get("samples", 0)
        check_finite(lam, f"the EK-FAC eigenvalues of layer {name!r}")
        out[f"corrected.{name}"] = lam.cpu().numpy()
    return out


# ---- merging coverages -----------------------------------------------------------------------------
def merge_disjoint(chunks: list[Sums], digests: dict[int, str]) -> Sums:
    """Sum the chunks whose coverage agrees with ``digests`` (the completion record's) and does not
    overlap a chunk already taken (largest first); the rest is ignored (and recomputed)."""
    total = Sums()
    for chunk in sorted(chunks, key=lambda c: len(c.covered), reverse=True):
        if not chunk.covered or any(digests.get(i) != d for i, d in chunk.covered.items()):
            continue
        if set(chunk.covered) & set(total.covered):
            continue
        total.add(chunk)
    return total


class Saver:
    """Saves partial sums under ``name`` at most every SAVE_SECONDS (always on :meth:`final`)."""

    def __init__(self, store: Store, ckpt: int, name: str, ensure: Callable[[], None], extra: dict | None = None):
        self.store, self.ckpt, self.name, self.ensure, self.extra = store, ckpt, name, ensure, extra or {}
        self.last = time.monotonic()
        self.dirty = False

    def maybe(self, sums: Sums) -> None:
        self.dirty = True
        if time.monotonic() - self.last >= SAVE_SECONDS:
            self.final(sums)

    def final(self, sums: Sums) -> None:
        if not self.dirty:
            return
        self.ensure()
        self.store.save_derived(self.ckpt, self.name, {f"sum.{k}": v for k, v in sums.to_arrays().items()}, "partial",
                                sums.meta(**self.extra))
        self.last, self.dirty = time.monotonic(), False


class CacheObserver:
    """Adds each written shard's K-FAC sums (computed by the cache step) to this rank's running sums
    (see :func:`attribution.cache.write_shards`); saves them periodically and when the rank is done."""

    def __init__(self, store: Store, ckpt: int, writer, device):
        rank, _ = rank_and_world()
        loaded = store.load_derived(ckpt, f"{_PARTIAL}rank{rank}", "partial")
        self.sums = Sums.from_derived(loaded, device) if loaded is not None else Sums()
        self.pending: Sums | None = None
        self.saver = Saver(store, ckpt, f"{_PARTIAL}rank{rank}", writer.ensure)

    def computed(self, x: dict[str, Tensor], g: dict[str, Tensor]) -> None:
        self.pending = factor_sums(x, g)

    def written(self, index: int, digest: str) -> None:
        if self.pending is None:
            raise RuntimeError("internal: a shard was written without its K-FAC statistics")
        self.pending.covered = {index: digest}
        self.sums.add(self.pending)
        self.pending = None
        self.saver.maybe(self.sums)

    def flush(self) -> None:
        self.saver.final(self.sums)


# ---- the derived data of a store ---------------------------------------------------------------------
class KroneckerStatistics:
    """K-FAC / EK-FAC (``kind``) of an Attributor's target layers: statistics during the cache stage and
    the derived data (the queries' side: attribution.preconditioners.kronecker).

    ``factors(batch) -> (grads [B, columns], values, x {layer: [B, T, d_in]}, g {layer: [B, T, d_out]})``
    is the cache step with factors (see :meth:`attribution.compression.BatchCompressor.with_factors`)."""

    def __init__(self, kind: str, layers: list[str], dtype: torch.dtype, device, store: Store, progress: bool = True):
        self.kind, self.layers, self.dtype, self.device = kind, list(layers), dtype, device
        self.store, self.progress = store, progress
        self.store_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self._loaded: dict[int, tuple[str, dict[str, KroneckerBlock]]] = {}

    # ---- cache stage ---------------------------------------------------------------------------
    def observer(self, ckpt: int, writer) -> CacheObserver:
        """The cache stage's observer of checkpoint ``ckpt`` (see attribution.cache.write_shards)."""
        return CacheObserver(self.store, ckpt, writer, self.device)

    def has_all(self, ckpt: int, fingerprint: str) -> bool:
        names = ("kfac", "ekfac") if self.kind == "ekfac" else ("kfac",)
        return all(self.store.has_derived(ckpt, n, fingerprint) for n in names)

    def derive(self, ckpt: int, record, loader: Iterable, writer, factors: Callable, meta: dict) -> None:
        """Rank 0, before the completion record: the K-FAC factors (and the EK-FAC correction) of the
        data in ``record``, from the saved sums plus a pass over the uncovered batches only."""
        if self.has_all(ckpt, record.fingerprint):
            return
        writer.ensure()
        digests = {s.index: s.digest for s in record.shards}
        if not self.store.has_derived(ckpt, "kfac", record.fingerprint):
            chunks = [Sums.from_derived(self.store.load_derived(ckpt, name, "partial"), self.device)
                      for name in self.store.derived_names(ckpt) if name.startswith(_PARTIAL)]
            previous = self.store.completion(ckpt)  # a completed store that grew: its result covers its shards
            if previous is not None and previous.fingerprint != record.fingerprint:
                loaded = self.store.load_derived(ckpt, "kfac", previous.fingerprint)
                if loaded is not None:
                    chunks.append(Sums.from_derived(loaded, self.device))
            sums = merge_disjoint(chunks, digests)
            saver = Saver(self.store, ckpt, f"{_PARTIAL}merged", writer.ensure)
            self._pass(loader, digests, sums, saver, lambda x, g: factor_sums(x, g), factors, f"K-FAC factors ckpt {ckpt}")
            blocks = kfac_blocks(sums, self.layers, self.store_dtype)
            self.store.save_derived(ckpt, "kfac", {**{f"sum.{k}": v for k, v in sums.to_arrays().items()},
                                                   **blocks_to_arrays(blocks)}, record.fingerprint,
                                    sums.meta(**meta, layers=self.layers, normalization="A: per token, G: per sample"))
            for name in self.store.derived_names(ckpt):
                if name.startswith(_PARTIAL):
                    self.store.remove_derived(ckpt, name)
        if self.kind == "ekfac" and not self.store.has_derived(ckpt, "ekfac", record.fingerprint):
            blocks = self._kfac(ckpt, record)
            loaded = self.store.load_derived(ckpt, _EK_PARTIAL, "partial")
            sums = Sums()
            if loaded is not None and loaded[1].get("basis") == record.fingerprint:
                sums = merge_disjoint([Sums.from_derived(loaded, self.device)], digests)
            saver = Saver(self.store, ckpt, _EK_PARTIAL, writer.ensure, {"basis": record.fingerprint})
            self._pass(loader, digests, sums, saver, lambda x, g: correction_sums(blocks, x, g), factors,
                       f"EK-FAC correction ckpt {ckpt}")
            corrected = corrected_eigenvalues(sums, self.layers)
            self.store.save_derived(ckpt, "ekfac", {**{f"sum.{k}": v for k, v in sums.to_arrays().items()}, **corrected},
                                    record.fingerprint, sums.meta(**meta, basis=record.fingerprint))
            self.store.remove_derived(ckpt, _EK_PARTIAL)

    def _pass(self, loader: Iterable, digests: dict[int, str], sums: Sums, saver: Saver, batch_sums: Callable,
              factors: Callable, desc: str) -> None:
        add_missing(loader, digests, sums, saver, batch_sums, lambda batch: factors(batch)[2:], desc, self.progress,
                    changed="differs from the one stored in shard {index}: the train loader must yield the same batches "
                            "in the same order",
                    short="the train loader yielded no batches {missing} for the stored shards")

    # ---- derived data --------------------------------------------------------------------------
    def _kfac(self, ckpt: int, record) -> dict[str, KroneckerBlock]:
        loaded = self.store.load_derived(ckpt, "kfac", record.fingerprint)
        if loaded is None:
            raise RuntimeError(f"{self.store!r} has no K-FAC factors for its current data (checkpoint {ckpt}): call "
                               "cache(train_loader) with preconditioner='kfac' or 'ekfac' to compute them (one pass over "
                               "the training data if it was cached without them)")
        return blocks_from_arrays(loaded[0], self.layers)

    def blocks(self, ckpt: int, record) -> dict[str, KroneckerBlock]:
        """The checkpoint's per-layer preconditioners for the data of ``record`` (loaded once)."""
        cached = self._loaded.get(ckpt)
        if cached is not None and cached[0] == record.fingerprint:
            return cached[1]
        blocks = self._kfac(ckpt, record)
        if self.kind == "ekfac":
            loaded = self.store.load_derived(ckpt, "ekfac", record.fingerprint)
            if loaded is None:
                raise RuntimeError(f"{self.store!r} has no EK-FAC correction for its current data (checkpoint {ckpt}): "
                                   "call cache(train_loader) with preconditioner='ekfac' to compute it")
            for name, block in blocks.items():
                block.corrected = torch.from_numpy(np.array(loaded[0][f"corrected.{name}"]))
        self._loaded[ckpt] = (record.fingerprint, blocks)
        return blocks


def resolved_dampings(blocks: dict[str, KroneckerBlock], damping: float | str) -> dict[str, float]:
    """{layer: the absolute damping added to its eigenvalues}."""
    return {n: absolute_damping(damping, b.mean_eigenvalue()) for n, b in blocks.items()}


__all__ = ["KroneckerBlock", "KroneckerStatistics", "correction_sums", "eigh64", "factor_sums", "kfac_blocks",
           "per_sample_gradients", "resolved_dampings"]
