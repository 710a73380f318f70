#!/usr/bin/env python
"""LDS of gradient compressors on an MLP trained on scikit-learn's digits: the shape of the paper's
Table 1(a) (MLP/MNIST there; MNIST cannot be downloaded here, digits ships with scikit-learn).

    python scripts/lds.py --out out/lds            # default run (<= 20 min on 2 CPU cores)
    python scripts/lds.py --out out/lds --quick    # <= 3 min, used by a test

Backbones: TRAK (an ensemble of independently trained checkpoints, the margin as output function)
and IF (block-diagonal FIM). Methods: RM, SM, SJLT, FJLT, Gaussian, GraSS (SJLT o RM, SJLT o SM),
FactGraSS and LoGra, at three k per layer. Each cell: LDS +- standard error over the held-out 90% of
the test points (damping cross-validated on the other 10%), and the compression wall-time of the
whole training set. Retrained subset models are cached under --out and reused (resumable).
Prints JSON (also written to --out/lds.json) and writes a Markdown table (--out/lds.md).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from attribution import Attributor
from attribution.compression import build_compressors, weight_gradients
from attribution.evaluation.examples import batches, load_digits_split, make_mlp, margin, per_sample_loss, train_mlp
from attribution.evaluation.lds import DAMPING_GRID, LDSHarness, cross_validated_lds
from attribution.selective_mask import MaskTrainingConfig, collect_factors, train_masks
from grass_ops.compressors import FactorizedCompressor

METHODS = {
    "RM": lambda d: "random_mask",
    "SM": lambda d: f"selective_mask:mask_dir={d['sm']}",
    "SJLT": lambda d: "sjlt",
    "FJLT": lambda d: "fjlt",
    "Gauss": lambda d: "gaussian",
    "GraSS (SJLT o RM)": lambda d: "grass:blowup=4",
    "GraSS (SJLT o SM)": lambda d: f"grass:blowup=4,mask_dir={d['grass_sm']}",
    "FactGraSS": lambda d: "factgrass",
    "LoGra": lambda d: "logra",
}


def compression_seconds(spec, layers, k, factors, flat_grads, repeats=3):
    """Wall time to compress the whole training set, every layer, from each method's natural input:
    the factors for factorized compressors (FactGraSS, LoGra), the materialized per-sample gradients
    for flat ones (whose formation, common to all flat methods, is timed separately)."""
    comps = build_compressors(spec, layers, k, seed=0)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for name, comp in comps.items():
            if isinstance(comp, FactorizedCompressor):
                comp.compress_factors(*factors[name])
            else:
                comp(flat_grads[name])
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/lds")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", type=int, default=50, help="LDS subset models")
    parser.add_argument("--checkpoints", type=int, default=10, help="TRAK ensemble size")
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 128, 512], help="k per layer")
    parser.add_argument("--backbones", nargs="+", default=["TRAK", "IF"], choices=["TRAK", "IF"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n-test", type=int, default=297)
    parser.add_argument("--heldout", type=int, default=300, help="training samples for Selective Mask training")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    grid = DAMPING_GRID
    mask_config = MaskTrainingConfig(steps=300, lr=0.05, lam=0.1, progress=False, seed=args.seed)
    if args.quick:
        args.models, args.checkpoints, args.ks, args.n_test = 12, 2, [64], 100
        grid = (1e-4, 1e-2, 1.0, 100.0)
        mask_config.steps = 80
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    (x_tr, y_tr), (x_te, y_te) = load_digits_split(args.seed)
    x_te, y_te = x_te[: args.n_test], y_te[: args.n_test]
    train_loader, test_loader = batches(x_tr, y_tr, 256), batches(x_te, y_te, 512)

    def train_fn(indices, seed):
        return train_mlp(make_mlp(seed), x_tr[indices], y_tr[indices], seed=seed)

    harness = LDSHarness(out / f"models_n{args.models}_t{args.n_test}", len(x_tr), train_fn,
                         lambda model: margin(model, (x_te, y_te)), n_models=args.models, seed=args.seed)
    t0 = time.perf_counter()
    harness.outputs()
    retrain_seconds = time.perf_counter() - t0

    checkpoints = [train_fn(torch.arange(len(x_tr)), 1000 + c) for c in range(args.checkpoints)]
    states = [m.state_dict() for m in checkpoints]
    model = checkpoints[0]
    accuracy = float((model(x_te).argmax(1) == y_te).float().mean())

    # Selective Masks from a held-out split of the training data (loss gradients of checkpoint 0)
    perm = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(args.seed + 7))[: args.heldout]
    heldout = batches(x_tr[perm], y_tr[perm], 256)
    mask_dirs, mask_seconds = {}, {}
    for k in args.ks:
        mask_dirs[k] = {"sm": out / "masks" / f"sm_k{k}", "grass_sm": out / "masks" / f"sm_k{4 * k}"}
        t0 = time.perf_counter()
        for kk, key in ((k, "sm"), (4 * k, "grass_sm")):
            train_masks(model, per_sample_loss, heldout, mask_dirs[k][key], k=kk, form="plain", config=mask_config)
        mask_seconds[k] = time.perf_counter() - t0

    factors, layers, _ = collect_factors(model, per_sample_loss, train_loader)
    t0 = time.perf_counter()
    flat_grads = {name: weight_gradients(*factors[name]) for name in layers}
    materialize_seconds = time.perf_counter() - t0

    cells = []
    for backbone in args.backbones:
        for method in args.methods:
            for k in args.ks:
                spec = METHODS[method](mask_dirs[k])
                kwargs = dict(compressor=spec, k=k, compile=False, progress=False, seed=args.seed)
                if backbone == "TRAK":
                    attr = Attributor(model, per_sample_loss, method="trak", output_fn=margin, checkpoints=states, **kwargs)
                else:
                    attr = Attributor(model, per_sample_loss, method="if", **kwargs)
                t0 = time.perf_counter()
                attr.cache(train_loader)
                cache_seconds = time.perf_counter() - t0
                features = attr.query_features(test_loader)
                result = cross_validated_lds(harness, lambda damping: attr.attribute(damping=damping, features=features),
                                             len(x_te), grid=grid, seed=args.seed)
                cell = {"backbone": backbone, "method": method, "k": k, "spec": spec, **result,
                        "compression_seconds": compression_seconds(spec, layers, k, factors, flat_grads),
                        "cache_seconds": cache_seconds}
                cells.append(cell)
                print(json.dumps(cell), flush=True)

    report = {
        "data": "sklearn digits, seeded split", "n_train": len(x_tr), "n_test": len(x_te), "quick": args.quick,
        "model": "MLP 64-128-64-10", "test_accuracy_ckpt0": accuracy, "lds_models": args.models,
        "trak_checkpoints": args.checkpoints, "damping_grid": list(grid), "k_per_layer": args.ks,
        "retrain_seconds": retrain_seconds, "selective_mask_training_seconds": mask_seconds,
        "per_sample_gradient_materialization_seconds": materialize_seconds, "total_seconds": time.perf_counter() - started,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "cells": cells,
    }
    (out / "lds.json").write_text(json.dumps(report, indent=1))
    (out / "lds.md").write_text(markdown_table(report))
    print(json.dumps({k: v for k, v in report.items() if k != "cells"}, indent=1))
    return report


def markdown_table(report) -> str:
    ks = report["k_per_layer"]
    lines = []
    for backbone in dict.fromkeys(c["backbone"] for c in report["cells"]):
        lines.append(f"\n**{backbone}** (LDS ± s.e. / compression time of {report['n_train']} samples)\n")
        lines.append("| method | " + " | ".join(f"k = {k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        for method in dict.fromkeys(c["method"] for c in report["cells"]):
            row = []
            for k in ks:
                cell = next((c for c in report["cells"] if c["backbone"] == backbone and c["method"] == method and c["k"] == k), None)
                row.append("" if cell is None else f"{cell['lds']:.3f} ± {cell['stderr']:.3f} / {1e3 * cell['compression_seconds']:.1f} ms")
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
