"""The linear datamodeling score (LDS; Park et al. 2023, paper §B.2).

Train M models on random subsets of the training set (half of it by default), record a model-output
function on the test points (higher = better, e.g. the margin or minus the loss), then, for an
attribution matrix S [n_test, n_train], correlate (Spearman, per test point, over the M subsets) the
predicted subset scores sum_{i in subset} S[q, i] with the actual outputs, and average over test
points. Retrained models and their outputs are saved on disk (numpy, atomic) and reused across
methods; an interrupted run resumes with the models it already has.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

import grass_ops
from grass_ops.atomic_files import atomic_writer
from grass_ops.benchmarking import timed_phase

from ..store import atomic_save_npy, atomic_write_json
from .metrics import spearman


@dataclass
class LDSResult:
    mean: float
    stderr: float
    per_test: Tensor

    def as_dict(self) -> dict:
        return {"lds": self.mean, "stderr": self.stderr, "n_test": int(self.per_test.numel())}


class LDSHarness:
    """train_fn(train_indices [m] int64, seed) -> model; output_fn(model) -> Tensor[n_test]."""

    def __init__(self, root: str | Path, n_train: int, train_fn: Callable, output_fn: Callable, n_models: int = 50,
                 subset_fraction: float = 0.5, seed: int = 0, progress: bool = True):
        if not 0 < subset_fraction < 1:
            raise ValueError(f"subset_fraction must be in (0, 1), got {subset_fraction}")
        self.root, self.n_train, self.n_models = Path(root), int(n_train), int(n_models)
        self.train_fn, self.output_fn, self.seed, self.progress = train_fn, output_fn, seed, progress
        self.subset_size = max(1, int(round(subset_fraction * n_train)))
        self.root.mkdir(parents=True, exist_ok=True)
        config = {"n_train": self.n_train, "n_models": self.n_models, "subset_size": self.subset_size, "seed": seed}
        path = self.root / "lds.json"
        if path.exists() and json.loads(path.read_text()) != config:
            raise ValueError(f"LDS directory {self.root} holds a different configuration {path.read_text()}; use another")
        atomic_write_json(path, config)

    def subset(self, m: int) -> Tensor:
        """The m-th training subset (sorted indices), a pure function of (seed, m, n_train)."""
        return grass_ops.random_mask(self.n_train, self.subset_size, grass_ops.derive_seed(self.seed, m))

    def subsets(self) -> Tensor:
        """[M, n_train] 0/1 membership matrix."""
        member = torch.zeros(self.n_models, self.n_train, dtype=torch.float64)
        for m in range(self.n_models):
            member[m, self.subset(m)] = 1.0
        return member

    def outputs(self) -> Tensor:
        """[M, n_test] model outputs, training (and saving) whatever models are missing."""
        if getattr(self, "_outputs", None) is not None:
            return self._outputs
        rows = []
        for m in tqdm(range(self.n_models), desc="LDS retraining", disable=not self.progress, leave=False):
            path = self.root / f"outputs_{m:03d}.npy"
            if not path.exists():
                model = self.train_fn(self.subset(m), grass_ops.derive_seed(self.seed + 1, m))
                state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
                with atomic_writer(self.root / f"model_{m:03d}.npz") as f:
                    np.savez(f, **state)
                with torch.no_grad():
                    atomic_save_npy(path, self.output_fn(model).double().cpu().numpy())
            rows.append(torch.from_numpy(np.load(path)))
        self._outputs = torch.stack(rows)
        return self._outputs

    def score(self, scores: Tensor, test_indices: Tensor | None = None) -> LDSResult:
        """LDS of an attribution matrix [n_test, n_train] (optionally on a subset of the test points)."""
        actual = self.outputs()  # [M, n_test]
        predicted = self.subsets() @ scores.double().cpu().T  # [M, n_test]
        if test_indices is not None:
            actual, predicted = actual[:, test_indices], predicted[:, test_indices]
        per_test = spearman(predicted.T, actual.T)  # [n_test]
        per_test = torch.nan_to_num(per_test, nan=0.0)
        n = per_test.numel()
        return LDSResult(float(per_test.mean()), float(per_test.std() / math.sqrt(n)) if n > 1 else 0.0, per_test)


DAMPING_GRID = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
# relative dampings (a fraction of each block's mean eigenvalue, see attribution.fim.check_damping)
RELATIVE_DAMPING_GRID = tuple(f"{f}*mean" for f in (1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0))


def cross_validated_lds(harness: LDSHarness, scores_for: Callable[[float], Tensor], n_test: int,
                        grid=DAMPING_GRID, cv_fraction: float = 0.1, seed: int = 0, all_dampings: bool = False) -> dict:
    """Pick the damping on ``cv_fraction`` of the test points (paper §B.2), report LDS on the rest.
    all_dampings=True adds "by_damping": {damping: {"cv", "lds", "stderr"}} (held-out LDS of every grid value)."""
    perm = torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))
    n_cv = max(1, int(round(cv_fraction * n_test)))
    cv, held = perm[:n_cv], perm[n_cv:]
    best, by_damping = None, {}
    for damping in grid:
        scores = scores_for(damping)
        cv_lds = harness.score(scores, cv).mean
        if all_dampings:
            result = harness.score(scores, held)
            by_damping[str(damping)] = {"cv": cv_lds, "lds": result.mean, "stderr": result.stderr}
        if best is None or cv_lds > best[1]:
            best = (damping, cv_lds, scores)
    result = harness.score(best[2], held)
    return {**result.as_dict(), "damping": best[0], "cv_lds": best[1], **({"by_damping": by_damping} if all_dampings else {})}


def preconditioner_table(report: dict, title: str, k_header: str = "k") -> str:
    """Markdown: one row per (compressor, k) of ``report["cells"]`` (k None for "exact"), one column per
    preconditioner, each cell "LDS ± s.e. (damping)"; ``title`` above it."""
    cells = report["cells"]
    preconditioners = list(dict.fromkeys(c["preconditioner"] for c in cells))
    lines = [f"\n{title}\n", f"| compressor | {k_header} | " + " | ".join(preconditioners) + " |",
             "|---|---|" + "---|" * len(preconditioners)]
    for compressor in dict.fromkeys(c["compressor"] for c in cells):
        for k in [None] if compressor == "exact" else report["k_per_layer"]:
            row = []
            for p in preconditioners:
                cell = next((c for c in cells if c["compressor"] == compressor and c["k"] == k and c["preconditioner"] == p),
                            None)
                row.append("" if cell is None else f"{cell['lds']:.3f} ± {cell['stderr']:.3f} ({cell['damping']})")
            lines.append(f"| {compressor} | {'full' if k is None else k} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def timed_whitened_lds(make_attributor: Callable, harness: LDSHarness, train_loader, test_loader, n_test: int, grid,
                       seed: int = 0, curvature_loader=None) -> dict:
    """:func:`timed_lds` for a preconditioner that whitens before compression ("kfac-whitened" /
    "ekfac-whitened"): the damping is applied before the compression, so every grid value caches its
    own store (``make_attributor(damping)``; ``curvature_loader``: its pass one's data, default the training
    data). The seconds are summed over the grid; ``whitening_seconds``
    (pass one) and ``cache_seconds`` (both passes) are also given per store (``*_per_store``); ``kept_share``:
    {damping: the layers' mean :func:`attribution.whitening.kept_share`}."""
    seconds: dict[str, float] = {}
    columns = []
    kept: dict[str, float] = {}  # damping -> the layers' mean whitening.kept_share

    def scores_for(damping):
        attr = make_attributor(damping)
        with timed_phase(seconds, "cache_seconds"):
            attr.cache(train_loader, curvature_loader=curvature_loader)
        seconds["whitening_seconds"] = seconds.get("whitening_seconds", 0.0) + attr.stats.get("whitening_seconds", 0.0)
        shares = attr.stats["whitening_kept_share"][0]  # one checkpoint
        kept[str(damping)] = sum(shares.values()) / len(shares)
        with timed_phase(seconds, "query_seconds"):
            features = attr.query_features(test_loader)
        columns.append(attr.compress.columns)
        with timed_phase(seconds, "score_seconds"):
            return attr.attribute(features=features)

    result = cross_validated_lds(harness, scores_for, n_test, grid=grid, seed=seed, all_dampings=True)
    per_store = {f"{key}_per_store": seconds[key] / len(grid) for key in ("cache_seconds", "whitening_seconds")}
    return {**result, **seconds, **per_store, "floats_per_sample": columns[0], "kept_share": kept}


def timed_lds(attr, harness: LDSHarness, train_loader, test_loader, n_test: int, grid, seed: int = 0) -> dict:
    """One Attributor's row of an LDS table: cache ``train_loader``, take the query features of
    ``test_loader`` once, and cross-validate the damping over ``grid`` (:func:`cross_validated_lds`, every
    damping kept); the result plus ``cache_seconds``, ``query_seconds``, ``score_seconds`` and
    ``floats_per_sample``."""
    seconds: dict[str, float] = {}
    with timed_phase(seconds, "cache_seconds"):
        attr.cache(train_loader)
    with timed_phase(seconds, "query_seconds"):
        features = attr.query_features(test_loader)
    with timed_phase(seconds, "score_seconds"):
        result = cross_validated_lds(harness, lambda d: attr.attribute(damping=d, features=features), n_test, grid=grid,
                                     seed=seed, all_dampings=True)
    return {**result, **seconds, "floats_per_sample": attr.compress.columns}
