#!/usr/bin/env python
"""How much influence the demo's candidate documents hold: an oracle ranks each question's candidates by their own
tail-patch (one step on each document alone, measured on the attributed answer), and the oracle's top 1, 5 and 10
are tail-patched as the demo's rows are, beside them. No ranking of the same candidates can do much better than the
oracle (a step on five documents is close to, but not exactly, the sum of five single steps), so it bounds what a
better method could reach on issue 19's target (tail-patch@5 at least 1.2x BM25's, standard errors apart) without
looking past these candidates. Prints JSON.

    python -m attribution.llm.cli demo --out out/llm                 # the model, optimizer.pt, corpus and facts.json
    python scripts/tail_patch_headroom.py --demo out/llm --pool 10    # candidates: every row's top 10, merged

The candidates of a question are the union of the first --pool documents of the --rows' rankings in facts.json
(by default those that `demo --tail-patch main` steps on: the default, BM25 and two-stage), or every document of the
corpus (--pool all: about five times the steps). The steps are the demo's (facts.tail_patch_rankings: the
fine-tuning's AdamW state, no momentum, each step evaluated on the model's answer and on the planted fact's). Costs
about one backward and one evaluation per candidate and question (about 0.6 s each for SmolLM2-135M on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grass_ops.benchmarking import emit_json_report, limit_primitive_cache  # noqa: E402

ANSWER_INDEX = {"own": 0, "true": 1}  # facts.tail_patch_answers' order: [the model's answer, the planted fact's]


def candidates(rows: list[dict], question: int, pool: int | None, ids: list[str]) -> list[str]:
    """The question's candidate document ids: the first ``pool`` of each row's ranking, merged rank by rank (a
    document once, at its best rank), or every id of ``ids`` (``pool`` None)."""
    if pool is None:
        return list(ids)
    merged: dict[str, None] = {}
    for rank in range(pool):
        for row in rows:
            ranking = row["ranking"][question]
            if rank < len(ranking):
                merged.setdefault(str(ranking[rank]), None)
    return list(merged)


def errors_apart(row: dict, reference: dict, key: str) -> bool:
    """Whether ``row``'s mean minus its standard error lies above ``reference``'s mean plus its own (``key``, e.g.
    "tail_patch@5_true", and ``key + "_se"``)."""
    return row[key] - row[key + "_se"] > reference[key] + reference[key + "_se"]


def per_question_rows(rows: list[dict], n: int) -> list[dict]:
    """``rows`` (facts.json's) with their per-question tail-patches cut to the first ``n`` questions and their
    summaries recomputed from them, so that every figure of the output is over the same questions."""
    from attribution.evaluation import facts
    from attribution.llm import demo

    out = []
    for row in rows:
        cut = {"method": row["method"], "row": row.get("row", row.get("scoring"))}
        for key in demo.PER_QUESTION_KEYS.values():
            cut[key] = {k: values[:n] for k, values in row[key].items()}
        for suffix, key in demo.PER_QUESTION_KEYS.items():
            for k, values in cut[key].items():
                summary = facts.tail_patch_summary([{int(k): v} for v in values])[int(k)]
                cut[f"tail_patch@{k}{suffix}"], cut[f"tail_patch@{k}{suffix}_se"] = summary["mean"], summary["se"]
        out.append(cut)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("out/llm"), help="the demo's --out folder")
    parser.add_argument("--pool", default="10",
                        help="candidates per question: each tail-patched row's first POOL documents, merged; or 'all'")
    parser.add_argument("--rows", default=None,
                        help="comma-separated tail-patched rows whose rankings give the candidates and that the "
                             "output lists (default: demo --tail-patch main's, BM25 among them)")
    parser.add_argument("--questions", type=int, default=None, help="the first questions only (default: all)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per document (the demo's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    pool = None if args.pool == "all" else int(args.pool) if args.pool.isdigit() else -1
    if pool is not None and pool < 1:
        parser.error(f"--pool must be a positive number of documents or 'all', got {args.pool!r}")
    if args.questions is not None and args.questions < 2:
        parser.error(f"--questions must be at least 2 (a mean with a standard error), got {args.questions}")
    limit_primitive_cache()  # as the demo does, before the first matmul
    from attribution import llm
    from attribution.evaluation import facts
    from attribution.llm import demo

    record = json.loads((args.demo / "facts.json").read_text())
    corpus = [json.loads(line) for line in (args.demo / "corpus.jsonl").read_text().splitlines() if line.strip()]
    queries = record["queries"][: args.questions]
    wanted = args.rows.split(",") if args.rows else list(demo.TAIL_PATCH_ROWS)
    patched = {r["row"]: r for r in record["methods"]
               if r.get("row") and r.get("ranking") and "tail_patch_true_per_query" in r}
    missing = [name for name in dict.fromkeys([*wanted, "bm25"]) if name not in patched]
    if missing:
        raise SystemExit(f"{args.demo / 'facts.json'} has no tail-patched row {', '.join(map(repr, missing))} with its "
                         f"ranking (it has {sorted(patched)}): run the demo with --tail-patch main or all, or name "
                         "others in --rows")
    rows = [patched[name] for name in dict.fromkeys([*wanted, "bm25"])]
    references = [r for r in record["methods"] if r.get("scoring") in ("random", "source")  # listed, not candidates
                  and "tail_patch_true_per_query" in r]
    answer = record["meta"].get("answer", "own")  # the completion the rows attributed (facts.json before it: own)
    index = ANSWER_INDEX[answer]
    ks = facts.TAIL_PATCH_KS
    model, tokenizer = llm.load_model(str(args.demo / "model"))
    optimizer = demo.load_optimizer(args.demo, model, first_moment=False)  # as the demo's tail-patch holds it
    step = {"tokenizer": tokenizer, "max_length": args.max_length,
            "autocast": demo.finetune_autocast()}
    ids = [str(d["id"]) for d in corpus]
    start = time.perf_counter()
    singles, oracle_patches, sizes = [], [], []
    for i, query in enumerate(queries):
        pool_ids = candidates(rows, i, pool, ids)
        if len(pool_ids) < max(ks):
            raise SystemExit(f"question {query['id']!r} has {len(pool_ids)} candidates, fewer than k = {max(ks)}: "
                             "raise --pool")
        answers = facts.tail_patch_answers(query)
        alone = facts.tail_patch_rankings(model, optimizer, corpus, answers, {d: [d] for d in pool_ids},
                                          ks=(1,), **step)
        single = {d: alone[d][1][index] for d in pool_ids}
        oracle = sorted(pool_ids, key=lambda d: -single[d])
        oracle_patches.append(facts.tail_patch_ranking(model, optimizer, corpus, answers, oracle, ks=ks, **step))
        singles.append(single)
        sizes.append(len(pool_ids))
        demo.release_freed_memory()
    oracle_row = {"method": f"oracle: the candidates ranked by their own tail-patch on the {answer} answer",
                  "row": "oracle"}
    demo.summarize_tail_patches(oracle_row, oracle_patches, queries)
    reference_rows = per_question_rows([*rows, *references], len(queries))
    bm25_row = next(r for r in reference_rows if r["row"] == "bm25")
    demo.paired_with([oracle_row, *reference_rows], bm25_row, "bm25")
    key_suffix = "_true" if answer == "true" else ""
    summary_keys = [f"tail_patch@{k}{key_suffix}{part}" for k in ks for part in ("", "_se", "_minus_bm25",
                                                                                  "_minus_bm25_se")]
    out = {"demo": str(args.demo), "answer": answer, "pool": args.pool, "questions": len(queries),
           "candidates_per_question": sizes, "seconds": time.perf_counter() - start,
           "rows": [{"method": r["method"], "row": r["row"], **{key: r[key] for key in summary_keys if key in r},
                     **{f"errors_apart_from_bm25@{k}": errors_apart(r, bm25_row, f"tail_patch@{k}{key_suffix}")
                        for k in ks if f"tail_patch@{k}{key_suffix}" in r}} for r in [oracle_row, *reference_rows]],
           "oracle_per_query": oracle_row[demo.PER_QUESTION_KEYS[key_suffix]],
           "single_document_tail_patch": singles}
    emit_json_report(out, args.json)
    return out


if __name__ == "__main__":
    main()
