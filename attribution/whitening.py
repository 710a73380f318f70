"""Symmetric whitening before compression: the store holds C(P^-1/2 g) for a Kronecker-factored P.

With a layer's K-FAC factors A = Q_A diag(a) Q_A^T and G = Q_G diag(b) Q_G^T (attribution.kfac) and the
eigenvalue matrix Lambda [d_in, d_out] (a b^T for K-FAC, EK-FAC's corrected second moments otherwise),

    (P + lambda I)^-1/2 vec(G_n) = vec(Q_A [(Q_A^T G_n Q_G) / sqrt(Lambda + lambda)] Q_G^T),

and an orthogonal Q drops out of every inner product, so the whitened gradient is compressed in the
eigenbasis: R_n = (Q_A^T G_n Q_G) * S with S = (Lambda + lambda)^-1/2, and
<C(R_q), C(R_i)> ~= <R_q, R_i> = g_q^T (P + lambda I)^-1 g_i is the influence score with no further curvature.
R_n = sum_t (Q_A^T x_t)(Q_G^T g_t)^T * S comes from the factors, so FactGraSS keeps its factorization:
its masks pick m_in eigenvectors of A and m_out of G (columns of Q_A, Q_G), the small Kronecker block is
scaled by S restricted to them, then its SJLT compresses it (grass_ops.compressors.Whitened). Flat
compressors take the whole rotated, scaled gradient; LoGra keeps m_in x m_out eigenvectors whole.

Masks in the whitened coordinates: a coordinate (i, j) of R carries E[R_ij^2] = Lambda_ij / (Lambda_ij + lambda)
of second moment (EK-FAC: exactly), which grows with Lambda, so "energy" keeps the m_in rows and m_out columns
with the largest sums of Lambda (K-FAC: the leading eigenvectors of A and G), and FactGraSS the k largest
coordinates of that block; "random" a seeded random subset of each, then FactGraSS's SJLT. :func:`kept_share`
says how much of the whitened second moment a store keeps (the cache's ``stats["whitening_kept_share"]``).

Two passes, both resumable and under torch.distributed:
* pass one (:meth:`Whitening.prepare`): the K-FAC sums of the curvature data (the training data, or
  another loader: a seeded sample of documents), rank r taking batches i % world == r; partial sums with
  the batches they cover are saved every ``kfac.SAVE_SECONDS``; rank 0 merges them, eigendecomposes, runs
  EK-FAC's correction pass (resumable too) and saves the result, ``ckpt_XXX/whitening``, tagged with the
  fingerprint of the curvature data;
* pass two: the cache stage, with each layer's whitened compressor installed in the backward taps.
The whitening is pinned: a store's rows are all whitened alike, so growing the store reuses it, and a
different curvature loader (other data) for a store that has one is refused, never mixed. The damping
is part of the whitening (the store's manifest records it): another damping needs another store.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from grass_ops import compressors as C
from grass_ops._hashing import derive_seed, random_mask
from grass_ops.benchmarking import timed_phase

from .batches import batch_digest, to_device
from .cache import require_reiterable
from .collectives import collectively
from .fim import absolute_damping, check_invertible
from .kfac import (
    KroneckerBlock,
    Saver,
    Sums,
    add_missing,
    blocks_from_arrays,
    blocks_to_arrays,
    corrected_eigenvalues,
    correction_sums,
    factor_sums,
    kfac_blocks,
    merge_disjoint,
)
from .process_group import all_gather_objects, barrier, rank_and_world
from .store import Store
from .store.records import WHITENING_DIR

KINDS = {"kfac-whitened": "kfac", "ekfac-whitened": "ekfac"}
MASKS = ("energy", "random")
RESULT = WHITENING_DIR
_PARTIAL = "whitening_partial."  # + "<kfac|ekfac>.rank<r>" (each rank's sums) or ".merged" (rank 0's catch-up)
_KFAC = "whitening_kfac"  # the K-FAC eigendecompositions between the two sums (EK-FAC's basis)


def data_fingerprint(digests: dict[int, str]) -> str:
    """The curvature data's fingerprint: its batches' digests in order."""
    return hashlib.sha256("".join(digests[i] for i in sorted(digests)).encode()).hexdigest()[:32]


@dataclass
class Curvature:
    """One checkpoint's pinned whitening: per-layer eigendecompositions (``corrected`` set for EK-FAC), the
    fingerprint of the data it came from, its batches and samples, and the damping and masks it uses."""

    blocks: dict[str, KroneckerBlock]
    fingerprint: str
    batches: int
    samples: int
    damping: float | str
    masks: str


def _top(energy: Tensor, m: int) -> Tensor:
    """The m indices of the largest entries (ties to the lower index), sorted ascending."""
    order = torch.argsort(-energy, stable=True)[:m]
    return torch.sort(order).values


def _learned(base: C.Compressor) -> bool:
    """Whether ``base`` selects coordinates by a learned mask (meaningless in the eigenbasis)."""
    masks = [getattr(base, key, None) for key in ("in_mask", "out_mask", "mask")]
    return isinstance(base, C.SelectiveMask) or any(isinstance(m, C.SelectiveMask) for m in masks)


def check_whitenable(base: C.Compressor, name: str) -> None:
    """Refuse, before any pass, a compressor with no whitened form: a learned mask (it picks raw coordinates) or a
    factorized compressor other than FactGraSS and LoGra."""
    if _learned(base):
        raise ValueError(f"layer {name!r}: a learned mask (mask_dir, SelectiveMask) selects coordinates of the raw gradient; "
                         "a whitened store chooses its coordinates in the whitened eigenbasis (whitening_masks)")
    if isinstance(base, C.FactorizedCompressor) and not isinstance(base, (C.FactGraSS, C.LoGra)):
        raise ValueError(f"layer {name!r}: no whitened form of the factorized compressor {type(base).__name__}")


def _coordinates(base: C.Compressor, eig: Tensor, masks: str, name: str) -> tuple[Tensor, Tensor, C.Compressor]:
    """The eigen-coordinates that ``base``'s whitened form keeps: (rows [m_in] of A's eigenvectors, cols [m_out]
    of G's, the inner compressor of the m_in x m_out block). FactGraSS keeps its k_in x k_out mask sizes and its
    SJLT, LoGra its k_in x k_out, a flat compressor takes all d_in x d_out rotated coordinates."""
    d_in, d_out = eig.shape
    check_whitenable(base, name)
    if isinstance(base, C.FactGraSS):
        m_in, m_out, inner, seed = base.k_in, base.k_out, base.projection, base.seed
    elif isinstance(base, C.LoGra):
        m_in, m_out, seed = base.k_in, base.k_out, base.seed
        inner = C.Identity(m_in * m_out)
    else:
        m_in, m_out, inner, seed = d_in, d_out, base, 0
    # each coordinate's whitened second moment Lambda / (Lambda + lambda) grows with Lambda, which keeps ranking the
    # coordinates where that ratio saturates at 1 (a small damping): the energy masks rank by Lambda
    if m_in == d_in and m_out == d_out:
        rows, cols = torch.arange(d_in), torch.arange(d_out)
    elif masks == "energy":
        rows, cols = _top(eig.sum(1), m_in), _top(eig.sum(0), m_out)
    else:
        rows, cols = random_mask(d_in, m_in, derive_seed(seed, 1)), random_mask(d_out, m_out, derive_seed(seed, 2))
    if isinstance(base, C.FactGraSS) and masks == "energy" and base.out_features < m_in * m_out:
        # in the eigenbasis the coordinates are ranked by what they carry: keep the k largest of the block
        # instead of mixing them all into k by the SJLT (no sketch noise from the weak ones)
        inner = C.SelectiveMask(m_in * m_out, indices=_top(eig[rows][:, cols].flatten(), base.out_features))
    return rows, cols, inner


def whitened_compressor(base: C.Compressor, block: KroneckerBlock, damping: float | str, masks: str, name: str
                        ) -> C.Whitened:
    """``base`` (a layer's compressor as built from the spec) in the whitened eigenbasis of ``block``, on the
    coordinates of :func:`_coordinates`. ``masks``: "energy" or "random" (see the module docstring)."""
    return _whitened(base, block, damping, masks, name)[0]


def kept_share(base: C.Compressor, block: KroneckerBlock, damping: float | str, masks: str, name: str) -> float:
    """The share of a layer's whitened second moment that its whitened store reaches: in the eigenbasis a
    coordinate's whitened second moment is Lambda / (Lambda + lambda) (exact for K-FAC's model, EK-FAC's by
    construction), summed over the coordinates the masks keep (those an SJLT mixes count whole), over the sum
    of all of them. 1.0: nothing dropped (an SJLT over all coordinates, or full masks; also a layer without
    any second moment); a small share means the store sees little of what the whitened inner product sums (a
    flat spectrum at small k). Masks (FactGraSS's, LoGra's, a flat random or GraSS mask) count what they keep."""
    return _whitened(base, block, damping, masks, name)[1]


def _whitened(base: C.Compressor, block: KroneckerBlock, damping: float | str, masks: str, name: str
              ) -> tuple[C.Whitened, float]:
    """(:func:`whitened_compressor`, :func:`kept_share`) from one d_in x d_out eigenvalue block."""
    eig = block.eigenvalues()
    lam = absolute_damping(damping, block.mean_eigenvalue())
    check_invertible(eig, lam, block.a_vecs.dtype, f"the Kronecker-factored curvature of {name!r}")
    rows, cols, inner = _coordinates(base, eig, masks, name)
    kept_eig = eig[rows][:, cols]
    compressor = C.Whitened(inner, block.a_vecs[:, rows], block.g_vecs[:, cols], (kept_eig + lam).rsqrt())
    if lam > 0:
        total, kept = float((eig / (eig + lam)).sum()), (kept_eig / (kept_eig + lam)).flatten()
    else:  # every coordinate counts 1 (check_invertible leaves only positive eigenvalues)
        total, kept = float(eig.numel()), torch.ones(kept_eig.numel(), dtype=eig.dtype)
    mask = inner if isinstance(inner, C._Mask) else getattr(inner, "mask", None)  # GraSS: its mask, then its SJLT
    if isinstance(mask, C._Mask):  # a mask drops what it does not keep; an SJLT after it mixes the kept ones whole
        kept = kept[mask.indices]
    return compressor, (float(kept.sum()) / total if total > 0 else 1.0)  # no second moment: nothing to lose


class Whitening:
    """The whitening of an Attributor's target layers: pass one, its record in the store, and the
    whitened compressors of each checkpoint.

    ``factors(batch) -> (x {layer: [B, T, d_in]}, g {layer: [B, T, d_out]})``: one batch's factors at the
    current weights (eval mode). ``bases``: {layer: the compressor built from the spec}."""

    def __init__(self, preconditioner: str, layers: list[str], bases: dict[str, C.Compressor], store: Store,
                 dtype: torch.dtype, device, damping: float | str, masks: str, factors: Callable, progress: bool = True,
                 stats: dict | None = None):
        self.kind = KINDS[preconditioner]
        self.preconditioner, self.layers, self.bases, self.store = preconditioner, list(layers), bases, store
        self.dtype, self.device, self.damping, self.masks = dtype, device, damping, masks
        self.factors, self.progress = factors, progress
        # "whitening_seconds": pass one's wall time, added up; "whitening_kept_share": {checkpoint: {layer: kept_share}}
        self.stats = {} if stats is None else stats
        self.store_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self._loaded: dict[int, tuple[str, Curvature, dict[str, C.Whitened]]] = {}

    # ---- the record ------------------------------------------------------------------------------
    def recorded(self, ckpt: int) -> Curvature | None:
        """The store's whitening of checkpoint ``ckpt`` (None: pass one has not finished)."""
        meta = self.store.derived_meta(ckpt, RESULT)
        if meta is None:
            return None
        fingerprint, info = meta
        cached = self._loaded.get(ckpt)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        arrays, info = self.store.load_derived(ckpt, RESULT, fingerprint)
        if info.get("preconditioner") != self.preconditioner or info.get("layers") != self.layers:
            raise ValueError(f"the store's whitening is {info.get('preconditioner')!r} of layers {info.get('layers')}, not "
                             f"{self.preconditioner!r} of {self.layers}")
        blocks = blocks_from_arrays(arrays, self.layers)
        if self.kind == "ekfac":
            for name, block in blocks.items():
                block.corrected = torch.from_numpy(np.array(arrays[f"corrected.{name}"]))
        curvature = Curvature(blocks, fingerprint, int(info["batches"]), int(info["samples"]), info["damping"], info["masks"])
        whitened = {n: _whitened(self.bases[n], blocks[n], curvature.damping, curvature.masks, n) for n in self.layers}
        self._loaded[ckpt] = (fingerprint, curvature, {n: w.to(self.device) for n, (w, _) in whitened.items()})
        self.stats.setdefault("whitening_kept_share", {})[ckpt] = {n: share for n, (_, share) in whitened.items()}
        return curvature

    def compressors(self, ckpt: int) -> dict[str, C.Whitened]:
        """{layer: its whitened compressor} of checkpoint ``ckpt``; a clear error before pass one."""
        if self.recorded(ckpt) is None:
            raise RuntimeError(f"preconditioner={self.preconditioner!r}: the store holds no whitening for checkpoint {ckpt} "
                               "yet; call cache(train_loader) first (pass one computes it)")
        return self._loaded[ckpt][2]

    def signature(self, n_checkpoints: int) -> str:
        """The fingerprints of every checkpoint's whitening (query features carry them: rows whitened by other
        factors do not compare)."""
        parts = []
        for c in range(n_checkpoints):
            self.compressors(c)  # read from the store (or a clear error before pass one)
            parts.append(self._loaded[c][0])
        return ",".join(parts)

    def check_damping(self, ckpt: int, damping) -> None:
        recorded = self.recorded(ckpt)
        if recorded is not None and damping != recorded.damping:
            raise ValueError(f"this store was whitened with damping {recorded.damping!r}; its rows cannot be re-damped "
                             f"to {damping!r} (preconditioner={self.preconditioner!r} applies the damping before "
                             "compression): cache another store for another damping")

    # ---- pass one --------------------------------------------------------------------------------
    def prepare(self, ckpt: int, loader: Iterable, writer, explicit: bool) -> Curvature:
        """Collective: checkpoint ``ckpt``'s whitening, from the store or computed from ``loader`` (pass one).
        ``explicit``: the caller named this curvature loader, so a store pinned to other data is refused."""
        what = "curvature_loader" if explicit else "train_loader"
        recorded = collectively(lambda: self.recorded(ckpt))
        if recorded is not None:
            if explicit:
                digests = collectively(lambda: self._digests(loader))
                if data_fingerprint(digests) != recorded.fingerprint:
                    raise ValueError(f"the store's whitening (checkpoint {ckpt}) came from other curvature data ({recorded.batches} "
                                     f"batches, fingerprint {recorded.fingerprint}); its rows cannot be mixed with rows whitened "
                                     "by other factors: use the same curvature_loader, none, or a new store")
            return recorded
        if self.store.shard_meta(ckpt):
            raise ValueError(f"the store holds shards of checkpoint {ckpt} but no whitening: it was not cached with "
                             f"preconditioner={self.preconditioner!r} (or its whitening was deleted); use a new store")
        require_reiterable(loader, "pass one reads it before the cache" + " (twice for EK-FAC)" * (self.kind == "ekfac"), what)
        with timed_phase(self.stats, "whitening_seconds"):
            rank, world = rank_and_world()
            if world > 1:
                writer.delegated = rank != 0
                collectively(writer.ensure)
                barrier()
            shares = all_gather_objects(collectively(lambda: self._rank_sums(ckpt, loader, writer, "kfac", factor_sums, what)))
            digests = {int(i): d for share in shares for i, d in share.items()}
            fingerprint = data_fingerprint(digests)
            collectively(lambda: rank == 0 and self._save_kfac(ckpt, loader, writer, digests, what))
            barrier()
            blocks, samples = collectively(lambda: self._kfac_blocks(ckpt, fingerprint))
            arrays = blocks_to_arrays(blocks)
            if self.kind == "ekfac":  # the correction pass, split over the ranks like the sums
                basis = _basis_digest(arrays)
                collectively(lambda: self._rank_sums(ckpt, loader, writer, "ekfac", lambda x, g: correction_sums(blocks, x, g),
                                                     what, basis))
                barrier()
                arrays.update(collectively(lambda: corrected_eigenvalues(
                    self._merged(ckpt, loader, writer, "ekfac", digests, lambda x, g: correction_sums(blocks, x, g), what, basis),
                    self.layers) if rank == 0 else {}))
            meta = {"preconditioner": self.preconditioner, "layers": self.layers, "damping": self.damping,
                    "masks": self.masks, "batches": len(digests), "samples": samples,
                    "normalization": "A: per token, G: per sample", "covered": {str(i): d for i, d in sorted(digests.items())}}
            collectively(lambda: rank == 0 and self._save_result(ckpt, arrays, fingerprint, meta))
            barrier()
            return collectively(lambda: self.recorded(ckpt))

    def _digests(self, loader: Iterable) -> dict[int, str]:
        digests = {i: batch_digest(batch) for i, batch in enumerate(loader)}
        if not digests:
            raise ValueError("the curvature loader yielded no batches")
        return digests

    def _factors(self, batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return self.factors(to_device(batch, self.device))

    def _rank_sums(self, ckpt: int, loader: Iterable, writer, stage: str, batch_sums: Callable, what: str,
                   basis: str | None = None) -> dict[int, str]:
        """This rank's sums of ``stage`` ("kfac": A and G; "ekfac": the correction in the eigenbasis ``basis``) over
        its batches (i % world == rank), resumed from its saved partial; returns {index: digest} of its batches. A
        partial that disagrees with the loader (other data, or another basis) is dropped and the sums restart."""
        rank, world = rank_and_world()
        name = f"{_PARTIAL}{stage}.rank{rank}"
        loaded = self.store.load_derived(ckpt, name, "partial")
        sums = Sums.from_derived(loaded, self.device) if loaded is not None and loaded[1].get("basis") == basis else Sums()
        saver = Saver(self.store, ckpt, name, writer.ensure, {"basis": basis})
        bar = tqdm(desc=f"whitening {stage} ckpt {ckpt}", disable=not self.progress or rank != 0, leave=False)
        restart = True
        while restart:
            mine: dict[int, str] = {}
            restart = False
            for index, batch in enumerate(loader):
                if index % world != rank:
                    continue
                digest = mine[index] = batch_digest(batch)
                if sums.covered.get(index) == digest:
                    continue
                if index in sums.covered:  # other data than the interrupted pass summed (nothing depends on it yet)
                    warnings.warn(f"batch {index} of {what} differs from the one an interrupted pass one summed: its "
                                  "partial sums are dropped and the pass restarts", stacklevel=2)
                    sums, restart = Sums(), True
                    break
                part = batch_sums(*self._factors(batch))
                part.covered = {index: digest}
                sums.add(part)
                saver.maybe(sums)
                bar.update(1)
        bar.close()
        if not mine and rank == 0:
            raise ValueError(f"{what} yielded no batches")
        saver.final(sums)
        return mine

    def _merged(self, ckpt: int, loader: Iterable, writer, stage: str, digests: dict[int, str], batch_sums: Callable,
                what: str, basis: str | None = None) -> Sums:
        """Rank 0: the ranks' partial sums of ``stage`` merged; batches no partial covers (another world size) summed here."""
        writer.ensure()
        chunks = []
        for name in self.store.derived_names(ckpt):
            if name.startswith(f"{_PARTIAL}{stage}."):
                loaded = self.store.load_derived(ckpt, name, "partial")
                if loaded is not None and loaded[1].get("basis") == basis:
                    chunks.append(Sums.from_derived(loaded, self.device))
        sums = merge_disjoint(chunks, digests)
        add_missing(loader, digests, sums, Saver(self.store, ckpt, f"{_PARTIAL}{stage}.merged", writer.ensure, {"basis": basis}),
                    batch_sums, self._factors, f"whitening {stage} ckpt {ckpt}", self.progress,
                    changed=f"of {what} changed during pass one: it must yield the same batches in the same order",
                    short=f"{what} yielded no batches {{missing}} (it yielded them before)")
        return sums

    def _save_kfac(self, ckpt: int, loader: Iterable, writer, digests: dict[int, str], what: str) -> None:
        """Rank 0: the K-FAC eigendecompositions of the merged sums, saved before EK-FAC's pass (whose sums are taken
        in their eigenbasis) and read back by every rank."""
        sums = self._merged(ckpt, loader, writer, "kfac", digests, factor_sums, what)
        blocks = kfac_blocks(sums, self.layers, self.store_dtype)
        self.store.save_derived(ckpt, _KFAC, blocks_to_arrays(blocks), data_fingerprint(digests),
                                {"samples": int(sums.counts.get("samples", 0))})

    def _kfac_blocks(self, ckpt: int, fingerprint: str) -> tuple[dict[str, KroneckerBlock], int]:
        arrays, meta = self.store.load_derived(ckpt, _KFAC, fingerprint)
        return blocks_from_arrays(arrays, self.layers), int(meta["samples"])

    def _save_result(self, ckpt: int, arrays: dict, fingerprint: str, meta: dict) -> None:
        self.store.save_derived(ckpt, RESULT, arrays, fingerprint, meta)
        for name in self.store.derived_names(ckpt):
            if name.startswith(_PARTIAL) or name == _KFAC:
                self.store.remove_derived(ckpt, name)


def _basis_digest(arrays: dict[str, np.ndarray]) -> str:
    """The sha256 of the K-FAC eigenbases an EK-FAC correction is summed in."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode() + np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()[:32]


__all__ = ["Curvature", "KINDS", "MASKS", "RESULT", "Whitening", "check_whitenable", "data_fingerprint", "whitened_compressor"]
