"""The model's compressed per-sample gradients as the stages use them: capture + compress (capture.py,
compress.py, compiled.py) with the model in eval mode, at every checkpoint.

:class:`ModelGradients` is built once per Attributor from its configuration: the target layers and
params= blocks, their compressors, the batch step, the checkpoints, and which function is
differentiated (``kind``: the loss, or TRAK's output function). :func:`eval_mode` and
:func:`captured_factors` are the eval-mode gradient loop that Selective Mask training shares.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

import grass_ops
from grass_ops.compressors import FactorizedCompressor

from .batches import batch_digest, batch_size, batch_tensors, slice_rows
from .cache import require_reiterable
from .capture import FactorCapture, tokens_view
from .checkpoints import Checkpoints
from .compression import BatchCompressor, build_compressors
from .layers import LayerInfo, find_layers
from .optimizer_state import normalization
from .param_grads import find_params
from .sharding import check_sharding, check_supported
from .store.manifest import DURING_TRAINING, model_fingerprint

PARAM_SEED_TAG = 1 << 20  # params= blocks draw their seeds from derive_seed(seed, PARAM_SEED_TAG, ...)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode (per-sample gradients: no dropout, no batch statistics), its mode restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def captured_factors(model: nn.Module, loss_fn: Callable, loader: Iterable, infos: dict[str, LayerInfo]
                     ) -> Iterator[tuple[str, dict[str, Tensor], dict[str, Tensor], Tensor]]:
    """Per batch of ``loader`` (model in eval mode): (batch digest, inputs {layer: [B, T, d_in]},
    output gradients {layer: [B, T, d_out]}, loss values [B])."""
    capture = FactorCapture(model, infos)
    with eval_mode(model):
        for batch in loader:
            inputs, grads, values = capture.capture(loss_fn, batch)
            yield batch_digest(batch), inputs, grads, values


def _square_sums(t: Tensor) -> Tensor:
    """[B, ..., d] -> [B, d] float64: per sample, the sum over tokens of t**2. Squared and summed in float32 (float64
    for a float64 t), without a float64 copy of t: three times faster on a CPU, and the energy masks only rank
    these sums (every batch's are added up in float64)."""
    t = tokens_view(t)
    if t.dtype == torch.float64:
        return t.square().sum(1)
    squared = t.square() if t.dtype == torch.float32 else t.float().square_()  # t.float() is t for float32
    return squared.sum(1).double()


class _SecondMoments(torch.autograd.Function):
    """Identity on a layer output y; the gradient w.r.t. its zero z [B, d_in + d_out] (float64) is, per
    sample, the sum over tokens of x_in**2 (computed in the forward, [B, d_in]) beside that of the output
    gradient**2 (in the backward). Nothing of the layer outlives its backward but those B * d_in floats."""

    @staticmethod
    def forward(y, x_moments, z):
        return y.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, g):
        (x_moments,) = ctx.saved_tensors
        return g, None, torch.cat([x_moments, _square_sums(g)], dim=1)


def _moments_tap(y: Tensor, x: Tensor, z: Tensor) -> Tensor:
    return _SecondMoments.apply(y, _square_sums(x.detach()), z)


def factor_moments(model: nn.Module, loss_fn: Callable, loader: Iterable, infos: dict[str, LayerInfo]
                   ) -> Iterator[tuple[str, dict[str, tuple[Tensor, Tensor]], int]]:
    """Per batch of ``loader`` (model in eval mode): (batch digest, {layer: (sum over samples and tokens
    of x_in**2 [d_in], of the per-sample output gradient**2 [d_out]), float64}, samples). The same sums
    as over :func:`captured_factors`' factors, formed inside the backward: the working set is the
    model's own activations, not every layer's factors."""
    capture = FactorCapture(model, infos)
    with eval_mode(model), capture.hooks():
        for batch in loader:
            rows = batch_size(batch)
            device = batch_tensors(batch)[0].device
            zeros = {n: torch.zeros(rows, i.d_in + i.d_out, dtype=torch.float64, device=device) for n, i in infos.items()}
            sums, _ = capture.sketches(loss_fn, batch, dict.fromkeys(infos, _moments_tap), zeros)
            yield batch_digest(batch), {n: sums[n].sum(0).split([i.d_in, i.d_out]) for n, i in infos.items()}, rows


def check_gradient_matrix(t, columns: int, what: str, rows: str) -> None:
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


class ModelGradients:
    """Compressed per-sample gradients [B, columns] of a model (blocks side by side: target layers first,
    then "param:<name>" blocks; block j is columns offsets[j]:offsets[j + 1]).

    ``config``: an :class:`attribution.config.AttributorConfig`; ``factors``: the cache step also returns
    every target layer's factors (K-FAC statistics), which needs target layers."""

    def __init__(self, model: nn.Module, loss_fn: Callable, config, factors: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (model, batch) -> Tensor[B], got {type(loss_fn).__name__}")
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError("model has no parameters to attribute through")
        self.device = torch.device(config.device) if config.device is not None else first.device
        if first.device != self.device:
            raise ValueError(f"the model is on {first.device} but device={self.device}; move the model first")
        self.model, self.loss_fn, self.output_fn, self.config = model, loss_fn, config.output_fn, config
        self.kind, self.dtype = config.gradient_kind, config.dtype
        self.layer_infos = find_layers(model, config.layers) if config.layers != [] else {}
        self.layer_names = list(self.layer_infos)
        self.param_names = list(find_params(model, config.params)) if config.params else []
        expert_layers = [n for n, i in self.layer_infos.items() if i.kind == "expert"]
        if expert_layers and (factors or config.optimizer_state is not None or config.whitening_record is not None):
            what = "an optimizer normalization" if config.optimizer_state is not None else f"preconditioner={config.preconditioner!r}"
            raise ValueError(f"{what} does not support the experts of a fused mixture-of-experts module ({expert_layers[0]}, "
                             "...): use preconditioner 'fim' / 'none', or leave the experts out of layers")
        if not self.layer_names and not self.param_names:
            raise ValueError("nothing to attribute through: layers=[] and no params")
        if not self.layer_names and factors:
            raise ValueError(f"preconditioner={config.preconditioner!r} needs target linear layers (layers=[] selects none)")
        named = dict(model.named_parameters())
        covered = {id(named[f"{m}.weight"]) for info in self.layer_infos.values() for m in info.modules
                   if f"{m}.weight" in named}
        twice = [n for n in self.param_names if id(named[n]) in covered]
        if twice:
            raise ValueError(f"params {twice} are already attributed as target layers' weights; leave them out of params")
        built = build_compressors(config.compressor, self.layer_infos, config.k, config.seed) if self.layer_names else {}
        param_infos = {f"param:{n}": LayerInfo(n, 1, named[n].numel(), "param") for n in self.param_names}
        if param_infos:  # other parameters: flat per-sample gradients, one block each (seeds apart from the layers')
            seed = grass_ops.derive_seed(config.seed, PARAM_SEED_TAG)
            built.update(build_compressors(config.param_compressor, param_infos, config.k, seed))
        self.compressors = {n: c.to(self.device) for n, c in built.items()}
        self.block_names = self.layer_names + list(param_infos)
        self.checkpoints = Checkpoints(model, config.checkpoints, config.checkpoint_weights, config.method)
        factorized = {n for n in self.layer_names if isinstance(self.compressors[n], FactorizedCompressor)}
        self.normalization = normalization(model, config.optimizer_state, config.optimizer_eps, self.layer_infos,
                                           self.param_names, factorized, config.optimizer_power)
        self.sharded = check_sharding(model)  # FSDP2: eager, lock-step forwards (see attribution.sharding)
        if self.sharded:
            check_supported(config)
        self.compress = BatchCompressor(model, self.layer_infos, self.param_names, self.compressors, self.dtype,
                                        self.device, compile=False if self.sharded or expert_layers else config.compile,
                                        sharded=self.sharded, param_chunk=config.param_chunk,
                                        return_factors=factors, autocast=config.autocast,
                                        normalization=self.normalization)
        self.stats: dict = {"graph_breaks": None, "compiled": False, "compile_seconds": 0.0, "gradient_seconds": 0.0,
                            "fim_seconds": 0.0}
        self.algorithm: str | None = None  # the fingerprint algorithm of the store (see :meth:`pin_weights`)
        self.pinned: list[str] = []

    @property
    def widths(self) -> list[int]:
        return self.compress.widths

    @property
    def offsets(self) -> list[int]:
        return self.compress.offsets

    @property
    def columns(self) -> int:
        return self.compress.columns

    # ---- one batch -----------------------------------------------------------------------------
    def __call__(self, batch, kind: str | None = None) -> tuple[Tensor, Tensor]:
        """(grads [n, columns], values [n]) of one batch; kind: "loss" or "output" (default: ``self.kind``)."""
        return self._timed(self.compress, batch, kind or self.kind)

    def with_factors(self, batch, kind: str | None = None) -> tuple:
        """As ``__call__`` plus every layer's factors ({layer: [B, T, d_in]}, {layer: [B, T, d_out]})."""
        return self._timed(self.compress.with_factors, batch, kind or self.kind)

    def layer_factors(self, batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every target layer's factors of one batch (eager, eval mode): ({layer: inputs [B, T, d_in]},
        {layer: output gradients [B, T, d_out]}) of ``kind``'s function, in float32 under autocast."""
        fn = self.output_fn if self.kind == "output" else self.loss_fn
        start = time.perf_counter()
        try:
            with eval_mode(self.model):
                x, g, _ = self.compress.capture.capture(self.compress.forward_in_mixed_precision(fn), batch, self.device)
        finally:
            self.stats["gradient_seconds"] += time.perf_counter() - start
        if self.config.autocast is not None:
            x, g = {n: t.float() for n, t in x.items()}, {n: t.float() for n, t in g.items()}
        return x, g

    def cache_step(self, batch, observer=None) -> tuple[Tensor, Tensor]:
        """One training batch's compressed gradients; with an observer its factors go to ``observer.computed``."""
        if observer is None:
            return self(batch)
        grads, values, x, g = self.with_factors(batch)
        observer.computed(x, g)
        return grads, values

    @property
    def lockstep(self) -> Callable | None:
        """For a sharded model: a dropped compression of a batch's first sample (see attribution.sharding)."""
        if not self.sharded:
            return None
        return lambda batch: self._timed(self.compress.unchecked, slice_rows(batch, 0, 1), self.kind)

    def relabelled(self, batch, loss: Callable) -> Tensor:
        """[B, columns] compressed gradients of another loss(model, batch) (the true Fisher's), uncompiled."""
        return self.compress.eager(batch, loss)[0]

    def _timed(self, step: Callable, batch, kind: str):
        """step(batch, fn, name) with the model in eval mode, timed in stats."""
        fn, name = (self.output_fn, "output_fn") if kind == "output" else (self.loss_fn, "loss_fn")
        start = time.perf_counter()
        try:
            with eval_mode(self.model):
                out = step(batch, fn, name)
        finally:
            self.stats["gradient_seconds"] += time.perf_counter() - start
        self.stats.update(self.compress.stats())
        return out

    # ---- the weights the gradients are taken at -------------------------------------------------
    def fingerprints(self) -> list[str]:
        return [model_fingerprint(self.checkpoints.state(c), self.algorithm) for c in range(len(self.checkpoints))]

    def pin_weights(self, algorithm: str | None) -> list[str]:
        """The checkpoints' fingerprints with ``algorithm`` (a store's; None: by device), kept for
        :meth:`check_unchanged`."""
        self.algorithm = algorithm
        self.pinned = self.fingerprints()
        return self.pinned

    @property
    def during_training(self) -> bool:
        """Whether the store was recorded during training (each row at its step's weights; see
        attribution.integrations): the architecture is pinned, not the weights."""
        return self.algorithm == DURING_TRAINING

    def check_unchanged(self) -> None:
        if self.during_training:
            return
        if self.fingerprints() != self.pinned:
            raise ValueError("the model's weights changed since this Attributor was built, and its store holds gradients "
                             "of the weights it was built with: build a new Attributor (with a new store) for the new weights")

    def manifest(self, fingerprints: list[str]) -> dict:
        """What a store's data depends on: the weights, the blocks and their compressors, the gradients' kind."""
        config = self.config
        return {
            "model_fingerprints": fingerprints,
            "layers": {n: [i.d_in, i.d_out, i.kind] for n, i in self.layer_infos.items()},
            "params": self.param_names,
            "compressors": {n: _portable(self.compressors[n].spec()) for n in self.block_names},
            "blocks": [[n, w] for n, w in zip(self.block_names, self.widths)],
            "k": config.k, "seed": config.seed, "dtype": str(self.dtype).replace("torch.", ""),
            "gradient_of": "output_fn" if self.kind == "output" else "loss_fn",
            "fisher": config.fisher,
            **({"autocast": str(config.autocast).replace("torch.", "")} if config.autocast is not None else {}),
            **({"optimizer_state": self.normalization.record} if self.normalization is not None else {}),
            **({"whitening": config.whitening_record} if config.whitening_record is not None else {}),
        }

    # ---- queries -------------------------------------------------------------------------------
    def per_checkpoint(self, test_loader: Iterable, per_batch: Callable) -> list[list]:
        """[per_batch(c, batch) for every batch] for every checkpoint c, the model in that state (eval
        mode). Refuses changed weights, a one-shot loader with several checkpoints, a loader without
        batches and one that yields other batches at another checkpoint."""
        self.check_unchanged()
        if len(self.checkpoints) > 1:
            require_reiterable(test_loader, "it is read once per checkpoint")
        out, digests = [], []
        with self.checkpoints.each() as indices:
            for c in indices:
                parts, seen = [], []
                for batch in test_loader:
                    seen.append(batch_digest(batch))
                    parts.append(per_batch(c, batch))
                if not parts:
                    raise ValueError("test_loader yielded no batches")
                out.append(parts)
                digests.append(seen)
        if any(d != digests[0] for d in digests):
            raise ValueError("the test loader yielded different batches for different checkpoints (a shuffling "
                             "DataLoader?): every checkpoint must see the same queries in the same order")
        return out

    def query_gradients(self, test_loader: Iterable) -> list[Tensor]:
        """Per checkpoint, the compressed query gradients [n_test, columns]."""
        grads = [torch.cat(parts) for parts in self.per_checkpoint(test_loader, lambda c, batch: self(batch)[0])]
        check_some_queries(grads[0])
        return grads


    def precomputed_batch(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """(batch, zero values) for a checked batch of precomputed compressed gradients [B, columns]."""
        check_gradient_matrix(batch, self.columns, "cache_gradients: each batch", "rows")
        return batch, torch.zeros(batch.shape[0], dtype=torch.float64)

    def precomputed_queries(self, grads: Tensor | list[Tensor]) -> list[Tensor]:
        """Checked precomputed compressed query gradients: one [n_test, columns] float tensor per checkpoint
        (a tensor for one), on the device in the run's dtype."""
        grads = [grads] if isinstance(grads, Tensor) else list(grads)
        if len(grads) != len(self.checkpoints):
            raise ValueError(f"features_from_gradients: one tensor per checkpoint ({len(self.checkpoints)}), got {len(grads)}")
        for g in grads:
            check_gradient_matrix(g, self.columns, "features_from_gradients: each tensor", "n_test")
            if g.shape[0] != grads[0].shape[0] or g.shape[0] == 0:
                raise ValueError("features_from_gradients: every checkpoint's tensor needs the same number (>= 1) of rows")
            if not torch.isfinite(g).all():
                raise FloatingPointError("features_from_gradients: the query gradients hold non-finite values")
        return [g.to(self.device, self.dtype) for g in grads]


def check_some_queries(grads: Tensor) -> None:
    if grads.shape[0] == 0:
        raise ValueError("test_loader yielded no samples")


__all__ = ["ModelGradients", "PARAM_SEED_TAG", "captured_factors", "check_gradient_matrix", "eval_mode"]
