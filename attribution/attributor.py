"""The Attributor: a thin facade over the stages

    capture (capture.py) -> compress (compress.py, compiled.py) -> cache (cache.py, store.py)
    -> preconditioning (fim.py) -> scoring (scoring.py)

Sign convention: score(z_i, z_test) = g_test^T (F + damping I)^-1 g_i with F = (1/n) sum_i g_i g_i^T per
block (influence functions); a positive score means that training on z_i lowers the test loss.
GradDot drops the FIM, GradCos normalizes GradDot, TracIn sums GradDot over checkpoints weighted by
their learning rates, TRAK averages the FIM-preconditioned scores of the output function's gradients
over checkpoints and weights train example i by the mean of (1 - sigmoid(f_i)).

The iFVP is applied to the query side: n_test is usually far smaller than n_train, so
(F + damping I)^-1 costs n_test * k^2 instead of n_train * k^2, and the store keeps the raw
compressed gradients, so a new damping needs no new cache.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

import grass_ops
from grass_ops.compressors import Compressor

from . import fim as fim_module
from . import index as index_module
from . import parallel, streaming
from .batches import batch_digest, to_device
from .cache import LazyWriter, cache_checkpoint, require_reiterable
from .checkpoints import Checkpoints
from .compress import BatchCompressor, build_compressors
from .distributed import all_gather_objects, is_distributed, rank_and_world
from .fim import DampedInverse, TrueFisherGradients, check_damping
from .kfac import KRONECKER, KroneckerPreconditioner, check_preconditioner
from .layers import LayerInfo, find_layers
from .manifest import fingerprint_algorithm, model_fingerprint
from .param_grads import find_params
from .scoring import PRECONDITIONED, QueryFeatures, Scorer, TopK
from .store import STORAGE_DTYPES, Completion, CorruptStoreError, DiskStore, MemoryStore, read_json, refuse_inside_store

METHODS = ("if", "graddot", "gradcos", "tracin", "trak")
PARAM_SEED_TAG = 1 << 20  # params= blocks draw their seeds from derive_seed(seed, PARAM_SEED_TAG, ...)
FISHERS = ("empirical", "true", "true_sampled")


def _check_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _check_gradient_matrix(t, columns: int, what: str, rows: str) -> None:
    """A float tensor [rows, columns] of precomputed compressed gradients, else a ValueError naming it."""
    if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != columns or not t.is_floating_point():
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what} must be a float tensor [{rows}, {columns}], got {got}")


def _portable(spec):
    """A compressor spec without file locations (learned masks are identified by their digest), so a
    store and its masks can move together."""
    if isinstance(spec, dict):
        return {k: _portable(v) for k, v in spec.items() if not (k == "path" and "digest" in spec)}
    return spec


class Attributor:
    """Gradient-based data attribution with compressed per-sample gradients.

    model: an nn.Module; loss_fn(model, batch) -> Tensor[B] per-sample losses (floating point).
    method: "if" | "graddot" | "gradcos" | "tracin" | "trak".
    compressor: a spec string ("factgrass", "logra", "sjlt", "grass", "random_mask", "gaussian", "fjlt",
        "rademacher", "identity", optionally "name:key=value,..."), a Compressor object, a {layer: Compressor}
        dict, or a callable (LayerInfo, k, seed) -> Compressor. k: the compressed dimension per layer.
    store: None (in memory) or a directory (persistent, resumable, crash-safe, checksummed).
    layers: None (every nn.Linear / Conv1D) or names / glob patterns.
    checkpoints: state dicts for TracIn / TRAK (default: the model as it is);
    checkpoint_weights: TracIn's learning rates (default 1). output_fn(model, batch) -> Tensor[B]: TRAK's
    model-output function (e.g. the margin log(p / (1 - p))). fisher: "empirical" (the paper's),
    "true" (exact expectation over classes) or "true_sampled" (labels drawn from the model), the latter
    two need logits_fn(model, batch) -> Tensor[B, C] and use the cross-entropy of those logits.
    preconditioner (if / trak): "fim" (default: the block-diagonal FIM of the compressed gradients, the
    paper's), "kfac" / "ekfac" (Kronecker-factored curvature of each target layer, applied to the query in
    the full parameter space before it is compressed; see attribution.kfac) or "none".
    damping: a number >= 0 (absolute) or "<factor>*mean" (relative: factor x the mean eigenvalue of each
    block's preconditioner, e.g. "0.1*mean").
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, method: str = "if", compressor="factgrass",
                 k: int = 4096, damping: float = 1e-3, store=None, layers=None, seed: int = 0, device=None,
                 dtype: torch.dtype = torch.float32, *, checkpoints: list | None = None,
                 checkpoint_weights: list[float] | None = None, output_fn: Callable | None = None,
                 fisher: str = "empirical", logits_fn: Callable | None = None, compile: bool = True,
                 storage_dtype: str | None = None, memory_budget: int = 1 << 30, progress: bool = True,
                 params: list[str] | str | None = None, param_compressor="sjlt", param_chunk: int = 64,
                 preconditioner: str | None = None, autocast: torch.dtype | str | None = None,
                 normalize: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (model, batch) -> Tensor[B], got {type(loss_fn).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        if fisher != "empirical" and not callable(logits_fn):
            raise ValueError(f"fisher={fisher!r} needs a callable logits_fn(model, batch) -> Tensor[B, C]")
        if method == "trak" and not callable(output_fn):
            raise ValueError("method='trak' needs a callable output_fn(model, batch) -> Tensor[B] (the model-output function)")
        if method == "trak" and fisher != "empirical":
            raise ValueError("method='trak' preconditions with the empirical FIM of output_fn's gradients: fisher must "
                             "be 'empirical'")
        if method not in ("if", "trak") and fisher != "empirical":
            raise ValueError(f"fisher={fisher!r} only matters for method='if'")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        if normalize and method == "trak":
            raise ValueError("normalize=True is for 'if', 'graddot' and 'tracin' ('gradcos' is normalized; TRAK weights "
                             "its own scores)")
        self.normalize = normalize or method == "gradcos"
        self.preconditioner = check_preconditioner(preconditioner, method, PRECONDITIONED)
        if self.preconditioner in KRONECKER and fisher != "empirical":
            raise ValueError(f"preconditioner={self.preconditioner!r} uses the empirical Fisher (the training factors); "
                             f"fisher={fisher!r} is supported with preconditioner='fim'")
        k = _check_int("k", k)
        seed = _check_int("seed", seed, 0, 2**63)
        self._damping = check_damping(damping)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        storage = storage_dtype or ("float64" if dtype == torch.float64 else "float32")
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}")
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError("model has no parameters to attribute through")
        self.device = torch.device(device) if device is not None else first.device
        if first.device != self.device:
            raise ValueError(f"the model is on {first.device} but device={self.device}; move the model first")
        self.model, self.loss_fn, self.method, self.k, self.seed = model, loss_fn, method, k, seed
        self.dtype, self.output_fn, self.fisher, self.logits_fn = dtype, output_fn, fisher, logits_fn
        self.memory_budget = _check_int("memory_budget", memory_budget)
        self.progress, self.use_compile = bool(progress), bool(compile)

        self.layer_infos = find_layers(model, layers) if layers != [] else {}
        self.layer_names = list(self.layer_infos)
        self.param_names = list(find_params(model, params)) if params else []
        if not self.layer_names and not self.param_names:
            raise ValueError("nothing to attribute through: layers=[] and no params")
        if not self.layer_names and self.preconditioner in KRONECKER:
            raise ValueError(f"preconditioner={self.preconditioner!r} needs target linear layers (layers=[] selects none)")
        named = dict(model.named_parameters())
        covered = {id(named[f"{m}.weight"]) for info in self.layer_infos.values() for m in info.modules
                   if f"{m}.weight" in named}
        twice = [n for n in self.param_names if id(named[n]) in covered]
        if twice:
            raise ValueError(f"params {twice} are already attributed as target layers' weights; leave them out of params")
        built = build_compressors(compressor, self.layer_infos, k, seed) if self.layer_names else {}
        param_infos = {f"param:{n}": LayerInfo(n, 1, named[n].numel(), "param") for n in self.param_names}
        if param_infos:  # other parameters: flat per-sample gradients, one block each (seeds apart from the layers')
            built.update(build_compressors(param_compressor, param_infos, k, grass_ops.derive_seed(seed, PARAM_SEED_TAG)))
        self.compressors: dict[str, Compressor] = {n: c.to(self.device) for n, c in built.items()}
        self.block_names = self.layer_names + list(param_infos)
        self.checkpoints = Checkpoints(model, checkpoints, checkpoint_weights, method)
        autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(autocast, autocast)
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        self.autocast = autocast
        self.compress = BatchCompressor(model, self.layer_infos, self.param_names, self.compressors, dtype, self.device,
                                        compile=self.use_compile, param_chunk=_check_int("param_chunk", param_chunk),
                                        return_factors=self.preconditioner in KRONECKER, autocast=autocast)
        self.dims = self.compress.widths
        if store is None:
            if is_distributed():
                raise ValueError("caching under torch.distributed needs store=<a directory every rank shares>: "
                                 "ranks write their shards there and read each other's")
            manifest = self._manifest(None)
            self.store = MemoryStore(self.compress.columns, storage)
        else:
            if not isinstance(store, (str, Path)) or not str(store):
                raise TypeError(f"store must be None or a directory path, got {store!r}")
            if Path(store).exists() and not Path(store).is_dir():
                raise ValueError(f"store {store} exists and is not a directory")
            manifest = self._manifest(Path(store))
            self.store = DiskStore(store, manifest, storage)
        self._fingerprints = manifest["model_fingerprints"]
        self._signature = hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k != "fisher"},
                                                    sort_keys=True).encode()).hexdigest()[:24]
        self._kron = (KroneckerPreconditioner(self.preconditioner, self.layer_names, self.compressors, self.compress.offsets,
                                              dtype, self.device, self.store, self.progress)
                      if self.preconditioner in KRONECKER else None)
        self.scorer = Scorer(method, self.store, self.compress.offsets, self.checkpoints.weights, dtype, self.device,
                             self._fims, None if self.preconditioner == "fim" else self._precondition_queries,
                             normalize=self.normalize)
        self._fim_cache: dict[tuple[int, str], list[DampedInverse]] = {}
        self._ann: dict = {}
        self._true_fisher = (TrueFisherGradients(fisher, logits_fn, lambda b, loss: self.compress.eager(b, loss)[0], self.device)
                             if logits_fn is not None else None)
        self.stats: dict = {"graph_breaks": None, "compiled": False, "compile_seconds": 0.0, "gradient_seconds": 0.0,
                            "fim_seconds": 0.0}

    # ---- configuration ---------------------------------------------------------------------------
    @property
    def damping(self) -> float:
        return self._damping

    @damping.setter
    def damping(self, value) -> None:
        self._damping = check_damping(value)

    def _manifest(self, root: Path | None) -> dict:
        self._algorithm = None
        if root is not None and (root / "manifest.json").is_file():  # check with the algorithm the store used
            recorded = read_json(root / "manifest.json", "manifest")
            if isinstance(recorded, dict) and isinstance(recorded.get("model_fingerprints"), list) and recorded["model_fingerprints"]:
                self._algorithm = fingerprint_algorithm(recorded["model_fingerprints"][0])
        return {
            "model_fingerprints": self._model_fingerprints(),
            "layers": {n: [i.d_in, i.d_out, i.kind] for n, i in self.layer_infos.items()},
            "params": self.param_names,
            "compressors": {n: _portable(self.compressors[n].spec()) for n in self.block_names},
            "blocks": [[n, w] for n, w in zip(self.block_names, self.compress.widths)],
            "k": self.k, "seed": self.seed, "dtype": str(self.dtype).replace("torch.", ""),
            "gradient_of": "output_fn" if self.method == "trak" else "loss_fn",
            "fisher": self.fisher,
            **({"autocast": str(self.autocast).replace("torch.", "")} if self.autocast is not None else {}),
        }

    def _model_fingerprints(self) -> list[str]:
        return [model_fingerprint(self.checkpoints.state(c), self._algorithm) for c in range(len(self.checkpoints))]

    def _check_model_unchanged(self) -> None:
        if self._model_fingerprints() != self._fingerprints:
            raise ValueError("the model's weights changed since this Attributor was built, and its store holds gradients "
                             "of the weights it was built with: build a new Attributor (with a new store) for the new weights")

    def compress_batch(self, batch, kind: str = "loss") -> tuple[Tensor, Tensor]:
        """Compressed per-sample gradients of one batch (the model in eval mode): (grads [n, columns],
        values [n]); block j is columns offsets[j]:offsets[j + 1] of ``self.compress``.
        kind: "loss" or "output" (TRAK's output_fn)."""
        if kind not in ("loss", "output"):
            raise ValueError(f"kind must be 'loss' or 'output', got {kind!r}")
        return self._gradient_pass(self.compress, batch, kind)

    def _gradient_pass(self, step: Callable, batch, kind: str):
        """step(batch, fn, name) with the model in eval mode (its mode restored), timed in stats."""
        fn, name = (self.output_fn, "output_fn") if kind == "output" else (self.loss_fn, "loss_fn")
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        try:
            out = step(batch, fn, name)
        finally:
            self.model.train(was_training)
            self.stats["gradient_seconds"] += time.perf_counter() - start
        self.stats.update(self.compress.stats())
        return out

    # ---- cache stage -----------------------------------------------------------------------------
    def cache(self, train_loader: Iterable) -> "Attributor":
        """Compress every training gradient (per checkpoint), then the per-block FIMs. Resumes an
        interrupted cache, grows a completed one, and writes nothing when the store is up to date."""
        if len(self.checkpoints) > 1:
            require_reiterable(train_loader, "it is read once per checkpoint")
        if self.method in PRECONDITIONED and self.fisher != "empirical" and self.method != "trak":
            require_reiterable(train_loader, f"fisher={self.fisher!r} reads it again to form the FIM")
        self._check_model_unchanged()
        kind = "output" if self.method == "trak" else "loss"
        records = []
        with LazyWriter(self.store) as writer, self.checkpoints.each() as indices:
            for c in indices:
                observer = self._kron.observer(c, writer) if self._kron is not None else None
                record = cache_checkpoint(self.store, lambda batch: self._cache_step(batch, kind, observer), train_loader, c,
                                          writer, lambda record, c=c: self._derive(c, record, train_loader, writer),
                                          self.progress, observer)
                records.append(record)
            self._refresh_indexes(records, writer)
        digests = {tuple(s.digest for s in r.shards) for r in records}
        if len(digests) != 1:
            raise ValueError("the train loader yielded different batches for different checkpoints (a shuffling "
                             "DataLoader?): every checkpoint must see the same batches in the same order")
        return self

    def _cache_step(self, batch, kind: str, observer) -> tuple[Tensor, Tensor]:
        """One training batch's compressed gradients; with K-FAC its factors' sums go to ``observer``."""
        if observer is None:
            return self.compress_batch(batch, kind)
        grads, values, x, g = self._with_factors(batch, kind)
        observer.computed(x, g)
        return grads, values

    def _with_factors(self, batch, kind: str):
        """compress_batch with every layer's factors (K-FAC)."""
        return self._gradient_pass(self.compress.with_factors, batch, kind)

    def cache_gradients(self, batches: Iterable[Tensor]) -> "Attributor":
        """Cache precomputed compressed gradients instead of computing them from a model: each batch a
        [B, columns] float tensor, the blocks side by side (``self.compress.offsets``), e.g. from another
        pipeline or synthetic data for benchmarks. The same store and guarantees as :meth:`cache`
        (resume, growth, torch.distributed), then the FIM. One checkpoint, empirical Fisher, not TRAK,
        preconditioner "fim" or "none" (K-FAC needs the model's factors)."""
        if len(self.checkpoints) > 1 or self.method == "trak" or self.fisher != "empirical" or self._kron is not None:
            raise ValueError("cache_gradients needs one checkpoint, the empirical Fisher, a method other than 'trak' "
                             "and preconditioner 'fim' or 'none' (those need the model)")
        columns = self.compress.columns

        def rows(batch):
            _check_gradient_matrix(batch, columns, "cache_gradients: each batch", "rows")
            return batch, torch.zeros(batch.shape[0], dtype=torch.float64)

        with LazyWriter(self.store) as writer:
            record = cache_checkpoint(self.store, rows, batches, 0, writer,
                                      lambda record: self._derive(0, record, batches, writer), self.progress)
            self._refresh_indexes([record], writer)
        return self

    def _refresh_indexes(self, records: list[Completion], writer: LazyWriter) -> None:
        """Rebuild every ANN index of the store that was built from older data (the store grew), with its
        recorded parameters. Collective: rank 0 builds."""
        fingerprint = index_module.data_fingerprint(records)
        stale = parallel.agreed(parallel.collectively(lambda: [
            (mode, found[1]) for mode in index_module.MODES
            if (found := self.store.derived_meta(0, index_module.derived_name(mode))) is not None and found[0] != fingerprint]))

        def rebuild():
            if rank_and_world()[0] != 0:
                return
            for mode, meta in stale:
                writer.ensure()
                index_module.build(self.store, records, list(range(len(records))), mode, meta["factory"],
                                   project=meta.get("project"), train_size=meta.get("train_size_requested"),
                                   nprobe=meta.get("nprobe"),
                                   seed=meta.get("seed", 0), rows_per_block=self._row_budget(1))

        if stale:
            parallel.collectively(rebuild)

    def _derive(self, c: int, record: Completion, loader: Iterable, writer: LazyWriter) -> None:
        """Everything computed from the cached data, if not already there: the FIM (for if / trak), or the
        K-FAC factors and EK-FAC correction for those preconditioners (the FIM then only for params= blocks).
        Collective under torch.distributed: every rank takes part in the FIM, rank 0 writes; rank 0 merges
        the ranks' K-FAC partials and runs the EK-FAC pass."""
        meta = {"preconditioner": self.preconditioner, "damping": self.damping}
        if self._kron is not None:
            kind = "output" if self.method == "trak" else "loss"
            parallel.collectively(lambda: rank_and_world()[0] == 0 and self._kron.derive(
                c, record, loader, writer, lambda batch: self._with_factors(batch, kind), meta))
            if not self.param_names:
                return
        if self.method not in PRECONDITIONED or self.preconditioner == "none":
            return
        if parallel.agreed(parallel.collectively(lambda: self.store.has_derived(c, "fim", record.fingerprint))):
            return
        start = time.perf_counter()
        fims = self._compute_fim(c, record, loader)
        self.stats["fim_seconds"] += time.perf_counter() - start

        def save():
            if rank_and_world()[0] == 0:
                writer.ensure()
                self.store.save_derived(c, "fim", fim_module.to_arrays(fims), record.fingerprint,
                                        {"fisher": self.fisher, "blocks": len(fims), **meta})

        parallel.collectively(save)
        if fims is not None:
            self._fim_cache[(c, record.fingerprint)] = fims

    def _compute_fim(self, c: int, record: Completion, loader: Iterable) -> list[DampedInverse] | None:
        """Collective. The empirical FIM: every rank its own shards (parallel.empirical_fims). The true
        Fisher re-reads the loader through the model: rank 0 alone (None on the other ranks)."""
        if self.fisher == "empirical" or self.method == "trak":
            return parallel.empirical_fims(self.store, c, record, self.scorer.split, self.dims, self._row_budget(1),
                                           self.device, self.dtype, self.progress)

        def true_fisher():
            if rank_and_world()[0] != 0:
                return None
            generator = torch.Generator().manual_seed(self.seed)  # one label stream for the whole FIM
            rows = (pair for batch in tqdm(loader, desc=f"true fisher ckpt {c}", disable=not self.progress, leave=False)
                    for pair in self._true_fisher(self.model, to_device(batch, self.device), generator))
            return fim_module.block_fims(rows, self.scorer.split, self.dims, record.samples, self.device, self.dtype)

        return parallel.collectively(true_fisher)

    # ---- attribute stage -------------------------------------------------------------------------
    def _records(self) -> list[Completion]:
        """Every checkpoint's completion record; raises IncompleteStoreError for an unfinished cache."""
        records = [self.store.require_complete(c) for c in range(len(self.checkpoints))]
        if len({r.samples for r in records}) != 1:
            raise CorruptStoreError(f"the store's checkpoints hold different numbers of samples: {[r.samples for r in records]}")
        return records

    @property
    def n_train(self) -> int:
        return self._records()[0].samples

    def _fims(self, c: int, record: Completion) -> list[DampedInverse]:
        key = (c, record.fingerprint)
        if key not in self._fim_cache:
            loaded = self.store.load_derived(c, "fim", record.fingerprint)
            if loaded is None:
                raise RuntimeError(f"{self.store!r} has no FIM for its current data (checkpoint {c}): call cache() to "
                                   "complete it")
            self._fim_cache = {k: v for k, v in self._fim_cache.items() if k[0] != c}
            self._fim_cache[key] = fim_module.from_arrays(loaded[0], self.dims, f"{self.store!r} (checkpoint {c}) fim")
        return self._fim_cache[key]

    def _rank_bounds(self, records: list[Completion], rows_per_block: int) -> list[tuple[int, int]]:
        """Every rank's (first, end) training rows under the streamed plan (one rank: the whole set)."""
        plan = self.scorer.plan(records, rows_per_block)
        world = rank_and_world()[1]
        return [streaming.rank_rows(plan, r, world) for r in range(world)]

    def _row_budget(self, n_test: int) -> int:
        """Training rows per block, so that one block (its rows in the storage and the compute dtype for
        every checkpoint, and its [n_test, rows] scores) fits in memory_budget."""
        itemsize = torch.finfo(self.dtype).bits // 8
        stored = torch.finfo(STORAGE_DTYPES[self.store.storage]).bits // 8
        per_row = len(self.checkpoints) * self.compress.columns * (stored + itemsize) + n_test * (2 * itemsize + 1)
        return max(1, self.memory_budget // per_row)

    def query_features(self, test_loader: Iterable) -> QueryFeatures:
        """Compressed query gradients (per checkpoint [n_test, columns]); reusable across dampings and
        by this Attributor (or another with the same configuration and model) only. With preconditioner=
        "kfac" / "ekfac" they also hold every layer's query gradients in the Kronecker eigenbasis (n_test x
        the target layers' parameters; attribute(test_loader) streams instead)."""
        records = self._records()
        if self._kron is not None:
            return self._kron_features(test_loader, records)
        self._check_model_unchanged()
        if len(self.checkpoints) > 1:
            require_reiterable(test_loader, "it is read once per checkpoint")
        kind = "output" if self.method == "trak" else "loss"
        grads, digests = [], []
        with self.checkpoints.each() as indices:
            for _ in indices:
                parts, seen = [], []
                for batch in test_loader:
                    seen.append(batch_digest(batch))
                    parts.append(self.compress_batch(batch, kind)[0])
                if not parts:
                    raise ValueError("test_loader yielded no batches")
                grads.append(torch.cat(parts))
                digests.append(seen)
        if grads[0].shape[0] == 0:
            raise ValueError("test_loader yielded no samples")
        if any(d != digests[0] for d in digests):
            raise ValueError("the test loader yielded different batches for different checkpoints (a shuffling "
                             "DataLoader?): every checkpoint must see the same queries in the same order")
        return QueryFeatures(grads, self._signature)

    def features_from_gradients(self, grads: Tensor | list[Tensor]) -> QueryFeatures:
        """Query features from precomputed compressed query gradients, the counterpart of
        :meth:`cache_gradients`: one [n_test, columns] float tensor per checkpoint (a tensor for one).
        Not with preconditioner "kfac" / "ekfac" (they precondition the full query gradient)."""
        if self._kron is not None:
            raise ValueError(f"features_from_gradients: preconditioner={self.preconditioner!r} needs the query's "
                             "full gradient; use query_features(test_loader)")
        grads = [grads] if isinstance(grads, Tensor) else list(grads)
        if len(grads) != len(self.checkpoints):
            raise ValueError(f"features_from_gradients: one tensor per checkpoint ({len(self.checkpoints)}), got {len(grads)}")
        columns = self.compress.columns
        for g in grads:
            _check_gradient_matrix(g, columns, "features_from_gradients: each tensor", "n_test")
            if g.shape[0] != grads[0].shape[0] or g.shape[0] == 0:
                raise ValueError("features_from_gradients: every checkpoint's tensor needs the same number (>= 1) of rows")
            if not torch.isfinite(g).all():
                raise FloatingPointError("features_from_gradients: the query gradients hold non-finite values")
        return QueryFeatures([g.to(self.device, self.dtype) for g in grads], self._signature)

    def _kron_features(self, test_loader: Iterable, records: list[Completion], damping=None) -> QueryFeatures:
        self._check_model_unchanged()
        if len(self.checkpoints) > 1:
            require_reiterable(test_loader, "it is read once per checkpoint")
        kind = "output" if self.method == "trak" else "loss"
        with self.checkpoints.each() as indices:
            return self._kron.query_features(test_loader, records, indices, lambda b: self._with_factors(b, kind),
                                             self._other_blocks, self._signature, damping)

    def _other_blocks(self, c: int, record: Completion, q: Tensor, damping) -> Tensor:
        """The params= blocks of queries [n, columns] preconditioned by their FIM (K-FAC covers the layers)."""
        if not self.param_names:
            return q
        q, offsets, fims = q.to(self.device, self.dtype).clone(), self.compress.offsets, self._fims(c, record)
        for j in range(len(self.layer_names), len(self.block_names)):
            q[:, offsets[j] : offsets[j + 1]] = fims[j].apply(q[:, offsets[j] : offsets[j + 1]], damping)
        return q

    def _precondition_queries(self, c: int, record: Completion, features: QueryFeatures, damping) -> Tensor:
        """The query side for preconditioner "kfac" / "ekfac" / "none" (the Scorer's hook)."""
        if self._kron is None:  # preconditioner="none"
            return features.grads[c].to(self.device, self.dtype)
        return self._kron.prepared(c, record, features, damping, self._other_blocks, len(self.checkpoints))

    def _features(self, test_loader, features) -> QueryFeatures:
        if features is None:
            if test_loader is None:
                raise ValueError("give test_loader or features (from query_features)")
            return self.query_features(test_loader)
        if test_loader is not None:
            raise ValueError("give test_loader or features, not both")
        if not isinstance(features, QueryFeatures):
            raise TypeError(f"features must come from Attributor.query_features, got {type(features).__name__}")
        if features.signature != self._signature:
            raise ValueError("features were computed by an Attributor with another configuration or model (compressor, "
                             "seed, k, gradient function or weights differ); recompute them with this one")
        return features

    def _queries(self, test_loader, damping, features) -> tuple[list[Completion], QueryFeatures, list[Tensor]]:
        """(records, features, prepared queries); collective under torch.distributed (the same on every rank)."""
        damping = self.damping if damping is None else check_damping(damping)

        def prepare():
            records = self._records()
            feats, loader = features, test_loader
            if feats is None and loader is not None and self._kron is not None:  # stream, one layer at a time
                feats, loader = self._kron_features(loader, records, damping), None
            feats = self._features(loader, feats)
            return records, feats, self.scorer.prepared_queries(feats, damping, records)

        records, feats, queries = parallel.collectively(prepare)
        parallel.check_same_queries(queries)
        return records, feats, queries

    def _score_blocks(self, test_loader, damping, features):
        """(n_test, n_train, this rank's score blocks, every rank's (first, end) training rows)."""
        records, features, queries = self._queries(test_loader, damping, features)
        rank, world = rank_and_world()
        rows = self._row_budget(features.n_test)
        bounds = self._rank_bounds(records, rows)
        blocks = self.scorer.score_blocks(queries, records, rows, part=(rank, world))
        return features.n_test, records[0].samples, blocks, bounds

    def attribute(self, test_loader: Iterable | None = None, *, damping: float | None = None,
                  features: QueryFeatures | None = None, out: str | Path | None = None) -> Tensor:
        """Scores [n_test, n_train] (float32, or float64 with dtype=torch.float64); see the module docstring.
        ``damping`` overrides self.damping; ``features`` (from query_features) skips recompressing the queries.
        ``out=PATH``: the matrix is written to PATH as an .npy in row blocks (for matrices larger than RAM;
        renamed into place when complete) and returned as a tensor over a copy-on-write memory map of it.
        Under torch.distributed every rank scores its share of the training rows and returns the whole matrix.
        ``out`` inside a store (this one or another) is refused."""
        if out is not None:
            refuse_inside_store(out, f"out={out}")
        n_test, n_train, blocks, bounds = self._score_blocks(test_loader, damping, features)
        if out is not None:
            return self._attribute_to(Path(out), n_test, n_train, blocks)
        scores = torch.zeros(n_test, n_train, dtype=self.dtype, device=self.device)

        def fill():
            for start, block in blocks:
                scores[:, start : start + block.shape[1]] = block

        parallel.collectively(fill)
        return parallel.share_columns(scores, bounds)

    def _attribute_to(self, path: Path, n_test: int, n_train: int, blocks) -> Tensor:
        rank = rank_and_world()[0]
        tmp = Path(parallel.agreed(str(streaming.tmp_path_for(path))))
        dtype = np.dtype("<f8" if self.dtype == torch.float64 else "<f4")
        try:
            parallel.collectively(lambda: rank == 0 and streaming.create_npy(tmp, (n_test, n_train), dtype))
            parallel.collectively(lambda: streaming.write_columns(tmp, blocks))
            parallel.collectively(lambda: rank == 0 and streaming.finish_npy(tmp, path))
        except BaseException:
            if rank == 0:
                tmp.unlink(missing_ok=True)
            raise
        return streaming.open_matrix(path)

    def top_k(self, test_loader: Iterable | None = None, k: int = 10, largest: bool = True, *,
              damping: float | None = None, features: QueryFeatures | None = None, index: bool = False,
              candidates: int | None = None, nprobe: int | None = None) -> tuple[Tensor, Tensor]:
        """(values, indices) [n_test, min(k, n_train)]: the most helpful (largest=True) or most harmful
        training examples, streamed over the store (the [n_test, n_train] matrix is never formed).
        Ties go to the lower training index. Under torch.distributed every rank scores its share of the
        store and every rank returns the merged result.

        ``index=True``: use the store's ANN index (:meth:`build_index`): ``candidates`` per query
        (default max(10 k, 100); at most the number of training rows) from the index, probing ``nprobe``
        lists (default: the index's), re-ranked exactly against the stored rows; under torch.distributed
        the ranks split the queries."""
        k = _check_int("k", k)
        if not isinstance(largest, bool):
            raise TypeError(f"largest must be a bool, got {largest!r}")
        if index:
            return self._top_k_indexed(test_loader, k, largest, damping, features, candidates, nprobe)
        n_test, _, blocks, _ = self._score_blocks(test_loader, damping, features)
        best = TopK(k, largest)
        parallel.collectively(lambda: [best.add(start, block) for start, block in blocks])
        return parallel.merge_top_k(best.values, best.indices, n_test, k, largest, self.device)

    def build_index(self, factory: str | None = index_module.DEFAULT_FACTORY, *,
                    project: int | None = index_module.DEFAULT_PROJECT,
                    train_size: int | None = None, nprobe: int | None = None, seed: int = 0) -> dict:
        """Build the ANN index over the stored training gradients for this method's scores (raw rows for
        if/graddot/tracin, normalized for gradcos, TRAK-weighted for trak) and save it in the store as
        derived data: the rows are projected on the top ``project`` eigenvectors of their second moment
        (None: kept whole) plus one coordinate that turns inner products into distances (see
        attribution.index), and indexed by FAISS ``factory`` (an index_factory string over L2; None: a flat
        scan below 20,000 rows, else "IVF<~4 sqrt(n)>,SQfp16"), trained on ``train_size`` random rows
        (default 40 per IVF list). ``nprobe``: the lists searched by default (default an eighth). Returns
        its summary. Collective: rank 0 builds."""
        if factory is not None and (not isinstance(factory, str) or not factory):
            raise TypeError(f"factory must be a FAISS index_factory string, got {factory!r}")
        if train_size is not None:
            train_size = _check_int("train_size", train_size)
        if project is not None:
            project = _check_int("project", project, 0)
        if nprobe is not None:
            nprobe = _check_int("nprobe", nprobe)
        seed = _check_int("seed", seed, 0, 2**32)
        records = parallel.collectively(self._records)
        mode = index_module.mode_of(self.method, self.normalize)

        def build():
            if rank_and_world()[0] != 0:
                return None
            with self.store.writer():
                return index_module.build(self.store, records, list(range(len(records))), mode, factory,
                                          project=project, train_size=train_size, nprobe=nprobe, seed=seed,
                                          rows_per_block=self._row_budget(1))

        return parallel.agreed(parallel.collectively(build))

    def _top_k_indexed(self, test_loader, k, largest, damping, features, candidates, nprobe):
        candidates = max(10 * k, 100) if candidates is None else _check_int("candidates", candidates)
        if nprobe is not None:
            nprobe = _check_int("nprobe", nprobe)
        records, feats, queries = self._queries(test_loader, damping, features)
        candidates = min(candidates, records[0].samples)  # more would only allocate [n_test, candidates] for nothing
        mode = index_module.mode_of(self.method, self.normalize)
        checkpoints = list(range(len(records)))

        def load():
            key = (mode, index_module.data_fingerprint(records))
            if key not in self._ann:
                self._ann = {key: index_module.load(self.store, records, checkpoints, mode)}
            return self._ann[key]

        loaded = parallel.collectively(load)
        weights = self.checkpoints.weights if self.method == "tracin" else [1.0] * len(queries)
        vectors = torch.cat([q.float() * w for q, w in zip(queries, weights)], dim=1).cpu()
        rank, world = rank_and_world()
        mine = streaming.share(feats.n_test, rank, world)  # the ranks split the queries

        def local():
            part = vectors[mine.start : mine.stop]
            ids = loaded.search(part if largest else -part, candidates, nprobe)
            return index_module.rerank(self.scorer, [q[mine.start : mine.stop] for q in queries], ids, k, largest,
                                       self.store, records, checkpoints, loaded.crcs, self._row_budget(1))

        values, indices = parallel.collectively(local)
        if world > 1:
            parts = all_gather_objects((values, indices))
            values, indices = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return values.to(self.device), indices.to(self.device)

    def select(self, test_loader: Iterable | None = None, n: int = 10, *, damping: float | None = None,
               features: QueryFeatures | None = None) -> tuple[Tensor, Tensor]:
        """(mean scores [n'], indices [n']), n' = min(n, n_train): the training examples with the largest
        mean score over the queries (LESS-style data selection with method="gradcos"), best first, ties
        to the lower index; streamed like top_k (collective under torch.distributed)."""
        n = _check_int("n", n)
        n_test, _, blocks, _ = self._score_blocks(test_loader, damping, features)
        best = TopK(n, True)
        parallel.collectively(lambda: [best.add(start, block.mean(0, keepdim=True)) for start, block in blocks])
        values, indices = parallel.merge_top_k(best.values, best.indices, 1, n, True, self.device)
        return values[0], indices[0]

    def self_influence(self, damping: float | None = None) -> Tensor:
        """[n_train]: each training example's score against itself, i.e. the diagonal of
        attribute(train) (g^T (F + damping I)^-1 g for "if"), streamed over the store (every rank its
        share under torch.distributed; every rank returns the whole vector)."""
        damping = self.damping if damping is None else check_damping(damping)
        if self._kron is not None:
            raise ValueError(f"self_influence with preconditioner={self.preconditioner!r} needs each training gradient in "
                             "full (the store keeps them compressed): use the diagonal of attribute(train_loader), or "
                             "preconditioner='fim'")
        records = parallel.collectively(self._records)
        rank, world = rank_and_world()
        rows = self._row_budget(1)
        bounds = self._rank_bounds(records, rows)
        out = parallel.collectively(lambda: self.scorer.self_influence(damping, records, rows, part=(rank, world)))
        return parallel.share_columns(out.to(self.device), bounds).to(self.dtype)  # NCCL sends device tensors

    def verify(self) -> dict:
        """Check every file of a disk store (sizes, headers, CRC32s, completion); raises
        CorruptStoreError listing every problem, else returns the summary."""
        if not isinstance(self.store, DiskStore):
            return {"ok": True, "store": "memory"}
        report = self.store.verify()
        if not report["ok"]:
            raise CorruptStoreError("store verification failed:\n  " + "\n  ".join(report["problems"]))
        return report

    def close(self) -> None:
        """Nothing to release: hooks are registered only while a batch is being captured (kept for
        compatibility)."""


__all__ = ["Attributor", "METHODS", "FISHERS", "QueryFeatures"]
