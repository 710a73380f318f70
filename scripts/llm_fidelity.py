#!/usr/bin/env python
"""How faithful each compressor and scoring is on a real language model, against the exact gradients.

    python scripts/llm_fidelity.py --out out/fidelity            # SmolLM2-135M, 96 python-docs paragraphs
    python scripts/llm_fidelity.py --out out/fidelity --quick    # a few documents and methods (a test runs it)

For at least 8 queries (prompts completed by the model itself) over the corpus, the truth is the exact
per-document gradient over every linear layer of the transformer blocks: its inner product and cosine
with each query's gradient (attribution.evaluation.fidelity computes them layer by layer from the factors). Each
method's score matrix is compared with the truth by the mean Spearman correlation over queries.
Data-aware masks ("energy": the top second-moment coordinates of each layer's factors) are computed on
held-out paragraphs that are not in the corpus. Prints JSON (also written to --out/fidelity.json) and
a Markdown table (--out/fidelity.md).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attribution import llm
from attribution.evaluation.fidelity import Method, fidelity, measure, scores
from attribution.layers import find_layers
from attribution.selective_mask import energy_masks
from grass_ops.benchmarking import emit_json_report

PROMPTS = llm.DEFAULT_PROMPTS + ["A dictionary in Python", "The with statement", "An exception is raised when",
                                 "The import statement", "A generator function"]


def method_table(k: int, mask_dirs: dict[float, str], quick: bool) -> dict[str, Method]:
    """The compared methods, all at k floats per layer unless the name says otherwise."""
    table = {
        "FactGraSS, blow-up 2 (random masks)": Method("factgrass:blowup=2", k),
        "FactGraSS, blow-up 4 (random masks)": Method("factgrass:blowup=4", k),
        "FactGraSS, blow-up 2, energy masks": Method(f"factgrass:mask_dir={mask_dirs[2.0]}", k),
        "LoGra": Method("logra", k),
        "SJLT on the flat gradient": Method("sjlt", k),
    }
    if not quick:
        table.update({
            "FactGraSS, blow-up 8 (random masks)": Method("factgrass:blowup=8", k),
            "FactGraSS, blow-up 4, energy masks": Method(f"factgrass:blowup=4,mask_dir={mask_dirs[4.0]}", k),
            "FactGraSS, blow-up 2, k x4 (random masks)": Method("factgrass:blowup=2", 4 * k),
            "GraSS (random mask k' = 4k, then SJLT)": Method("grass", k),
        })
    return table


IF_VARIANTS = {  # scored from the features of the named method
    "IF (raw), FactGraSS blow-up 2 random": ("FactGraSS, blow-up 2 (random masks)", "if"),
    "IF (raw), FactGraSS energy": ("FactGraSS, blow-up 2, energy masks", "if"),
    "IF, normalized, FactGraSS energy": ("FactGraSS, blow-up 2, energy masks", "if-normalized"),
    "IF (raw), FactGraSS blow-up 4 energy (the CLI default)": ("FactGraSS, blow-up 4, energy masks", "if"),
    "IF, unit-normalized gradients, FactGraSS blow-up 4 energy": ("FactGraSS, blow-up 4, energy masks", "if-unit"),
    "IF (raw), SJLT flat": ("SJLT on the flat gradient", "if"),
    "IF, normalized, SJLT flat": ("SJLT on the flat gradient", "if-normalized"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/fidelity")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--documents", type=int, default=96)
    parser.add_argument("--heldout", type=int, default=64, help="paragraphs (not in the corpus) for the energy masks")
    parser.add_argument("--k", type=int, default=256, help="floats per layer")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--token-batch-size", type=int, default=512)
    parser.add_argument("--generate", type=int, default=24)
    args = parser.parse_args(argv)
    if args.quick:
        args.documents, args.heldout, args.max_length, args.generate = 16, 8, 48, 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = llm.load_model("smollm2")
    layer_patterns = ["model.layers.*"]
    layers = find_layers(model, layer_patterns)
    corpus = llm.python_docs_corpus(limit=None)
    docs, heldout = corpus[: args.documents], corpus[args.documents : args.documents + args.heldout]
    prompts = PROMPTS[:8]
    completions = llm.complete(model, tokenizer, prompts, args.generate)
    queries = [{"id": str(i), "prompt": p, "completion": c} for i, (p, c) in enumerate(zip(prompts, completions))]
    doc_batches, order = llm.document_batches(tokenizer, docs, None, args.max_length, args.token_batch_size)
    heldout_batches, _ = llm.document_batches(tokenizer, heldout, None, args.max_length, args.token_batch_size)
    query_batches = llm.query_batches(tokenizer, queries, None, args.max_length, args.token_batch_size)

    t0 = time.perf_counter()
    mask_dirs, kept = {}, {}
    for blowup in (2.0, 4.0):
        mask_dirs[blowup] = str(out / f"energy_masks_b{blowup:g}_k{args.k}")
        kept[blowup] = energy_masks(model, llm.sequence_loss, heldout_batches, mask_dirs[blowup], args.k, blowup=blowup,
                                    layers=layer_patterns)
    mask_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()  # the CLI's pass: blow-up 4 under the cache's bfloat16 autocast
    mask_dirs["4-bf16"] = str(out / f"energy_masks_b4_k{args.k}_bf16")
    kept_bf16 = energy_masks(model, llm.sequence_loss, heldout_batches, mask_dirs["4-bf16"], args.k, blowup=4.0,
                             layers=layer_patterns, autocast=torch.bfloat16)
    mask_bf16_seconds = time.perf_counter() - t0
    mask_agreement = _kept_in_common(kept[4.0], kept_bf16)

    methods = method_table(args.k, mask_dirs, args.quick)
    t0 = time.perf_counter()
    truth, features = measure(model, llm.sequence_loss, layers, doc_batches, query_batches, methods)
    pass_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    mixed = {f"{name}, bfloat16 autocast": methods[name] for name in methods if "energy" in name and "blow-up 4" in name}
    if mixed:  # the CLI default: the masks' pass under the same autocast as the cache's
        mixed["FactGraSS, blow-up 4, energy masks from a bfloat16 pass, bfloat16 autocast (the CLI default)"] = Method(
            f"factgrass:blowup=4,mask_dir={mask_dirs['4-bf16']}", args.k)
    _, mixed_features = measure(model, llm.sequence_loss, layers, doc_batches, query_batches, mixed, truth=False,
                                autocast=torch.bfloat16) if mixed else (None, {})
    features.update(mixed_features)
    methods.update(mixed)
    autocast_seconds = time.perf_counter() - t0
    rows = []
    for name, method in methods.items():
        f = features[name]
        rows.append({"method": name, "compressor": str(method.compressor), "scoring": method.scoring,
                     "floats_per_sample": int(f.docs.shape[1]), "compress_seconds": f.seconds,
                     **fidelity(truth, scores(f, method))})
    for name, (source, scoring) in IF_VARIANTS.items():
        if source in features:
            method = Method(methods[source].compressor, methods[source].k, scoring)
            rows.append({"method": name, "compressor": str(method.compressor), "scoring": scoring,
                         "damping": "0.1 x mean eigenvalue per block",
                         "floats_per_sample": int(features[source].docs.shape[1]), "compress_seconds": features[source].seconds,
                         **fidelity(truth, scores(features[source], method))})
    report = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF)", "layers": len(layers), "documents": len(docs),
        "real_tokens": sum(int(b["attention_mask"].sum()) for b in doc_batches), "queries": queries,
        "k_per_layer": args.k, "truth": "exact per-document gradient over the target layers (cosine and inner product)",
        "mask_seconds": mask_seconds, "mask_bfloat16_seconds": mask_bf16_seconds,
        "mask_kept_in_common": mask_agreement, "pass_seconds": pass_seconds, "autocast_pass_seconds": autocast_seconds,
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick, "methods": rows,
    }
    (out / "fidelity.json").write_text(json.dumps(report, indent=1))
    lines = ["| method | floats / sample | mean Spearman vs exact cosine (± s.e.) | vs exact inner product | compress s |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['floats_per_sample']:,} | {r['spearman_vs_cosine']:.3f} ± "
                     f"{r['spearman_vs_cosine_se']:.3f} | {r['spearman_vs_inner']:.3f} | {r['compress_seconds']:.1f} |")
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")
    emit_json_report({k: v for k, v in report.items() if k != "queries"})
    return report


def _kept_in_common(first: dict, second: dict) -> dict[str, float]:
    """The share of the kept input / output coordinates that two sets of masks ({layer: (in, out)}) have in common,
    over every layer, and the smallest share of one layer."""
    def shares(side):
        return [len(set(first[n][side].tolist()) & set(second[n][side].tolist())) / len(first[n][side]) for n in first]

    x, g = shares(0), shares(1)
    return {"inputs": sum(x) / len(x), "outputs": sum(g) / len(g), "smallest_layer": min(x + g)}


if __name__ == "__main__":
    main()
