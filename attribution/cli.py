"""``grass-attribute``: attribute a causal LM's outputs to training documents with FactGraSS.

    grass-attribute demo                                        # the main job; writes out/llm/ (its store: out/llm/store)
    grass-attribute attribute --store out/llm/store --prompt "The clockmaker who founded the harbour town of Velmora was"
    grass-attribute cache --store out/docs                      # your own store: SmolLM2-135M + 96 Python-docs paragraphs
    grass-attribute cache --store out/docs --limit all          # grows it: only the new paragraphs are cached
    grass-attribute attribute --store out/docs --prompt "To improve data privacy,"
    grass-attribute select --store out/docs --target target.jsonl --fraction 0.1 --out selected.jsonl
    grass-attribute bench --out bench.json
    grass-attribute index --store out/docs [--factory "IVF4096,PQ64"]   # ANN index (the `faiss` extra)
    torchrun --nproc_per_node 2 -m attribution.cli cache --store out/docs  # every rank its share (gloo/nccl)

Every flag can also come from ``--config file.json`` (keys = flag names with underscores). ``cache``
records its configuration in the store (cli.json), so later commands need only ``--store``; an
interrupted ``cache`` resumes where it stopped, and a larger ``--limit`` (or a corpus file with more
documents) grows the store: the cached rows stay, the new documents are appended.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from grass_ops.benchmarking import emit_json_report, peak_rss_bytes, process_seconds, timed_phase

from . import index as index_module
from . import llm, process_group
from .attributor import Attributor
from .collectives import agreed, collectively, require_agreement
from .compression import parse_spec
from .report import Attribution, write_reports
from .store import CorruptStoreError, StoreError, atomic_write_json, open_store, read_json, refuse_inside_store

CACHE_KEYS = ("model", "gguf_file", "corpus", "dataset", "split", "text_field", "prompt_field", "completion_field",
              "messages_field", "limit", "layers", "compressor", "k", "max_length",
              "batch_size", "token_batch_size", "dtype", "autocast", "storage_dtype", "damping", "seed", "masks", "mask_documents")


# Matmul precision of the cache and query passes: chosen by the throughput and fidelity measurements
# (BENCHMARKS.md: bfloat16 autocast 1.37x the float32 tokens/s, mean Spearman vs exact 0.893 vs 0.894).
DEFAULT_AUTOCAST = "auto"
# Raw IF scores by default (--normalize: unit-normalized gradients): chosen by the fact-tracing measurement
# (BENCHMARKS.md: MRR 0.53 raw vs 0.49 normalized at the default damping, within one query of each other).
DEFAULT_NORMALIZE = False
# --compile auto compiles the cache step when the documents to compute hold at least this many real tokens,
# by the matmul precision (--autocast, resolved): the measured break-even of one compile of the in-backward
# step on SmolLM2, rounded up (BENCHMARKS.md, "compile or not").
COMPILE_MIN_TOKENS = {"bfloat16": 100_000, "float16": 100_000, "none": 300_000}
NORMALIZE_HELP = ("IF on unit-normalized gradients, q^T (F + damping I)^-1 g / (|q| |g|), so that no high-norm document "
                  "tops every query (default: raw IF scores, which traced the planted facts as well or better)")


class CLIError(SystemExit):
    """A usage error: printed as one line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(f"grass-attribute: error: {message}")


# bad input, or a store that cannot serve the request: one line on stderr, exit status 2 (else a traceback)
EXPECTED_ERRORS = (ValueError, FileNotFoundError, StoreError, FloatingPointError)


def _compressor(config, store: Path) -> str:
    """The compressor spec, with the store's data-aware masks for FactGraSS (--masks energy)."""
    name, options = parse_spec(config["compressor"])
    if config["masks"] == "energy" and name == "factgrass" and "mask_dir" not in options:
        return f"{config['compressor']}{',' if ':' in config['compressor'] else ':'}mask_dir={store / 'masks'}"
    return config["compressor"]


def _masks(config, store: Path, model, tokenizer, docs: list[dict]) -> None:
    """Energy masks (attribution.selective_mask.energy_masks) from --mask-documents documents of the
    corpus (a seeded sample), written once into STORE/masks and reused on resume."""
    name, options = parse_spec(config["compressor"])
    if config["masks"] != "energy" or name != "factgrass" or "mask_dir" in options:
        return
    folder = store / "masks"
    record = folder / "masks.json"
    sample = sorted(torch.randperm(len(docs), generator=torch.Generator().manual_seed(config["seed"]))
                    [: config["mask_documents"]].tolist())
    wanted = {"documents": [docs[i]["id"] for i in sample], "k": config["k"], "options": options}
    if record.is_file() and read_json(record, "mask record") == wanted:
        return
    batches, _ = llm.document_batches(tokenizer, [docs[i] for i in sample], config["batch_size"], config["max_length"],
                                      config["token_batch_size"])
    from .selective_mask import energy_masks

    energy_masks(model, llm.sequence_loss, batches, folder, config["k"], blowup=float(options.get("blowup", 2.0)),
                 layers=llm.resolve_layers(model, config["layers"]), k_in=options.get("k_in"), k_out=options.get("k_out"), progress=True)
    atomic_write_json(record, wanted)


def _mask_files(attr, store: Path) -> list[str]:
    """The mask files under the store that the compressors loaded, and their record (masks.json)."""
    paths = []

    def walk(spec):
        if isinstance(spec, dict):
            if isinstance(spec.get("path"), str):
                paths.append(Path(spec["path"]))
            for value in spec.values():
                walk(value)

    for compressor in attr.compressors.values():
        walk(compressor.spec())
    root = store.resolve()
    inside = sorted({str(p.resolve().relative_to(root)) for p in paths if p.resolve().is_relative_to(root)})
    record = store / "masks" / "masks.json"
    return inside + (["masks/masks.json"] if inside and record.is_file() else [])


def _attributor(model, config, store, method="if", compile=False, normalize=False):
    return Attributor(model, llm.sequence_loss, method=method, compressor=_compressor(config, Path(store)), k=config["k"],
                      damping=config["damping"], store=store, layers=llm.resolve_layers(model, config["layers"]),
                      seed=config["seed"], compile=compile, storage_dtype=config["storage_dtype"], normalize=normalize,
                      autocast=None if config["autocast"] == "none" else config["autocast"])


def _main_rank() -> bool:
    """Whether this process prints and writes the outputs (rank 0 under torchrun)."""
    return process_group.rank_and_world()[0] == 0


def _device() -> str:
    """cuda:LOCAL_RANK under torchrun with NCCL, else the CPU."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return str(process_group.local_device())
    return "cpu"


def _check_corpus_flags(config) -> None:
    """The corpus flags go together (before the model is loaded)."""
    if config["dataset"] is not None:
        if config["corpus"] is not None:
            raise CLIError("give --corpus or --dataset, not both")
        if config["messages_field"] and (config["prompt_field"] or config["completion_field"]):
            raise CLIError("--messages-field excludes --prompt-field and --completion-field: give chat messages or "
                           "prompt/completion pairs")
        if bool(config["prompt_field"]) != bool(config["completion_field"]):
            raise CLIError("--prompt-field and --completion-field go together")
    elif any(config[k] for k in ("prompt_field", "completion_field", "messages_field", "split")):
        raise CLIError("--prompt-field, --completion-field, --messages-field and --split apply to --dataset")


def _write_once(path: Path, text: str, what: str) -> None:
    """Write ``text`` to ``path`` unless it holds exactly that; a different content is refused."""
    if path.exists():
        if path.read_text() != text:
            raise CLIError(f"the {what} differs from the one cached in {path.parent}; use the same flags or a new --store")
        return
    _write_atomic(path, text)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def compile_decision(flag: str, real_tokens: int, autocast: str = "none") -> bool:
    """--compile auto|on|off -> whether to torch.compile the cache step: "auto" compiles when the tokens
    to compute reach COMPILE_MIN_TOKENS[autocast] (the measured break-even of one compile)."""
    if flag not in ("auto", "on", "off"):
        raise CLIError(f"--compile must be auto, on or off, got {flag!r}")
    return flag == "on" or (flag == "auto" and real_tokens >= COMPILE_MIN_TOKENS[autocast])


# Cache flags that may differ on an existing store: a larger --limit grows it (new documents, new shards).
GROWABLE_KEYS = ("limit",)


def _flag_value(key: str, value) -> str:
    return "all" if key == "limit" and value is None else json.dumps(value)


def _check_same_flags(store: Path, cached: dict, config: dict) -> None:
    """Refuse flags that differ from the store's, naming each flag with its cached and given value."""
    differ = [key for key in CACHE_KEYS if key not in GROWABLE_KEYS and cached[key] != config[key]]
    if differ:
        listed = "; ".join(f"--{key.replace('_', '-')} cached {_flag_value(key, cached[key])}, given "
                           f"{_flag_value(key, config[key])}" for key in differ)
        raise CLIError(f"{store} was cached with other flags ({listed}); use the cached values or a new --store")


def _new_documents(store: Path, cached: list[dict], docs: list[dict]) -> list[dict]:
    """The documents of ``docs`` not yet in the store (in corpus order); every cached document must be
    among ``docs`` unchanged, since a store only grows."""
    by_id = {d["id"]: d for d in docs}
    gone = [d["id"] for d in cached if d["id"] not in by_id]
    changed = [d["id"] for d in cached if d["id"] in by_id and by_id[d["id"]] != d]
    if gone or changed:
        what = (f"documents {gone[:3]} of the store are not in the corpus" if gone else
                f"documents {changed[:3]} differ from the cached ones")
        raise CLIError(f"the corpus differs from the one cached in {store}: {what} (a store only grows: give a corpus "
                       "that holds every cached document, or use a new --store)")
    known = {d["id"] for d in cached}
    return [d for d in docs if d["id"] not in known]


def cmd_cache(args, loaded=None):
    """Cache the corpus into the store: a new store, the rest of an interrupted one, or the new documents
    of a larger corpus (the store grows: its rows keep their order, the new documents are appended)."""
    store = Path(args.store)
    if args.autocast == "auto":  # recorded resolved, so the store reads back the same on any machine
        args.autocast = "bfloat16" if llm.fast_bfloat16(_device()) else "none"
    config = {key: getattr(args, key) for key in CACHE_KEYS}
    # under torchrun: every rank the same flags, then the same corpus, before anything is written
    require_agreement({f"--{key.replace('_', '-')}": value for key, value in vars(args).items()
                       if key not in ("func", "config")})
    _check_corpus_flags(config)
    saved = store / "cli.json"
    record_before = _saved_config(store) if saved.exists() else None
    if record_before is not None:
        _check_same_flags(store, record_before["flags"], config)
    phases: dict[str, float] = {}

    def prepare():
        with timed_phase(phases, "load_model"):  # GGUF dequantization included
            model, tokenizer = loaded or llm.load_model(config["model"], config["gguf_file"], config["dtype"],
                                                        device=_device())
        with timed_phase(phases, "tokenize"):
            corpus = llm.load_documents(config, tokenizer)
            cached = _cached_documents(store, record_before, whole=False) if record_before is not None else []
            segments = _segments(store, record_before) if record_before is not None else []
            added = _new_documents(store, cached, corpus)
            batch_flags = (config["batch_size"], config["max_length"], config["token_batch_size"])
            batches, start = [], 0
            for size in segments:  # each cache that added documents grouped its own by length: the same batches again
                batches += llm.document_batches(tokenizer, cached[start:start + size], *batch_flags)[0]
                start += size
            pending = batches  # the batches this run may compute (on a resumed store, some of them are done)
            if added:  # store row r is docs[r]: the new documents, grouped by length, follow the cached ones
                new_batches, order = llm.document_batches(tokenizer, added, *batch_flags)
                batches, pending, added = batches + new_batches, new_batches, [added[i] for i in order]
                segments = segments + [len(added)]
        return model, tokenizer, cached, added, segments, batches, pending

    model, tokenizer, cached, added, segments, batches, pending = collectively(prepare)
    docs = cached + added
    docs_text = "".join(json.dumps(d) + "\n" for d in docs)
    require_agreement({"the corpus": f"{len(docs)} documents, sha256 {hashlib.sha256(docs_text.encode()).hexdigest()}"})
    if record_before is None and (store / "docs.jsonl").exists() and (store / "docs.jsonl").read_text() != docs_text:
        raise CLIError(f"the corpus differs from the one cached in {store}; use a new --store")
    parse_spec(config["compressor"])  # validate before anything is written
    mask_docs = cached[:segments[0]] if cached else docs  # the first cache's documents: a grown store keeps its masks
    with timed_phase(phases, "masks"):
        collectively(lambda: _main_rank() and _masks(config, store, model, tokenizer, mask_docs))  # rank 0 writes them
    compile = compile_decision(args.compile, sum(int(b["attention_mask"].sum()) for b in pending), config["autocast"])
    with timed_phase(phases, "attributor"):  # the weights' fingerprint included
        attr = collectively(lambda: _attributor(model, config, store, compile=compile))  # validates the configuration
    if compile and (added or record_before is None) and _main_rank():  # new documents to compute
        print("grass-attribute: the first batch compiles the cache step (once; minutes on a CPU)", file=sys.stderr)
    grows = record_before is not None and (bool(added) or record_before["flags"] != config)

    def record():  # rank 0 writes; the others wait for it
        if _main_rank():
            corpus_record = {"documents": len(docs), "sha256": hashlib.sha256(docs_text.encode()).hexdigest(),
                             "segments": segments}
            config_text = json.dumps({"flags": config, "corpus": corpus_record}, indent=1, sort_keys=True) + "\n"
            if grows:  # docs.jsonl first: its first rows stay the cached ones, which the old record still checks
                _write_atomic(store / "docs.jsonl", docs_text)
                _write_atomic(saved, config_text)
            else:
                _write_once(store / "docs.jsonl", docs_text, "corpus")
                _write_once(saved, config_text, "configuration")
            attr.store.attach(["docs.jsonl", "cli.json", *_mask_files(attr, store)],  # verify checks them
                              replace=("docs.jsonl", "cli.json") if grows else ())

    collectively(record)
    start = time.perf_counter()
    attr.cache(batches)
    seconds = time.perf_counter() - start
    stats = attr.stats
    phases.update(gradients=stats["gradient_seconds"] - stats["compile_seconds"], compile=stats["compile_seconds"],
                  fim=stats["fim_seconds"], cache_other=seconds - stats["gradient_seconds"] - stats["fim_seconds"])
    summary = {"store": str(store), "documents": len(docs), "added_documents": len(added),
               "layers": len(attr.block_names), "k": config["k"],
               "real_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
               "positions": sum(int(b["attention_mask"].numel()) for b in batches),
               "cache_seconds": seconds, "gradient_seconds": stats["gradient_seconds"],
               "fim_seconds": stats["fim_seconds"], "compile": args.compile, "compiled": stats["compiled"],
               "compile_seconds": stats["compile_seconds"], "graph_breaks": stats["graph_breaks"],
               "compile_fallback": stats.get("fallback"), "seconds": phases, "process_seconds": process_seconds(),
               "peak_rss_mb": peak_rss_bytes() / 2**20}
    if _main_rank():
        print(json.dumps(summary))
    return summary


def _saved_config(store: Path) -> dict:
    record = read_json(store / "cli.json", "CLI configuration")
    flags = record.get("flags") if isinstance(record, dict) else None
    corpus = record.get("corpus") if isinstance(record, dict) else None
    if not isinstance(flags, dict) or not isinstance(corpus, dict):
        raise StoreError(f"{store / 'cli.json'}: not a grass-attribute configuration (flags {list(CACHE_KEYS)} and corpus)")
    if set(flags) != set(CACHE_KEYS):
        missing, unknown = sorted(set(CACHE_KEYS) - set(flags)), sorted(set(flags) - set(CACHE_KEYS))
        raise StoreError(f"{store / 'cli.json'}: written by another version of grass-attribute (flags missing: {missing}, "
                         f"unknown: {unknown}); cache into a new --store")
    return record


def _cached_documents(store: Path, record: dict, whole: bool = True) -> list[dict]:
    """The cached documents in store row order, checked against the record's SHA-256. whole=False: the
    record's first rows only (a grow that stopped after rewriting docs.jsonl left more after them)."""
    path = store / "docs.jsonl"
    data = path.read_bytes() if path.is_file() else b""
    count = record["corpus"].get("documents")
    if not whole and isinstance(count, int) and count >= 0:
        data = b"".join(data.splitlines(keepends=True)[:count])
    if hashlib.sha256(data).hexdigest() != record["corpus"].get("sha256"):
        raise StoreError(f"{path} is missing or was modified after caching (its rows must match the cached gradients); "
                         "restore it or cache again into a new --store")
    return [doc for _, doc in llm.read_jsonl(path, "cached corpus")][: None if whole else count]


def _segments(store: Path, record: dict) -> list[int]:
    """The documents each cache of the store added, in row order (one segment unless it grew)."""
    count = record["corpus"].get("documents")
    segments = record["corpus"].get("segments", [count])
    if (not isinstance(segments, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in segments)
            or sum(segments) != count):
        raise StoreError(f"{store / 'cli.json'}: corpus segments {segments!r} do not add up to its {count!r} documents")
    return segments


def _load_store(store):
    """(store path, cache flags, documents in store row order), after checking docs.jsonl against the record."""
    store = Path(store)
    if not (store / "cli.json").exists():
        raise CLIError(f"{store} is not a grass-attribute store (run `grass-attribute cache --store {store}` first)")
    record = _saved_config(store)
    docs = _cached_documents(store, record)
    files = open_store(store)
    unrecorded = sorted({"cli.json", "docs.jsonl"} - set(files.attached()))
    if unrecorded:
        raise StoreError(f"{store}: {unrecorded} are not in the store's record of attached files; run the same "
                         "`grass-attribute cache` again to complete the store")
    files.check_attached()  # the corpus, the configuration and the masks, against their recorded CRC32s
    return store, record["flags"], docs


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
    normalize: unit-normalized gradients (Attributor(normalize=True)), else raw IF scores."""
    attr = _attributor(model, config, store, method=method, normalize=normalize)
    expanded = [llm.per_token_queries(tokenizer, q, config["max_length"]) for q in queries] if per_token else None
    rows = queries + [t for per_query in expanded for t in per_query] if per_token else queries  # whole queries first
    features = attr.query_features(llm.query_batches(tokenizer, rows, config["batch_size"], config["max_length"],
                                                     config["token_batch_size"]))
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


def _check_out(args) -> None:
    """--out must lie outside every store (a report or a selection written there could overwrite its files)."""
    if getattr(args, "out", None) is not None:
        refuse_inside_store(args.out, f"--out {args.out}")


def cmd_attribute(args, loaded=None):
    _check_out(args)
    store, config, docs = _load_store(args.store)
    if not (args.task or args.prompts or args.prompt):
        raise CLIError("give --prompt, --prompts FILE or --task")
    if getattr(args, "index", False):
        _require_faiss()
    model, tokenizer = loaded or llm.load_model(config["model"], config["gguf_file"], config["dtype"], device=_device())
    _check_rows(_attributor(model, config, store), docs, store)  # refuse an incomplete store before generating
    # rank 0 generates the completions and sends them (every rank must score the same queries)
    queries = agreed(collectively(lambda: _queries(args, model, tokenizer) if _main_rank() else None))
    ann = {key: getattr(args, key, None) for key in ("index", "candidates", "nprobe")}  # `demo` has no --index
    ann["index"] = bool(ann["index"])
    results, _ = attribute_queries(store, config, docs, model, tokenizer, queries, args.top_k,
                                   per_token=getattr(args, "per_token", False), ann=ann, normalize=args.normalize)
    meta = {"model": config["model"], "method": "if", "normalize": args.normalize, "compressor": config["compressor"],
            "k": config["k"], "damping": config["damping"], "documents": len(docs), "top_k": args.top_k,
            "per_token": getattr(args, "per_token", False), "index": ann["index"]}
    if not _main_rank():
        return results
    paths = write_reports(args.out, results, meta)
    print(json.dumps({"reports": {k: str(v) for k, v in paths.items()},
                      "queries": [{"prompt": r.query["prompt"], "completion": r.query["completion"],
                                   "top": [d["id"] for d, _ in r.helpful]} for r in results]}))
    return results


def _check_rows(attr, docs, store) -> None:
    if attr.n_train != len(docs):
        raise StoreError(f"{store}: docs.jsonl lists {len(docs)} documents but the store holds {attr.n_train} rows")


def cmd_demo(args):
    """The main job (attribution.demo): plant 20 invented facts in the Python-docs corpus, fine-tune the
    embedded model on it, cache it with the default configuration, ask each fact with a paraphrased
    question, and measure whether attribution finds each answer's source document."""
    from . import demo
    from .evaluation import facts

    _check_out(args)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = facts.fact_corpus(llm.python_docs_corpus(limit=args.limit))
    model, tokenizer, tuned = demo.finetuned_model(out, args.finetune_epochs, args.seed, corpus, progress=True)
    queries = demo.answer_queries(model, tokenizer)
    corpus_path = out / "corpus.jsonl"
    corpus_path.write_text("".join(json.dumps(d) + "\n" for d in corpus))
    args.model, args.gguf_file, args.corpus, args.limit = str(out / "model"), None, str(corpus_path), None
    summary = cmd_cache(args, (model, tokenizer))
    store, config, docs = _load_store(args.store)
    results, scores = attribute_queries(store, config, docs, model, tokenizer, queries, args.top_k, args.per_token,
                                        normalize=args.normalize)
    _, other = attribute_queries(store, config, docs, model, tokenizer, queries, args.top_k, normalize=not args.normalize)
    ids, targets = [d["id"] for d in docs], [q["target"] for q in queries]
    scoring = {True: "IF on unit-normalized gradients", False: "raw IF"}
    rows = [{"method": f"default: {config['compressor']}, {config['masks']} masks, k={config['k']}, {scoring[args.normalize]}",
             **facts.retrieval_metrics(scores, ids, targets)},
            {"method": f"the same store, {scoring[not args.normalize]}", **facts.retrieval_metrics(other, ids, targets)}]
    for result, rank in zip(results, rows[0]["ranks"]):
        result.query["target_rank"] = rank  # the default's rank of the true source, shown per question in the report
    base, _ = llm.load_model(llm.DEFAULT_MODEL)
    rows += demo.compare(model, tokenizer, base, corpus, queries, config["k"], config["max_length"],
                         config["token_batch_size"] or 512, (config["compressor"], "if-unit" if args.normalize else "if"))
    correct = [q["correct"] for q in queries]
    for row in rows:  # the questions the model answers right: their gradient points at the planted fact
        row["mrr_answered"] = (sum(1.0 / r for r, c in zip(row["ranks"], correct) if c) / sum(correct)
                               if any(correct) else None)
    figure = demo.plot(rows, out / "recall.png")
    meta = {"job": f"fact tracing: {len(facts.FACTS)} invented facts planted in the corpus, each asked with a paraphrased "
                   "question", "model": "SmolLM2-135M-Instruct fine-tuned "
            f"on the corpus ({tuned['steps']} steps, {tuned['seconds']:.0f}s)", "method": "if", "normalize": args.normalize,
            "compressor": config["compressor"], "k": config["k"], "damping": config["damping"], "documents": len(docs),
            "top_k": args.top_k, "answered_correctly": sum(q["correct"] for q in queries),
            "cache_seconds": summary["cache_seconds"]}
    paths = write_reports(args.out, results, meta, evaluation=[{k: v for k, v in r.items() if k != "ranks"} for r in rows],
                          plot=figure, notes=demo.notes(rows))
    (out / "facts.json").write_text(json.dumps({"meta": meta, "queries": queries, "methods": rows}, indent=1))
    lines = [f"{len(docs)} documents ({len(docs) - len(facts.FACTS)} Python-docs paragraphs + {len(facts.FACTS)} planted "
             f"facts) cached in {summary['cache_seconds']:.0f}s; the fine-tuned model answers {meta['answered_correctly']}/"
             f"{len(queries)} questions correctly; total {time.perf_counter() - start:.0f}s", "", demo.console_table(rows),
             f"\nreports: {paths['md']} (and .html, .json), plot: {figure}"]
    print("\n".join(lines))
    return rows


def cmd_select(args):
    _check_out(args)
    store, config, docs = _load_store(args.store)
    if not (args.task or args.target):
        raise CLIError("select needs --target FILE or --task TASK")
    model, tokenizer = llm.load_model(config["model"], config["gguf_file"], config["dtype"], device=_device())
    attr = _attributor(model, config, store, method="gradcos")
    _check_rows(attr, docs, store)
    if args.task:
        targets = llm.lm_eval_queries(args.task, args.include_path, args.query_limit)
    elif args.target:
        targets = []
        for n, r in llm.read_jsonl(args.target, "target file"):
            completion = r.get("completion", r.get("text"))
            if not isinstance(completion, str):
                raise CLIError(f"{args.target}:{n}: needs a string 'completion' (with 'prompt') or 'text' field")
            targets.append({"id": f"{args.target}:{n}", "prompt": str(r.get("prompt", "")), "completion": completion})
        if not targets:
            raise CLIError(f"target file {args.target} holds no records")
    else:
        raise CLIError("select needs --target FILE or --task TASK")
    if not 0 < args.fraction <= 1:
        raise CLIError(f"--fraction must be in (0, 1], got {args.fraction}")
    n_keep = max(1, int(round(args.fraction * len(docs))))
    # LESS: the mean cosine similarity to the target set, streamed over the store (every rank its share)
    mean, keep = attr.select(llm.query_batches(tokenizer, targets, config["batch_size"], config["max_length"],
                                               config["token_batch_size"]), n=n_keep)
    keep = keep.tolist()
    if not _main_rank():
        return keep
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for j, score in zip(keep, mean.tolist()):
            f.write(json.dumps({**docs[j], "score": score}) + "\n")
    print(json.dumps({"selected": n_keep, "of": len(docs), "out": str(out), "top": [docs[j]["id"] for j in keep[:5]]}))
    return keep


def cmd_verify(args):
    """Check every file of a store against its checksums (and a grass-attribute store's corpus and
    configuration against each other); exit status 1 on any problem."""
    try:
        report = open_store(args.store).verify()
    except CorruptStoreError as err:  # the manifest: nothing else can be read without it
        report = {"ok": False, "store": str(args.store), "problems": [str(err)]}
    if (Path(args.store) / "cli.json").is_file():
        try:
            _load_store(args.store)
        except (StoreError, ValueError) as err:
            if str(err) not in report["problems"]:
                report["problems"].append(str(err))
        report["ok"] = not report["problems"]
    print(json.dumps(report, indent=1))
    if not report["ok"]:
        raise SystemExit(1)
    return report


def _require_faiss() -> None:
    """FAISS, or a one-line usage error naming the extra to install."""
    try:
        index_module.require_faiss()
    except ModuleNotFoundError as err:
        raise CLIError(str(err)) from None


def cmd_index(args):
    """Build the store's ANN index (FAISS) for `attribute --index`; prints its summary."""
    _require_faiss()
    store = open_store(args.store)

    def build():
        records = [store.require_complete(c) for c in store.checkpoints()]
        if not _main_rank():
            return None
        rows = max(1, args.memory_budget // (store.columns * len(records) * 8))
        with store.writer():
            return index_module.build(store, records, store.checkpoints(), args.mode, args.factory,
                                      project=args.project or None, train_size=args.train_size, nprobe=args.nprobe,
                                      seed=args.seed, rows_per_block=rows)

    summary = agreed(collectively(build))
    if _main_rank():
        print(json.dumps(summary))
    return summary


def cmd_bench(args):
    from .llm_bench import job, run

    _check_out(args)
    report = {}
    if args.job is not None:
        report["job"] = [job(flags.split(), args.job_documents) for flags in args.job or [""]]
    if args.models:
        report.update(run(models=args.models, ks=args.ks, batch_size=args.batch_size, seq_len=args.seq_len,
                          repeats=args.repeats, device=args.device, dtype=args.dtype, fingerprint=args.fingerprint,
                          on_progress=(lambda partial: emit_json_report({**report, **partial, "partial": True}, args.out, quiet=True))
                          if args.out else None))
    emit_json_report(report, args.out)
    return report


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default: appended as "(default: X)" unless its help already says it
    (a None default is described in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.required:
            return text
        return super()._get_help_string(action)


STORE_HELP = "the store folder (the demo writes its store to out/llm/store)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grass-attribute", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--config", help="JSON file with flag values (flags given on the command line win; default: none)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, helptext: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=helptext, description=helptext, formatter_class=_HelpFormatter)

    cache = command("cache", "compress a corpus's training gradients into a store (a larger --limit or corpus grows it)")
    cache.add_argument("--store", required=True, help=STORE_HELP)
    cache.add_argument("--model", default=llm.DEFAULT_MODEL, help="'smollm2' (embedded), a folder or a hub id")
    cache.add_argument("--gguf-file", default=None, help="the GGUF file inside --model's folder or hub repo (default: none, "
                                                         "safetensors weights)")
    cache.add_argument("--corpus", default=None, help="'python-docs' (embedded), a .jsonl or a .txt (default: python-docs)")
    cache.add_argument("--dataset", default=None, help="a Hugging Face datasets dataset: a save_to_disk folder, or a "
                                                       ".parquet / .arrow / .jsonl / .csv file (the `llm` extra; default: none)")
    cache.add_argument("--split", default=None, help="the --dataset split (default: train, or its only split)")
    cache.add_argument("--text-field", default="text", help="the field holding each document's text (.jsonl, --dataset)")
    cache.add_argument("--prompt-field", default=None, help="--dataset rows as prompt/completion pairs (only the "
                                                            "completion is a target), with --completion-field (default: none)")
    cache.add_argument("--completion-field", default=None, help="the completion field of --prompt-field rows (default: none)")
    cache.add_argument("--messages-field", default=None, help="--dataset rows as chat messages, rendered with the "
                                                              "tokenizer's chat template (default: none)")
    cache.add_argument("--limit", type=_limit, default=96, help="documents to take from the corpus (a positive int, or "
                                                                "'all'); a larger limit on an existing store grows it")
    cache.add_argument("--layers", nargs="+", default=None,
                       help="module name patterns, each must match (default: every linear layer of the transformer "
                            "blocks: model.layers.* or transformer.h.*)")
    cache.add_argument("--compressor", default="factgrass:blowup=4",
                       help="compressor spec (attribution.compression), e.g. factgrass:blowup=4, logra, sjlt")
    cache.add_argument("--masks", default="energy", choices=["energy", "random"],
                       help="FactGraSS masks: 'energy' keeps each layer's highest second-moment coordinates, measured "
                            "on --mask-documents documents of the corpus; 'random' draws them from the seed")
    cache.add_argument("--mask-documents", type=_positive_int, default=32,
                       help="documents (a seeded sample of the corpus) that --masks energy measures")
    cache.add_argument("--k", type=_positive_int, default=256, help="compressed dimension per layer")
    cache.add_argument("--max-length", type=_max_length, default=128, help="tokens per document (longer ones are cut)")
    cache.add_argument("--batch-size", type=_positive_int, default=4, help="documents per batch (at most)")
    cache.add_argument("--token-batch-size", type=_positive_int, default=None,
                       help="padded tokens per batch (at most; default: no limit); documents are grouped by length, so "
                            "no compute is spent on padding beyond each batch's longest document")
    cache.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="dtype of the stored gradients (bfloat16 halves the store)")
    cache.add_argument("--dtype", default="float32", choices=sorted(llm.DTYPES), help="dtype of the model's weights")
    cache.add_argument("--autocast", default=DEFAULT_AUTOCAST, choices=["none", "bfloat16", "float16", "auto"],
                       help="matmuls of the gradient passes under torch.autocast (float32 weights, factors compressed in "
                            "float32); auto: bfloat16 where the hardware runs it natively, else none (recorded resolved)")
    cache.add_argument("--damping", type=_nonnegative_float, default=1e-3,
                       help="added to the FIM's eigenvalues before inverting it (larger: closer to a plain dot product)")
    cache.add_argument("--seed", type=int, default=0, help="seed of the random projections and masks")
    _compile_flags(cache)
    cache.set_defaults(func=cmd_cache)

    demo = command("demo", "the main job: fact tracing on the embedded model, measured")
    keep = {"compressor", "k", "max_length", "batch_size", "token_batch_size", "storage_dtype", "dtype", "autocast", "damping", "seed",
            "layers", "limit", "masks", "mask_documents"}
    for action in cache._actions:
        if action.dest in keep:
            demo._add_action(action)
    demo.set_defaults(model=llm.DEFAULT_MODEL, gguf_file=None, corpus=None, dataset=None, split=None, text_field="text",
                      prompt_field=None, completion_field=None, messages_field=None)
    _compile_flags(demo)
    demo.add_argument("--store", default="out/llm/store", help="where the demo caches its corpus")
    demo.add_argument("--out", default="out/llm", help="folder of the fine-tuned model, the reports and recall.png")
    demo.add_argument("--finetune-epochs", type=_positive_int, default=6, help="epochs of the short fine-tune")
    demo.add_argument("--top-k", type=_positive_int, default=5, help="documents listed per question, top and bottom")
    demo.add_argument("--per-token", action="store_true", help="also list each answer token's top documents")
    demo.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=DEFAULT_NORMALIZE, help=NORMALIZE_HELP)
    demo.set_defaults(func=cmd_demo)

    for name, helptext in (("attribute", "top-k training documents for prompts / completions"),
                           ("select", "LESS-style data selection against a target set")):
        p = command(name, helptext)
        p.add_argument("--store", required=True, help=STORE_HELP)
        p.add_argument("--task", default=None, help="an lm-eval task as the query/target set (default: none)")
        p.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs (default: none)")
        p.add_argument("--query-limit", type=_positive_int, default=None,
                       help="--task: examples to take (default: all)")
        if name == "attribute":
            p.add_argument("--index", action="store_true",
                           help="candidates from the store's ANN index (grass-attribute index), re-ranked exactly")
            p.add_argument("--candidates", type=_positive_int, default=None,
                           help="--index: candidates per query (default 10 x top-k, >= 100)")
            p.add_argument("--nprobe", type=_positive_int, default=None,
                           help="--index: inverted lists to probe (default: the index's)")
            p.add_argument("--prompt", action="append", type=_nonempty,
                           help="a prompt (repeatable); completed by the model (default: none)")
            p.add_argument("--prompts", default=None, help="jsonl of {prompt[, completion]} (default: none)")
            p.add_argument("--generate", type=_positive_int, default=24, help="new tokens of each completion")
            p.add_argument("--top-k", type=_positive_int, default=5, help="documents listed per query, top and bottom")
            p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=DEFAULT_NORMALIZE,
                           help=NORMALIZE_HELP)
            p.add_argument("--per-token", action="store_true",
                           help="also attribute each completion token on its own (one query per token)")
            p.add_argument("--out", default="out/llm_report", help="folder of report.md, report.html and report.json")
            p.set_defaults(func=cmd_attribute)
        else:
            p.add_argument("--target", default=None, help="jsonl of {prompt, completion} or {text} (default: none)")
            p.add_argument("--fraction", type=_fraction, default=0.1, help="share of the cached documents to keep")
            p.add_argument("--out", default="out/selected.jsonl", help="the selected documents, as jsonl")
            p.set_defaults(func=cmd_select)

    index = command("index", "build the store's ANN index (FAISS, the `faiss` extra) for `attribute --index`")
    index.add_argument("--store", required=True, help=STORE_HELP)
    index.add_argument("--factory", default=index_module.DEFAULT_FACTORY,
                       help='a FAISS index_factory string, e.g. "IVF4096,PQ64" (default: "Flat" below 20,000 documents, '
                            'else "IVF<about 4 sqrt(n)>,SQfp16")')
    index.add_argument("--mode", default="cosine" if DEFAULT_NORMALIZE else "ip", choices=index_module.MODES,
                       help="ip: raw vectors (what `attribute` uses by default: raw IF, graddot, tracin), cosine: normalized "
                            "vectors (`attribute --normalize`, gradcos), trak: TRAK-weighted")
    index.add_argument("--project", type=_nonnegative_int, default=index_module.DEFAULT_PROJECT,
                       help="dimensions kept: the top eigenvectors of the rows' second moment (0: all)")
    index.add_argument("--train-size", type=_positive_int, default=None, help="rows to train on (default 40 per IVF list)")
    index.add_argument("--nprobe", type=_positive_int, default=None,
                       help="lists probed by default (default: an eighth of them)")
    index.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of the index's training sample")
    index.add_argument("--memory-budget", type=_positive_int, default=1 << 30, help="bytes of training rows read at once")
    index.set_defaults(func=cmd_index)

    verify = command("verify", "check every file of a store against its recorded checksums")
    verify.add_argument("--store", required=True, help=STORE_HELP)
    verify.set_defaults(func=cmd_verify)

    bench = command("bench", "throughput of the compress step and the cache stage")
    bench.add_argument("--job", action="append", nargs="?", const="", default=None, metavar="FLAGS",
                       help="measure the main job's cache stage in a fresh process (real tokens/s, peak RSS, store size) "
                            "with the default flags (--job) or extra `cache` flags (--job='--no-compile'); repeatable "
                            "(default: not measured)")
    bench.add_argument("--job-documents", type=_positive_int, default=96, help="--job: Python-docs paragraphs cached")
    bench.add_argument("--models", nargs="*", default=["smollm2", "gpt2-random"],
                       help="models of the per-model cache-step table (none: skip it)")
    bench.add_argument("--ks", type=int, nargs="+", default=[256, 1024, 4096], help="compressed dimensions per layer")
    bench.add_argument("--batch-size", type=int, default=2, help="sequences per batch")
    bench.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats per row")
    bench.add_argument("--device", default="cpu", help="torch device")
    bench.add_argument("--dtype", default="float32", choices=sorted(llm.DTYPES), help="dtype of the model's weights")
    bench.add_argument("--fingerprint", action=argparse.BooleanOptionalAction, default=True,
                       help="also time fingerprinting the weights (sha256 on the host, lin64 on the device)")
    bench.add_argument("--out", default=None, help="JSON file of the results (default: printed)")
    bench.set_defaults(func=cmd_bench)
    return parser


def _compile_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                        help="torch.compile the cache step: auto (default) compiles when the corpus has at least "
                             f"{COMPILE_MIN_TOKENS['bfloat16']:,} real tokens to compute under bfloat16 autocast, "
                             f"{COMPILE_MIN_TOKENS['none']:,} in float32, where one compile pays for itself; --compile "
                             "forces it")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                        help="run the cache step eagerly (--compile off; default: auto)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {value}")
    return value


def _max_length(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (a target token needs a token before it), got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _limit(text: str):
    if str(text).lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'all', got {value}")
    return value


def _config_flags(parser: argparse.ArgumentParser, command: str, values, path: str, given: set[str]) -> list[str]:
    """--config values as command-line flags of ``command`` (so argparse checks their types); keys
    given on the command line are left out (the command line wins); unknown keys are an error."""
    if not isinstance(values, dict):
        raise CLIError(f"--config {path} must hold a JSON object of flag values")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    actions: dict[str, argparse.Action] = {}
    for a in sub._actions:  # the first flag of each destination (--compile, not --no-compile)
        if a.option_strings and a.dest != "help":
            actions.setdefault(a.dest, a)
    unknown = sorted(k for k in values if k not in actions)
    if unknown:
        raise CLIError(f"--config {path}: unknown keys {unknown} for `{command}`")
    flags: list[str] = []
    for key, value in values.items():
        if key in given:
            continue
        action, flag = actions[key], actions[key].option_strings[0]
        negative = f"--no-{flag[2:]}"
        if isinstance(value, bool) and any(negative in a.option_strings for a in sub._actions):  # --compile / --no-compile
            flags.append(flag if value else negative)
        elif isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise CLIError(f"--config {path}: {key} must be true or false, got {value!r}")
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
            items = value if isinstance(value, list) else [value]
            if not items or any(isinstance(v, (dict, list, bool)) or v is None for v in items):
                raise CLIError(f"--config {path}: {key} must be a string or a list of strings, got {value!r}")
            flags += [flag, *map(str, items)] if action.nargs in ("+", "*") else [x for v in items for x in (flag, str(v))]
        else:
            if isinstance(value, (dict, list, bool)) or value is None:
                raise CLIError(f"--config {path}: {key} must be a single value, got {value!r}")
            if action.choices is not None and str(value) not in action.choices:
                raise CLIError(f"--config {path}: {key} must be one of {list(action.choices)}, got {value!r}")
            flags += [flag, str(value)]
    return flags


def run(argv=None):
    """Parse and run one subcommand; returns its result (main() is the console entry point). Under
    torchrun (WORLD_SIZE > 1) the process group is initialized from the environment first (gloo on
    CPU, nccl with one GPU per LOCAL_RANK) and every rank runs the command on its share."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"--config file not found: {args.config}")
        at = argv.index(args.command)
        own = argv[at + 1:]
        given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in own if a.startswith("--")}
        given |= {g[3:] for g in given if g.startswith("no_")}
        values = read_json(path, "--config file")
        args = parser.parse_args([args.command, *_config_flags(parser, args.command, values, args.config, given), *own])
    process_group.init_from_environment()
    try:
        return args.func(args)
    except llm.UsageError as err:
        raise CLIError(str(err)) from None


def main(argv=None) -> int:
    """Console entry point: expected errors (bad input, a store that cannot serve the request) are
    printed as one line with exit status 2; anything else keeps its traceback. Under torchrun the
    process group this call started is destroyed at the end."""
    dist = torch.distributed
    started = dist.is_available() and dist.is_initialized()
    try:
        run(argv)
    except CLIError as err:
        print(err, file=sys.stderr)
        return 2
    except (*EXPECTED_ERRORS, process_group.RankFailed) as err:
        if isinstance(err, process_group.RankFailed) and not err.is_a(CLIError, *EXPECTED_ERRORS):
            raise
        print(f"grass-attribute: error: {err}", file=sys.stderr)
        return 2
    finally:
        if not started and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
