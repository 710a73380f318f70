#!/usr/bin/env python
"""The main job: train an MLP on scikit-learn's digits, cache its training gradients with FactGraSS,
and show, for a few test digits, the most helpful and most harmful training digits.

    python scripts/digits_demo.py --out out/digits

Writes attribution.png (a grid: test digit | top helpful | top harmful), summary.json and summary.txt,
and a resumable on-disk store (store/). Runs in about a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from attribution.evaluation.examples import batches, load_digits_split, make_mlp, per_sample_loss, train_mlp


def plot_grid(path, test_x, test_y, pred, train_x, train_y, helpful, harmful, helpful_scores, harmful_scores):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, k = len(test_x), len(helpful[0])
    fig, axes = plt.subplots(rows, 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.55 * rows))
    for r in range(rows):
        cells = [(test_x[r], f"test y={test_y[r]}\npred {pred[r]}", "Blues")]
        cells += [(train_x[i], f"+ y={train_y[i]}\n{s:.2g}", "Greens") for i, s in zip(helpful[r], helpful_scores[r])]
        cells += [(train_x[i], f"- y={train_y[i]}\n{s:.2g}", "Reds") for i, s in zip(harmful[r], harmful_scores[r])]
        for ax, (img, title, cmap) in zip(axes[r], cells):
            ax.imshow(np.asarray(img).reshape(8, 8), cmap=cmap, vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle(f"FactGraSS influence on sklearn digits: test digit | top {k} helpful (green) | top {k} harmful (red)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    from attribution import Attributor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/digits")
    parser.add_argument("--k", type=int, default=256, help="compressed dimension per layer")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--queries", type=int, default=6, help="test digits shown in the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    (x_tr, y_tr), (x_te, y_te) = load_digits_split(args.seed)
    t0 = time.perf_counter()
    model = train_mlp(make_mlp(args.seed), x_tr, y_tr, seed=args.seed)
    train_seconds = time.perf_counter() - t0
    with torch.no_grad():
        pred = model(x_te).argmax(1)
    accuracy = float((pred == y_te).float().mean())

    attr = Attributor(model, per_sample_loss, method="if", compressor="factgrass", k=args.k, damping=args.damping,
                      store=out / "store", seed=args.seed, compile=not args.no_compile)
    t0 = time.perf_counter()
    attr.cache(batches(x_tr, y_tr, 128))
    cache_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = attr.attribute(batches(x_te, y_te, 128))  # [n_test, n_train]
    attribute_seconds = time.perf_counter() - t0

    helpful_v, helpful = scores.topk(args.top, dim=1)
    harmful_v, harmful = scores.topk(args.top, dim=1, largest=False)
    same_label_helpful = float((y_tr[helpful] == y_te[:, None]).float().mean())
    same_label_harmful = float((y_tr[harmful] == y_te[:, None]).float().mean())
    base_rate = float(sum(((y_tr == c).float().mean() * (y_te == c).float().mean()) for c in range(10)))

    # the shown queries: the misclassified test digits first, then correct ones
    wrong = (pred != y_te).nonzero().flatten().tolist()
    right = (pred == y_te).nonzero().flatten().tolist()
    shown = (wrong[: args.queries // 2] + right)[: args.queries]
    plot_grid(out / "attribution.png", x_te[shown], y_te[shown].tolist(), pred[shown].tolist(), x_tr, y_tr.tolist(),
              helpful[shown].tolist(), harmful[shown].tolist(), helpful_v[shown].tolist(), harmful_v[shown].tolist())

    summary = {
        "data": "sklearn digits (8x8), seeded split", "n_train": len(x_tr), "n_test": len(x_te),
        "model": "MLP 64-128-64-10 (ReLU)", "test_accuracy": accuracy, "train_seconds": train_seconds,
        "method": "influence function, block-diagonal FIM", "compressor": attr.compressors[attr.layer_names[0]].spec(),
        "k_per_layer": attr.dims, "damping": args.damping, "seed": args.seed,
        "cache_seconds": cache_seconds, "attribute_seconds": attribute_seconds,
        "compiled": attr.stats["compiled"], "graph_breaks": attr.stats["graph_breaks"],
        f"top{args.top}_helpful_same_label_rate": same_label_helpful,
        f"top{args.top}_harmful_same_label_rate": same_label_harmful,
        "random_pair_same_label_rate": base_rate,
        "queries": [
            {"test_index": int(i), "label": int(y_te[i]), "predicted": int(pred[i]),
             "helpful": [{"train_index": int(j), "label": int(y_tr[j]), "score": float(s)} for j, s in zip(helpful[i], helpful_v[i])],
             "harmful": [{"train_index": int(j), "label": int(y_tr[j]), "score": float(s)} for j, s in zip(harmful[i], harmful_v[i])]}
            for i in shown
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"MLP on sklearn digits: {len(x_tr)} train / {len(x_te)} test, test accuracy {accuracy:.3f}",
        f"FactGraSS influence (k={args.k} per layer): cache {cache_seconds:.1f}s, attribute {attribute_seconds:.2f}s "
        f"(compiled={attr.stats['compiled']}, graph breaks={attr.stats['graph_breaks']})",
        f"top-{args.top} helpful training digits share the test label {100 * same_label_helpful:.1f}% of the time, "
        f"harmful ones {100 * same_label_harmful:.1f}% (random pairs: {100 * base_rate:.1f}%)",
    ]
    for q in summary["queries"]:
        lines.append(f"  test #{q['test_index']} (label {q['label']}, predicted {q['predicted']}): helpful labels "
                     f"{[h['label'] for h in q['helpful']]}, harmful labels {[h['label'] for h in q['harmful']]}")
    lines.append(f"grid: {out / 'attribution.png'}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
