"""A Hugging Face ``Trainer`` callback that records compressed per-sample gradients while the model trains.

At each chosen optimizer step the callback takes that step's training batches (every micro-batch of a
gradient-accumulation step, captured by a forward pre-hook on the model) and, just before the optimizer
step (``on_pre_optimizer_step``: the weights the batches were trained at), compresses their per-sample
gradients with the model in eval mode, as ``Attributor.compress_batch`` does. It then

* writes them to a store (``store=DIR``): one shard per micro-batch, crash-safe and resumable like
  ``Attributor.cache``'s, completed (with its FIM) when training ends. ``Attributor(model, loss_fn,
  store=DIR, compressor=..., k=..., seed=..., layers=...)`` reads it with the trained model (or any
  weights of the same architecture): the store pins the architecture, not the weights, since each row is
  a gradient at the weights of its own step; ``Attributor.cache`` refuses to add rows to it;
* and/or scores a fixed query set on the fly (``queries=``), without a store: TracIn as in its paper,
  score(q, z) = sum over the recorded steps t that trained on z of lr_t * g_q(w_t) . g_z(w_t), the query
  gradients compressed at the same weights as the batch's (:meth:`GradientCacheCallback.query_scores`).

The Trainer drops a dataset's id columns, so rows are identified by :func:`example_digest` (the
sha256 of a row's unpadded token ids): :func:`recorded_rows` lists a store's (step, digest) per row.
With ``cli_model=`` (where the trained model will be saved) the callback also writes the store's ``cli.json`` and
``docs.jsonl`` (row r: id "<step>:<digest>", the decoded text, its step and digest), so that
``grass-attribute attribute --store DIR --prompt ...`` reads it like a store of ``grass-attribute cache``.
Under torch.distributed (DDP) every rank records its own micro-batches into the shared store.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - the llm extra is not installed
    raise ImportError("attribution.integrations needs transformers: pip install 'grass_ops[llm]'") from error

from ..attributor import Attributor
from ..batches import batch_digest, slice_rows
from ..cache import LazyWriter, finish_checkpoint
from ..collectives import collectively
from ..config import check_int
from ..process_group import all_gather_objects, barrier, rank_and_world
from ..sharding import is_sharded
from ..store import DiskStore
from ..store.manifest import DURING_TRAINING
from .fused import FusedRecorder, FusedUnavailable, unavailable_reason

FUSED_RTOL = {False: 1e-3, True: 5e-2}  # the first fused row against the eval-mode gradient (by autocast)

# The Attributor options the callback passes on; the others are fixed by what it records.
PASSED_OPTIONS = ("dtype", "autocast", "storage_dtype", "memory_budget", "params", "param_compressor", "param_chunk",
                  "device", "damping")


def example_digest(input_ids: Tensor, attention_mask: Tensor | None = None) -> str:
    """The identity of one training example: sha256 (24 hex digits) of its token ids [T] where
    ``attention_mask`` [T] is nonzero (padding excluded), as int64."""
    ids = torch.as_tensor(input_ids).detach().reshape(-1)
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask).detach().reshape(-1)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has {mask.numel()} entries but input_ids {ids.numel()}")
        ids = ids[mask.to(ids.device) != 0]
    data = ids.to("cpu", torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:24]


def row_digests(batch: dict) -> list[str]:
    """example_digest of every row of a batch dict (``input_ids`` [B, T], optional ``attention_mask``)."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    return [example_digest(ids[i], None if mask is None else mask[i]) for i in range(ids.shape[0])]


def row_tokens(batch: dict) -> list[list[int]]:
    """Every row's unpadded token ids (as :func:`example_digest` sees them)."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    return [(ids[i] if mask is None else ids[i][mask[i] != 0]).tolist() for i in range(ids.shape[0])]


def causal_lm_loss(model: nn.Module, batch: dict) -> Tensor:
    """Per-sample summed next-token cross-entropy [B] over the ``labels`` that are not -100 (the Hugging
    Face convention: labels aligned with input_ids, shifted here). Every other tensor of the batch is passed to
    the model (attention_mask, position_ids, ...), as the Trainer passes them."""
    if "labels" not in batch:
        raise ValueError("causal_lm_loss needs the batch's 'labels' (give loss_fn= for batches without them)")
    logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    labels = batch["labels"][:, 1:]
    token_loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none", ignore_index=-100)
    return token_loss.sum(1)


def recorded_rows(store: str | Path) -> list[dict]:
    """[{"step", "digest"}] of a completed store's rows in row order (the Attributor's training indices)."""
    opened = DiskStore(store)
    if opened.manifest["model_fingerprints"][0].partition(":")[0] != DURING_TRAINING:
        raise ValueError(f"store {store} was not recorded during training (GradientCacheCallback): it has no steps per row")
    record = opened.require_complete(0)
    metas = opened.shard_meta(0)
    return [{"step": int(metas[s.index]["step"]), "digest": d} for s in record.shards for d in metas[s.index]["row_digests"]]


class _TrainingAttributor(Attributor):
    """An Attributor whose new store pins the architecture, not the weights (rows come from many steps)."""

    def _weights_algorithm(self, root):
        return DURING_TRAINING


def _chosen_steps(every, steps) -> tuple[int | None, frozenset | None]:
    if steps is not None:
        if every is not None:
            raise ValueError("give every= or steps=, not both")
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise TypeError(f"steps must be an iterable of optimizer steps (ints >= 1), got {steps!r}")
        chosen = frozenset(check_int("steps", s) for s in steps)
        if not chosen:
            raise ValueError("steps is empty: give at least one optimizer step")
        return None, chosen
    return check_int("every", 1 if every is None else every), None


class GradientCacheCallback(TrainerCallback):
    """Records the compressed per-sample gradients of the training batches at chosen optimizer steps.

    store: a directory (a new or a resumable store; see the module docstring) or None.
    queries: None or an iterable of query batches (dicts like the training batches') scored on the fly.
    every: record every ``every``-th optimizer step (1-based; default 1, every step), or
    steps: exactly these optimizer steps.
    loss_fn(model, batch) -> Tensor[B]: per-sample losses (default :func:`causal_lm_loss`).
    compressor, k, layers, seed, compile, progress and ``options`` (dtype, autocast, storage_dtype, ...): as
    :class:`attribution.Attributor`'s (defaults: grass-attribute's, factgrass:blowup=4 with k=256 over every
    linear layer of the transformer blocks, else over every linear layer; uncompiled). Read the store with the
    same compressor, k, seed and layers.
    """

    def __init__(self, store: str | Path | None = None, *, queries: Iterable | None = None, every: int | None = None,
                 steps: Iterable[int] | None = None, loss_fn: Callable | None = None,
                 compressor="factgrass:blowup=4", k: int = 256, layers=None, seed: int = 0, compile: bool = False,
                 progress: bool = False, fused: bool | None = None, cli_model: str | None = None, **options):
        if store is None and queries is None:
            raise ValueError("nothing to record: give store= (a directory) and/or queries= (batches to score on the fly)")
        if store is not None and not isinstance(store, (str, Path)):
            raise TypeError(f"store must be a directory path or None, got {type(store).__name__}")
        if fused not in (None, True, False):
            raise TypeError(f"fused must be None (automatic), True or False, got {fused!r}")
        if fused and loss_fn is not None:
            raise ValueError("fused=True records the gradients of the model's own loss: give no loss_fn")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (model, batch) -> Tensor[B], got {type(loss_fn).__name__}")
        if cli_model is not None and (store is None or not isinstance(cli_model, (str, Path))):
            raise ValueError("cli_model (the folder the trained model is saved to, for grass-attribute) needs store=")
        if cli_model is not None and options.get("dtype", torch.float32) != torch.float32:
            raise ValueError("cli_model: grass-attribute reads float32 gradients; give no dtype= with cli_model")
        self.cli_model = None if cli_model is None else str(cli_model)
        unknown = sorted(set(options) - set(PASSED_OPTIONS))
        if unknown:
            raise TypeError(f"GradientCacheCallback got unexpected options {unknown}; it passes on {list(PASSED_OPTIONS)}")
        self.every, self.steps = _chosen_steps(every, steps)
        self.queries = None if queries is None else list(queries)
        if self.queries is not None and not all(isinstance(q, dict) and "input_ids" in q for q in self.queries):
            raise TypeError("queries must be batches: dicts holding 'input_ids' [B, T] (and what loss_fn reads)")
        if self.queries == []:
            raise ValueError("queries is empty: give at least one query batch, or None")
        self.store_path = None if store is None else Path(store)
        self.loss_fn = causal_lm_loss if loss_fn is None else loss_fn
        self.fused = fused
        self.attributor_options = dict(compressor=compressor, k=k, layers=layers, seed=seed, compile=compile,
                                       progress=progress, **options)
        self.attributor: Attributor | None = None
        self._model, self._hooks = None, []
        self._active, self._inside, self._pending = False, False, []
        self._recorder: FusedRecorder | None = None  # fused recording (see attribution.integrations.fused), or None
        self._open = None  # the micro-batch whose training forward runs with the taps
        self._verified = False
        self.mode: str | None = None  # "fused" or "recompute", once training began
        self._position, self._start = 0, 0  # the next shard's index (over every rank) and first row
        self._revisit: dict[int, dict] = {}  # shards of steps after the resumed checkpoint, met again as they run
        self._local: list[tuple[int, int, list[str], Tensor | None]] = []  # (index, step, digests, scores [n_q, rows])
        self._gathered = None

    # ---- which steps -----------------------------------------------------------------------------
    def records(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is recorded."""
        return step in self.steps if self.steps is not None else step % self.every == 0

    # ---- Trainer events --------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("GradientCacheCallback: the Trainer passed no model to on_train_begin")
        self._release()  # a train() that raised left its hooks behind
        if is_sharded(model):
            raise ValueError("GradientCacheCallback does not record a sharded (FSDP) training run: every forward is a "
                             "collective there, and the recording would have to run in lock-step on every rank")
        self._tokenizer = kwargs.get("processing_class") or kwargs.get("tokenizer")
        self._model_dtype = str(next(model.parameters()).dtype).replace("torch.", "")  # how grass-attribute loads it
        if self.cli_model is not None and not hasattr(self._tokenizer, "decode"):
            raise ValueError("cli_model: the store's docs.jsonl holds the decoded rows; give the Trainer its tokenizer "
                             "(processing_class=)")
        if self.attributor is None or self._model is not model:
            self._model = model
            options = {**self.attributor_options, "layers": _default_layers(model, self.attributor_options["layers"])}
            self.attributor = _TrainingAttributor(model, self.loss_fn, store=self.store_path, **options)
        self._gathered, self._local, self._verified = None, [], False
        reason = "a custom loss_fn" if self.loss_fn is not causal_lm_loss else unavailable_reason(self.attributor.gradients.compress, model)
        if reason is not None and self.fused:
            raise ValueError(f"fused=True cannot be served: {reason}")
        self._recorder = None if reason is not None or self.fused is False else FusedRecorder(self.attributor.gradients.compress)
        self.mode = "recompute" if self._recorder is None else "fused"
        if self.store_path is not None:
            self._open_store(state.global_step)
        self._hooks = [model.register_forward_pre_hook(self._capture, with_kwargs=True),
                       model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True)]

    def on_step_begin(self, args, state, control, **kwargs):
        self._active, self._pending = self.records(state.global_step + 1), []

    def on_pre_optimizer_step(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
        if self._active:
            if not self._pending:
                raise RuntimeError(f"GradientCacheCallback: step {state.global_step + 1} ran no forward through the model "
                                   "it was given (is the Trainer's model another module?)")
            self._record(state.global_step + 1, _learning_rate(lr_scheduler, optimizer))
        self._active, self._pending = False, []

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()
        try:
            if self.store_path is not None:
                self._finish_store()
        finally:
            self._release()
        if self.queries is not None:
            self._gathered = _merge(all_gather_objects(self._local))

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _release(self) -> None:
        """Remove the model hooks and any taps left on (idempotent)."""
        self._remove_hooks()
        self._open, self._pending, self._active = None, [], False
        if self._recorder is not None and self._recorder.capture.armed:
            self._recorder.end_interrupted()

    @contextlib.contextmanager
    def _locked(self):
        """The store's writer lock while the block writes (rank 0's, shared by the ranks); yields the writer. Held
        per recorded step, so that a train() that raises leaves no lock behind."""
        rank, world = rank_and_world()
        writer = LazyWriter(self.attributor.store)
        writer.delegated = rank != 0
        try:
            collectively(writer.ensure)
            barrier()
            yield writer
            barrier()  # every rank's shards are written before rank 0 lets the lock go
        finally:
            writer.__exit__(None, None, None)

    # ---- recording -------------------------------------------------------------------------------
    def _capture(self, module, args, kwargs):
        if not self._active or self._inside or not module.training:
            return None
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise RuntimeError("GradientCacheCallback: the training forward got no input_ids tensor [B, T]")
        # the batch's own tensors (not e.g. the Trainer's num_items_in_batch)
        batch = {key: value for key, value in kwargs.items()
                 if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == ids.shape[0]}
        batch["input_ids"] = ids
        fused = self._recorder.begin(int(ids.shape[0])) if self._recorder is not None else None
        self._pending.append((batch, fused))
        self._open = self._pending[-1] if fused is not None else None
        return None

    def _after_forward(self, module, args, kwargs, output):
        """After the training forward (also when it raised: always_call): the taps come off."""
        if self._open is not None:
            (batch, fused), self._open = self._open, None
            if output is None:  # the forward raised: nothing of this step is recorded
                self._recorder.end_interrupted()
                self._active, self._pending = False, []
                return None
            self._recorder.end(fused, batch, kwargs, output)
        return None

    def _query_gradients(self) -> Tensor:
        return torch.cat([self.attributor.compress_batch(q)[0] for q in self.queries])

    def _record(self, step: int, lr: float) -> None:
        rank, world = rank_and_world()
        counts = all_gather_objects(len(self._pending))
        if len(set(counts)) != 1:
            raise RuntimeError(f"GradientCacheCallback: the ranks ran different numbers of micro-batches at step {step}: {counts}")
        self._inside = True
        try:
            queries = self._query_gradients() if self.queries is not None else None
            with self._locked() if self.store_path is not None else contextlib.nullcontext():
                self._record_batches(step, lr, queries, rank, world)
        finally:
            self._inside = False

    def _record_batches(self, step: int, lr: float, queries: Tensor | None, rank: int, world: int) -> None:
        for batch, fused in self._pending:
            rows = int(batch["input_ids"].shape[0])
            sizes = all_gather_objects(rows)
            index, start = self._position + rank, self._start + sum(sizes[:rank])
            grads, digests = self._shard(index, step, lr, batch, start, lambda: self._gradients(batch, fused))
            if queries is not None:
                self._local.append((index, step, digests, (lr * queries @ grads.to(queries.dtype).T).cpu()))
            self._position += world
            self._start += sum(sizes)

    def _gradients(self, batch: dict, fused) -> tuple[Tensor, Tensor]:
        """(grads [B, columns], values [B]): from the training backward (fused), else recomputed in eval mode."""
        if fused is not None and self._recorder is not None:
            try:
                grads, values = self._recorder.rows(fused)
                if not self._verified:
                    self._verify(batch, grads, fused.autocast)
                return grads, values
            except FusedUnavailable as problem:
                if self.fused:
                    raise RuntimeError(f"fused=True: {problem}") from None
                warnings.warn(f"GradientCacheCallback: recomputing the per-sample gradients from now on ({problem})",
                              RuntimeWarning, stacklevel=2)
                self._recorder, self.mode = None, "recompute"
        return self.attributor.compress_batch(batch)

    def _verify(self, batch: dict, grads: Tensor, autocast: bool) -> None:
        """The first fused row of a run against its eval-mode gradient (dropout or another loss would differ)."""
        exact = self.attributor.compress_batch(slice_rows(batch, 0, 1))[0][0].to(grads.dtype)
        error = float((grads[0] - exact).norm() / exact.norm().clamp_min(1e-30))
        if error > FUSED_RTOL[autocast]:
            raise FusedUnavailable(f"the training step's gradient of a sample differs from its eval-mode gradient by "
                                   f"{error:.2g} (relative; dropout?)")
        self._verified = True

    def _shard(self, index: int, step: int, lr: float, batch: dict, start: int, gradients) -> tuple[Tensor, list[str]]:
        """(grads [rows, columns], row digests) of one micro-batch, written as shard ``index`` (a shard an
        interrupted run already wrote for the same batch is read back instead)."""
        digests, digest = row_digests(batch), batch_digest(batch)
        store = self.attributor.store if self.store_path is not None else None
        existing = self._revisit.pop(index, None)  # a shard an interrupted run wrote after the resumed checkpoint
        if existing is not None:
            if existing["digest"] != digest or int(existing["start"]) != start or int(existing["step"]) != step:
                raise ValueError(f"store {self.store_path} holds a different batch as shard {index} (step "
                                 f"{existing['step']}, not {step}): resume the same training run, or use a new store")
            return store.read_shard(0, store.shard_info(0, index, existing)).float(), digests
        grads, values = gradients()
        if store is not None:
            store.write_shard(0, index, grads, {"rows": len(digests), "digest": digest, "start": start,
                                                "values": values.double().cpu().tolist(), "step": step,
                                                "learning_rate": lr, "row_digests": digests,
                                                **({"row_tokens": row_tokens(batch)} if self.cli_model else {})})
        return grads, digests

    # ---- the store -------------------------------------------------------------------------------
    def _open_store(self, global_step: int) -> None:
        """Continue after the shards of the steps up to ``global_step`` (a resumed run); later shards of an
        interrupted run are checked against the batches as the steps run again."""
        world = rank_and_world()[1]
        store = self.attributor.store
        metas = store.shard_meta(0)
        done = {i: m for i, m in metas.items() if int(m["step"]) <= global_step}
        self._revisit = {i: m for i, m in metas.items() if int(m["step"]) > global_step}
        self._position = 0 if not done else max(done) + 1
        if self._position % world:
            raise ValueError(f"store {self.store_path} was recorded by a run with another number of ranks; use a new store")
        missing = [i for i in range(self._position) if i not in done]
        if missing:
            raise ValueError(f"store {self.store_path} lacks shards {missing[:5]} of steps up to {global_step}: it was "
                             "written by another run; use a new store")
        self._start = sum(int(m["rows"]) for m in done.values())

    def _finish_store(self) -> None:
        store, attributor = self.attributor.store, self.attributor
        count = self._position
        if count == 0:
            return
        with self._locked() as writer:
            record = finish_checkpoint(store, 0, count, writer,
                                       lambda record: attributor.preconditioning.derive(0, record, None, writer))
            attributor.ann.refresh([record], writer)
            if self.cli_model is not None:
                collectively(lambda: rank_and_world()[0] == 0 and self._write_cli_files(record))

    def _write_cli_files(self, record) -> bool:
        """docs.jsonl (one document per row) and cli.json (the flags that reproduce this compressor), attached."""
        from grass_ops.atomic_files import write_text_atomic

        from ..llm.config import CLI_JSON, CacheConfig

        store, options = self.attributor.store, self.attributor_options
        autocast = self.attributor.config.autocast
        autocast = "none" if autocast is None else str(autocast).replace("torch.", "")
        metas = store.shard_meta(0)
        docs = []
        for shard in record.shards:
            meta = metas[shard.index]
            if "row_tokens" not in meta:
                raise ValueError(f"store {self.store_path}: shard {shard.index} was recorded without cli_model (its rows' "
                                 "tokens were not kept); use a new store for cli_model")
            for digest, ids in zip(meta["row_digests"], meta["row_tokens"]):
                docs.append({"id": f"{meta['step']}:{digest}", "text": self._tokenizer.decode(ids), "step": meta["step"],
                             "digest": digest})
        text = "".join(json.dumps(d) + "\n" for d in docs)
        layers = options["layers"]
        config = CacheConfig(model=self.cli_model, compressor=options["compressor"], k=options["k"], seed=options["seed"],
                             layers=None if layers is None else [layers] if isinstance(layers, str) else list(layers),
                             storage_dtype=store.storage, dtype=self._model_dtype, autocast=autocast, masks="random",
                             limit=None,
                             damping=options.get("damping", CacheConfig.damping))
        corpus = {"documents": len(docs), "sha256": hashlib.sha256(text.encode()).hexdigest(), "segments": [len(docs)]}
        write_text_atomic(store.root / "docs.jsonl", text)
        write_text_atomic(store.root / CLI_JSON, config.record_text(corpus))
        store.attach(["docs.jsonl", CLI_JSON], replace=("docs.jsonl", CLI_JSON))
        return True

    # ---- results ---------------------------------------------------------------------------------
    def query_scores(self) -> tuple[Tensor, list[dict]]:
        """(scores [n_queries, n_rows], rows [{"step", "digest"}]) of every recorded row (all ranks, in
        shard order) once training ended: lr_t * g_q(w_t) . g_z(w_t) per row (float32)."""
        if self.queries is None:
            raise ValueError("query_scores: this callback was given no queries")
        if self._gathered is None:
            raise RuntimeError("query_scores: training has not ended (call it after Trainer.train())")
        if not self._gathered[1]:
            raise RuntimeError("query_scores: no step was recorded (check every= / steps= against the training's steps)")
        return self._gathered

    def example_scores(self) -> tuple[Tensor, list[str]]:
        """(TracIn scores [n_queries, n_examples], example digests): :meth:`query_scores` summed over the
        recorded steps of each example, examples in order of first appearance."""
        scores, rows = self.query_scores()
        order: dict[str, int] = {}
        for row in rows:
            order.setdefault(row["digest"], len(order))
        columns = torch.tensor([order[row["digest"]] for row in rows], dtype=torch.long)
        out = torch.zeros(scores.shape[0], len(order), dtype=torch.float64)
        out.index_add_(1, columns, scores.double())
        return out.float(), list(order)


def _default_layers(model: nn.Module, layers):
    """``layers``, or for None grass-attribute's default: every linear layer of the transformer blocks (a LoRA
    model's adapters), else find_layers' default (every linear layer)."""
    if layers is not None:
        return layers
    from ..llm.models import UsageError, resolve_layers

    try:
        return resolve_layers(model, None)
    except UsageError:
        return None


def _learning_rate(lr_scheduler, optimizer) -> float:
    if lr_scheduler is not None and hasattr(lr_scheduler, "get_last_lr"):
        return float(lr_scheduler.get_last_lr()[0])
    if optimizer is not None:
        return float(optimizer.param_groups[0]["lr"])
    raise RuntimeError("GradientCacheCallback: the Trainer passed neither lr_scheduler nor optimizer")


def _merge(parts: list[list]) -> tuple[Tensor, list[dict]]:
    entries = sorted((e for part in parts for e in part), key=lambda e: e[0])
    if not entries:
        return torch.zeros(0, 0), []
    rows = [{"step": step, "digest": d} for _, step, digests, _ in entries for d in digests]
    return torch.cat([e[3] for e in entries], dim=1), rows


__all__ = ["GradientCacheCallback", "causal_lm_loss", "example_digest", "recorded_rows"]
