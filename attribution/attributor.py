"""The Attributor: a facade over the stages
    capture + compress (gradients.py) -> cache (cache.py, store/) -> preconditioning (preconditioners/)
    -> scoring (scoring.py; collectives.py under torch.distributed, ann.py with an ANN index)

Sign convention: score(z_i, z_test) = g_test^T (F + damping I)^-1 g_i with F = (1/n) sum_i g_i g_i^T per
block (influence functions); a positive score means that training on z_i lowers the test loss.
GradDot drops the FIM, GradCos normalizes GradDot, TracIn sums GradDot over checkpoints weighted by their
learning rates, TRAK averages the FIM-preconditioned output-gradient scores over checkpoints, i weighted by mean(1 - sigmoid(f_i)).

The iFVP is applied to the query side (n_test * k^2, not n_train * k^2); the store keeps the raw
compressed gradients, so a new damping needs no new cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from . import collectives
from . import index as index_module
from .ann import AnnIndex
from .cache import LazyWriter, cache_checkpoint, check_same_batches, require_reiterable
from .config import FISHERS, METHODS, AttributorConfig, check_int
from .fim import check_damping
from .gradients import ModelGradients
from .optimizer_state import DEFAULT_EPS, DEFAULT_POWER, check_recorded
from .preconditioners import Setup, build_preconditioner, preconditioner_class
from .process_group import rank_and_world
from .scoring import QueryFeatures, Scorer, check_features
from .store import STORAGE_DTYPES, Completion, CorruptStoreError, DiskStore, MemoryStore, refuse_inside_store
from .store.manifest import recorded_algorithm, signature
from .streaming import RowBudget


class Attributor:
    """Gradient-based data attribution with compressed per-sample gradients.

    model: an nn.Module; loss_fn(model, batch) -> Tensor[B] per-sample losses (floating point).
    method: "if" | "graddot" | "gradcos" | "tracin" | "trak".
    compressor: a spec string ("factgrass", "logra", "sjlt", "grass", "random_mask", "gaussian", "fjlt",
        "rademacher", "identity", optionally "name:key=value,..."), a Compressor object, a {layer: Compressor}
        dict, or a callable (LayerInfo, k, seed) -> Compressor. k: the compressed dimension per layer.
    store: None (in memory) or a directory (persistent, resumable, crash-safe, checksummed).
    layers: None (every nn.Linear / Conv1D) or names / glob patterns.
    checkpoints: state dicts for TracIn / TRAK (default: the model as it is; None: the model's own weights; a
    callable returning a state dict: read each time it is needed, one in memory at a time);
    checkpoint_weights: the score is their weighted sum (TracIn's learning rates; default 1; not TRAK's ensemble).
    output_fn(model, batch) -> Tensor[B]: TRAK's model-output function (e.g. the margin log(p / (1 - p))).
    fisher: "empirical" (the paper's), "true" (exact expectation over classes) or "true_sampled" (labels drawn from the model), the latter
    two need logits_fn(model, batch) -> Tensor[B, C] and use the cross-entropy of those logits.
    preconditioner (if / trak): "fim" (default: the block-diagonal FIM of the compressed gradients, the
    paper's), "kfac" / "ekfac" (Kronecker-factored curvature of each target layer, applied to the query in
    the full parameter space before it is compressed; see attribution.preconditioners), "mixed"
    (TrackStar's task-aware curvature: per block (1 - task_weight) F_train + task_weight F_query, F_query
    the mean second moment of the compressed query gradients scored together, so that directions every
    query shares are damped; task_weight in [0, 1), 0 is "fim"; see attribution.preconditioners.mixed),
    "kfac-whitened" / "ekfac-whitened" (both sides whitened before compression: the store holds
    C((P + damping I)^-1/2 g) of each layer's K-FAC / EK-FAC curvature P, computed by a first pass over the
    training data or ``cache(..., curvature_loader=)``; the damping is fixed at cache time; see
    attribution.whitening) or "none".
    whitening_masks (whitened preconditioners): "energy" (FactGraSS / LoGra keep the eigenvectors that carry
    the most whitened second moment) or "random" (a seeded random subset of them).
    damping: a number >= 0 (absolute) or "<factor>*mean" (relative: factor x the mean eigenvalue of each
    block's preconditioner, e.g. "0.1*mean").
    optimizer_state (optimizer-aware normalization, TrackStar / LESS): an Adam / AdamW ``state_dict()``, a
    {parameter name: exp_avg_sq} mapping or the path of a file holding one (a Hugging Face Trainer's
    optimizer.pt): every per-sample gradient is divided by sqrt(v) + optimizer_eps before it is compressed, v
    the bias-corrected second moment (factorized compressors: Adafactor's rank-1 factors of v on x_in and
    g_out); see attribution.optimizer_state. The store records its fingerprint. Give it a relative damping
    ("<factor>*mean"): the division scales the gradients by 1e3-1e5, which an absolute damping does not follow
    (a UserWarning says so).
    optimizer_power: the power of that division (default 1, TrackStar's): 0.5 divides each side by
    (sqrt(v) + eps) ** 0.5, so that method="graddot" scores <g_q, g_d / (sqrt(v) + eps)>, the first-order change of
    the query's log-probability after one Adam step on the document (without momentum, up to the learning rate):
    the ranking for influence (tail-patch), not for finding a fact's source. Recorded with the state.
    config: an AttributorConfig instead of the keyword arguments (give one or the other).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, method: str = "if", compressor="factgrass",
                 k: int = 4096, damping: float = 1e-3, store=None, layers=None, seed: int = 0, device=None,
                 dtype: torch.dtype = torch.float32, *, checkpoints: list | None = None,
                 checkpoint_weights: list[float] | None = None, output_fn: Callable | None = None,
                 fisher: str = "empirical", logits_fn: Callable | None = None, compile: bool | str = True,
                 storage_dtype: str | None = None, memory_budget: int = 1 << 30, progress: bool = True,
                 params: list[str] | str | None = None, param_compressor="sjlt", param_chunk: int = 64,
                 preconditioner: str | None = None, task_weight: float | None = None, autocast: torch.dtype | str | None = None,
                 normalize: bool = False, optimizer_state=None, optimizer_eps: float = DEFAULT_EPS,
                 optimizer_power: float = DEFAULT_POWER, whitening_masks: str = "energy", config: AttributorConfig | None = None):
        self.config = config = AttributorConfig.from_arguments(locals(), config)
        self.method, self.k, self.seed, self.dtype, self.fisher = config.method, config.k, config.seed, config.dtype, config.fisher
        self.normalize, self.preconditioner, self.progress = config.normalized, config.preconditioner, config.progress
        self.gradients = gradients = ModelGradients(model, loss_fn, config, preconditioner_class(self.preconditioner).needs_factors)
        self.model, self.device, self.checkpoints, self.compress = model, gradients.device, gradients.checkpoints, gradients.compress
        self.layer_infos, self.layer_names, self.block_names = gradients.layer_infos, gradients.layer_names, gradients.block_names
        self.compressors, self.dims, self.stats = gradients.compressors, gradients.widths, gradients.stats
        root = None if config.store is None else Path(config.store)
        manifest = gradients.manifest(gradients.pin_weights(self._weights_algorithm(root)))
        if gradients.during_training and len(self.checkpoints) > 1:
            raise ValueError(f"store {root} was recorded during training (each row at the weights of its step): it has one "
                             "checkpoint; give no checkpoints")
        check_recorded(root, manifest.get("optimizer_state"))  # a clear error before the store's generic one
        self.store = (MemoryStore(gradients.columns, config.storage) if root is None
                      else DiskStore(root, manifest, config.storage))
        self._signature = signature(manifest)
        self.budget = RowBudget(config.memory_budget, len(self.checkpoints), gradients.columns,
                                torch.finfo(STORAGE_DTYPES[self.store.storage]).bits // 8, self.dtype)
        self.preconditioning = build_preconditioner(
            self.preconditioner, Setup(config, self.store, gradients, self.budget, self._signature))
        self.scorer = Scorer(self.method, self.store, gradients.offsets, self.checkpoints.weights, self.dtype, self.device,
                             self.preconditioning, normalize=self.normalize)
        self.ann = AnnIndex(self.scorer, self.checkpoints.weights, self.budget, self.device)

    def _weights_algorithm(self, root: Path | None) -> str | None:
        """How the store pins the model: the algorithm of its recorded fingerprints (None: a new store, by device)."""
        return recorded_algorithm(root)

    def _require_shared_store(self) -> None:
        if isinstance(self.store, MemoryStore) and rank_and_world()[1] > 1:
            raise ValueError("caching under torch.distributed needs store=<a directory every rank shares>: "
                             "ranks write their shards there and read each other's")

    def _refuse_training_store(self, what: str) -> None:
        if self.gradients.during_training:
            where = getattr(self.store, "root", "(in memory)")
            raise ValueError(f"{what}: store {where} was recorded during training by GradientCacheCallback (each row at "
                             "the weights of its step); its rows are added by the callback, not from this model")

    @property
    def damping(self) -> float | str:
        return self.config.damping

    @damping.setter
    def damping(self, value) -> None:
        self.config.damping = check_damping(value)

    @property
    def memory_budget(self) -> int:
        return self.budget.memory_budget

    @memory_budget.setter
    def memory_budget(self, value: int) -> None:
        self.budget.memory_budget = check_int("memory_budget", value)

    def compress_batch(self, batch, kind: str = "loss") -> tuple[Tensor, Tensor]:
        """Compressed per-sample gradients of one batch (the model in eval mode): (grads [n, columns],
        values [n]); block j is columns offsets[j]:offsets[j + 1] of ``self.compress``.
        kind: "loss" or "output" (TRAK's output_fn)."""
        if kind not in ("loss", "output"):
            raise ValueError(f"kind must be 'loss' or 'output', got {kind!r}")
        if self.preconditioning.whitened:
            if len(self.checkpoints) > 1:
                raise ValueError(f"compress_batch: with preconditioner={self.preconditioner!r} each checkpoint has its own "
                                 "whitening; use query_features(test_loader)")
            self.preconditioning.install(0)
        return self.gradients(batch, kind)

    def _with_factors(self, batch, kind: str):
        """compress_batch with every layer's factors (K-FAC)."""
        return self.gradients.with_factors(batch, kind)

    # ---- cache stage -----------------------------------------------------------------------------
    def cache(self, train_loader: Iterable, *, curvature_loader: Iterable | None = None) -> "Attributor":
        """Compress every training gradient (per checkpoint), then the preconditioner's derived data.
        Resumes an interrupted cache, grows a completed one, and writes nothing when the store is up to date.
        ``curvature_loader`` (preconditioner "kfac-whitened" / "ekfac-whitened"): the batches whose K-FAC
        factors whiten the store (default: the training batches), read before the cache (pass one) and
        pinned in the store: a grown store keeps them, other data for a store that has them is refused."""
        self._refuse_training_store("cache()")
        self._require_shared_store()
        if len(self.checkpoints) > 1:
            require_reiterable(train_loader, "it is read once per checkpoint")
        if self.fisher != "empirical":
            require_reiterable(train_loader, f"fisher={self.fisher!r} reads it again to form the FIM")
        self.gradients.check_unchanged()
        records = []
        with LazyWriter(self.store) as writer, self.checkpoints.each() as indices:
            for c in indices:
                self.preconditioning.prepare(c, train_loader, writer, curvature_loader)
                observer = self.preconditioning.observer(c, writer)
                records.append(cache_checkpoint(
                    self.store, lambda batch: self.gradients.cache_step(batch, observer), train_loader, c, writer,
                    lambda record, c=c: self.preconditioning.derive(c, record, train_loader, writer), self.progress, observer,
                    self.gradients.lockstep))
            self.ann.refresh(records, writer)
        check_same_batches(records)
        return self

    def cache_gradients(self, batches: Iterable[Tensor]) -> "Attributor":
        """Cache precomputed compressed gradients instead of computing them from a model: each batch a
        [B, columns] float tensor, the blocks side by side (``self.compress.offsets``), e.g. from another
        pipeline or synthetic data for benchmarks. The same store and guarantees as :meth:`cache`
        (resume, growth, torch.distributed), then the FIM. One checkpoint, empirical Fisher, not TRAK,
        preconditioner "fim" or "none" (K-FAC needs the model's factors)."""
        self._refuse_training_store("cache_gradients()")
        self._require_shared_store()
        if (len(self.checkpoints) > 1 or self.method == "trak" or self.fisher != "empirical" or self.preconditioning.needs_factors
                or self.preconditioning.whitened):
            raise ValueError("cache_gradients needs one checkpoint, the empirical Fisher, a method other than 'trak' "
                             "and preconditioner 'fim' or 'none' (K-FAC and the whitened ones need the model)")
        with LazyWriter(self.store) as writer:
            record = cache_checkpoint(self.store, self.gradients.precomputed_batch, batches, 0, writer,
                                      lambda record: self.preconditioning.derive(0, record, batches, writer), self.progress)
            self.ann.refresh([record], writer)
        return self

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

    def _row_budget(self, n_test: int) -> int:
        """Training rows per block for n_test queries (see streaming.RowBudget)."""
        return self.budget.rows(n_test)

    def query_features(self, test_loader: Iterable) -> QueryFeatures:
        """Compressed query gradients (per checkpoint [n_test, columns]); reusable across dampings and
        by this Attributor (or another with the same configuration and model) only. With preconditioner=
        "kfac" / "ekfac" they also hold every layer's query gradients in the Kronecker eigenbasis (n_test x
        the target layers' parameters; attribute(test_loader) streams instead)."""
        return self.preconditioning.query_features(test_loader, self._records())

    def features_from_gradients(self, grads: Tensor | list[Tensor]) -> QueryFeatures:
        """Query features from precomputed compressed query gradients, the counterpart of
        :meth:`cache_gradients`: one [n_test, columns] float tensor per checkpoint (a tensor for one).
        Not with preconditioner "kfac" / "ekfac" (they precondition the full query gradient); with "kfac-whitened" /
        "ekfac-whitened" they must be this store's whitened gradients (``compress_batch``'s)."""
        if self.preconditioning.full_query_gradients:
            raise ValueError(f"features_from_gradients: preconditioner={self.preconditioner!r} needs the query's "
                             "full gradient; use query_features(test_loader)")
        return self.preconditioning.features_of(self.gradients.precomputed_queries(grads))

    def _features(self, test_loader, features, records: list[Completion], damping=None) -> QueryFeatures:
        if features is None:
            if test_loader is None:
                raise ValueError("give test_loader or features (from query_features)")
            return self.preconditioning.query_features(test_loader, records, damping)
        if test_loader is not None:
            raise ValueError("give test_loader or features, not both")
        return check_features(features, self._signature)

    def _queries(self, test_loader, damping, features) -> tuple[list[Completion], QueryFeatures, list[Tensor]]:
        """(records, features, prepared queries); collective under torch.distributed (the same on every rank)."""
        damping = self.damping if damping is None else check_damping(damping)

        def prepare():
            records = self._records()
            feats = self._features(test_loader, features, records, damping)
            return records, feats, self.scorer.prepared_queries(feats, damping, records)

        records, feats, queries = collectives.collectively(prepare)
        collectives.check_same_queries(queries)
        return records, feats, queries

    def _score_blocks(self, test_loader, damping, features):
        """(n_test, n_train, this rank's score blocks, every rank's (first, end) training rows)."""
        records, features, queries = self._queries(test_loader, damping, features)
        rows = self._row_budget(features.n_test)
        bounds = collectives.rank_bounds(self.scorer.plan(records, rows))
        blocks = self.scorer.score_blocks(queries, records, rows, part=rank_and_world())
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
            return collectives.write_score_matrix(Path(out), blocks, n_test, n_train, self.dtype)
        return collectives.score_matrix(blocks, n_test, n_train, bounds, self.dtype, self.device)

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
        k = check_int("k", k)
        if not isinstance(largest, bool):
            raise TypeError(f"largest must be a bool, got {largest!r}")
        if index:
            return self._top_k_indexed(test_loader, k, largest, damping, features, candidates, nprobe)
        n_test, _, blocks, _ = self._score_blocks(test_loader, damping, features)
        return collectives.top_k(blocks, n_test, k, largest, self.device)

    def _top_k_indexed(self, test_loader, k, largest, damping, features, candidates, nprobe):
        candidates = max(10 * k, 100) if candidates is None else check_int("candidates", candidates)
        nprobe = None if nprobe is None else check_int("nprobe", nprobe)
        records, feats, queries = self._queries(test_loader, damping, features)
        candidates = min(candidates, records[0].samples)  # more would only allocate [n_test, candidates] for nothing
        return self.ann.top_k(queries, records, feats.n_test, k, largest, candidates, nprobe)

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
        return self.ann.build(collectives.collectively(self._records), factory, project, train_size, nprobe, seed)

    def select(self, test_loader: Iterable | None = None, n: int = 10, *, damping: float | None = None,
               features: QueryFeatures | None = None) -> tuple[Tensor, Tensor]:
        """(mean scores [n'], indices [n']), n' = min(n, n_train): the training examples with the largest
        mean score over the queries (LESS-style data selection with method="gradcos"), best first, ties
        to the lower index; streamed like top_k (collective under torch.distributed)."""
        n = check_int("n", n)
        _, _, blocks, _ = self._score_blocks(test_loader, damping, features)
        values, indices = collectives.top_k(blocks, 1, n, True, self.device, reduce=lambda block: block.mean(0, keepdim=True))
        return values[0], indices[0]

    def self_influence(self, damping: float | None = None) -> Tensor:
        """[n_train]: each training example's score against itself, i.e. the diagonal of
        attribute(train) (g^T (F + damping I)^-1 g for "if"), streamed over the store (every rank its
        share under torch.distributed; every rank returns the whole vector)."""
        damping = self.damping if damping is None else check_damping(damping)
        records = collectives.collectively(self._records)
        rows = self._row_budget(1)
        bounds = collectives.rank_bounds(self.scorer.plan(records, rows))
        out = collectives.collectively(lambda: self.scorer.self_influence(damping, records, rows, part=rank_and_world()))
        return collectives.share_columns(out.to(self.device), bounds).to(self.dtype)  # NCCL sends device tensors

    def verify(self) -> dict:
        """Check every file of a disk store (sizes, headers, CRC32s, completion); raises
        CorruptStoreError listing every problem, else returns the summary."""
        if not isinstance(self.store, DiskStore):
            return {"ok": True, "store": "memory"}
        report = self.store.verify()
        if not report["ok"]:
            raise CorruptStoreError("store verification failed:\n  " + "\n  ".join(report["problems"]))
        return report


__all__ = ["Attributor", "AttributorConfig", "METHODS", "FISHERS", "QueryFeatures"]
