"""``grass-attribute``: attribute a causal LM's outputs to training documents with FactGraSS.

    grass-attribute cache --store out/llm                      # SmolLM2-135M + Python-docs paragraphs
    grass-attribute attribute --store out/llm --prompt "To improve data privacy,"
    grass-attribute select --store out/llm --target target.jsonl --fraction 0.1 --out selected.jsonl
    grass-attribute bench --out bench.json
    grass-attribute index --store out/llm [--factory "IVF4096,PQ64"]    # ANN index (the `faiss` extra)
    torchrun --nproc_per_node 2 -m attribution.cli cache --store out/llm # every rank its share (gloo/nccl)

Every flag can also come from ``--config file.json`` (keys = flag names with underscores). ``cache``
records its configuration in the store (cli.json), so later commands need only ``--store``; an
interrupted ``cache`` resumes where it stopped.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

import torch

from grass_ops.benchmarking import emit_json_report

from . import distributed, llm
from . import index as index_module
from .attributor import Attributor
from .parallel import agreed, collectively
from .report import Attribution, write_reports
from .store import open_store, read_json

CACHE_KEYS = ("model", "gguf_file", "corpus", "text_field", "limit", "layers", "compressor", "k", "max_length",
              "batch_size", "dtype", "damping", "seed")


class CLIError(SystemExit):
    """A usage error: printed as one line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(f"grass-attribute: error: {message}")


def _layers(model, patterns):
    """The --layers patterns; each must match a module. None (the default): every linear layer of the
    transformer blocks, whichever of the usual names the architecture has (llm.DEFAULT_LAYERS)."""
    names = [n for n, _ in model.named_modules()]
    matches = lambda p: any(fnmatch.fnmatchcase(n, p) for n in names)  # noqa: E731
    if patterns is None:
        found = [p for p in llm.DEFAULT_LAYERS if matches(p)]
        if not found:
            raise CLIError(f"the model has no modules named {llm.DEFAULT_LAYERS}: give --layers")
        return found
    unmatched = [p for p in patterns if not matches(p)]
    if unmatched:
        raise CLIError(f"--layers patterns {unmatched} match no module of the model")
    return list(patterns)


def _attributor(model, config, store, method="if", compile=False):
    return Attributor(model, llm.sequence_loss, method=method, compressor=config["compressor"], k=config["k"],
                      damping=config["damping"], store=store, layers=_layers(model, config["layers"]),
                      seed=config["seed"], compile=compile)


def _main_rank() -> bool:
    """Whether this process prints and writes the outputs (rank 0 under torchrun)."""
    return distributed.rank_and_world()[0] == 0


def _device() -> str:
    """cuda:LOCAL_RANK under torchrun with NCCL, else the CPU."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return str(distributed.local_device())
    return "cpu"


def _docs(config):
    if config["corpus"] in (None, "python-docs"):
        return llm.python_docs_corpus(limit=config["limit"])
    return llm.read_corpus(config["corpus"], config["text_field"], config["limit"])


def _write_once(path: Path, text: str, what: str) -> None:
    """Write ``text`` to ``path`` unless it holds exactly that; a different content is refused."""
    if path.exists():
        if path.read_text() != text:
            raise CLIError(f"the {what} differs from the one cached in {path.parent}; use the same flags or a new --store")
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cmd_cache(args, loaded=None):
    store = Path(args.store)
    config = {key: getattr(args, key) for key in CACHE_KEYS}
    saved = store / "cli.json"
    if saved.exists() and read_json(saved, "CLI configuration") != config:
        raise CLIError(f"{store} was cached with {saved.read_text()}; use the same flags or a new --store")
    docs = _docs(config)
    docs_text = "".join(json.dumps(d) + "\n" for d in docs)
    if (store / "docs.jsonl").exists() and (store / "docs.jsonl").read_text() != docs_text:
        raise CLIError(f"the corpus differs from the one cached in {store}; use a new --store")
    model, tokenizer = loaded or llm.load_model(config["model"], config["gguf_file"], config["dtype"], device=_device())
    batches = llm.document_batches(tokenizer, docs, config["batch_size"], config["max_length"])
    attr = _attributor(model, config, store, compile=args.compile)  # validates the whole configuration

    def record():  # rank 0 writes; the others wait for it
        if _main_rank():
            _write_once(store / "docs.jsonl", docs_text, "corpus")
            _write_once(saved, json.dumps(config, indent=1, sort_keys=True) + "\n", "configuration")

    collectively(record)
    start = time.perf_counter()
    attr.cache(batches)
    seconds = time.perf_counter() - start
    summary = {"store": str(store), "documents": len(docs), "layers": len(attr.block_names), "k": config["k"],
               "cache_seconds": seconds, "compiled": attr.stats["compiled"], "compile_seconds": attr.stats["compile_seconds"],
               "graph_breaks": attr.stats["graph_breaks"], "compile_fallback": attr.stats.get("fallback")}
    if _main_rank():
        print(json.dumps(summary))
    return summary


def _load_store(store):
    store = Path(store)
    if not (store / "cli.json").exists():
        raise CLIError(f"{store} is not a grass-attribute store (run `grass-attribute cache --store {store}` first)")
    config = read_json(store / "cli.json", "CLI configuration")
    docs = [record for _, record in llm.read_jsonl(store / "docs.jsonl", "cached corpus")]
    return store, config, docs


def _queries(args, model, tokenizer):
    if args.task:
        return llm.lm_eval_queries(args.task, args.include_path, args.query_limit)
    queries = []
    if args.prompts:
        for n, record in llm.read_jsonl(args.prompts, "prompts file"):
            if not isinstance(record.get("prompt"), str):
                raise CLIError(f"{args.prompts}:{n}: needs a string 'prompt' field")
            queries.append({"prompt": record["prompt"], "completion": record.get("completion"),
                            **({"id": str(record["id"])} if "id" in record else {})})
    queries += [{"prompt": p, "completion": None} for p in args.prompt or []]
    if not queries:
        raise SystemExit("give --prompt, --prompts FILE or --task")
    missing = [q for q in queries if not q.get("completion")]
    for q, text in zip(missing, llm.complete(model, tokenizer, [q["prompt"] for q in missing], args.generate)):
        q["completion"] = text
    return [{"id": q.get("id", str(i)), **q} for i, q in enumerate(queries)]


def cmd_attribute(args, loaded=None):
    store, config, docs = _load_store(args.store)
    model, tokenizer = loaded or llm.load_model(config["model"], config["gguf_file"], config["dtype"], device=_device())
    attr = _attributor(model, config, store)
    attr.n_train  # an incomplete store is refused before the model generates anything
    queries = _queries(args, model, tokenizer)
    features = attr.query_features(llm.query_batches(tokenizer, queries, config["batch_size"], config["max_length"]))
    ann = {key: getattr(args, key, None) for key in ("index", "candidates", "nprobe")}  # `demo` has no --index
    ann["index"] = bool(ann["index"])
    top = attr.top_k(k=args.top_k, features=features, **ann)
    bottom = attr.top_k(k=args.top_k, largest=False, features=features, **ann)
    results = [Attribution(q, [(docs[j], float(s)) for j, s in zip(top[1][i], top[0][i]) if j >= 0],
                           [(docs[j], float(s)) for j, s in zip(bottom[1][i], bottom[0][i]) if j >= 0])
               for i, q in enumerate(queries)]
    meta = {"model": config["model"], "method": "if", "compressor": config["compressor"], "k": config["k"],
            "damping": config["damping"], "documents": len(docs), "index": ann["index"]}
    if not _main_rank():
        return results
    paths = write_reports(args.out, results, meta)
    print(json.dumps({"reports": {k: str(v) for k, v in paths.items()},
                      "queries": [{"prompt": r.query["prompt"], "completion": r.query["completion"],
                                   "top": [d["id"] for d, _ in r.helpful]} for r in results]}))
    return results


def cmd_demo(args):
    """The embedded default end to end: cache the corpus, then attribute the default prompts' completions."""
    loaded = llm.load_model(args.model, args.gguf_file, args.dtype)
    start = time.perf_counter()
    summary = cmd_cache(args, loaded)
    args.prompt = args.prompt or list(llm.DEFAULT_PROMPTS)
    results = cmd_attribute(args, loaded)
    lines = [f"{summary['documents']} Python-docs paragraphs cached with FactGraSS (k={args.k} per layer, "
             f"{summary['layers']} linear layers) in {summary['cache_seconds']:.0f}s; total {time.perf_counter() - start:.0f}s"]
    for r in results:
        lines.append(f"\n{r.query['prompt']!r} -> {r.query['completion']!r}")
        lines += [f"  + {s:9.3g}  [{d['id']}] {d['text'][:110]}" for d, s in r.helpful[:3]]
    lines.append(f"\nreports: {Path(args.out) / 'report.md'} (and .html, .json)")
    print("\n".join(lines))
    return results


def cmd_select(args):
    store, config, docs = _load_store(args.store)
    model, tokenizer = llm.load_model(config["model"], config["gguf_file"], config["dtype"], device=_device())
    attr = _attributor(model, config, store, method="gradcos")
    attr.n_train  # refuse an incomplete store first
    if args.task:
        targets = llm.lm_eval_queries(args.task, args.include_path, args.query_limit)
    elif args.target:
        targets = []
        for n, r in llm.read_jsonl(args.target, "target file"):
            completion = r.get("completion", r.get("text"))
            if not isinstance(completion, str):
                raise CLIError(f"{args.target}:{n}: needs a string 'completion' (with 'prompt') or 'text' field")
            targets.append({"id": f"{args.target}:{n}", "prompt": str(r.get("prompt", "")), "completion": completion})
    else:
        raise CLIError("select needs --target FILE or --task TASK")
    if not 0 < args.fraction <= 1:
        raise CLIError(f"--fraction must be in (0, 1], got {args.fraction}")
    n_keep = max(1, int(round(args.fraction * len(docs))))
    # LESS: the mean cosine similarity to the target set, streamed over the store (every rank its share)
    mean, keep = attr.select(llm.query_batches(tokenizer, targets, config["batch_size"], config["max_length"]), n=n_keep)
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
    """Check every file of a store against its checksums; exit status 1 on any problem."""
    report = open_store(args.store).verify()
    print(json.dumps(report, indent=1))
    if not report["ok"]:
        raise SystemExit(1)
    return report


def cmd_index(args):
    """Build the store's ANN index (FAISS) for `attribute --index`; prints its summary."""
    index_module.require_faiss()
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
    from .llm_bench import run

    report = run(models=args.models, ks=args.ks, batch_size=args.batch_size, seq_len=args.seq_len,
                 repeats=args.repeats, device=args.device, dtype=args.dtype)
    emit_json_report(report, args.out)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grass-attribute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file with flag values (flags given on the command line win)")
    sub = parser.add_subparsers(dest="command", required=True)

    cache = sub.add_parser("cache", help="compress a corpus's training gradients into a store")
    cache.add_argument("--store", required=True)
    cache.add_argument("--model", default=llm.DEFAULT_MODEL, help="'smollm2' (embedded), a folder or a hub id")
    cache.add_argument("--gguf-file", default=None)
    cache.add_argument("--corpus", default="python-docs", help="'python-docs' (embedded), a .jsonl or a .txt")
    cache.add_argument("--text-field", default="text")
    cache.add_argument("--limit", type=_limit, default=96, help="documents to take from the corpus (a positive int, or 'all')")
    cache.add_argument("--layers", nargs="+", default=None,
                       help="module name patterns, each must match (default: every linear layer of the transformer "
                            "blocks: model.layers.* or transformer.h.*)")
    cache.add_argument("--compressor", default="factgrass")
    cache.add_argument("--k", type=int, default=256, help="compressed dimension per layer")
    cache.add_argument("--max-length", type=int, default=128)
    cache.add_argument("--batch-size", type=int, default=4)
    cache.add_argument("--dtype", default="float32", choices=sorted(llm.DTYPES))
    cache.add_argument("--damping", type=float, default=1e-3)
    cache.add_argument("--seed", type=int, default=0)
    cache.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                       help="torch.compile the cache step (default; --no-compile runs it eagerly)")
    cache.set_defaults(func=cmd_cache)

    demo = sub.add_parser("demo", help="the embedded default: cache + attribute the default prompts")
    for action in cache._actions:
        if action.dest not in ("help", "store"):
            demo._add_action(action)
    demo.add_argument("--store", default="out/llm/store")
    demo.add_argument("--prompt", action="append", help="prompts (default: the paper's and three docs questions)")
    demo.add_argument("--prompts", default=None)
    demo.add_argument("--task", default=None)
    demo.add_argument("--include-path", default=None)
    demo.add_argument("--query-limit", type=int, default=None)
    demo.add_argument("--generate", type=int, default=24)
    demo.add_argument("--top-k", type=int, default=5)
    demo.add_argument("--out", default="out/llm")
    demo.set_defaults(func=cmd_demo)

    for name, helptext in (("attribute", "top-k training documents for prompts / completions"),
                           ("select", "LESS-style data selection against a target set")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--store", required=True)
        p.add_argument("--task", default=None, help="an lm-eval task as the query/target set")
        p.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
        p.add_argument("--query-limit", type=int, default=None)
        if name == "attribute":
            p.add_argument("--index", action="store_true",
                           help="candidates from the store's ANN index (grass-attribute index), re-ranked exactly")
            p.add_argument("--candidates", type=int, default=None, help="--index: candidates per query (default 10 x top-k, >= 100)")
            p.add_argument("--nprobe", type=int, default=None, help="--index: inverted lists to probe (default: the index's)")
            p.add_argument("--prompt", action="append", help="a prompt (repeatable); completed by the model")
            p.add_argument("--prompts", default=None, help="jsonl of {prompt[, completion]}")
            p.add_argument("--generate", type=int, default=24, help="new tokens of each completion")
            p.add_argument("--top-k", type=int, default=5)
            p.add_argument("--out", default="out/llm_report")
            p.set_defaults(func=cmd_attribute)
        else:
            p.add_argument("--target", default=None, help="jsonl of {prompt, completion} or {text}")
            p.add_argument("--fraction", type=float, default=0.1)
            p.add_argument("--out", default="out/selected.jsonl")
            p.set_defaults(func=cmd_select)

    index = sub.add_parser("index", help="build the store's ANN index (FAISS, the `faiss` extra) for `attribute --index`")
    index.add_argument("--store", required=True)
    index.add_argument("--factory", default=index_module.DEFAULT_FACTORY,
                       help='a FAISS index_factory string, e.g. "IVF4096,PQ64" (default: "Flat" below 20,000 documents, '
                            'else "IVF<about 4 sqrt(n)>,SQfp16")')
    index.add_argument("--mode", default="ip", choices=index_module.MODES,
                       help="ip: raw vectors (if, graddot, tracin; what `attribute` uses), cosine: normalized (gradcos), "
                            "trak: TRAK-weighted")
    index.add_argument("--project", type=int, default=index_module.DEFAULT_PROJECT,
                       help="dimensions kept: the top eigenvectors of the rows' second moment (0: all)")
    index.add_argument("--train-size", type=int, default=None, help="rows to train on (default 40 per IVF list)")
    index.add_argument("--nprobe", type=int, default=None, help="lists probed by default (default: an eighth of them)")
    index.add_argument("--seed", type=int, default=0)
    index.add_argument("--memory-budget", type=int, default=1 << 30, help="bytes of training rows read at once")
    index.set_defaults(func=cmd_index)

    verify = sub.add_parser("verify", help="check every file of a store against its recorded checksums")
    verify.add_argument("--store", required=True)
    verify.set_defaults(func=cmd_verify)

    bench = sub.add_parser("bench", help="throughput of the compress step and the cache stage")
    bench.add_argument("--models", nargs="+", default=["smollm2", "gpt2-random"])
    bench.add_argument("--ks", type=int, nargs="+", default=[256, 1024, 4096])
    bench.add_argument("--batch-size", type=int, default=2)
    bench.add_argument("--seq-len", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default="float32", choices=sorted(llm.DTYPES))
    bench.add_argument("--out", default=None)
    bench.set_defaults(func=cmd_bench)
    return parser


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


def _apply_config(parser, args, argv) -> None:
    """Fill flags from --config FILE (JSON object; keys are flag names with underscores). Flags given
    on the command line win; unknown keys are an error."""
    values = read_json(Path(args.config), "--config file") if Path(args.config).is_file() else None
    if values is None:
        raise CLIError(f"--config file not found: {args.config}")
    if not isinstance(values, dict):
        raise CLIError(f"--config {args.config} must hold a JSON object of flag values")
    unknown = sorted(k for k in values if not hasattr(args, k) or k in ("func", "command", "config"))
    if unknown:
        raise CLIError(f"--config {args.config}: unknown keys {unknown} for `{args.command}`")
    given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    for key, value in values.items():
        if key in given:
            continue
        if key == "limit":
            try:
                value = _limit(value)
            except argparse.ArgumentTypeError as err:
                raise CLIError(f"--config {args.config}: limit {err}") from None
        setattr(args, key, value)


def run(argv=None):
    """Parse and run one subcommand; returns its result (main() is the console entry point). Under
    torchrun (WORLD_SIZE > 1) the process group is initialized from the environment first (gloo on
    CPU, nccl with one GPU per LOCAL_RANK) and every rank runs the command on its share."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        _apply_config(parser, args, argv)
    distributed.init_from_environment()
    return args.func(args)


def main(argv=None) -> int:
    dist = torch.distributed
    started = dist.is_available() and dist.is_initialized()
    try:
        run(argv)
    finally:
        if not started and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
