"""``grass-attribute attribute``: the top-k training documents of prompts / completions, as reports."""
from __future__ import annotations

import json

from ... import llm
from ...collectives import agreed, collectively
from ..config import DEFAULT_NORMALIZE, CacheConfig
from ..report import Attribution, write_reports
from . import flags as f
from .common import CLIError, attributor, check_out, check_rows, load_model, load_store, main_rank, require_faiss


def _queries(args, model, tokenizer):
    if args.task:
        return llm.lm_eval_queries(args.task, args.include_path, args.query_limit)
    queries = []
    if args.prompts:
        for n, record in llm.read_jsonl(args.prompts, "prompts file"):
            if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise CLIError(f"{args.prompts}:{n}: needs a non-empty string 'prompt' field")
            completion = record.get("completion")
            if completion is not None and (not isinstance(completion, str) or not completion.strip()):
                raise CLIError(f"{args.prompts}:{n}: 'completion' must be a non-empty string (or absent: the model "
                               "completes the prompt)")
            queries.append({"prompt": record["prompt"], "completion": completion,
                            **({"id": str(record["id"])} if "id" in record else {})})
    queries += [{"prompt": p, "completion": None} for p in args.prompt or []]
    if not queries:
        raise CLIError("give --prompt, --prompts FILE or --task")
    missing = [q for q in queries if not q.get("completion")]
    for q, text in zip(missing, llm.complete(model, tokenizer, [q["prompt"] for q in missing], args.generate)):
        q["completion"] = text
    return [{"id": q.get("id", str(i)), **q} for i, q in enumerate(queries)]


def attribute_queries(store, config, docs, model, tokenizer, queries: list[dict], top_k: int, per_token: bool = False,
                      method: str = "if", ann: dict | None = None, normalize: bool = DEFAULT_NORMALIZE):
    """(results, scores [n_queries, n_docs] or None) for queries with completions, against a cached store.
    per_token=True: each completion token is its own query; results then carry per-token top documents.
    ann={"index": True, "candidates": .., "nprobe": ..}: the top and bottom documents come from the store's
    ANN index (Attributor.top_k(index=True)) and no score matrix is formed (scores is None).
    normalize: unit-normalized gradients (Attributor(normalize=True)), else raw IF scores. ``config``: the
    store's CacheConfig (or the dict of its flags, as cli.json records them)."""
    config = CacheConfig.from_dict(config) if isinstance(config, dict) else config
    attr = attributor(model, config, store, method=method, normalize=normalize)
    expanded = [llm.per_token_queries(tokenizer, q, config.max_length) for q in queries] if per_token else None
    rows = queries + [t for per_query in expanded for t in per_query] if per_token else queries  # whole queries first
    features = attr.query_features(llm.query_batches(tokenizer, rows, config.batch_size, config.max_length,
                                                     config.token_batch_size))
    if ann and ann.get("index"):
        scores = None
        top = attr.top_k(k=top_k, features=features, **ann)
        bottom = attr.top_k(k=top_k, largest=False, features=features, **ann)
    else:
        scores = attr.attribute(features=features)
        k = min(top_k, scores.shape[1])
        top = scores.topk(k, dim=1)
        rest = scores.scatter(1, top[1], float("inf"))  # the bottom list is drawn from the documents not on top
        bottom = rest.topk(min(k, scores.shape[1] - k), dim=1, largest=False)

    def listed(values, indices, i, skip=frozenset()):
        return [(docs[j], float(v)) for j, v in zip(indices[i].tolist(), values[i].tolist()) if j >= 0 and j not in skip]

    ranked = [(listed(*top, i), listed(*bottom, i, skip=frozenset(top[1][i].tolist()))) for i in range(len(rows))]
    results = [Attribution(q, *ranked[i]) for i, q in enumerate(queries)]
    if per_token:
        start = len(queries)
        for result, per_query in zip(results, expanded):
            result.tokens = [{"token": rows[i]["token"], "position": rows[i]["position"], "helpful": ranked[i][0],
                              "harmful": ranked[i][1]} for i in range(start, start + len(per_query))]
            start += len(per_query)
    return results, None if scores is None else scores[: len(queries)]


def run(args, loaded=None):
    check_out(args)
    store, config, docs = load_store(args.store)
    if not (args.task or args.prompts or args.prompt):
        raise CLIError("give --prompt, --prompts FILE or --task")
    if getattr(args, "index", False):
        require_faiss()
    model, tokenizer = loaded or load_model(config)
    check_rows(attributor(model, config, store), docs, store)  # refuse an incomplete store before generating
    # rank 0 generates the completions and sends them (every rank must score the same queries)
    queries = agreed(collectively(lambda: _queries(args, model, tokenizer) if main_rank() else None))
    ann = {key: getattr(args, key, None) for key in ("index", "candidates", "nprobe")}  # `demo` has no --index
    ann["index"] = bool(ann["index"])
    results, _ = attribute_queries(store, config, docs, model, tokenizer, queries, args.top_k,
                                   per_token=getattr(args, "per_token", False), ann=ann, normalize=args.normalize)
    meta = {"model": config.model, "method": "if", "normalize": args.normalize, "compressor": config.compressor,
            "k": config.k, "damping": config.damping, "documents": len(docs), "top_k": args.top_k,
            "per_token": getattr(args, "per_token", False), "index": ann["index"]}
    if not main_rank():
        return results
    paths = write_reports(args.out, results, meta)
    print(json.dumps({"reports": {k: str(v) for k, v in paths.items()},
                      "queries": [{"prompt": r.query["prompt"], "completion": r.query["completion"],
                                   "top": [d["id"] for d, _ in r.helpful]} for r in results]}))
    return results


COMMAND = f.Command("attribute", "top-k training documents for prompts / completions", [
    f.STORE, *f.QUERY_SET,
    f.Flag("--index", "candidates from the store's ANN index (grass-attribute index), re-ranked exactly", default=False,
           action="store_true"),
    f.Flag("--candidates", "--index: candidates per query (default 10 x top-k, >= 100)", type=f.positive_int),
    f.Flag("--nprobe", "--index: inverted lists to probe (default: the index's)", type=f.positive_int),
    f.Flag("--prompt", "a prompt (repeatable); completed by the model (default: none)", type=f.nonempty, action="append"),
    f.Flag("--prompts", "jsonl of {prompt[, completion]} (default: none)"),
    f.Flag("--generate", "new tokens of each completion", default=24, type=f.positive_int),
    f.Flag("--top-k", "documents listed per query, top and bottom", default=5, type=f.positive_int),
    f.NORMALIZE,
    f.Flag("--per-token", "also attribute each completion token on its own (one query per token)", default=False,
           action="store_true"),
    f.Flag("--out", "folder of report.md, report.html and report.json", default="out/llm_report"),
], run)
