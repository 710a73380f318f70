#!/usr/bin/env python
"""Tail-patch's cost on the main job, from a demo folder: the optimizer step in its direct Adam form against the
copied step (a one-parameter copy of the optimizer per parameter), alternating, with a check that the two agree bit
for bit; and the seconds of one question's tail-patch (every ranking of the demo's tail-patched rows, the random and
true-source references). Prints JSON.

    python -m attribution.llm.cli demo --out out/llm          # the model, optimizer.pt and facts.json it reads
    python scripts/bench_tail_patch.py --demo out/llm --repeats 3 --questions 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grass_ops.benchmarking import emit_json_report  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("out/llm"), help="the demo's --out folder")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each form (alternating)")
    parser.add_argument("--questions", type=int, default=2, help="questions whose tail-patch is timed (after one warm-up)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    import torch

    from attribution.evaluation import facts, optimizer_step
    from attribution.llm.demo_run import DemoRun

    run = DemoRun.read(args.demo)
    corpus, record = run.corpus, run.record
    model, tokenizer = run.model()
    optimizer = run.optimizer(model, first_moment=True)  # the copied step reads Adam's first moment
    autocast = run.autocast  # the precision the run stepped in
    with facts._evaluation_mode(model):
        grads = facts._loss_gradients(model, tokenizer, corpus[:3], run.max_length, autocast, mean=False)
    direct_form = optimizer_step._direct_adam
    seconds = {"direct": [], "copied": []}
    equal = True
    for _ in range(args.repeats):
        results = {}
        for form in ("direct", "copied"):
            optimizer_step._direct_adam = direct_form if form == "direct" else (lambda *_: False)
            try:
                start = time.perf_counter()
                results[form] = optimizer_step.stepped_parameters(model, optimizer, grads, None, False, 0.01)
                seconds[form].append(time.perf_counter() - start)
            finally:
                optimizer_step._direct_adam = direct_form
        equal = equal and all(torch.equal(results["direct"][n], results["copied"][n]) for n in results["copied"])
        del results
    del grads
    optimizer = run.optimizer(model)  # without the first moment, as the demo's tail-patch holds it
    rows = [r for r in record["methods"] if r.get("ranking")]
    ids = [str(d["id"]) for d in corpus]

    def question(i: int) -> float:
        rankings = {f"row {j}": r["ranking"][i] for j, r in enumerate(rows)}
        rankings.update(facts.reference_rankings(ids, record["queries"][i]["target"], 0, i))
        ks = {name: (1,) if name == "source" else facts.TAIL_PATCH_KS for name in rankings}
        start = time.perf_counter()
        facts.tail_patch_rankings(model, optimizer, corpus, record["queries"][i], rankings, ks=ks,
                                  **run.step_options(tokenizer))
        return time.perf_counter() - start

    question(0)  # warm-up
    per_question = [question(i) for i in range(1, 1 + args.questions)]
    out = {"demo": str(args.demo), "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters()),
           "step_seconds": {form: {"median": statistics.median(v), "all": v} for form, v in seconds.items()},
           "step_forms_bit_equal": equal, "rankings_per_question": len(rows) + 2,
           "tail_patch_seconds_per_question": per_question}
    emit_json_report(out, args.json)
    return out


if __name__ == "__main__":
    main()
