"""``grass-attribute select``: LESS-style data selection against a target set."""
from __future__ import annotations

import json
from pathlib import Path

from ... import llm
from . import flags as f
from .common import CLIError, attributor, check_out, check_rows, load_model, load_store, main_rank


def _targets(args) -> list[dict]:
    """The target set: an lm-eval task, or a jsonl of {prompt, completion} or {text}."""
    if args.task:
        return llm.lm_eval_queries(args.task, args.include_path, args.query_limit)
    if args.target:
        targets = []
        for n, r in llm.read_jsonl(args.target, "target file"):
            completion = r.get("completion", r.get("text"))
            if not isinstance(completion, str):
                raise CLIError(f"{args.target}:{n}: needs a string 'completion' (with 'prompt') or 'text' field")
            targets.append({"id": f"{args.target}:{n}", "prompt": str(r.get("prompt", "")), "completion": completion})
        if not targets:
            raise CLIError(f"target file {args.target} holds no records")
        return targets
    raise CLIError("select needs --target FILE or --task TASK")


def run(args):
    check_out(args)
    store, config, docs = load_store(args.store)
    if not (args.task or args.target):
        raise CLIError("select needs --target FILE or --task TASK")
    model, tokenizer = load_model(config, args.fsdp)
    attr = attributor(model, config, store, method="gradcos")
    check_rows(attr, docs, store)
    targets = _targets(args)
    if not 0 < args.fraction <= 1:
        raise CLIError(f"--fraction must be in (0, 1], got {args.fraction}")
    n_keep = max(1, int(round(args.fraction * len(docs))))
    # LESS: the mean cosine similarity to the target set, streamed over the store (every rank its share)
    mean, keep = attr.select(llm.query_batches(tokenizer, targets, config.batch_size, config.max_length,
                                               config.token_batch_size), n=n_keep)
    keep = keep.tolist()
    if not main_rank():
        return keep
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as file:
        for j, score in zip(keep, mean.tolist()):
            file.write(json.dumps({**docs[j], "score": score}) + "\n")
    print(json.dumps({"selected": n_keep, "of": len(docs), "out": str(out), "top": [docs[j]["id"] for j in keep[:5]]}))
    return keep


COMMAND = f.Command("select", "LESS-style data selection against a target set", [
    f.STORE, f.FSDP, *f.QUERY_SET,
    f.Flag("--target", "jsonl of {prompt, completion} or {text} (default: none)"),
    f.Flag("--fraction", "share of the cached documents to keep", default=0.1, type=f.fraction),
    f.Flag("--out", "the selected documents, as jsonl", default="out/selected.jsonl"),
], run)
