#!/usr/bin/env python
"""LDS of a small causal language model trained from scratch on CPU (the shape of the GraSS paper's
Table 1(d)): FactGraSS vs LoGra vs SJLT at equal k per layer, each with the compressed FIM (the paper's
IF), K-FAC and EK-FAC (attribution.kfac: the query preconditioned in the full parameter space, then
compressed like the training gradients), and K-FAC / EK-FAC whitening both sides before compression
(attribution.whitening: a store per damping, since the damping is applied before compressing).

    flock /tmp/grass_heavy.lock python scripts/lm_lds.py --out out/lm_lds          # about an hour on 2 cores
    python scripts/lm_lds.py --out out/lm_lds --quick                              # a few minutes

Setup (attribution.evaluation.lm_lds): character-level 2-layer GPT (d = 128, 4 heads, context 64) on Python's
own documentation (pydoc_data.topics), 2000 training sequences of 64 tokens, 100 held-out sequences;
every linear layer of the two blocks is attributed (8 layers). Attributed loss: the summed next-token
loss of a sequence; LDS output: minus the mean next-token loss of each held-out sequence; 50 models
retrained on seeded half-subsets (same initialization, the subset and its order differ). Damping:
relative ("<f>*mean"), picked on 10% of the held-out sequences, LDS +- s.e. on the other 90%.

Everything is cached under --out and resumed: the trained model, each retrained model's outputs
(LDSHarness), each store (one per compressor and k, shared by the three preconditioners) and each
finished cell. Prints a JSON line per cell and writes --out/lm_lds[_quick].json and .md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from attribution import Attributor
from attribution.evaluation.lds import RELATIVE_DAMPING_GRID, LDSHarness, preconditioner_table, timed_lds, timed_whitened_lds
from attribution.evaluation.lm_lds import CharData, LMConfig, batches, block_layers, heldout_output, make_model, sequence_loss, train_lm
from grass_ops.atomic_files import atomic_writer

PRECONDITIONERS = ("ekfac", "kfac", "fim", "kfac-whitened", "ekfac-whitened")  # ekfac first: its cache accumulates the
# K-FAC sums, kfac and fim reuse the store; the whitened ones cache their own store per damping (it is applied before compression)
WHITENED = ("kfac-whitened", "ekfac-whitened")
COMPRESSORS = ("factgrass", "logra", "sjlt")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/lm_lds")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--ks", type=int, nargs="+", default=[64, 256], help="k per layer")
    parser.add_argument("--compressors", nargs="+", default=list(COMPRESSORS), choices=list(COMPRESSORS))
    parser.add_argument("--preconditioners", nargs="+", default=list(PRECONDITIONERS), choices=list(PRECONDITIONERS))
    parser.add_argument("--exact", action="store_true", help="also kfac / ekfac without compression (an identity "
                        "store: 2000 x 393k floats, 3.1 GB on disk; the exact FIM of 65k x 65k blocks is out of reach)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: these GEMMs are small, and two "
                        "OpenMP threads measured up to 10x slower than one on a 2-core machine shared with other jobs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config, grid = LMConfig(), RELATIVE_DAMPING_GRID
    if args.quick:
        config = replace(config, n_train=240, n_test=40, epochs=2, d_model=64)
        args.models, args.ks, grid = 8, [64], ("1e-3*mean", "0.1*mean", "10.0*mean")
    tag = hashlib.sha256(json.dumps({**config.as_dict(), "seed": args.seed}, sort_keys=True).encode()).hexdigest()[:10]
    out = Path(args.out)
    root = out / tag
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config.as_dict(), indent=1))
    started = time.perf_counter()

    data = CharData(config)
    train_loader, test_loader = batches(data.train, config.batch), batches(data.test, config.batch)
    harness = LDSHarness(root / f"models_n{args.models}", config.n_train,
                         lambda indices, seed: train_lm(data, config, indices, seed),
                         lambda model: heldout_output(model, data), n_models=args.models, seed=args.seed)
    t0 = time.perf_counter()
    harness.outputs()
    retrain_seconds = time.perf_counter() - t0

    model_path = root / "model.pt"
    t0 = time.perf_counter()
    if model_path.exists():
        model = make_model(len(data.vocab), config)
        model.load_state_dict(torch.load(model_path, weights_only=True))
        model.eval()
    else:
        model = train_lm(data, config, torch.arange(config.n_train), seed=10**6 + args.seed)
        with atomic_writer(model_path) as f:
            torch.save(model.state_dict(), f)
    train_seconds = time.perf_counter() - t0
    with torch.no_grad():
        test_loss = float(-heldout_output(model, data).mean())
        train_loss = float(sequence_loss(model, data.train[:500]).mean() / config.length)

    cells = []
    plan = [("exact", None, p) for p in args.preconditioners if p not in ("fim", *WHITENED)] * args.exact
    plan += [(c, k, p) for c in args.compressors for k in args.ks for p in args.preconditioners]
    for compressor, k, preconditioner in plan:
        done = root / "cells" / f"{compressor}_k{k or 'full'}_{preconditioner}.json"
        if done.exists():
            cell = json.loads(done.read_text())
        else:
            cell = run_cell(model, data, config, harness, root / "stores" / f"{compressor}_k{k or 'full'}", compressor, k,
                            preconditioner, train_loader, test_loader, grid, args.seed)
            done.parent.mkdir(exist_ok=True)
            done.write_text(json.dumps(cell, indent=1))
        cells.append(cell)
        print(json.dumps({key: v for key, v in cell.items() if key != "by_damping"}), flush=True)

    report = {
        "model": f"char-level GPT, {config.layers} layers, d={config.d_model}, {config.heads} heads, context {config.length}",
        "data": "pydoc_data.topics (Python's documentation topics), character tokens", "config": config.as_dict(),
        "quick": args.quick, "vocab": len(data.vocab), "n_train": config.n_train, "n_test": config.n_test,
        "lds_models": args.models, "train_loss_per_token": train_loss, "test_loss_per_token": test_loss,
        "damping_grid": list(grid), "k_per_layer": args.ks, "layers": block_layers(model),
        "retrain_seconds_this_run": retrain_seconds, "train_seconds_this_run": train_seconds,
        "total_seconds_this_run": time.perf_counter() - started,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "cells": cells,
    }
    name = "lm_lds_quick" if args.quick else "lm_lds"
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{name}.md").write_text(markdown_table(report))
    print(json.dumps({key: v for key, v in report.items() if key != "cells"}, indent=1))
    return report


def run_cell(model, data, config, harness, store, compressor, k, preconditioner, train_loader, test_loader, grid, seed):
    spec = "identity" if compressor == "exact" else compressor
    if preconditioner in WHITENED:
        def attributor(damping):
            return Attributor(model, sequence_loss, method="if", compressor=spec, k=k or 10**9, seed=seed,
                              store=store.with_name(f"{store.name}_{preconditioner}_{damping}"), layers=block_layers(model),
                              compile=False, progress=False, preconditioner=preconditioner, damping=damping)

        return {"compressor": compressor, "k": k, "preconditioner": preconditioner,
                **timed_whitened_lds(attributor, harness, train_loader, test_loader, config.n_test, grid, seed)}
    attr = Attributor(model, sequence_loss, method="if", compressor=spec, k=k or 10**9, store=store, seed=seed,
                      layers=block_layers(model), compile=False, progress=False, preconditioner=preconditioner)
    return {"compressor": compressor, "k": k, "preconditioner": preconditioner,
            **timed_lds(attr, harness, train_loader, test_loader, config.n_test, grid, seed)}


def markdown_table(report) -> str:
    return preconditioner_table(report, f"**{report['model']}, {report['n_train']} train / {report['n_test']} held-out "
                                "sequences, IF** (LDS ± s.e. at the cross-validated damping, in brackets)", "k per layer")


if __name__ == "__main__":
    main()
