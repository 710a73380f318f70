#!/usr/bin/env python
"""How much influence the demo's candidate documents hold: an oracle ranks each question's candidates by their own
tail-patch (one step on each document alone, measured on the attributed answer), and the oracle's top 1, 5 and 10
are tail-patched as the demo's rows are, beside them. A step on k documents follows their mean loss, so to first
order (Adam's normalization aside) it moves the answer by the mean of their single steps, and the oracle's top k are then the best k of the
candidates: it bounds (to first order) what a better ranking of the same candidates could reach on issue 19's
target (tail-patch@5 at least 1.2x BM25's, standard errors apart). Prints JSON.

    python -m attribution.llm.cli demo --out out/llm                 # the model, optimizer.pt, corpus and facts.json
    python scripts/tail_patch_headroom.py --demo out/llm --pool 10    # candidates: every row's top 10, merged

The candidates of a question are the union of the first --pool documents of the --rows' rankings in facts.json
(by default those of `demo --tail-patch main`'s rows that facts.json has: the default, BM25, two-stage and influence;
a run before the influence row, or with --no-influence, has the first three), or every document of the corpus
(--pool all: about five times the steps). The steps are the demo's (facts.tail_patch_rankings: the
fine-tuning's AdamW state, no momentum, each step evaluated on the model's answer and on the planted fact's). Costs
one backward and one evaluation per candidate and question: 621 s for the main job's 20 questions and about 18
candidates each (SmolLM2-135M, 2 cores).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grass_ops.benchmarking import emit_json_report, limit_primitive_cache  # noqa: E402


def candidates(rows: list[dict], question: int, pool: int | None, ids: list[str]) -> list[str]:
    """The question's candidate document ids: the first ``pool`` of each row's ranking, merged rank by rank (a
    document once, at its best rank), or every id of ``ids`` (``pool`` None)."""
    if pool is None:
        return list(ids)
    merged: dict[str, None] = {}
    for rank in range(pool):
        for row in rows:
            merged.setdefault(str(row["ranking"][question][rank]), None)
    return list(merged)


def above_by_errors(row: dict, reference: dict, key: str) -> bool:
    """Whether ``row``'s mean minus its standard error lies above ``reference``'s mean plus its own (``key``, e.g.
    "tail_patch@5_true", and ``key + "_se"``): issue 19's "standard errors apart", one way."""
    return row[key] - row[key + "_se"] > reference[key] + reference[key + "_se"]


def per_question_rows(rows: list[dict], queries: list[dict]) -> list[dict]:
    """``rows`` (facts.json's) with their per-question tail-patches cut to the first len(``queries``) questions and
    summarized again (demo.summarize_tail_patches), so that every figure of the output is over the same questions."""
    from attribution.llm import demo

    out = []
    for row in rows:
        own, true = (row[demo.PER_QUESTION_KEYS[suffix]] for suffix in ("", "_true"))
        patches = [{int(k): [own[k][i], true[k][i]] for k in own} for i in range(len(queries))]
        cut = {"method": row["method"], "row": row.get("row", row.get("scoring"))}
        demo.summarize_tail_patches(cut, patches, queries)
        out.append(cut)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("out/llm"), help="the demo's --out folder")
    parser.add_argument("--pool", default="10", help="candidates per question: the --rows' first POOL documents, "
                                                     "merged (at most 10: facts.json keeps each row's top 10); or 'all'")
    parser.add_argument("--rows", default=None,
                        help="comma-separated tail-patched rows whose rankings give the candidates and that the output "
                             "lists (default: those of demo --tail-patch main's rows that facts.json has); BM25 is "
                             "always among them")
    parser.add_argument("--questions", type=int, default=None, help="the first questions only (default: all)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per document (default: the demo's, from facts.json; 128 if it has none)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    pool = None if args.pool == "all" else int(args.pool) if args.pool.isdigit() else -1
    if pool is not None and not 1 <= pool:
        parser.error(f"--pool must be a positive number of documents or 'all', got {args.pool!r}")
    if args.questions is not None and args.questions < 2:
        parser.error(f"--questions must be at least 2 (a mean with a standard error), got {args.questions}")
    limit_primitive_cache()  # as the demo does, before the first matmul
    from attribution.evaluation import facts
    from attribution.llm import demo
    from attribution.llm.demo_run import DemoRun

    run = DemoRun.read(args.demo)
    corpus = run.corpus
    queries = run.queries[: args.questions]
    patched = {r["row"]: r for r in run.methods
               if r.get("row") and r.get("ranking") and "tail_patch_true_per_query" in r}
    wanted = ([name.strip() for name in args.rows.split(",")] if args.rows else
              [name for name in demo.TAIL_PATCH_ROWS if name in patched or name == "default"])
    wanted = list(dict.fromkeys([*wanted, "bm25"]))
    missing = [name for name in wanted if name not in patched]
    if missing:
        raise SystemExit(f"{args.demo / 'facts.json'} has no tail-patched row {', '.join(map(repr, missing))} with its "
                         f"ranking (it has {sorted(patched)}): run the demo with --tail-patch main (the default, BM25, "
                         "two-stage and influence) or all (every row), or name others in --rows")
    rows = [patched[name] for name in wanted]
    kept = min(len(ranking) for row in rows for ranking in row["ranking"])
    if pool is not None and pool > kept:
        parser.error(f"--pool must be at most {kept} (facts.json keeps each row's top {kept}) or 'all', got {pool}")
    references = [r for r in run.methods if r.get("scoring") in ("random", "source")  # listed, not candidates
                  and "tail_patch_true_per_query" in r]
    ks = facts.TAIL_PATCH_KS
    ids = [str(d["id"]) for d in corpus]
    pools = [candidates(rows, i, pool, ids) for i in range(len(queries))]
    short = [q["id"] for q, pool_ids in zip(queries, pools) if len(pool_ids) < max(ks)]
    if short:  # refused before any step, not after minutes of them
        raise SystemExit(f"questions {short} have fewer than k = {max(ks)} candidates: raise --pool")
    answer = run.answer  # the completion the rows attributed
    index = list(demo.ANSWER_SUFFIXES).index(answer)  # its place in facts.tail_patch_answers' [own, true]
    model, tokenizer = run.model()
    optimizer = run.optimizer(model)  # without the first moment, as the demo's tail-patch holds it
    step = run.step_options(tokenizer, args.max_length)  # the token cut and precision the rows were stepped in
    start = time.perf_counter()
    singles, oracle_patches = [], []
    for query, pool_ids in zip(queries, pools):
        answers = facts.tail_patch_answers(query)
        alone = facts.tail_patch_rankings(model, optimizer, corpus, answers, {d: [d] for d in pool_ids},
                                          ks=(1,), **step)
        single = {d: alone[d][1][index] for d in pool_ids}
        oracle = sorted(pool_ids, key=lambda d: -single[d])
        oracle_patches.append(facts.tail_patch_ranking(model, optimizer, corpus, answers, oracle, ks=ks, **step))
        singles.append(single)
        demo.release_freed_memory()
    which = {"own": "the model's answer", "true": "the planted fact's answer"}[answer]
    oracle_row = {"method": f"oracle: the candidates ranked by their own tail-patch on {which}", "row": "oracle"}
    demo.summarize_tail_patches(oracle_row, oracle_patches, queries)
    listed = per_question_rows([*rows, *references], queries)
    bm25_row = next(r for r in listed if r["row"] == "bm25")
    demo.paired_with([oracle_row, *listed], bm25_row, "bm25")
    suffix = demo.ANSWER_SUFFIXES[answer]
    summary_keys = [f"tail_patch@{k}{suffix}{part}" for k in ks for part in ("", "_se", "_minus_bm25",
                                                                              "_minus_bm25_se")]
    out = {"demo": str(args.demo), "answer": answer, "pool": pool or "all", "rows_pooled": wanted,
           "questions": len(queries), "max_length": step["max_length"],
           "finetune_autocast": demo.precision_name(step["autocast"]),
           "candidates_per_question": [len(p) for p in pools], "seconds": time.perf_counter() - start,
           "rows": [{"method": r["method"], "row": r["row"], **{key: r[key] for key in summary_keys if key in r},
                     **{f"above_bm25_by_errors@{k}": above_by_errors(r, bm25_row, f"tail_patch@{k}{suffix}")
                        for k in ks if f"tail_patch@{k}{suffix}" in r and r is not bm25_row}}
                    for r in [oracle_row, *listed]],
           "oracle_per_query": oracle_row[demo.PER_QUESTION_KEYS[suffix]],
           "single_document_tail_patch": singles}
    emit_json_report(out, args.json)
    return out


if __name__ == "__main__":
    main()
