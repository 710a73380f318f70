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

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

import grass_ops

from ..capture import FactorCapture
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
    truth without it)."""
    model.eval()
    capture = FactorCapture(model, layers)
    # methods that differ only in their scoring share one compressor and its features (one flat SJLT's hash
    # over every layer's weights is 9 bytes per parameter)
    keys = {name: (m.compressor if isinstance(m.compressor, str) else id(m.compressor), m.k, m.seed)
            for name, m in methods.items()}
    shared = {key: name for name, key in reversed(keys.items())}  # the first method of each key computes it
    compressors = {name: build_compressors(methods[name].compressor, layers, methods[name].k, methods[name].seed)
                   for name in shared.values()}
    if truth:  # the exact inner products need every query's factors beside each document batch's
        q_factors = _stack_factors(capture, loss_fn, query_batches, autocast)
        n_query = next(iter(q_factors.values()))[0].shape[0]
        q_norm2 = torch.zeros(n_query, dtype=torch.float64)
        for x, g in q_factors.values():
            q_norm2 += grass_ops.factorized_inner(x, g, x, g).diagonal().double()
        q_feats = {name: torch.cat([compress_layer(comps[n], *q_factors[n]) for n in layers], 1)
                   for name, comps in compressors.items()}
    else:  # features only: each query batch compressed and its factors dropped (a smaller working set)
        q_feats = {name: [] for name in compressors}
        for batch in query_batches:
            x, g, _ = _factors(capture, loss_fn, batch, autocast)
            for name, comps in compressors.items():
                q_feats[name].append(torch.cat([compress_layer(comps[n], x[n], g[n]) for n in layers], 1))
            del x, g
        q_feats = {name: torch.cat(parts) for name, parts in q_feats.items()}
        n_query = next(iter(q_feats.values())).shape[0]
    inner, d_norm2, d_feats, seconds = [], [], {name: [] for name in compressors}, {name: 0.0 for name in compressors}
    for batch in tqdm(doc_batches, desc="fidelity", disable=not progress, leave=False):
        x, g, _ = _factors(capture, loss_fn, batch, autocast)
        rows = next(iter(x.values())).shape[0]
        ip = torch.zeros(n_query, rows, dtype=torch.float64)
        norm2 = torch.zeros(rows, dtype=torch.float64)
        for n in layers if truth else []:
            ip += grass_ops.factorized_inner(*q_factors[n], x[n], g[n]).double()
            norm2 += torch.bmm(x[n].transpose(1, 2), g[n]).double().square().sum((1, 2))
        inner.append(ip)
        d_norm2.append(norm2)
        for name, comps in compressors.items():
            start = time.perf_counter()
            d_feats[name].append(torch.cat([compress_layer(comps[n], x[n], g[n]) for n in layers], 1))
            seconds[name] += time.perf_counter() - start
        del x, g  # this batch's factors, before the next batch's are captured
    exact = Truth(torch.cat(inner, 1), q_norm2.sqrt(), torch.cat(d_norm2).sqrt()) if truth else None
    computed = {name: Features(q_feats[name], torch.cat(d_feats[name]), [compressors[name][n].out_features for n in layers],
                               seconds[name]) for name in compressors}
    features = {name: computed[shared[keys[name]]] for name in methods}
    return exact, features


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
