"""How faithful compressed attribution is on a language model: every method's scores against the
exact, uncompressed per-document gradients, in one pass over the corpus.

The truth, per query q and document d, is the exact inner product and cosine of their gradients over
the target layers. It is computed layer by layer from the factors, never forming a whole model's
gradient: <G_q, G_d> = sum_{u,t} <x_qu, x_dt> <g_qu, g_dt> (``grass_ops.factorized_inner``), and
||G_d||^2 from the document's own [d_in, d_out] gradient, one layer at a time. Every method's
compressed features come from the same factors (a compressor is linear in the gradient), so one
forward and backward pass per batch serves the truth and every method.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

import grass_ops

from ..batches import batch_size
from ..capture import FactorCapture, tokens_view
from ..compression import build_compressors, compress_layer
from ..fim import FIMAccumulator
from ..layers import LayerInfo
from .metrics import spearman


@dataclass
class Method:
    """A compressor (spec string or factory, k per layer) and how its features are scored."""

    compressor: object
    k: int
    scoring: str = "cosine"  # "cosine" | "inner" | "if" | "if-unit" | "if-normalized"
    damping: float = 0.1  # relative: a fraction of each block's mean FIM eigenvalue (if variants)
    seed: int = 0


@dataclass
class Truth:
    inner: Tensor  # [n_query, n_doc] float64
    query_norms: Tensor  # [n_query]
    doc_norms: Tensor  # [n_doc]

    @property
    def cosine(self) -> Tensor:
        return self.inner / (self.query_norms[:, None] * self.doc_norms[None, :]).clamp_min(1e-300)


@dataclass
class Features:
    queries: Tensor  # [n_query, columns]
    docs: Tensor  # [n_doc, columns]
    widths: list[int]
    seconds: float = 0.0  # compression time over the corpus
    extra: dict = field(default_factory=dict)


def _factors(capture: FactorCapture, loss_fn: Callable, batch, autocast: torch.dtype | None):
    """Per-sample factors of one batch (in float32 when autocast computed them in lower precision)."""
    if autocast is None:
        return capture.capture(loss_fn, batch)
    with torch.autocast("cpu", dtype=autocast):
        x, g, values = capture.capture(loss_fn, batch)
    return {n: t.float() for n, t in x.items()}, {n: t.float() for n, t in g.items()}, values


def _stack_factors(capture: FactorCapture, loss_fn: Callable, batches: Iterable,
                   autocast: torch.dtype | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """All queries' factors per layer, padded to a common token length (padding tokens have zero gradients)."""
    parts: dict[str, list] = {n: [] for n in capture.layers}
    for batch in batches:
        x, g, _ = _factors(capture, loss_fn, batch, autocast)
        for n in capture.layers:
            parts[n].append((x[n], g[n]))
    out = {}
    for n, items in parts.items():
        t = max(x.shape[1] for x, _ in items)
        pad = lambda a: torch.nn.functional.pad(a, (0, 0, 0, t - a.shape[1]))  # noqa: E731
        out[n] = (torch.cat([pad(x) for x, _ in items]), torch.cat([pad(g) for _, g in items]))
    return out


def measure(model, loss_fn: Callable, layers: dict[str, LayerInfo], doc_batches: list, query_batches: list,
            methods: dict[str, Method], progress: bool = True, truth: bool = True,
            autocast: torch.dtype | None = None) -> tuple[Truth | None, dict[str, Features]]:
    """One pass over ``doc_batches``: the exact truth (unless truth=False) and every method's
    compressed features (from factors computed under torch.autocast(autocast) when given: measure the
    truth without it). The truth needs every query's factors beside each document batch's; truth=False forms
    the features inside the backward instead, one layer at a time (a working set of the model's activations)."""
    model.eval()
    capture = FactorCapture(model, layers)
    # methods that differ only in their scoring share one compressor and its features (one flat SJLT's hash
    # over every layer's weights is 9 bytes per parameter)
    keys = {name: (m.compressor if isinstance(m.compressor, str) else id(m.compressor), m.k, m.seed)
            for name, m in methods.items()}
    shared = {key: name for name, key in reversed(keys.items())}  # the first method of each key computes it
    compressors = {name: build_compressors(methods[name].compressor, layers, methods[name].k, methods[name].seed)
                   for name in shared.values()}
    if not truth:  # features only, compressed inside the backward: no layer's factors outlive its backward
        return None, _compressed_features(capture, loss_fn, layers, doc_batches, query_batches, compressors,
                                          {name: shared[keys[name]] for name in methods}, progress, autocast)
    # the exact inner products need every query's factors beside each document batch's
    q_factors = _stack_factors(capture, loss_fn, query_batches, autocast)
    n_query = next(iter(q_factors.values()))[0].shape[0]
    q_norm2 = torch.zeros(n_query, dtype=torch.float64)
    for x, g in q_factors.values():
        q_norm2 += grass_ops.factorized_inner(x, g, x, g).diagonal().double()
    q_feats = {name: torch.cat([compress_layer(comps[n], *q_factors[n]) for n in layers], 1)
               for name, comps in compressors.items()}
    inner, d_norm2, d_feats, seconds = [], [], {name: [] for name in compressors}, {name: 0.0 for name in compressors}
    for batch in tqdm(doc_batches, desc="fidelity", disable=not progress, leave=False):
        x, g, _ = _factors(capture, loss_fn, batch, autocast)
        rows = next(iter(x.values())).shape[0]
        ip = torch.zeros(n_query, rows, dtype=torch.float64)
        norm2 = torch.zeros(rows, dtype=torch.float64)
        for n in layers:
            ip += grass_ops.factorized_inner(*q_factors[n], x[n], g[n]).double()
            norm2 += torch.bmm(x[n].transpose(1, 2), g[n]).double().square().sum((1, 2))
        inner.append(ip)
        d_norm2.append(norm2)
        for name, comps in compressors.items():
            start = time.perf_counter()
            d_feats[name].append(torch.cat([compress_layer(comps[n], x[n], g[n]) for n in layers], 1))
            seconds[name] += time.perf_counter() - start
        del x, g  # this batch's factors, before the next batch's are captured
    exact = Truth(torch.cat(inner, 1), q_norm2.sqrt(), torch.cat(d_norm2).sqrt())
    computed = {name: Features(q_feats[name], torch.cat(d_feats[name]), [compressors[name][n].out_features for n in layers],
                               seconds[name]) for name in compressors}
    features = {name: computed[shared[keys[name]]] for name in methods}
    return exact, features


class _CompressedInBackward(torch.autograd.Function):
    """Identity on a layer output y [B, ..., d_out]; the gradient w.r.t. its zero z [B, sum of k] is every compressor's
    compression of the layer's per-sample gradient, side by side: :func:`compress_layer` on the input x [B, ..., d_in]
    (saved from the forward) and the output gradient (in the backward), what the factors' path computes from the
    same two tensors. ``timed``: {compressor index: seconds}, added to."""

    @staticmethod
    def forward(y, x, z, comps, timed):
        return y.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.comps, ctx.timed, ctx.dtype = inputs[3], inputs[4], inputs[2].dtype

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        x, g3 = (_float(tokens_view(t.detach())) for t in (x, g))
        parts = []
        for i, comp in enumerate(ctx.comps):
            start = time.perf_counter()
            parts.append(compress_layer(comp, x, g3).to(ctx.dtype))
            ctx.timed[i] += time.perf_counter() - start
        return g, None, torch.cat(parts, 1), None, None


def _float(t: Tensor) -> Tensor:
    """``t`` in float32 when autocast gave it a lower precision (as :func:`_factors` upcasts the factors)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _compressed_features(capture: FactorCapture, loss_fn: Callable, layers: dict[str, LayerInfo], doc_batches: list,
                         query_batches: list, compressors: dict[str, dict], owner: dict[str, str], progress: bool,
                         autocast: torch.dtype | None) -> dict[str, Features]:
    """Every compressor's features of the queries and the documents, formed inside the backward of each batch (one
    forward and backward per batch for all of them; :class:`_CompressedInBackward`); {method: Features}, methods
    sharing a compressor (``owner``: method -> the one that computes it) sharing the object."""
    names = list(compressors)
    timed = [0.0] * len(names)
    taps = {n: functools.partial(_tap, tuple(compressors[name][n] for name in names), timed) for n in layers}
    widths = {n: [compressors[name][n].out_features for name in names] for n in layers}
    forward = loss_fn if autocast is None else _autocast_forward(loss_fn, autocast)
    first = next(capture.model.parameters())
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32  # the factors' dtype after _float

    def features(batches, desc):
        out = {name: [] for name in names}
        for batch in tqdm(batches, desc=desc, disable=not progress or desc is None, leave=False):
            rows = batch_size(batch)
            zeros = {n: torch.zeros(rows, sum(widths[n]), dtype=dtype, device=first.device) for n in layers}
            with capture.hooks():
                sketches, _ = capture.sketches(forward, batch, taps, zeros)
            split = {n: sketches[n].split(widths[n], dim=1) for n in layers}
            for i, name in enumerate(names):
                out[name].append(torch.cat([split[n][i] for n in layers], 1))
        return {name: torch.cat(parts) for name, parts in out.items()}

    queries = features(query_batches, None)
    timed[:] = [0.0] * len(names)  # the seconds over the corpus only, as the factors' path counts them
    docs = features(doc_batches, "fidelity")
    computed = {name: Features(queries[name], docs[name], [compressors[name][n].out_features for n in layers], timed[i])
                for i, name in enumerate(names)}
    return {method: computed[owner[method]] for method in owner}


def _tap(comps: tuple, timed: list, y: Tensor, x: Tensor, z: Tensor) -> Tensor:
    return _CompressedInBackward.apply(y, x, z, comps, timed)


def _autocast_forward(loss_fn: Callable, dtype: torch.dtype) -> Callable:
    """loss_fn with its forward under CPU autocast to ``dtype`` (the backward outside it)."""

    def forward(model, batch):
        with torch.autocast("cpu", dtype=dtype):
            return loss_fn(model, batch)

    return forward


def scores(features: Features, method: Method) -> Tensor:
    """[n_query, n_doc] float64 scores of one method from its features."""
    q, d = features.queries.double(), features.docs.double()
    if method.scoring == "inner":
        return q @ d.T
    if method.scoring == "cosine":
        return (q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)) @ (d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)).T
    if method.scoring not in ("if", "if-unit", "if-normalized"):
        raise ValueError(f"scoring must be 'cosine', 'inner', 'if', 'if-unit' or 'if-normalized', got {method.scoring!r}")
    total = torch.zeros(q.shape[0], d.shape[0], dtype=torch.float64)
    q_quad = torch.zeros(q.shape[0], dtype=torch.float64)
    d_quad = torch.zeros(d.shape[0], dtype=torch.float64)
    start = 0
    for w in features.widths:
        qb, db = q[:, start : start + w], d[:, start : start + w]
        acc = FIMAccumulator(w, "cpu", torch.float64)
        acc.add(db)
        inverse = acc.finalize(db.shape[0], torch.float64)
        damping = method.damping * float(inverse.eigvals.mean()) if inverse.eigvals.mean() > 0 else method.damping
        total += inverse.apply(qb, damping) @ db.T
        if method.scoring == "if-normalized":
            q_quad += inverse.quadratic(qb, damping)
            d_quad += inverse.quadratic(db, damping)
        start += w
    if method.scoring == "if-normalized":  # the cosine in the metric (F + damping I)^-1
        total = total / (q_quad.sqrt()[:, None] * d_quad.sqrt()[None, :]).clamp_min(1e-300)
    if method.scoring == "if-unit":  # IF on unit-normalized gradients: Attributor(normalize=True)
        total = total / (q.norm(dim=1)[:, None] * d.norm(dim=1)[None, :]).clamp_min(1e-300)
    return total


def fidelity(truth: Truth, score: Tensor) -> dict:
    """Mean (and per-query) Spearman of a score matrix against the exact cosine and inner product."""
    per_cos = spearman(score, truth.cosine)
    per_ip = spearman(score, truth.inner)
    n = per_cos.numel()
    return {"spearman_vs_cosine": float(per_cos.mean()), "spearman_vs_cosine_se": float(per_cos.std() / math.sqrt(n)) if n > 1 else 0.0,
            "spearman_vs_inner": float(per_ip.mean()), "per_query_vs_cosine": [round(float(v), 4) for v in per_cos]}
