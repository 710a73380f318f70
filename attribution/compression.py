"""Compress stage: per-block compressors from a spec ("factgrass", "sjlt:s=2", ...) and the
per-batch step that turns a batch into compressed per-sample gradients [B, columns].

A *block* is one target linear layer or one other parameter (``params=``; per-sample gradients from
vmap(grad)). A layer's block is compressed inside the backward pass (:func:`layer_tap`, the capture
stage's ``sketches``): factorized compressors (FactGraSS, LoGra) from the masked or projected factors,
flat ones (SJLT, masks, GraSS, Gaussian, FJLT, identity) from the per-sample weight gradient, formed
for one layer at a time. With ``return_factors`` (K-FAC statistics) the step captures every layer's
factors instead and compresses them after the backward (:func:`compress_layer`). Every block's compressed gradients sit side by
side in one row: columns offsets[j]:offsets[j + 1] belong to block j.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

import grass_ops
from grass_ops import compressors as C

from .batches import batch_size, shape_key, to_device
from .capture import FactorCapture, tokens_view
from .compiled import CompiledStep
from .layers import LayerInfo
from .param_grads import loss_module, per_sample_grads
from .regional import MIN_BLOCKS, RegionalCompile, repeated_blocks

# name -> builder(layer, k, seed, options) -> Compressor
_BUILDERS: dict[str, Callable] = {}


def _builder(*names):
    def register(fn):
        for name in names:
            _BUILDERS[name] = fn
        return fn

    return register


def _intermediate(d: int, k_sqrt: int, blowup: float) -> int:
    return max(1, min(d, int(round(blowup * k_sqrt))))


def _at_most(option: str, value: int, bound: int, layer: LayerInfo, what: str) -> int:
    if value > bound:
        raise ValueError(f"compressor option {option}={value} exceeds {what} ({bound}) of layer {layer.name}")
    return value


def _learned(mask_dir: str | None, layer: LayerInfo, part: str, size: int, k: int | None):
    """A Selective Mask saved by attribution.selective_mask.train_masks (None: use a random mask)."""
    if mask_dir is None:
        return None
    return C.SelectiveMask(size, path=Path(mask_dir) / f"{layer.name}{part}.npz", k=k)


@_builder("factgrass")
def _factgrass(layer: LayerInfo, k: int, seed: int, blowup: float = 2.0, k_in: int | None = None,
               k_out: int | None = None, s: int = 1, mask_dir: str | None = None):
    """k_in' = k_out' = blowup * sqrt(k) (capped at d), as in the paper's FactGraSS. mask_dir: learned
    factorized Selective Masks (<layer>.in.npz / <layer>.out.npz) instead of random ones."""
    root = math.isqrt(k) or 1
    k_in = _at_most("k_in", k_in, layer.d_in, layer, "d_in") if k_in else _intermediate(layer.d_in, root, blowup)
    k_out = _at_most("k_out", k_out, layer.d_out, layer, "d_out") if k_out else _intermediate(layer.d_out, root, blowup)
    return C.FactGraSS(layer.d_in, layer.d_out, k, k_in, k_out, seed=seed, s=min(s, k),
                       in_mask=_learned(mask_dir, layer, ".in", layer.d_in, k_in),
                       out_mask=_learned(mask_dir, layer, ".out", layer.d_out, k_out))


@_builder("logra")
def _logra(layer: LayerInfo, k: int, seed: int, k_in: int | None = None, k_out: int | None = None):
    root = math.isqrt(k) or 1
    k_in = _at_most("k_in", k_in, layer.d_in, layer, "d_in") if k_in else min(layer.d_in, root)
    k_out = _at_most("k_out", k_out, layer.d_out, layer, "d_out") if k_out else min(layer.d_out, root)
    return C.LoGra(layer.d_in, layer.d_out, k_in, k_out, seed)


@_builder("sjlt")
def _sjlt(layer, k, seed, s: int = 1):
    return C.SJLT(layer.params, k, _at_most("s", s, k, layer, "k"), seed)


@_builder("random_mask", "rm")
def _random_mask(layer, k, seed):
    return C.RandomMask(layer.params, k, seed)


@_builder("selective_mask", "sm")
def _selective_mask(layer, k, seed, mask_dir: str | None = None):
    if mask_dir is None:
        raise ValueError("selective_mask needs mask_dir=<directory of masks from attribution.selective_mask.train_masks>")
    return _learned(mask_dir, layer, "", layer.params, k)


@_builder("grass")
def _grass(layer, k, seed, k_prime: int | None = None, blowup: float = 4.0, s: int = 1, mask_dir: str | None = None):
    """SJLT_k o Mask_k'; mask_dir: a learned plain Selective Mask of k' coordinates (GraSS with SM)."""
    if k_prime is not None:
        _at_most("k_prime", k_prime, layer.params, layer, "the parameter count")
        if k_prime < k:
            raise ValueError(f"compressor option k_prime={k_prime} must be >= k={k} (layer {layer.name})")
    else:
        k_prime = max(k, min(layer.params, int(blowup * k)))
    return C.GraSS(layer.params, k, k_prime, _at_most("s", s, k, layer, "k"), seed,
                   mask=_learned(mask_dir, layer, "", layer.params, k_prime))


@_builder("gaussian")
def _gaussian(layer, k, seed):
    return C.Gaussian(layer.params, k, seed)


@_builder("rademacher")
def _rademacher(layer, k, seed):
    return C.Rademacher(layer.params, k, seed)


@_builder("fjlt")
def _fjlt(layer, k, seed):
    return C.FJLT(layer.params, k, seed)


@_builder("identity")
def _identity(layer, k, seed):
    return C.Identity(layer.params)


def _options_of(name: str) -> dict[str, str]:
    """{option: annotation} of a builder (everything after layer, k, seed)."""
    params = list(inspect.signature(_BUILDERS[name]).parameters.values())[3:]
    return {p.name: str(p.annotation) for p in params}


def _parse_option(spec: str, name: str, key: str, text: str, annotation: str):
    """One option value, checked against the builder's annotation: ints and floats must be positive
    (and finite), strings non-empty."""
    if "int" in annotation:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"compressor option {key}={text!r} in {spec!r} must be a positive int") from None
        if value < 1:
            raise ValueError(f"compressor option {key}={value} in {spec!r} must be a positive int")
        return value
    if "float" in annotation:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"compressor option {key}={text!r} in {spec!r} must be a positive number") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"compressor option {key}={text} in {spec!r} must be a positive finite number")
        return value
    if not text:
        raise ValueError(f"compressor option {key} in {spec!r} needs a value")
    return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """"name" or "name:key=value,key=value" -> (name, options), each option checked by name and value."""
    if not isinstance(spec, str):
        raise TypeError(f"compressor must be a spec string, a Compressor, a dict or a factory, got {type(spec).__name__}")
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name not in _BUILDERS:
        raise ValueError(f"compressor must be one of {sorted(_BUILDERS)} (optionally 'name:key=value,...'), got {spec!r}")
    known = _options_of(name)
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"compressor option {item!r} in {spec!r} must be key=value")
        if key not in known:
            valid = ", ".join(known) or "none"
            raise ValueError(f"compressor {name!r} has no option {key!r} (options: {valid})")
        options[key] = _parse_option(spec, name, key, value.strip(), known[key])
    return name, options


def build_compressors(spec, layers: dict[str, LayerInfo], k: int, seed: int) -> dict[str, C.Compressor]:
    """One compressor per layer. ``spec``: a string spec, a Compressor object (shared by every layer of
    its size), a {layer name: Compressor} dict, or a callable
    ``(layer: LayerInfo, k, seed) -> Compressor``. Each layer's seed is derived from ``seed`` and its index;
    k is capped at the layer's parameter count."""
    if isinstance(spec, C.Compressor):  # one compressor object for every layer it fits
        misfits = [n for n, layer in layers.items() if spec.in_features != layer.params]
        if misfits:
            raise ValueError(f"the compressor takes {spec.in_features} inputs but layers {misfits} have other sizes; "
                             "pass a {layer name: Compressor} dict or a factory (LayerInfo, k, seed) -> Compressor")
        spec = {n: spec for n in layers}
    if isinstance(spec, dict):
        missing = [n for n in layers if n not in spec]
        if missing:
            raise ValueError(f"compressor dict has no entry for layers {missing}")
        built = {n: spec[n] for n in layers}
    else:
        if callable(spec):
            make = spec
        else:
            name, options = parse_spec(str(spec))
            make = lambda layer, k_l, s_l: _BUILDERS[name](layer, k_l, s_l, **options)  # noqa: E731
        built = {
            n: make(layer, min(int(k), layer.params), grass_ops.derive_seed(seed, i))
            for i, (n, layer) in enumerate(layers.items())
        }
    for name, comp in built.items():
        if comp.in_features != layers[name].params:
            raise ValueError(f"compressor for {name} takes {comp.in_features} inputs, the layer has {layers[name].params}")
    return built


def weight_gradients(x_in: Tensor, g_out: Tensor) -> Tensor:
    """Per-sample weight gradients [B, d_in * d_out] (row-major (i, j)) from factors [B, (T,) d]."""
    if x_in.dim() == 2:
        return torch.einsum("bi,bj->bij", x_in, g_out).flatten(1)
    return torch.bmm(x_in.transpose(1, 2), g_out).flatten(1)


def compress_layer(comp: C.Compressor, x_in: Tensor, g_out: Tensor, chunk_elements: int = 1 << 25) -> Tensor:
    """[B, k] compressed per-sample gradients of one layer from its factors [B, (T,) d]."""
    if isinstance(comp, C.FactorizedCompressor):
        return comp.compress_factors(x_in, g_out)
    step = max(1, chunk_elements // max(1, x_in.shape[-1] * g_out.shape[-1]))
    if x_in.shape[0] <= step:  # one chunk: no loop over the (possibly symbolic) batch size
        return comp(weight_gradients(x_in, g_out))
    parts = [comp(weight_gradients(x_in[s : s + step], g_out[s : s + step])) for s in range(0, x_in.shape[0], step)]
    return torch.cat(parts)


def layer_tap(comp: C.Compressor, layer: LayerInfo, scale: tuple | None = None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """tap(y, x_in, z) -> y for :meth:`FactorCapture.sketches`: the layer output y [B, ..., d_out] with a
    zero term whose gradient w.r.t. z [B, k], given dL/dy, is ``comp``'s compression of the per-sample
    weight gradient vec(x_in^T dL/dy) (x_in a constant). The term is computed without autocast, in z's
    dtype (float32 under bfloat16 autocast, as compress_layer on upcast factors).

    ``scale`` (an optimizer normalization's, :mod:`attribution.optimizer_state`, in z's dtype): ("factored",
    x_in scale [d_in], g_out scale [d_out]) for a factorized compressor, x_in and g_out scaled before its masks;
    ("exact", [d_in * d_out]) for a flat one, the weight gradient divided elementwise (the adjoint weight
    scaled: its gradient is then the scaled x_in^T dL/dy)."""

    # a partial of one module-level function: the taps of every layer share its code, and what differs (the compressor,
    # the shapes, the scale) is data, so a compiled block (attribution.regional) traces no per-layer Python constant
    return functools.partial(_tap, comp, layer.d_in, layer.d_out, scale)


def _tap(comp: C.Compressor, d_in: int, d_out: int, scale: tuple | None, y: Tensor, x_in: Tensor, z: Tensor) -> Tensor:
    """:func:`layer_tap`'s tap(y, x_in, z) of one layer."""
    with torch.autocast(y.device.type, enabled=False):
        x3, y3 = tokens_view(x_in.detach()), tokens_view(y)
        if isinstance(comp, C.FactorizedCompressor):
            if scale is None:
                out = comp.sketch_output(y3, x3, z)
            else:
                out = comp.sketch_output(y3, x3.to(z.dtype) * scale[1], z, out_scale=scale[2])
        else:  # the adjoint as a per-sample weight [B, d_in, d_out]: its gradient is x_in^T dL/dy
            adjoint = comp.adjoint(z) if scale is None else comp.adjoint(z) * scale[1]
            weight = adjoint.view(-1, d_in, d_out)
            out = y3 + torch.bmm(x3.to(z.dtype), weight).to(y3.dtype)
    return out.reshape(y.shape)


def check_scales(blocks: dict[str, C.Compressor], scales: dict[str, tuple]) -> None:
    """Each block's normalization has the compressor's form: factored for a factorized one, exact otherwise."""
    for name, scale in scales.items():
        factorized = isinstance(blocks[name], C.FactorizedCompressor) and not name.startswith("param:")
        if (scale[0] == "factored") != factorized:
            raise ValueError(f"block {name}: a {scale[0]} optimizer normalization for a "
                             f"{'factorized' if factorized else 'flat'} compressor")


def check_gradients(grads: Tensor, values: Tensor, name: str) -> None:
    """Refuse what would be cached silently wrong: non-finite values or gradients, and gradients that
    are all zero for the whole batch (a value detached from the model)."""
    if not bool(torch.isfinite(values).all()):
        bad = torch.nonzero(~torch.isfinite(values)).flatten()[:5].tolist()
        raise FloatingPointError(f"{name} is not finite for samples {bad} of the batch")
    finite = torch.isfinite(grads)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite.all(1)).flatten()[:5].tolist()
        raise FloatingPointError(f"the compressed gradients of samples {bad} of the batch are not finite (overflow or NaN "
                                 f"in {name}'s backward)")
    if grads.numel() and not bool(grads.any()):
        raise ValueError(f"every gradient of the batch is zero: {name}'s value does not depend on the target layers "
                         "(is it detached, or computed without the model?)")


def _fn_key(fn: Callable):
    """A stable key for a per-sample function: bound methods are new objects at every access."""
    if inspect.ismethod(fn):
        return (id(fn.__self__), id(fn.__func__))
    return id(fn)


class BatchCompressor:
    """Batches -> compressed per-sample gradients, the same for the cache and the attribute stage.

    ``blocks``: {block name: Compressor}, target layers first (names as in ``layers``), then
    "param:<name>" blocks. Calling it with a batch and a per-sample function fn(model, batch) -> [B]
    (the loss, or TRAK's output function) returns (grads [B, columns] in ``dtype``, values [B] of fn).
    The step runs under torch.compile (see :mod:`attribution.compiled`) unless compile=False.
    return_factors=True: the step also returns every target layer's factors (see :meth:`with_factors`),
    e.g. for the K-FAC statistics, from the same compiled step (no extra pass)."""

    def __init__(self, model, layers: dict[str, LayerInfo], params: list[str], blocks: dict[str, C.Compressor],
                 dtype: torch.dtype, device: torch.device, compile: bool = True, param_chunk: int = 64,
                 return_factors: bool = False, autocast: torch.dtype | None = None, normalization=None,
                 sharded: bool = False):
        self.model, self.layers, self.params, self.blocks = model, layers, list(params), blocks
        self.sharded = sharded  # FSDP2: every forward is collective, so the shape pass runs for every batch
        self.dtype, self.device, self.param_chunk = dtype, device, int(param_chunk)
        self.return_factors, self.autocast = bool(return_factors), autocast
        self.capture = FactorCapture(model, layers)
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        self.sketch_dtype = torch.float64 if first is not None and first.dtype == torch.float64 else torch.float32
        # the optimizer normalization (attribution.optimizer_state), in the dtype the sketches are formed in
        self.scales = {} if normalization is None else normalization.to(device, self.sketch_dtype).scales
        if self.scales and return_factors:
            raise ValueError("an optimizer normalization is applied inside the backward; the factors' path (K-FAC "
                             "statistics) does not support it")
        check_scales(blocks, self.scales)
        self.taps = {n: layer_tap(blocks[n], layers[n], self.scales.get(n)) for n in layers}
        self.regional = self._regional(compile)
        # the whole step under torch.compile; never for a sharded or MoE model (their forwards must run eagerly)
        self.compile = bool(compile) and self.regional is None and not (sharded or self.capture.experts)
        self.widths = [blocks[n].out_features for n in blocks]
        self.offsets = [0]
        for width in self.widths:
            self.offsets.append(self.offsets[-1] + width)
        self.blocked: str | None = None  # why this compressor must not run yet (see :meth:`block`)
        self._probe_shapes: dict[tuple, tuple] = {}  # (fn key, shapes) -> (fn kept alive, layer output shapes)
        self._loss_modules: dict[int, tuple] = {}
        self._steps: dict[int, tuple[Callable, CompiledStep]] = {}
        self._retired: list[dict] = []  # the statistics of the steps dropped by install (another whitening)

    @property
    def columns(self) -> int:
        return self.offsets[-1]

    def _regional(self, compile) -> RegionalCompile | None:
        """compile="regional": the repeated blocks compiled (attribution.regional), where the step allows it: target
        layers only, in-backward compression. A sharded or MoE model runs eagerly; elsewhere the whole step is
        compiled, with a warning."""
        if compile != "regional" or self.sharded or self.capture.experts:
            return None  # (a sharded or MoE model: eager, the whole step is not compiled either)
        blocks = repeated_blocks(self.model, self.layers) if self.layers else []
        why = ("other-parameter blocks (params=) are taken with torch.func" if self.params else
               "the factors' path (K-FAC statistics)" if self.return_factors else
               f"no {MIN_BLOCKS} repeated blocks hold target layers" if not blocks else None)
        if why is not None:
            warnings.warn(f"compile='regional' is not available here ({why}): the whole step is compiled", stacklevel=4)
            return None
        return RegionalCompile(self.model, blocks)

    def block(self, reason: str) -> None:
        """Refuse to compress (a RuntimeError giving ``reason``) until :meth:`install` sets the compressors."""
        self.blocked = reason

    def install(self, compressors: dict[str, C.Compressor]) -> None:
        """Replace target layers' compressors by others of the same widths (a whitening's, per checkpoint):
        the taps are rebuilt and the compiled steps dropped (the next batch compiles anew: with compile=True and
        several checkpoints, once per checkpoint and pass)."""
        for name, comp in compressors.items():
            if name not in self.layers or comp.out_features != self.blocks[name].out_features:
                raise ValueError(f"install: {name!r} is not a target layer of this width")
            if self.scales.get(name) is not None:
                raise ValueError("install: a target layer with an optimizer normalization keeps its compressor")
        self.blocks.update(compressors)
        self.taps.update({n: layer_tap(c, self.layers[n]) for n, c in compressors.items()})
        self._retired.extend(dict(step.stats) for _, step in self._steps.values())  # their compile time still counts
        self._steps.clear()
        if self.regional is not None:  # a fresh copy of the blocks' code: its own recompile budget
            self._retired.append(dict(self.regional.stats))
            self.regional = RegionalCompile(self.model, self.regional.blocks)
        self.blocked = None

    def probes(self, fn: Callable, batch) -> dict:
        """The step's zero inputs: one sketch z [B, k] per target layer (in-backward compression), or
        with return_factors one probe per call of each target layer, for this batch's shapes (the layers'
        output shapes are taken once per shape of the batch's non-sample dims, from one sample)."""
        if not self.layers:
            return {}
        key = (_fn_key(fn), tuple((shape[1:], dtype) for shape, dtype in shape_key(batch)))
        if key not in self._probe_shapes or self.sharded:  # also checks every layer's layout on one sample (a [T, B, d] layer
            with self._mixed_precision():  # cannot pass for [B, T, d] when T == B, but it fails with B = 1)
                self._probe_shapes[key] = (fn, self.capture.output_shapes(fn, batch))
        if not self.return_factors:
            rows = batch_size(batch)
            return {n: torch.zeros(rows, self.blocks[n].out_features, dtype=self.sketch_dtype, device=self.device)
                    for n in self.layers}
        return self.capture.zero_probes(self._probe_shapes[key][1], batch_size(batch), self.device)

    def raw(self, fn: Callable, batch, probes: dict) -> tuple[Tensor, ...]:
        """The eager step: (grads [B, columns], values [B]), then with return_factors every layer's
        inputs [B, T, d_in] and then every layer's output gradients [B, T, d_out]."""
        parts, values, inputs, grads = [], None, {}, {}
        if self.layers and not self.return_factors:
            sketches, values = self.capture.sketches(self.forward_in_mixed_precision(fn), batch, self.taps, probes)
            parts = [sketches[n].to(self.dtype) for n in self.layers]
        elif self.layers:
            inputs, grads, values = self.capture.factors(self.forward_in_mixed_precision(fn), batch, probes)
            if self.autocast is not None:  # compress in float32 (the factors of one layer may differ in dtype)
                inputs = {n: t.float() for n, t in inputs.items()}
                grads = {n: t.float() for n, t in grads.items()}
            parts = [compress_layer(self.blocks[n], inputs[n], grads[n]).to(self.dtype) for n in self.layers]
        if self.params:
            key = _fn_key(fn)
            if key not in self._loss_modules:  # keep fn alive with its wrapper, so its key stays unique
                self._loss_modules[key] = (fn, loss_module(self.model, fn))
            flat = per_sample_grads(self._loss_modules[key][1], batch, self.params, self.param_chunk)
            for n in self.params:  # an optimizer normalization divides these exactly (the "exact" scales)
                scale = self.scales.get(f"param:{n}")
                grads_n = flat[n] if scale is None else flat[n] * scale[1].to(flat[n].dtype)
                parts.append(self.blocks[f"param:{n}"](grads_n).to(self.dtype))
            if values is None:
                with torch.no_grad():
                    values = fn(self.model, batch)
        factors = tuple(inputs[n] for n in self.layers) + tuple(grads[n] for n in self.layers) if self.return_factors else ()
        return (torch.cat(parts, dim=1), values.detach()) + factors

    def forward_in_mixed_precision(self, fn: Callable) -> Callable:
        """fn with its forward pass under :meth:`_mixed_precision`; the backward runs outside autocast
        (each op's backward in the dtype its forward ran in, the sketches' products in float32)."""
        if self.autocast is None:
            return fn

        def forward(model, batch):
            with self._mixed_precision():
                return fn(model, batch)

        return forward

    def _mixed_precision(self):
        """torch.autocast to ``self.autocast`` for the forward pass (matmuls in bfloat16 or float16,
        reductions and norms in float32), or nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def step(self, fn: Callable, name: str) -> CompiledStep:
        key = _fn_key(fn)
        if key not in self._steps:
            def run(batch, probes):
                return self.raw(fn, batch, probes)

            compiled = CompiledStep(run if self.regional is None else self.regional.wrap(run),
                                    lambda batch: (self.probes(fn, batch),), compile=self.compile, name=name)
            self._steps[key] = (fn, compiled)
        return self._steps[key][1]

    def __call__(self, batch, fn: Callable, name: str = "loss_fn") -> tuple[Tensor, Tensor]:
        """(grads [B, columns], values [B]) of one batch; refuses empty batches, non-finite gradients and
        a function whose value does not depend on the target layers."""
        return self.with_factors(batch, fn, name)[:2]

    def with_factors(self, batch, fn: Callable, name: str = "loss_fn") -> tuple:
        """(grads [B, columns], values [B], inputs {layer: [B, T, d_in]}, output grads {layer: [B, T, d_out]});
        the factor dicts are empty unless return_factors=True. Checks as :meth:`__call__`."""
        if self.blocked is not None:
            raise RuntimeError(self.blocked)
        batch = to_device(batch, self.device)
        rows = batch_size(batch)
        if rows == 0:
            raise ValueError("a batch holds no samples (its tensors have 0 rows)")
        with self.capture.hooks():
            grads, values, *factors = self.step(fn, name)(batch)
        if not values.is_floating_point():
            raise TypeError(f"{name} must return floating-point per-sample values, got {values.dtype}")
        if values.dim() != 1 or values.shape[0] != rows:
            raise ValueError(f"{name} must return per-sample values of shape [B] = [{rows}], got {tuple(values.shape)}")
        check_gradients(grads, values, name)
        n = len(factors) // 2
        return grads, values, dict(zip(self.layers, factors[:n])), dict(zip(self.layers, factors[n:]))

    def unchecked(self, batch, fn: Callable, name: str = "loss_fn") -> None:
        """The step run for its collectives only (a sharded model's dropped round, attribution.sharding): no
        check, no result (a sample whose gradient is zero or not finite is not an error here)."""
        if self.blocked is not None:
            raise RuntimeError(self.blocked)
        with self.capture.hooks():
            self.step(fn, name)(to_device(batch, self.device))

    def eager(self, batch, fn: Callable, name: str = "loss") -> tuple[Tensor, Tensor]:
        """The step without torch.compile (e.g. for the true Fisher's relabelled losses)."""
        if self.blocked is not None:
            raise RuntimeError(self.blocked)
        batch = to_device(batch, self.device)
        with self.capture.hooks():
            grads, values = self.raw(fn, batch, self.probes(fn, batch))[:2]
        check_gradients(grads, values, name)
        return grads, values

    def stats(self) -> dict:
        """Compile statistics summed over this compressor's steps."""
        steps = [s.stats for _, s in self._steps.values()] + self._retired
        if self.regional is not None:
            steps.append(self.regional.stats)
        return {"compiled": any(s["compiled"] for s in steps),
                "graph_breaks": max((s["graph_breaks"] for s in steps if s["graph_breaks"] is not None), default=None),
                "compile_seconds": sum(s["compile_seconds"] for s in steps),
                "graphs": sum(s["graphs"] for s in steps),
                "fallback": next((s["fallback"] for s in steps if s["fallback"]), None)}
