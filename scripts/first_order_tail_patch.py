#!/usr/bin/env python
"""How well the training step's first order predicts tail-patch, exactly (no compression, every parameter), on a demo
folder. Prints JSON.

    python -m attribution.llm.cli demo --out out/llm                                 # model, optimizer.pt, facts.json
    python scripts/tail_patch_headroom.py --demo out/llm --json out/headroom.json    # each candidate's own tail-patch
    python scripts/first_order_tail_patch.py --demo out/llm --headroom out/headroom.json

Tail-patch takes one AdamW step without momentum on documents D: theta' = theta - lr * g_D / (sqrt(v) + eps) (and the
weight decay, the same for every D), so to first order the answer's log-probability moves by
lr * <grad log p(answer), -g_D / (sqrt(v) + eps)> = lr * <g_q, g_D / (sqrt(v) + eps)>, g_q the gradient of the
answer's loss -log p. For every question and document this script forms, from the exact gradients (g_q in float32;
g_d of the document's mean token loss, in the run's recorded precision, as the step takes it), the score
<g_q, g_d * (sqrt(v) + eps) ** -e> (positive: the step raises the answer) for e = 0 (GradDot), 1 (the step's own
geometry: ``optimizer_power=0.5`` on each side) and 2 (TrackStar's ``optimizer_power=1``), raw and as a cosine. v is
the state's bias-corrected second moment before the step (the step itself first adds its own (1 - beta2) g**2), so
the first order is exact in the gradients, not in v.

Per score: the MRR of the planted fact's source and, against the headroom script's single-document tail-patches
(``--headroom``, measured on the same folder, answer, token cut and precision): the mean per-question Spearman and
Pearson correlation over each question's candidates, the pooled Pearson correlation and slope of lr * score against
them (e = 1 only: the prediction in nats), and the mean single-document tail-patch of each score's top 1 and top 5
candidates beside the best possible (the oracle's).

Cost on the main job (SmolLM2-135M, 20 questions, 116 documents, 2 cores): one backward per question and
ceil(questions / --chunk) per document, about 6 minutes; the chunk's query gradients are held (--chunk 10: 5.4 GB).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grass_ops.benchmarking import emit_json_report, limit_primitive_cache  # noqa: E402

EXPONENTS = {0: "graddot", 1: "step (optimizer_power 0.5)", 2: "trackstar (optimizer_power 1)"}


def step_divisors(model, optimizer) -> dict:
    """{parameter name: sqrt(v) + eps} of the optimizer's bias-corrected second moment (the step's, without momentum)."""
    named = dict(model.named_parameters())
    out = {}
    for group in optimizer.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            state = optimizer.state[p]
            name = next(n for n, q in named.items() if q is p)
            out[name] = (state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))).sqrt() + eps
    return out


def exact_scores(model, tokenizer, queries: list[dict], corpus: list[dict], divisors: dict, *, max_length: int,
                 autocast, chunk: int) -> dict:
    """{"scores": [3, questions, documents] of <g_q, g_d / divisor ** e> for e = 0, 1, 2 (g_q of the answer's loss -log
    p, g_d of the document's mean token loss: positive raises the answer; float32 products summed in float64),
    "query_norms" and "document_norms": [3, n] of ||g / divisor ** (e / 2)||, for the cosines}."""
    import torch

    from attribution import llm
    from attribution.evaluation import facts

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scale = {n: divisors[n].reciprocal() for n, _ in named}

    def gradients(loss):
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}

    scores = torch.zeros(3, len(queries), len(corpus), dtype=torch.float64)
    query_norms = torch.zeros(3, len(queries), dtype=torch.float64)
    document_norms = torch.zeros(3, len(corpus), dtype=torch.float64)
    model.eval()
    for start in range(0, len(queries), chunk):
        rows = list(range(start, min(start + chunk, len(queries))))
        held = {n: torch.empty(len(rows), p.numel()) for n, p in named}
        for row, q in enumerate(rows):
            (batch,) = llm.query_batches(tokenizer, [queries[q]], 1, max_length, pad_multiple=1)
            g = gradients(llm.chunked_sequence_loss(model, batch).sum())  # the answer's loss: -log p
            for n, _ in named:
                held[n][row] = g[n].reshape(-1)
                for e in range(3):
                    query_norms[e, q] += float((g[n].square() * scale[n].pow(e)).sum())
            del g
        for d, doc in enumerate(corpus):
            with facts._autocast(autocast):
                loss = facts.training_loss(model, tokenizer, [doc], max_length, mean=True)
            g = gradients(loss)
            for n, _ in named:
                flat, s = g[n].reshape(-1), scale[n].reshape(-1)
                weighted = flat
                for e in range(3):
                    # <g_q, g_d s^e>: the step -lr g_d s moves -log p by -lr <g_q, g_d s>, log p by +lr <g_q, g_d s>
                    scores[e, rows, d] += (held[n] @ weighted).double()
                    if start == 0:
                        document_norms[e, d] += float((flat * weighted).sum())
                    weighted = weighted * s
            del g
        del held
    return {"scores": scores, "query_norms": query_norms.sqrt(), "document_norms": document_norms.sqrt()}


def rank_correlation(a, b) -> float:
    """Spearman's correlation (ties by order; the candidates' values are continuous)."""
    import numpy as np

    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def against_tail_patch(scores, ids: list[str], singles: list[dict]) -> dict:
    """The score [questions, documents] against each question's single-document tail-patches (``singles``: {id: nats}
    per question): mean per-question Spearman and Pearson over the candidates, and the mean tail-patch of the score's
    top 1 and top 5 candidates."""
    import numpy as np

    column = {d: j for j, d in enumerate(ids)}
    spearman, pearson, top1, top5 = [], [], [], []
    for q, single in enumerate(singles):
        names = list(single)
        labels = np.array([single[d] for d in names])
        values = np.array([float(scores[q, column[d]]) for d in names])
        spearman.append(rank_correlation(values, labels))
        pearson.append(float(np.corrcoef(values, labels)[0, 1]))
        order = np.argsort(-values, kind="stable")
        top1.append(float(labels[order[0]]))
        top5.append(float(labels[order[:5]].mean()))
    return {"spearman": float(np.mean(spearman)), "pearson": float(np.mean(pearson)),
            "tail_patch_of_top1": float(np.mean(top1)), "tail_patch_of_top5": float(np.mean(top5))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("out/llm"), help="the demo's --out folder")
    parser.add_argument("--headroom", type=Path, default=None,
                        help="scripts/tail_patch_headroom.py's JSON on the same folder: each candidate's own tail-patch")
    parser.add_argument("--questions", type=int, default=None, help="the first questions only (default: all)")
    parser.add_argument("--chunk", type=int, default=10, help="questions whose gradients are held at once")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.chunk < 1:
        parser.error(f"--chunk must be at least 1, got {args.chunk}")
    if args.questions is not None and args.questions < 1:
        parser.error(f"--questions must be at least 1, got {args.questions}")
    limit_primitive_cache()
    import numpy as np

    from attribution.evaluation import facts
    from attribution.llm import demo
    from attribution.llm.demo_run import DemoRun

    run = DemoRun.read(args.demo)
    queries = run.queries[: args.questions]
    singles = None
    if args.headroom is not None:
        headroom = json.loads(args.headroom.read_text())
        measured = (headroom.get("demo"), headroom.get("answer"), headroom.get("max_length", run.max_length),
                    headroom.get("finetune_autocast", demo.precision_name(run.autocast)))
        if (Path(measured[0] or "").resolve() != args.demo.resolve()
                or measured[1:] != (run.answer, run.max_length, demo.precision_name(run.autocast))):
            raise SystemExit(f"--headroom {args.headroom} was measured on {measured[0]!r} (answer, max_length, precision "
                             f"{measured[1:]}), not on --demo {args.demo} ({run.answer!r}, {run.max_length}, "
                             f"{demo.precision_name(run.autocast)!r})")
        singles = headroom["single_document_tail_patch"][: len(queries)]
        if len(singles) < len(queries):
            raise SystemExit(f"--headroom {args.headroom} holds {len(singles)} questions, fewer than {len(queries)}")
    answers = [facts.tail_patch_answers(q)[list(demo.ANSWER_SUFFIXES).index(run.answer)] for q in queries]
    model, tokenizer = run.model()
    optimizer = run.optimizer(model)
    divisors = step_divisors(model, optimizer)
    lr = optimizer.param_groups[0]["lr"]
    del optimizer
    start = time.perf_counter()
    found = exact_scores(model, tokenizer, answers, run.corpus, divisors, max_length=run.max_length,
                         autocast=run.autocast, chunk=args.chunk)
    ids = [str(d["id"]) for d in run.corpus]
    targets = [q["target"] for q in queries]
    rows = []
    for e, name in EXPONENTS.items():
        raw = found["scores"][e]
        cosine = raw / (found["query_norms"][e][:, None] * found["document_norms"][e][None, :])
        for form, matrix in (("raw", raw), ("cosine", cosine)):
            row = {"score": name, "divisor_exponent": e, "form": form,
                   "mrr": facts.retrieval_metrics(matrix, ids, targets)["mrr"]}
            if singles is not None:
                row.update(against_tail_patch(matrix, ids, singles))
            rows.append(row)
    out = {"demo": str(args.demo), "answer": run.answer, "questions": len(queries), "documents": len(ids),
           "lr": lr, "seconds": time.perf_counter() - start, "rows": rows,
           "step_top10": [[ids[j] for j in np.argsort(-found["scores"][1][q].numpy(), kind="stable")[:10]]
                          for q in range(len(queries))]}
    if singles is not None:
        predicted, measured = [], []
        for q, single in enumerate(singles):
            for d, nats in single.items():
                predicted.append(lr * float(found["scores"][1][q, ids.index(d)]))
                measured.append(nats)
        predicted, measured = np.array(predicted), np.array(measured)
        out["step_prediction"] = {"pairs": len(measured), "pearson": float(np.corrcoef(predicted, measured)[0, 1]),
                                  "slope": float(np.polyfit(predicted, measured, 1)[0]),
                                  "mean_predicted": float(predicted.mean()), "mean_measured": float(measured.mean())}
        out["oracle"] = {"tail_patch_of_top1": float(np.mean([max(s.values()) for s in singles])),
                         "tail_patch_of_top5": float(np.mean([np.sort(list(s.values()))[::-1][:5].mean()
                                                              for s in singles]))}
    if not all(math.isfinite(r["mrr"]) for r in rows):
        raise RuntimeError("a score is not finite")
    emit_json_report(out, args.json)
    return out


if __name__ == "__main__":
    main()
