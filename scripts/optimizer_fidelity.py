#!/usr/bin/env python
"""How close FactGraSS's Adafactor-factored optimizer normalization is to the exact elementwise one, on SmolLM2.

    python scripts/optimizer_fidelity.py                      # 8 documents, 4 queries, 64 tokens, every block
    python scripts/optimizer_fidelity.py --blocks 0 15 29     # a few blocks only
    python scripts/optimizer_fidelity.py --model out/llm/model --optimizer-state out/llm/optimizer.pt   # the demo's

A real AdamW state comes from a few AdamW steps on the documents (the model keeps the stepped weights, as a
fine-tuned model keeps its optimizer's state). For every target layer (the linear layers of the chosen
transformer blocks) and every document and query, the exact normalized per-sample gradient G / (sqrt(v) + eps)
is compared with the factored one, G scaled by the Adafactor factors of v + eps**2 (what FactGraSS and LoGra apply
to x_in and g_out; attribution.optimizer_state): their cosine per sample. Over all layers, the GradDot scores of
the queries against the documents: exact normalized, factored normalized, and unnormalized, compared by the
Spearman correlation per query (mean) and over the whole score matrix; then the pipeline itself (Attributor with
optimizer_state: FactGraSS and SJLT at --k floats per layer) against the exact normalized scores. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from attribution import Attributor, llm
from attribution import optimizer_state as opt_state
from attribution.compression import weight_gradients
from attribution.evaluation.metrics import spearman
from attribution.gradients import captured_factors
from attribution.layers import find_layers


def adamw_state(model, batches, steps: int, lr: float) -> dict:
    """The AdamW state_dict after ``steps`` passes over ``batches`` (the model's weights are updated)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        for batch in batches:
            opt.zero_grad()
            llm.sequence_loss(model, batch).mean().backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return opt.state_dict()


def layer_gradients(model, layers, batches) -> dict[str, torch.Tensor]:
    """{layer: per-sample weight gradients [n, d_in * d_out], float64}, rows in batch order."""
    out: dict[str, list] = {n: [] for n in layers}
    for _, inputs, grads, _ in captured_factors(model, llm.sequence_loss, batches, layers):
        for n in layers:
            out[n].append(weight_gradients(inputs[n].double(), grads[n].double()))
    return {n: torch.cat(parts) for n, parts in out.items()}


def rank_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"spearman_per_query_mean": float(spearman(a, b, dim=1).mean()),
            "spearman_whole_matrix": float(spearman(a.flatten(), b.flatten(), dim=0))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="AdamW passes over the documents")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--eps", type=float, default=opt_state.DEFAULT_EPS)
    parser.add_argument("--blocks", type=int, nargs="*", default=None, help="transformer blocks (default: all)")
    parser.add_argument("--k", type=int, default=256, help="floats per layer of the pipeline rows")
    parser.add_argument("--model", default="smollm2", help="a model folder (e.g. the demo's out/llm/model)")
    parser.add_argument("--optimizer-state", default=None,
                        help="its AdamW state_dict file (e.g. the demo's out/llm/optimizer.pt) instead of --steps of AdamW")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = llm.load_model(args.model)
    corpus = llm.python_docs_corpus(limit=None)
    docs, queries = corpus[: args.documents], corpus[args.documents : args.documents + args.queries]
    doc_batches, _ = llm.document_batches(tokenizer, docs, 4, args.max_length)
    query_batches, _ = llm.document_batches(tokenizer, queries, 4, args.max_length)
    state = (adamw_state(model, doc_batches, args.steps, args.lr) if args.optimizer_state is None
             else torch.load(args.optimizer_state, weights_only=True))
    model.eval()
    blocks = args.blocks if args.blocks else range(model.config.num_hidden_layers)
    patterns = [f"model.layers.{b}.*" for b in blocks]
    layers = find_layers(model, patterns)
    found = opt_state.match(model, state, [opt_state.layer_parameter(model, i) for i in layers.values()])

    per_layer, totals = [], {"exact": 0, "factored": 0, "raw": 0}
    for group in range(0, len(blocks), 5):  # five blocks' factors at a time
        infos = find_layers(model, patterns[group : group + 5])
        grads = layer_gradients(model, infos, doc_batches + query_batches)
        for name, g in grads.items():
            v = opt_state.second_moment(name, *found[opt_state.layer_parameter(model, infos[name])]).T  # [d_in, d_out]
            exact = g * opt_state.exact_scale(v, args.eps).flatten()
            x_scale, g_scale = opt_state.factored_scales(v, args.eps)
            factored = g * torch.outer(x_scale, g_scale).flatten()
            cos = torch.nn.functional.cosine_similarity(exact, factored, dim=1)
            per_layer.append({"layer": name, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())})
            n = len(docs)
            for key, t in (("exact", exact), ("factored", factored), ("raw", g)):
                totals[key] = totals[key] + t[n:] @ t[:n].T  # [queries, documents]
            del exact, factored, g
    cosines = torch.tensor([r["cosine_mean"] for r in per_layer])
    by_kind: dict[str, list] = {}
    for r in per_layer:
        by_kind.setdefault(r["layer"].rsplit(".", 1)[-1], []).append(r["cosine_mean"])

    pipeline = {}
    for label, compressor in (("FactGraSS blow-up 4 (random masks), factored normalization", "factgrass:blowup=4"),
                              ("SJLT on the flat gradient, exact normalization", "sjlt")):
        attr = Attributor(model, llm.sequence_loss, method="graddot", compressor=compressor, k=args.k, layers=patterns,
                          compile=False, progress=False, optimizer_state=state, optimizer_eps=args.eps)
        scores = attr.cache(doc_batches).attribute(query_batches).double()
        pipeline[label] = rank_agreement(totals["exact"], scores)
    report = {
        "model": args.model, "documents": len(docs), "queries": len(queries), "max_length": args.max_length,
        "adamw": ({"steps": args.steps * len(doc_batches), "lr": args.lr} if args.optimizer_state is None
                  else {"state": args.optimizer_state}),
        "eps": args.eps, "layers": len(per_layer), "blocks": list(blocks),
        "cosine_exact_vs_factored": {"mean_over_layers": float(cosines.mean()), "min_over_layers": float(cosines.min()),
                                     "median_over_layers": float(cosines.median()),
                                     "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
                                     "worst_layers": sorted(per_layer, key=lambda r: r["cosine_mean"])[:3]},
        "graddot_spearman": {"factored_vs_exact": rank_agreement(totals["exact"], totals["factored"]),
                             "unnormalized_vs_exact": rank_agreement(totals["exact"], totals["raw"])},
        f"pipeline_k{args.k}_vs_exact_normalized": pipeline,
        "seconds": time.perf_counter() - started, "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
