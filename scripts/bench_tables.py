#!/usr/bin/env python
"""Markdown tables for BENCHMARKS.md from the JSON of the benchmark scripts.

    python scripts/bench_tables.py ops bench_ops.json
    python scripts/bench_tables.py attribution bench_attribution.json
    python scripts/bench_tables.py llm bench_llm.json
"""
from __future__ import annotations

import json
import sys


def ops(report) -> str:
    out = ["| k | zeros | grass sjlt (ms) | index_add_ (ms) | dense Gaussian (ms) | speedup vs index_add_ |",
           "|---|---|---|---|---|---|"]
    for r in report.get("sjlt", []):
        dense = f"{r['dense_gaussian_ms']:.1f}" if r["dense_gaussian_ms"] else "skipped (matrix over --max-dense-gib)"
        out.append(f"| {r['k']} | {round(100 * r['zero_fraction'])}% | {r['sjlt_ms']:.2f} | {r['index_add_ms']:.2f} | {dense} | "
                   f"{r['speedup_vs_index_add']:.2f}x |")
    out += ["", "| shape | B x T | k | k_in' = k_out' | factgrass (ms) | naive (ms) | LoGra (ms) | vs LoGra | vs naive |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("factgrass", []):
        out.append(f"| {r['shape']} {r['d_in']}x{r['d_out']} | {r['batch']}x{r['tokens']} | {r['k']} | {r['k_in_prime']} | "
                   f"{r['factgrass_ms']:.2f} | {r['naive_ms']:.2f} | {r['logra_ms']:.2f} | {r['speedup_vs_logra']:.2f}x | "
                   f"{r['speedup_vs_naive']:.2f}x |")
    return "\n".join(out)


def attribution(report) -> str:
    out = ["| model | forward+backward | FactGraSS eager | FactGraSS compiled | LoGra eager | LoGra compiled | graph breaks | "
           "attribute (scores/s) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in report["models"].items():
        out.append(f"| {name} | {r['forward_backward_samples_per_s']:,.0f} | {r['cache_factgrass_eager_samples_per_s']:,.0f} | "
                   f"{r['cache_factgrass_compiled_samples_per_s']:,.0f} | {r['cache_logra_eager_samples_per_s']:,.0f} | "
                   f"{r['cache_logra_compiled_samples_per_s']:,.0f} | {r['graph_breaks_factgrass']} | "
                   f"{r['attribute_scores_per_s']:,.0f} (n_train={r['n_train']}) |")
    return "\n".join(out)


def llm(report) -> str:
    out = ["| model | compressor | k per layer | bare fwd + act-grad bwd (tok/s) | compress (tok/s) | cache step (tok/s) | "
           "cache / bare | factors / compressed / weight grads (MB per sample) |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in report["models"].items():
        for key, r in rows.items():
            if not isinstance(r, dict):
                continue
            comp, k = key.rsplit("_k", 1)
            b = r["per_sample_bytes"]
            out.append(f"| {name} ({r['layers']} layers) | {comp} | {k} | {r['bare_tokens_per_s']:.0f} | "
                       f"{r['compress_tokens_per_s']:.0f} | {r['cache_tokens_per_s']:.0f} | {100 * r['cache_vs_bare']:.0f}% | "
                       f"{b['factors'] / 1e6:.1f} / {b['compressed'] / 1e6:.2f} / {b['weight_gradients_never_formed'] / 1e6:.0f} |")
        speedups = [f"k={key.rsplit('_k', 1)[1]}: {v:.2f}x" for key, v in rows.items() if key.startswith("compress_speedup")]
        out.append(f"| {name} | FactGraSS / LoGra compress | | | {', '.join(speedups)} | | | |")
    return "\n".join(out)


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    print({"ops": ops, "attribution": attribution, "llm": llm}[kind](json.load(open(path))))
