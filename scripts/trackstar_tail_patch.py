#!/usr/bin/env python
"""EleutherAI Bergson's TrackStar on the main job, scored like the demo's rows: its ranking of the 116 paragraphs
for each of the 20 questions gets the demo's retrieval metrics and tail-patch (one AdamW step, without momentum,
on its top 1, 5 and 10 paragraphs), beside the demo's own rows read from its facts.json. Prints JSON.

    bash ../shared/peers/bergson-venv.sh                                  # Bergson in its own venv (once)
    python -m attribution.llm.cli demo --out out/llm ...                  # the demo's folder: model, optimizer, facts
    python scripts/trackstar_tail_patch.py --demo out/llm --work out/trackstar

Bergson reads the demo's own inputs, pre-tokenized (``input_ids`` and ``labels``, so that no chat template is
added): the corpus cut at --max-length tokens as the demo caches it, every token a target; each question's prompt
and the completion the demo attributed (the planted fact's answer, or the model's with ``demo --answer own``: the
facts.json's "answer"), its tokens the targets. It runs ``bergson trackstar`` with the fine-tuning's
AdamW state (its second moments normalize the gradients), unit-normalized gradients, the mixed train/query
Hessian (its default) and a 16 x 16 projection per module (256 floats for each of the 210 block linear layers,
the demo default's k), in float32, batches of at most 4 documents. A run folder whose scores exist is reused when
its inputs are the same bytes (``--rerun`` starts anew).

Each step is evaluated on the model's answer and on the planted fact's true answer, as the demo's rows are
(``tail_patch@k``, ``_answered`` over the questions answered right, ``_true``). The per-question values are
``per_query_tail_patch`` and ``per_query_tail_patch_true``, each {k: [nats per question]}; files written before
run d12 hold ``per_query_tail_patch`` as a list of {k: nats}, one per question.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grass_ops.benchmarking import emit_json_report, run_measured  # noqa: E402

VENV = Path(os.environ.get("BERGSON_VENV", Path.home() / ".cache" / "bergson-venv"))
# Run in Bergson's venv: its scores [documents, queries] with proponents (that lower the query's loss) first when
# sorted descending, saved as .npy.
READ_SCORES = """
import sys, numpy as np
from bergson.data import load_scores_loss_signed
scores, _ = load_scores_loss_signed(sys.argv[1])
np.save(sys.argv[2], -scores.float().numpy())
"""


def pretokenized(run, work: Path, tokenizer, max_length: int) -> tuple[list[dict], list[dict]]:
    """(corpus, queries) of the demo's folder (a DemoRun); writes Bergson's pre-tokenized corpus.jsonl and
    queries.jsonl."""
    from attribution.llm.tokens import document_tokens, query_tokens

    corpus, queries = run.corpus, run.queries
    work.mkdir(parents=True, exist_ok=True)

    def rows(encoded, items):
        return "".join(json.dumps({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, targets)],
                                   "id": item["id"]}) + "\n" for (ids, targets), item in zip(encoded, items))

    (work / "corpus.jsonl").write_text(rows(document_tokens(tokenizer, corpus, max_length), corpus))
    (work / "queries.jsonl").write_text(rows([query_tokens(tokenizer, q, max_length) for q in queries], queries))
    return corpus, queries


def run_trackstar(demo: Path, work: Path, rerun: bool) -> dict:
    """``bergson trackstar`` into work/run (skipped when its scores exist for the same inputs, the pre-tokenized
    corpus and questions and the demo's optimizer state, and not ``rerun``); its wall time and peak RSS, or
    {"reused": True}."""
    run = work / "run"
    inputs = hashlib.sha256()
    for path in (work / "corpus.jsonl", work / "queries.jsonl", demo / "optimizer.pt"):
        inputs.update(path.read_bytes())
    stamp = work / "inputs.sha256"  # the inputs whose scores run/ holds: another demo folder or --answer is rerun
    if (run / "scores" / "scores.bin").is_file() and not rerun and stamp.is_file() and stamp.read_text() == inputs.hexdigest():
        return {"reused": True}
    stamp.unlink(missing_ok=True)
    cmd = [str(VENV / "bin" / "bergson"), "trackstar", str(run), "--model", str(demo / "model"), "--precision", "fp32",
           "--projection_dim", "16", "--data.dataset", str(work / "corpus.jsonl"),
           "--query.dataset", str(work / "queries.jsonl"), "--optimizer_state", str(demo / "optimizer.pt"),
           "--unit_normalize", "true", "--token_batch_size", "512", "--max_batch_size", "4", "--score", "individual",
           "--overwrite", "true"]
    result = run_measured(cmd)
    if result["status"] != 0:
        raise RuntimeError(f"bergson trackstar failed: {result['stderr_tail']}")
    stamp.write_text(inputs.hexdigest())
    return {"seconds": result["seconds"], "peak_rss_mb": result["peak_rss_bytes"] / 2**20, "command": " ".join(cmd)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("out/llm"), help="the demo's --out folder")
    parser.add_argument("--work", type=Path, default=Path("out/trackstar"), help="Bergson's inputs and run folder")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per document (default: the demo's, from facts.json; 128 if it has none)")
    parser.add_argument("--rerun", action="store_true", help="run trackstar again even if its scores exist")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if not (VENV / "bin" / "bergson").is_file():
        raise SystemExit(f"Bergson is not installed at {VENV}: run bash ../shared/peers/bergson-venv.sh")
    import torch

    from attribution.evaluation import facts
    from attribution.llm import demo
    from attribution.llm.demo_run import DemoRun

    run = DemoRun.read(args.demo)
    model, tokenizer = run.model()
    step = run.step_options(tokenizer, args.max_length)  # the token cut and precision the demo's rows were stepped in
    corpus, queries = pretokenized(run, args.work, tokenizer, step["max_length"])
    trackstar = run_trackstar(args.demo, args.work, args.rerun)
    subprocess.run([str(VENV / "bin" / "python"), "-c", READ_SCORES, str(args.work / "run" / "scores"),
                    str(args.work / "scores.npy")], check=True, capture_output=True)
    import numpy as np

    scores = torch.from_numpy(np.load(args.work / "scores.npy")).double().T  # [queries, documents]
    if tuple(scores.shape) != (len(queries), len(corpus)):
        raise RuntimeError(f"Bergson's scores have shape {tuple(scores.shape)}, expected ({len(queries)}, {len(corpus)})")
    ids, targets = [d["id"] for d in corpus], [q["target"] for q in queries]
    row = demo.evaluated("Bergson trackstar (optimizer state, unit-normalized, mixed Hessian, 16x16 per module)",
                         scores, ids, targets, scoring="trackstar")
    optimizer = run.optimizer(model)  # without the first moment, as the demo's tail-patch holds it
    # each step evaluated on the model's answer and on the planted fact's true one, as the demo's rows are
    patches = [facts.tail_patch_ranking(model, optimizer, corpus, facts.tail_patch_answers(q), ranking, **step)
               for q, ranking in zip(queries, row["ranking"])]
    demo.summarize_tail_patches(row, patches, queries)
    keys = ("method", "recall@1", "recall@5", "mrr", *(f"tail_patch@{k}{suffix}{se}" for k in facts.TAIL_PATCH_KS
                                                       for suffix in ("", "_answered", "_true") for se in ("", "_se")))
    ours = run.methods
    out = {"answer": run.answer,  # the completion attributed
           "trackstar": {k: row.get(k) for k in keys}, "trackstar_run": trackstar,
           "demo_rows": [{k: r.get(k) for k in keys} for r in ours if r.get("tail_patch@5") is not None],
           "per_query_tail_patch": row["tail_patch_per_query"],
           "per_query_tail_patch_true": row["tail_patch_true_per_query"]}
    emit_json_report(out, args.json)
    return out


if __name__ == "__main__":
    main()
