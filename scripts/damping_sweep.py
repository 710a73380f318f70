#!/usr/bin/env python
"""How the demo's retrieval depends on the scoring of one cached store: MRR and recall@1/@5 of the fact-tracing
questions for each damping (absolute, or '<f>*mean': f times each layer block's mean eigenvalue), preconditioner
(the FIM, or TrackStar's mixed train + query curvature at a task weight) and document-side normalization:

* ``raw``: IF, q^T (F + damping I)^-1 g;
* ``unit``: the same store's features unit-normalized by their compressed norms (Attributor(normalize=True));
* ``whitened``: raw IF divided by sqrt(g^T (F + damping I)^-1 g), the document's self-influence: TrackStar's cosine
  after whitening, as far as one query's ranking goes (its own norm does not reorder its documents).

The questions and their true sources come from the demo's facts.json, the documents from the store. Prints one JSON
line per setting, then a JSON summary.

    python -m attribution.llm.cli demo --out out/llm                # the model, questions and store it reads
    python -m attribution.llm.cli cache --store out/llm/ostore --model out/llm/model --corpus out/llm/corpus.jsonl \\
        --limit all --optimizer-state out/llm/optimizer.pt         # the same corpus, optimizer-normalized
    python scripts/damping_sweep.py --demo out/llm --store out/llm/ostore --json sweep.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grass_ops.benchmarking import emit_json_report  # noqa: E402

DAMPINGS = ("0.001", "0.0001*mean", "0.001*mean", "0.005*mean", "0.01*mean", "0.1*mean")
PRECONDITIONERS = ("fim", "mixed:0.5", "mixed:0.78")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("out/llm"), help="the demo's --out folder (facts.json, model)")
    parser.add_argument("--store", type=Path, default=None, help="the store to score (default: the demo's DEMO/store)")
    parser.add_argument("--dampings", nargs="+", default=list(DAMPINGS))
    parser.add_argument("--preconditioners", nargs="+", default=list(PRECONDITIONERS),
                        help="fim, none, or mixed:<task weight>")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    from attribution import llm
    from attribution.evaluation import facts
    from attribution.llm.commands.common import attributor, load_store
    from attribution.llm.commands.flags import damping as parse_damping

    dampings = [parse_damping(d) for d in args.dampings]  # cache --damping's parser: a number or '<f>*mean'

    record = json.loads((args.demo / "facts.json").read_text())
    queries = record["queries"]
    store, config, docs = load_store(str(args.store or args.demo / "store"))
    model, tokenizer = llm.load_model(str(args.demo / "model"))
    ids, targets = [d["id"] for d in docs], [q["target"] for q in queries]
    rows = []

    def measured(setting: dict, scores) -> None:
        metrics = facts.retrieval_metrics(scores.float(), ids, targets)
        rows.append({**setting, **{k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}})
        print(json.dumps(rows[-1]), flush=True)

    start = time.perf_counter()
    for spec in args.preconditioners:
        name, _, weight = spec.partition(":")
        task_weight = float(weight) if weight else None
        for normalize in (False, True):
            attr = attributor(model, config, store, method="if", preconditioner=name, task_weight=task_weight,
                              normalize=normalize)
            features = attr.query_features(llm.query_batches(tokenizer, queries, config.batch_size, config.max_length,
                                                             config.token_batch_size))
            for damping in dampings if name != "none" else dampings[:1]:
                setting = {"preconditioner": name, "task_weight": task_weight, "damping": damping}
                scores = attr.attribute(features=features, damping=damping).double()
                measured({**setting, "documents": "unit" if normalize else "raw"}, scores)
                if not normalize:
                    norms = attr.self_influence(damping=damping).double().clamp_min(1e-300).sqrt()
                    measured({**setting, "documents": "whitened"}, scores / norms[None])
    best = max(rows, key=lambda r: r["mrr"])
    report = {"store": str(args.store or args.demo / "store"), "optimizer_state": config.optimizer_state is not None,
              "store_damping": config.damping, "questions": len(queries),
              "documents": len(docs), "rows": rows,
              "answer": record.get("meta", {}).get("answer", "own"),  # the attributed completion (demo --answer)
              "best": best, "seconds": time.perf_counter() - start}
    emit_json_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
