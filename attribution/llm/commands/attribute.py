"""``grass-attribute attribute``: the top-k training documents of prompts / completions, as reports."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch

from ... import index as index_module
from ... import llm, retrieval
from ...collectives import agreed, collectively
from ...config import METHODS
from ...evaluation import facts
from ...preconditioners import PRECONDITIONERS, REGISTRY, resolve_preconditioner
from ...scoring import PRECONDITIONED
from ...store import open_store
from ...whitening import KINDS as WHITENED
from ..config import DEFAULT_NORMALIZE, CacheConfig
from ..report import Attribution, write_reports
from . import flags as f
from .common import (
    CLIError,
    attributor,
    check_out,
    check_rows,
    check_whitened_scoring,
    load_model,
    load_store,
    main_rank,
    require_faiss,
)

# What a store of `grass-attribute cache` holds: one model's compressed loss gradients and their FIM (the Attributor's
# defaults). The methods and preconditioners that need more are refused, with what they need.
UNCACHED_METHODS = {
    "tracin": "sums gradient dot products over training checkpoints weighted by their learning rates; a store of "
              "`grass-attribute cache` holds one model's gradients (no checkpoints), where TracIn is --method graddot",
    "trak": "needs the gradients of a model-output function cached per checkpoint (the Python API's "
            "Attributor(method='trak', output_fn=...)); a store of `grass-attribute cache` holds loss gradients",
}
STORE_METHODS = tuple(m for m in METHODS if m not in UNCACHED_METHODS)
STORE_PRECONDITIONERS = ("fim", "none", "mixed")  # the FIM is derived by `cache` (and serves "mixed"); "none" needs none


def scoring(args, config: CacheConfig | None = None) -> tuple[str, str, bool]:
    """(method, preconditioner, normalize) of `attribute`'s --method, --preconditioner and --normalize, or a usage
    error naming the flag and the values that a store of `grass-attribute cache` (``config``: its configuration)
    accepts. A whitened store (cache --preconditioner) serves --method if with its own preconditioner only."""
    method, given = args.method, args.preconditioner
    if method in UNCACHED_METHODS:
        raise CLIError(f"--method {method} {UNCACHED_METHODS[method]}; accepted: {', '.join(STORE_METHODS)}")
    whitened = None if config is None else config.preconditioner
    if whitened is not None or given in WHITENED:
        if whitened is None:
            raise CLIError(f"--preconditioner {given} is how a store is cached (`grass-attribute cache --preconditioner "
                           f"{given}` whitens its gradients); this store holds raw ones: use fim, none or mixed")
        check_whitened_scoring(whitened, method, given)
        normalize = DEFAULT_NORMALIZE if args.normalize is None else args.normalize
        return method, whitened, normalize
    if method not in PRECONDITIONED and given not in (None, "none"):
        raise CLIError(f"--preconditioner {given} applies to --method if; --method {method} uses none (drop "
                       "--preconditioner or give none)")
    preconditioner = resolve_preconditioner(given, method, PRECONDITIONED)
    if preconditioner not in STORE_PRECONDITIONERS:
        raise CLIError(f"--preconditioner {preconditioner} needs its data ({', '.join(REGISTRY[preconditioner].derived_names)}"
                       ": the target layers' Kronecker factors) collected while caching, as "
                       f"Attributor(preconditioner={preconditioner!r}).cache does; a store of `grass-attribute cache` holds "
                       f"the FIM only; accepted: {', '.join(STORE_PRECONDITIONERS)}")
    if method == "gradcos" and args.normalize is False:
        raise CLIError("--method gradcos is the cosine of the gradients (unit-normalized by definition): drop --no-normalize")
    normalize = DEFAULT_NORMALIZE if args.normalize is None else args.normalize
    return method, preconditioner, normalize or method == "gradcos"


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


def two_stage_candidates(attr, features, rows: list[dict], docs: list[dict], sources, k: int, nprobe: int | None = None):
    """(candidate rows [n_rows, width], -1 padded; distinct candidates per row): the union of each source's top
    ``k`` documents per query: "bm25" (BM25 of prompt + completion against the documents' text, ties to the
    lower row) and "index" (the store's ANN index for ``attr``'s scores)."""
    n = min(k, len(docs))
    parts = []
    if "bm25" in sources:
        lexical = facts.bm25_scores([f"{q['prompt']} {q['completion']}" for q in rows], [str(d["text"]) for d in docs])
        parts.append(torch.argsort(-lexical, dim=1, stable=True)[:, :n].numpy())
    if "index" in sources:
        parts.append(retrieval.index_candidates(attr, n, features=features, nprobe=nprobe))
    ids = retrieval.candidate_rows(np.concatenate(parts, axis=1), len(rows), len(docs))
    return ids, (ids >= 0).sum(1).tolist()


def attribute_queries(store, config, docs, model, tokenizer, queries: list[dict], top_k: int, per_token: bool = False,
                      method: str = "if", ann: dict | None = None, normalize: bool = DEFAULT_NORMALIZE,
                      two_stage: dict | None = None, preconditioner: str | None = None, task_weight: float | None = None):
    """(results, scores [n_queries, n_docs] or None) for queries with completions, against a cached store.
    per_token=True: each completion token is its own query; results then carry per-token top documents.
    ann={"index": True, "candidates": .., "nprobe": ..}: the top and bottom documents come from the store's
    ANN index (Attributor.top_k(index=True)) and no score matrix is formed (scores is None).
    two_stage={"sources": ("bm25", "index"), "k": .., "nprobe": ..}: the top and bottom documents are the union of
    the sources' top k candidates (:func:`two_stage_candidates`) re-ranked by the exact score
    (retrieval.rerank_candidates); each query then carries "candidates" (how many) and scores is None.
    normalize: unit-normalized gradients (Attributor(normalize=True)), else raw scores. ``method`` and
    ``preconditioner`` (None: the method's default) and ``task_weight`` (of "mixed": the curvature mixes in the
    second moment of all ``rows``): the Attributor's. ``config``: the store's CacheConfig (or the dict of its flags,
    as cli.json records them)."""
    config = CacheConfig.from_dict(config) if isinstance(config, dict) else config
    attr = attributor(model, config, store, method=method, normalize=normalize, preconditioner=preconditioner,
                      task_weight=task_weight)
    expanded = [llm.per_token_queries(tokenizer, q, config.max_length) for q in queries] if per_token else None
    rows = queries + [t for per_query in expanded for t in per_query] if per_token else queries  # whole queries first
    features = attr.query_features(llm.query_batches(tokenizer, rows, config.batch_size, config.max_length,
                                                     config.token_batch_size))
    if two_stage:
        scores = None
        ids, counts = two_stage_candidates(attr, features, rows, docs, **two_stage)
        top = retrieval.rerank_candidates(attr, ids, top_k, features=features)
        bottom = retrieval.rerank_candidates(attr, ids, 2 * top_k, features=features, largest=False)  # top ones skipped
        for q, count in zip(queries, counts):
            q["candidates"] = count
    elif ann and ann.get("index"):
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

    ranked = [(listed(*top, i), listed(*bottom, i, skip=frozenset(top[1][i].tolist()))[:top_k]) for i in range(len(rows))]
    results = [Attribution(q, *ranked[i]) for i, q in enumerate(queries)]
    if per_token:
        start = len(queries)
        for result, per_query in zip(results, expanded):
            result.tokens = [{"token": rows[i]["token"], "position": rows[i]["position"], "helpful": ranked[i][0],
                              "harmful": ranked[i][1]} for i in range(start, start + len(per_query))]
            start += len(per_query)
    return results, None if scores is None else scores[: len(queries)]


def _check_mixed(args) -> dict:
    """{preconditioner: "mixed", task_weight: w} for --preconditioner mixed --task-weight W, {} for the FIM; a
    usage error for one flag without the other, or with --per-token (its token rows would join the query set)."""
    preconditioner, weight = getattr(args, "preconditioner", None), getattr(args, "task_weight", None)
    if preconditioner != "mixed":
        if weight is not None:
            given = preconditioner or "fim (the default)"
            raise CLIError(f"--task-weight weights the query set in --preconditioner mixed, not --preconditioner {given}")
        return {}
    if weight is None:
        raise CLIError("--preconditioner mixed needs --task-weight W, the query set's share of the curvature in [0, 1)")
    if getattr(args, "per_token", False):
        raise CLIError("--preconditioner mixed takes its query curvature from the whole queries; --per-token would add "
                       "each token's row to that set: drop one of them")
    return {"preconditioner": "mixed", "task_weight": weight}


def run(args, loaded=None):
    check_out(args)
    store, config, docs = load_store(args.store)
    if not (args.task or args.prompts or args.prompt):
        raise CLIError("give --prompt, --prompts FILE or --task")
    method, preconditioner, normalize = scoring(args, config)
    sources = args.candidates if isinstance(getattr(args, "candidates", None), tuple) else None
    if getattr(args, "candidates_k", None) is not None and sources is None:
        raise CLIError("--candidates-k counts the candidates of --candidates bm25, index or bm25,index; give one of them")
    if sources and getattr(args, "index", False):
        raise CLIError(f"--candidates {','.join(sources)} re-ranks its own candidates: drop --index (the ANN index is "
                       "the source `index`, its count --candidates-k)")
    mixed = _check_mixed(args)
    if getattr(args, "index", False) or (sources and "index" in sources):
        require_faiss()
    if sources and "index" in sources:
        mode = index_module.mode_of(method, normalize)
        if open_store(store).derived_meta(0, index_module.derived_name(mode)) is None:
            raise CLIError(f"--candidates index needs the store's ANN index ({mode} scores): build it with "
                           f"`grass-attribute index --store {store} --mode {mode}`")
    fsdp = getattr(args, "fsdp", False)  # `demo` has no --fsdp
    model, tokenizer = loaded or load_model(config, fsdp)
    check_rows(attributor(model, config, store), docs, store)  # refuse an incomplete store before generating
    # rank 0 generates the completions and sends them (every rank must score the same queries); a sharded model
    # generates on every rank (each forward is collective)
    queries = agreed(collectively(lambda: _queries(args, model, tokenizer) if main_rank() or fsdp else None))
    ann = {key: getattr(args, key, None) for key in ("index", "candidates", "nprobe")}  # `demo` has no --index
    ann["index"] = bool(ann["index"])
    two_stage = None if sources is None else {"sources": sources, "k": args.candidates_k or max(10 * args.top_k, 100),
                                              "nprobe": args.nprobe}
    results, _ = attribute_queries(store, config, docs, model, tokenizer, queries, args.top_k,
                                   per_token=getattr(args, "per_token", False), method=method, ann=ann,
                                   normalize=normalize, two_stage=two_stage, preconditioner=preconditioner,
                                   task_weight=mixed.get("task_weight"))
    meta = {"model": config.model, "method": method, "preconditioner": preconditioner, "normalize": normalize,
            "compressor": config.compressor, "k": config.k, "damping": config.damping,
            **mixed, "documents": len(docs),
            "top_k": args.top_k, "per_token": getattr(args, "per_token", False), "index": ann["index"]}
    if two_stage:  # marked in the reports and the printed JSON: the ranking is two-stage, from how many candidates
        meta["two_stage"] = {"sources": list(sources), "candidates_k": two_stage["k"],
                             "candidates": [r.query["candidates"] for r in results]}
    if not main_rank():
        return results
    paths = write_reports(args.out, results, meta)
    print(json.dumps({"reports": {k: str(v) for k, v in paths.items()}, "method": method, "preconditioner": preconditioner,
                      **({"two_stage": meta["two_stage"]} if two_stage else {}),
                      "queries": [{"prompt": r.query["prompt"], "completion": r.query["completion"],
                                   **({"candidates": r.query["candidates"]} if two_stage else {}),
                                   "top": [d["id"] for d, _ in r.helpful]} for r in results]}))
    return results


COMMAND = f.Command("attribute", "top-k training documents for prompts / completions", [
    f.STORE, f.FSDP, *f.QUERY_SET,
    f.Flag("--index", "candidates from the store's ANN index (grass-attribute index), re-ranked exactly", default=False,
           action="store_true"),
    f.Flag("--candidates", "--index: candidates per query (default 10 x top-k, >= 100); or the sources of a two-stage "
                           "ranking, bm25, index or bm25,index: the union of their top --candidates-k documents per query, "
                           "re-ranked by the exact gradient score (`index`: the store's ANN index)", type=f.candidates),
    f.Flag("--candidates-k", "--candidates SOURCES: documents from each source per query (default 10 x top-k, >= 100)",
           type=f.positive_int),
    f.Flag("--nprobe", "--index: inverted lists to probe (default: the index's)", type=f.positive_int),
    f.Flag("--prompt", "a prompt (repeatable); completed by the model (default: none)", type=f.nonempty, action="append"),
    f.Flag("--prompts", "jsonl of {prompt[, completion]} (default: none)"),
    f.Flag("--generate", "new tokens of each completion", default=24, type=f.positive_int),
    f.Flag("--top-k", "documents listed per query, top and bottom", default=5, type=f.positive_int),
    f.Flag("--method", "the score: if (influence function), graddot (gradient dot product), gradcos (gradient cosine); "
                       "tracin and trak need more than `grass-attribute cache` stores and are refused",
           default="if", choices=METHODS),
    f.Flag("--preconditioner", "--method if: fim (the store's Fisher information, default), none (a plain dot "
                               "product) or mixed (TrackStar's task-aware curvature: the FIM mixed with the queries', "
                               "--task-weight); graddot and gradcos use none; kfac and ekfac need factors `cache` does "
                               "not collect and are refused; a store cached with --preconditioner kfac-whitened or "
                               "ekfac-whitened uses its own (default there)", choices=PRECONDITIONERS),
    f.TASK_WEIGHT,
    replace(f.NORMALIZE, help=f.NORMALIZE.help[:-1] + "; --method gradcos is normalized by definition)", default=None),
    f.Flag("--per-token", "also attribute each completion token on its own (one query per token)", default=False,
           action="store_true"),
    f.Flag("--out", "folder of report.md, report.html and report.json", default="out/llm_report"),
], run)
