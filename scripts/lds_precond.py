#!/usr/bin/env python
"""LDS of the preconditioners (fim, kfac, ekfac) at equal storage on scikit-learn's digits, for IF.

    python scripts/lds_precond.py --out out/lds                       # the project's digits LDS (scripts/lds.py's setup)
    python scripts/lds_precond.py --out out/lds --setup kronfluence   # kronfluence's shape: MLP 64-32-10, 1000 / 100
    python scripts/lds_precond.py --out out/lds --quick               # a minute; used by a test

Every cell caches one store (the compressed training gradients, the same for every preconditioner)
and scores the queries with {fim, kfac, ekfac}: fim is the paper's FIM of the compressed gradients;
kfac / ekfac precondition each query in the full parameter space with the Kronecker-factored
curvature and then compress it (attribution.kfac). kfac-whitened / ekfac-whitened whiten both sides
before compressing (attribution.whitening): their store depends on the damping, so each grid value
caches its own (their cache seconds are summed over the grid; *_per_store is one store's). "exact" rows use the identity compressor (no
compression). The damping is relative ("<f>*mean": f times each block's mean eigenvalue), picked on
10% of the test points from the grid, and LDS +- s.e. is reported on the other 90%; the held-out
LDS at every grid value is kept in the JSON (e.g. kronfluence's fixed 0.1*mean). Retrained subset
models are cached under --out and shared with scripts/lds.py (same harness configuration).
Prints one JSON line per cell, then a summary; writes --out/precond_<setup>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from attribution import Attributor
from attribution.evaluation.examples import batches, load_digits_split, make_mlp, margin, per_sample_loss, train_mlp
from attribution.evaluation.lds import RELATIVE_DAMPING_GRID, LDSHarness, preconditioner_table, timed_lds, timed_whitened_lds

PRECONDITIONERS = ("fim", "kfac", "ekfac", "kfac-whitened", "ekfac-whitened")
WHITENED = ("kfac-whitened", "ekfac-whitened")
COMPRESSORS = ("factgrass", "logra", "sjlt")


def make_small_mlp(seed: int = 0) -> nn.Module:
    """kronfluence's digits benchmark model: MLP 64-32-10."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


SETUPS = {  # name -> (model factory, n_train (None: all 1500), n_test)
    "project": (make_mlp, None, 297),
    "kronfluence": (make_small_mlp, 1000, 100),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/lds")
    parser.add_argument("--setup", choices=list(SETUPS), default="project")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", type=int, default=50, help="LDS subset models")
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 128, 512], help="k per layer")
    parser.add_argument("--compressors", nargs="+", default=list(COMPRESSORS))
    parser.add_argument("--preconditioners", nargs="+", default=list(PRECONDITIONERS), choices=list(PRECONDITIONERS))
    parser.add_argument("--no-exact", action="store_true", help="skip the uncompressed (identity) rows")
    parser.add_argument("--curvature-samples", type=int, nargs="+", default=[],
                        help="also the whitened cells with their curvature from a seeded sample of this many training "
                             "samples (one cell per value; the default cells use all of them)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_model, n_train, n_test = SETUPS[args.setup]
    grid = RELATIVE_DAMPING_GRID
    if args.quick:
        args.models, args.ks, n_test, grid = 12, [64], min(n_test, 100), ("1e-3*mean", "0.1*mean", "10.0*mean")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    (x_tr, y_tr), (x_te, y_te) = load_digits_split(args.seed, n_test=SETUPS[args.setup][2])
    if n_train is not None:
        x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    x_te, y_te = x_te[:n_test], y_te[:n_test]
    train_loader, test_loader = batches(x_tr, y_tr, 256), batches(x_te, y_te, 512)

    def train_fn(indices, seed):
        return train_mlp(make_model(seed), x_tr[indices], y_tr[indices], seed=seed)

    prefix = "" if args.setup == "project" else f"{args.setup}_"
    harness = LDSHarness(out / f"{prefix}models_n{args.models}_t{n_test}", len(x_tr), train_fn,
                         lambda model: margin(model, (x_te, y_te)), n_models=args.models, seed=args.seed)
    t0 = time.perf_counter()
    harness.outputs()
    retrain_seconds = time.perf_counter() - t0
    model = train_fn(torch.arange(len(x_tr)), 1000)  # the attributed model (scripts/lds.py's checkpoint 0)
    accuracy = float((model(x_te).argmax(1) == y_te).float().mean())

    cells = []
    plan = [("exact", None)] * (not args.no_exact) + [(c, k) for c in args.compressors for k in args.ks]
    for compressor, k in plan:
        for preconditioner in args.preconditioners:
            if args.quick and compressor == "exact" and preconditioner == "fim":
                continue  # the exact FIM's 8192 x 8192 eigendecomposition takes minutes on 2 cores
            if compressor == "exact" and preconditioner in WHITENED:
                continue  # uncompressed, whitening both sides is K-FAC / EK-FAC itself (tests/attribution/test_whitening.py)
            spec = "identity" if compressor == "exact" else compressor

            def attributor(damping=1e-3, spec=spec, k=k, preconditioner=preconditioner):
                return Attributor(model, per_sample_loss, method="if", compressor=spec, k=k or 10**9, compile=False,
                                  progress=False, seed=args.seed, preconditioner=preconditioner, damping=damping)

            samples = [None] + args.curvature_samples if preconditioner in WHITENED else [None]
            for n in samples:
                if preconditioner in WHITENED:
                    curvature = None
                    if n is not None:  # a seeded sample of the training set
                        chosen = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(args.seed))[:n].sort().values
                        curvature = batches(x_tr[chosen], y_tr[chosen], 256)
                    result = timed_whitened_lds(attributor, harness, train_loader, test_loader, len(x_te), grid, args.seed,
                                                curvature)
                else:
                    result = timed_lds(attributor(), harness, train_loader, test_loader, len(x_te), grid, args.seed)
                cells.append(cell_of(args, model, compressor, k, preconditioner, result, len(x_tr), n))
                print(json.dumps({key: v for key, v in cells[-1].items() if key != "by_damping"}), flush=True)

    report = {
        "setup": args.setup, "data": "sklearn digits, seeded split", "n_train": len(x_tr), "n_test": len(x_te),
        "quick": args.quick, "model": "MLP 64-128-64-10" if args.setup == "project" else "MLP 64-32-10",
        "test_accuracy": accuracy, "lds_models": args.models, "damping_grid": list(grid), "k_per_layer": args.ks,
        "retrain_seconds": retrain_seconds, "total_seconds": time.perf_counter() - started,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "cells": cells,
    }
    (out / f"precond_{args.setup}.json").write_text(json.dumps(report, indent=1))
    (out / f"precond_{args.setup}.md").write_text(markdown_table(report))
    print(json.dumps({key: v for key, v in report.items() if key != "cells"}, indent=1))
    return report


def cell_of(args, model, compressor, k, preconditioner, result, n_train, curvature_samples) -> dict:
    """One row of the table: the LDS result, the store's floats and (K-FAC / EK-FAC) the factors' floats."""
    factor_floats = sum(m.in_features ** 2 + m.out_features ** 2 + m.in_features * m.out_features * preconditioner.startswith("ekfac")
                        for m in model.modules() if isinstance(m, nn.Linear))
    return {"setup": args.setup, "compressor": compressor, "k": k, "preconditioner": preconditioner, **result,
            "store_floats": result["floats_per_sample"] * n_train,
            **({"factor_floats": factor_floats} if preconditioner != "fim" else {}),
            **({"curvature_samples": curvature_samples} if curvature_samples is not None else {})}


def markdown_table(report) -> str:
    return preconditioner_table(report, f"**{report['model']}, {report['n_train']} train / {report['n_test']} test, IF** "
                                "(LDS ± s.e. at the cross-validated damping; the damping in brackets)")


if __name__ == "__main__":
    main()
