#!/usr/bin/env python
"""The demo's tail-patch alone on a demo folder's first questions: the resident set after each question (after the
demo's own trim), the peak RSS and the seconds. Run it in fresh processes to compare allocator settings, e.g. glibc's
mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=1048576``) or not (BENCHMARKS.md, "The fact's own answer
attributed"). Prints JSON.

    python -m attribution.llm.cli demo --out out/llm            # the model, optimizer.pt, corpus and facts.json
    MALLOC_MMAP_THRESHOLD_=1048576 python scripts/tail_patch_memory.py --demo out/llm --questions 3
    python scripts/tail_patch_memory.py --demo out/llm --questions 3

It steps on the rankings that the demo's tail-patched rows kept in facts.json (the random and true-source
references added as the demo adds them), with demo.tail_patch_rows itself; --rows picks some of them, e.g. to time
what one row adds:

    python scripts/tail_patch_memory.py --demo out/llm --questions 2 --rows default,store,two-stage,bm25
    python scripts/tail_patch_memory.py --demo out/llm --questions 2 --rows default,two-stage,bm25
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grass_ops.benchmarking import emit_json_report, limit_primitive_cache, peak_rss_bytes  # noqa: E402


def resident_mib() -> float:
    """This process's resident set now (Linux /proc/self/statm), MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("out/llm"), help="the demo's --out folder")
    parser.add_argument("--questions", type=int, default=3, help="the first questions whose tail-patch is run")
    parser.add_argument("--rows", default=None, help="comma-separated rows (facts.json's \"row\" names, e.g. "
                                                     "default,two-stage,bm25) to step on (default: every row with a "
                                                     "ranking); two runs time a row's share of tail-patch")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.questions < 1:
        parser.error(f"--questions must be at least 1, got {args.questions}")
    limit_primitive_cache()  # as the demo does, before the first matmul
    from attribution.llm import demo
    from attribution.llm.demo_run import DemoRun

    run = DemoRun.read(args.demo)
    corpus, queries = run.corpus, run.queries[: args.questions]
    ranked = {r.get("row", r["method"]): r for r in run.methods
              if r.get("ranking") and r.get("scoring") not in ("random", "source")}
    if not ranked:
        raise SystemExit(f"{args.demo / 'facts.json'} keeps no ranking: run the demo with --tail-patch main or all")
    names = [name.strip() for name in args.rows.split(",")] if args.rows else list(ranked)
    unknown = [name for name in names if name not in ranked]
    if unknown:
        raise SystemExit(f"--rows names {unknown}, which facts.json has no ranking for (it has {sorted(ranked)})")
    rows = [{"method": ranked[name]["method"], "ranking": ranked[name]["ranking"]} for name in names]
    model, tokenizer = run.model()
    optimizer = run.optimizer(model)  # without the first moment, as the demo's tail-patch holds it
    after_each = []
    trim = demo.release_freed_memory  # the demo trims after each question: measure right after it

    def trimmed():
        trim()
        after_each.append(resident_mib())

    start_mib, start = resident_mib(), time.perf_counter()
    demo.release_freed_memory = trimmed
    try:
        demo.tail_patch_rows(model, optimizer, tokenizer, corpus, queries, rows, seed=0, max_length=run.max_length,
                             autocast=run.autocast, progress=False)  # the token cut and precision of the run
    finally:
        demo.release_freed_memory = trim
    out = {"demo": str(args.demo), "questions": len(queries), "rows": len(rows), "row_names": names,
           "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "start_mib": start_mib,
           "after_each_question_mib": after_each, "peak_mib": peak_rss_bytes() / 2**20,
           "seconds": time.perf_counter() - start}
    emit_json_report(out, args.json)
    return out


if __name__ == "__main__":
    main()
