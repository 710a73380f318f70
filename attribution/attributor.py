"""The Attributor: cache stage (compress training gradients, FIM) and attribute stage (scores, top-k).

Sign convention: score(z_i, z_test) = g_test^T (F + damping I)^-1 g_i with F = (1/n) sum_i g_i g_i^T per
layer block (influence functions); a positive score means that training on z_i lowers the test loss.
GradDot drops the FIM, GradCos normalizes GradDot, TracIn sums GradDot over checkpoints weighted by
their learning rates, TRAK averages the FIM-preconditioned scores of the output function's gradients
over checkpoints and weights train example i by the mean of (1 - sigmoid(f_i)).

The iFVP is applied to the query side: n_test is usually far smaller than n_train, so
(F + damping I)^-1 costs n_test * k^2 instead of n_train * k^2, and the store keeps the raw
compressed gradients, so a new damping needs no new cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from grass_ops.compressors import Compressor

from .capture import FactorCapture
from .compress import build_compressors, compress_layer
from .fim import DampedInverse, FIMAccumulator
from .layers import LayerInfo, find_layers
from .param_grads import batch_size, find_params, loss_module, per_sample_grads
from .store import STORAGE_DTYPES, DiskStore, MemoryStore

METHODS = ("if", "graddot", "gradcos", "tracin", "trak")
FISHERS = ("empirical", "true", "true_sampled")


def _to_device(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def batch_digest(batch) -> str:
    """sha256 of a batch's tensors (structure, shapes, dtypes and bytes)."""
    h = hashlib.sha256()

    def visit(obj):
        if isinstance(obj, Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for key in sorted(obj):
                h.update(str(key).encode())
                visit(obj[key])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
        else:
            h.update(repr(obj).encode())

    visit(batch)
    return h.hexdigest()[:24]


def model_fingerprint(state: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


class Attributor:
    """Gradient-based data attribution with compressed per-sample gradients.

    model: an nn.Module; loss_fn(model, batch) -> Tensor[B] per-sample losses.
    method: "if" | "graddot" | "gradcos" | "tracin" | "trak".
    compressor: a spec string ("factgrass", "logra", "sjlt", "grass", "random_mask", "gaussian", "fjlt",
        "rademacher", "identity", optionally "name:key=value,..."), a {layer: Compressor} dict, or a
        callable (LayerInfo, k, seed) -> Compressor. k: the compressed dimension per layer.
    store: None (in memory) or a directory (persistent, resumable, crash-safe).
    layers: None (every nn.Linear / Conv1D) or names / glob patterns.
    checkpoints: state dicts for TracIn / TRAK (default: the model as it is);
    checkpoint_weights: TracIn's learning rates (default 1). output_fn(model, batch) -> Tensor[B]: TRAK's
    model-output function (e.g. the margin log(p / (1 - p))). fisher: "empirical" (the paper's),
    "true" (exact expectation over classes) or "true_sampled" (labels drawn from the model), the latter
    two need logits_fn(model, batch) -> Tensor[B, C] and use the cross-entropy of those logits.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, method: str = "if", compressor="factgrass",
                 k: int = 4096, damping: float = 1e-3, store=None, layers=None, seed: int = 0, device=None,
                 dtype: torch.dtype = torch.float32, *, checkpoints: list | None = None,
                 checkpoint_weights: list[float] | None = None, output_fn: Callable | None = None,
                 fisher: str = "empirical", logits_fn: Callable | None = None, compile: bool = True,
                 storage_dtype: str | None = None, memory_budget: int = 1 << 30, progress: bool = True,
                 params: list[str] | str | None = None, param_compressor="sjlt", param_chunk: int = 64):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        if fisher != "empirical" and logits_fn is None:
            raise ValueError(f"fisher={fisher!r} needs logits_fn(model, batch) -> Tensor[B, C]")
        if method == "trak" and output_fn is None:
            raise ValueError("method='trak' needs output_fn(model, batch) -> Tensor[B] (the model-output function)")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        first = next(model.parameters(), None)
        model_device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device) if device is not None else model_device
        if model_device != self.device:
            raise ValueError(f"the model is on {model_device} but device={self.device}; move the model first")
        self.model, self.loss_fn, self.method, self.k, self.damping = model, loss_fn, method, k, float(damping)
        self.seed, self.dtype, self.output_fn, self.fisher, self.logits_fn = seed, dtype, output_fn, fisher, logits_fn
        self.memory_budget, self.progress, self.use_compile = int(memory_budget), progress, compile
        self.layer_infos = find_layers(model, layers) if layers != [] else {}
        self.layer_names = list(self.layer_infos)
        self.param_names = list(find_params(model, params)) if params else []
        if not self.layer_names and not self.param_names:
            raise ValueError("nothing to attribute through: layers=[] and no params")
        self.param_chunk = int(param_chunk)
        built = build_compressors(compressor, self.layer_infos, k, seed) if self.layer_names else {}
        # other parameters: flat per-sample gradients, one block each (seeds continue after the layers')
        named = dict(model.named_parameters())
        param_infos = {f"param:{n}": LayerInfo(n, 1, named[n].numel(), "param") for n in self.param_names}
        if param_infos:
            built.update(build_compressors(param_compressor, param_infos, k, seed + 1))
        self.compressors: dict[str, Compressor] = {n: c.to(self.device) for n, c in built.items()}
        self.block_names = self.layer_names + list(param_infos)
        self.dims = [self.compressors[n].out_features for n in self.block_names]
        self.checkpoints = checkpoints
        if method == "tracin" and not checkpoints:
            warnings.warn("method='tracin' without checkpoints: using the current model alone (= GradDot)")
        n_ckpt = len(checkpoints) if checkpoints else 1
        self.checkpoint_weights = [float(w) for w in (checkpoint_weights or [1.0] * n_ckpt)]
        if len(self.checkpoint_weights) != n_ckpt:
            raise ValueError(f"checkpoint_weights has {len(self.checkpoint_weights)} entries for {n_ckpt} checkpoints")
        self.capture = FactorCapture(model, self.layer_infos)
        self._probe_shapes: dict[tuple, dict] = {}
        self._steps: dict[str, Callable] = {}
        self.stats: dict = {"graph_breaks": None, "compiled": False}
        storage = storage_dtype or ("float64" if dtype == torch.float64 else "float32")
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}")
        self.n_train: int | None = None
        if store is None:
            if _rank_and_world()[1] > 1:
                raise ValueError("caching under torch.distributed needs store=<a directory every rank shares>: "
                                 "ranks write their shards there and read each other's")
            self.store = MemoryStore(len(self.block_names))
        else:
            self.store = DiskStore(store, self._manifest(storage), len(self.block_names), storage)

    # ---- configuration ---------------------------------------------------------------------------
    def _checkpoint_states(self) -> list[dict | None]:
        return list(self.checkpoints) if self.checkpoints else [None]

    def _manifest(self, storage: str) -> dict:
        states = [s if s is not None else self.model.state_dict() for s in self._checkpoint_states()]
        return {
            "model_fingerprints": [model_fingerprint(s) for s in states],
            "layers": {n: [i.d_in, i.d_out, i.kind] for n, i in self.layer_infos.items()},
            "params": self.param_names,
            "compressors": {n: self.compressors[n].spec() for n in self.block_names},
            "k": self.k, "seed": self.seed, "dtype": str(self.dtype).replace("torch.", ""),
            "gradient_of": "output_fn" if self.method == "trak" else "loss_fn",
            "fisher": self.fisher,
        }

    def _load_checkpoint(self, index: int) -> None:
        state = self._checkpoint_states()[index]
        if state is not None:
            self.model.load_state_dict(state)

    # ---- per-batch step (compiled) ---------------------------------------------------------------
    def _probes(self, batch) -> dict[str, Tensor]:
        if not self.layer_names:
            return {}
        key = tuple(t.shape for t in _flat_tensors(batch))
        if key not in self._probe_shapes:
            self._probe_shapes[key] = self.capture.output_shapes(self.loss_fn, batch)
        return {n: torch.zeros(s, device=self.device, dtype=self._param_dtype()) for n, s in self._probe_shapes[key].items()}

    def _param_dtype(self):
        return next(self.model.parameters()).dtype

    def _raw_step(self, fn: Callable, batch, probes: dict[str, Tensor]):
        compressed = []
        values = None
        if self.layer_names:
            inputs, grads, values = self.capture.factors(fn, batch, probes)
            compressed = [compress_layer(self.compressors[n], inputs[n].detach(), grads[n]).to(self.dtype)
                          for n in self.layer_names]
        if self.param_names:
            wrappers = self.__dict__.setdefault("_loss_modules", {})
            if id(fn) not in wrappers:
                wrappers[id(fn)] = (fn, loss_module(self.model, fn))
            flat = per_sample_grads(wrappers[id(fn)][1], batch, self.param_names, self.param_chunk)
            compressed += [self.compressors[f"param:{n}"](flat[n]).to(self.dtype) for n in self.param_names]
            if values is None:
                with torch.no_grad():
                    values = fn(self.model, batch)
        return compressed, values.detach()

    def _step(self, kind: str) -> Callable:
        """kind: "loss" or "output" (TRAK). Compiled with fullgraph; falls back (and reports the number of
        graph breaks in ``stats``) when a model cannot be captured whole."""
        if kind in self._steps:
            return self._steps[kind]
        fn = self.loss_fn if kind == "loss" else self.output_fn
        eager = lambda batch, probes: self._raw_step(fn, batch, probes)  # noqa: E731
        if not self.use_compile:
            self._steps[kind] = eager
            return eager
        full = torch.compile(eager, fullgraph=True, dynamic=False)
        state = {"fn": full}

        def step(batch, probes):
            try:
                out = state["fn"](batch, probes)
                self.stats["compiled"] = True
                if self.stats["graph_breaks"] is None:
                    self.stats["graph_breaks"] = 0
                return out
            except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as err:
                if state["fn"] is not full:
                    raise
                explanation = torch._dynamo.explain(eager)(batch, probes)
                self.stats["graph_breaks"] = explanation.graph_break_count
                warnings.warn(f"the model cannot be compiled as one graph ({explanation.graph_break_count} graph "
                              f"breaks; first: {str(err).splitlines()[0]}); compiling with graph breaks")
                state["fn"] = torch.compile(eager, dynamic=False)
                return state["fn"](batch, probes)

        self._steps[kind] = step
        return step

    def compress_batch(self, batch, kind: str = "loss") -> tuple[list[Tensor], Tensor]:
        """Compressed per-sample gradients of one batch: ([n, k_l] per layer, values [n])."""
        batch = _to_device(batch, self.device)
        probes = self._probes(batch)
        compressed, values = self._step(kind)(batch, probes)
        rows = next(iter(probes.values())).shape[0] if probes else compressed[0].shape[0]
        if values.dim() != 1 or values.shape[0] != rows:
            name = "output_fn" if kind == "output" else "loss_fn"
            raise ValueError(f"{name} must return per-sample values of shape [B] = [{rows}], got {tuple(values.shape)}")
        return compressed, values

    # ---- cache stage -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _each_checkpoint(self):
        """Yield an iterator over checkpoint indices with the model in eval mode and that checkpoint's
        weights loaded; restores the model's own weights and training mode afterwards."""
        was_training = self.model.training
        original = {n: t.detach().clone() for n, t in self.model.state_dict().items()} if self.checkpoints else None
        self.model.eval()

        def indices():
            for c in range(len(self._checkpoint_states())):
                self._load_checkpoint(c)
                yield c

        try:
            yield indices()
        finally:
            if original is not None:
                self.model.load_state_dict(original)
            self.model.train(was_training)

    def cache(self, train_loader: Iterable) -> "Attributor":
        """Compress every training gradient (per checkpoint), then the per-layer FIMs. Resumable with a store path."""
        kind = "output" if self.method == "trak" else "loss"
        with self._each_checkpoint() as checkpoints:
            totals = [self._cache_checkpoint(c, train_loader, kind) for c in checkpoints]
        if len(set(totals)) != 1:
            raise ValueError(f"checkpoints saw different numbers of training samples: {totals}")
        self.n_train = totals[0]
        return self

    def _cache_checkpoint(self, c: int, loader: Iterable, kind: str) -> int:
        rank, world = _rank_and_world()
        done = self.store.completed_shards(c)
        n = 0
        index = -1
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"cache ckpt {c}", disable=not self.progress or rank != 0, leave=False)
        for index, batch in enumerate(bar):
            if index % world != rank:  # another rank's batch (torch.distributed): only count its rows
                n += batch_size(batch)
                continue
            digest = batch_digest(batch)
            if index in done:
                if done[index]["digest"] != digest:
                    raise ValueError(f"batch {index} differs from the one stored in shard {index}: the loader must "
                                     "yield the same batches in the same order to resume (or use a new store)")
                n += done[index]["rows"]
                continue
            compressed, values = self.compress_batch(batch, kind)
            rows = values.shape[0]
            self.store.write_shard(c, index, compressed, {"rows": rows, "digest": digest, "start": n,
                                                          "values": values.double().cpu().tolist()})
            n += rows
        _barrier()
        done = self.store.completed_shards(c)
        stale = [i for i in done if i > index]
        if stale:
            raise ValueError(f"the store holds shards {stale[:5]} beyond the loader's {index + 1} batches")
        missing = [i for i in range(index + 1) if i not in done]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} are missing after caching (did a rank fail?)")
        if n == 0:
            raise ValueError("train_loader yielded no samples")
        self.stats[f"cache_seconds_ckpt{c}"] = time.perf_counter() - start
        self.__dict__.get("_fim_cache", {}).pop(c, None)
        if rank == 0:  # the FIM is computed once, from the store every rank wrote to
            if self.method in ("if", "trak") and self.store.load_fim(c) is None:
                self.store.discard_fim(c)
                self.store.save_fim(c, self._compute_fim(c, loader, n))
            self.store.mark_complete(c, n)
        _barrier()
        return n

    def _compute_fim(self, c: int, loader: Iterable, n: int) -> list[DampedInverse]:
        accs = [FIMAccumulator(d, self.device, self.dtype) for d in self.dims]
        if self.fisher == "empirical" or self.method == "trak":
            for _, layers in self._iter_train(c):
                for acc, g in zip(accs, layers):
                    acc.add(g.to(self.device))
        else:
            for batch in tqdm(loader, desc=f"true fisher ckpt {c}", disable=not self.progress, leave=False):
                for layers, weights in self._true_fisher_grads(_to_device(batch, self.device)):
                    for acc, g in zip(accs, layers):
                        acc.add(g, weights)
        return [acc.finalize(n) for acc in accs]

    def _true_fisher_grads(self, batch):
        """Gradients of the cross-entropy with model-drawn labels (true_sampled) or, for each class c,
        with label c weighted by p_c (true: the exact expectation over classes)."""
        with torch.no_grad():
            probs = torch.softmax(self.logits_fn(self.model, batch).double(), dim=-1)
        if self.fisher == "true_sampled":
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            labels = [torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(self.device)]
            weights = [None]
        else:
            labels = [torch.full((probs.shape[0],), c, device=self.device) for c in range(probs.shape[1])]
            weights = [probs[:, c] for c in range(probs.shape[1])]
        for label, weight in zip(labels, weights):
            fn = lambda model, b, y=label: nn.functional.cross_entropy(self.logits_fn(model, b), y, reduction="none")  # noqa: E731
            layers, _ = self._raw_step(fn, batch, self._probes(batch))
            yield layers, weight

    def _iter_train(self, c: int, max_rows: int | None = None):
        """Yield (start row, [per-layer [rows, k_l] tensors]) over the stored training gradients."""
        done = self.store.completed_shards(c)
        for index, meta in done.items():
            layers = self.store.read_shard(c, index)
            if max_rows is None or meta["rows"] <= max_rows:
                yield meta["start"], [t.to(self.dtype) for t in layers]
                continue
            for s in range(0, meta["rows"], max_rows):
                yield meta["start"] + s, [t[s : s + max_rows].to(self.dtype) for t in layers]

    def _train_values(self, c: int) -> Tensor:
        done = self.store.completed_shards(c)
        return torch.tensor([v for meta in done.values() for v in meta["values"]], dtype=torch.float64)

    def _require_cache(self):
        if self.n_train is None:
            done = self.store.completed_shards(0)
            if not done:
                raise RuntimeError("call cache(train_loader) before attribute()")
            self.n_train = sum(m["rows"] for m in done.values())

    # ---- attribute stage -------------------------------------------------------------------------
    def _queries(self, test_loader: Iterable, c: int) -> list[Tensor]:
        kind = "output" if self.method == "trak" else "loss"
        parts = [self.compress_batch(batch, kind)[0] for batch in test_loader]
        if not parts:
            raise ValueError("test_loader yielded no samples")
        return [torch.cat([p[j] for p in parts]) for j in range(len(self.dims))]

    def _row_budget(self, n_test: int) -> int:
        per_row = 4 * (sum(self.dims) + n_test)
        return max(1, self.memory_budget // max(1, per_row))

    def query_features(self, test_loader: Iterable) -> list[list[Tensor]]:
        """Compressed query gradients, [checkpoint][block] -> [n_test, k_l]; reusable across dampings."""
        with self._each_checkpoint() as checkpoints:
            return [self._queries(test_loader, c) for c in checkpoints]

    def attribute(self, test_loader: Iterable | None = None, *, damping: float | None = None,
                  features: list[list[Tensor]] | None = None) -> Tensor:
        """Scores [n_test, n_train] (float32, or float64 with dtype=torch.float64); see the module docstring.
        ``damping`` overrides self.damping; ``features`` (from query_features) skips recompressing the queries."""
        self._require_cache()
        if features is None:
            if test_loader is None:
                raise ValueError("attribute needs test_loader or features")
            features = self.query_features(test_loader)
        damping = self.damping if damping is None else float(damping)
        scores = None
        q_weight = None
        for c, queries in enumerate(features):
            part = self._scores_for_checkpoint(c, queries, damping)
            weight = self.checkpoint_weights[c] if self.method == "tracin" else 1.0
            scores = part * weight if scores is None else scores + part * weight
            if self.method == "trak":
                q = 1.0 - torch.sigmoid(self._train_values(c))
                q_weight = q if q_weight is None else q_weight + q
        if self.method == "trak":
            m = len(features)
            scores = scores / m * (q_weight / m).to(scores.device, scores.dtype).unsqueeze(0)
        return scores

    def _fims(self, c: int) -> list[DampedInverse]:
        cache = self.__dict__.setdefault("_fim_cache", {})
        if c not in cache:
            fims = self.store.load_fim(c)
            if fims is None:
                raise RuntimeError("the store has no FIM for this checkpoint; run cache() to completion")
            cache[c] = fims
        return cache[c]

    def _scores_for_checkpoint(self, c: int, queries: list[Tensor], damping: float) -> Tensor:
        n_test = queries[0].shape[0]
        if self.method in ("if", "trak"):
            queries = [fim.apply(q, damping) for fim, q in zip(self._fims(c), queries)]
        scores = torch.zeros(n_test, self.n_train, dtype=self.dtype, device=self.device)
        train_norms = torch.zeros(self.n_train, dtype=torch.float64, device=self.device) if self.method == "gradcos" else None
        for start, layers in self._iter_train(c, self._row_budget(n_test)):
            rows = layers[0].shape[0]
            block = scores[:, start : start + rows]
            for q, g in zip(queries, layers):
                g = g.to(self.device)
                block += q @ g.T
                if train_norms is not None:
                    train_norms[start : start + rows] += g.double().pow(2).sum(1)
        if self.method == "gradcos":
            q_norms = sum(q.double().pow(2).sum(1) for q in queries).sqrt()
            denom = q_norms.unsqueeze(1) * train_norms.sqrt().unsqueeze(0)
            scores = (scores.double() / denom.clamp_min(1e-30)).to(self.dtype)
        return scores

    def top_k(self, test_loader: Iterable, k: int = 10, largest: bool = True) -> tuple[Tensor, Tensor]:
        """(values, indices) [n_test, k]: the most helpful (largest=True) or most harmful training examples."""
        scores = self.attribute(test_loader)
        return torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=largest)

    def self_influence(self) -> Tensor:
        """[n_train]: g_i^T (F + damping I)^-1 g_i for "if" (g_i^T g_i otherwise), from the store (checkpoint 0)."""
        self._require_cache()
        fims = self._fims(0) if self.method in ("if", "trak") else None
        out = torch.zeros(self.n_train, dtype=torch.float64)
        for start, layers in self._iter_train(0, self._row_budget(1)):
            for j, g in enumerate(layers):
                g = g.to(self.device)
                pre = fims[j].apply(g, self.damping) if fims else g
                out[start : start + g.shape[0]] += (pre.double() * g.double()).sum(1).cpu()
        return out.to(self.dtype)

    def close(self) -> None:
        """Remove the forward hooks from the model."""
        self.capture.remove()


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _flat_tensors(obj) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for key in sorted(obj) for t in _flat_tensors(obj[key])]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _flat_tensors(item)]
    return []


__all__ = ["Attributor", "METHODS", "batch_digest", "model_fingerprint"]
