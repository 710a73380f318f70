"""``grass-attribute``: attribute a causal LM's outputs to training documents with FactGraSS.

    grass-attribute cache --store out/llm                      # SmolLM2-135M + Python-docs paragraphs
    grass-attribute attribute --store out/llm --prompt "To improve data privacy,"
    grass-attribute select --store out/llm --target target.jsonl --fraction 0.1 --out selected.jsonl
    grass-attribute bench --out bench.json

Every flag can also come from ``--config file.json`` (keys = flag names with underscores). ``cache``
records its configuration in the store (cli.json), so later commands need only ``--store``; an
interrupted ``cache`` resumes where it stopped.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import sys
import time
from pathlib import Path

from grass_ops.benchmarking import emit_json_report

from . import llm
from .attributor import Attributor
from .report import Attribution, write_reports
from .store import StoreError, open_store, read_json

CACHE_KEYS = ("model", "gguf_file", "corpus", "text_field", "limit", "layers", "compressor", "k", "max_length",
              "batch_size", "token_batch_size", "dtype", "storage_dtype", "damping", "seed")


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
                      seed=config["seed"], compile=compile, storage_dtype=config["storage_dtype"])


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
    if saved.exists() and _saved_config(store)["flags"] != config:
        raise CLIError(f"{store} was cached with {json.dumps(_saved_config(store)['flags'])}; use the same flags or a "
                       "new --store")
    docs = _docs(config)
    model, tokenizer = loaded or llm.load_model(config["model"], config["gguf_file"], config["dtype"])
    batches, order = llm.document_batches(tokenizer, docs, config["batch_size"], config["max_length"],
                                          config["token_batch_size"])
    docs = [docs[i] for i in order]  # store row r is docs[r]: the batches group documents by length
    docs_text = "".join(json.dumps(d) + "\n" for d in docs)
    if (store / "docs.jsonl").exists() and (store / "docs.jsonl").read_text() != docs_text:
        raise CLIError(f"the corpus differs from the one cached in {store}; use a new --store")
    attr = _attributor(model, config, store, compile=args.compile)  # validates the whole configuration
    _write_once(store / "docs.jsonl", docs_text, "corpus")
    record = {"flags": config, "corpus": {"documents": len(docs), "sha256": hashlib.sha256(docs_text.encode()).hexdigest()}}
    _write_once(saved, json.dumps(record, indent=1, sort_keys=True) + "\n", "configuration")
    start = time.perf_counter()
    attr.cache(batches)
    seconds = time.perf_counter() - start
    summary = {"store": str(store), "documents": len(docs), "layers": len(attr.block_names), "k": config["k"],
               "cache_seconds": seconds, "compiled": attr.stats["compiled"], "compile_seconds": attr.stats["compile_seconds"],
               "graph_breaks": attr.stats["graph_breaks"], "compile_fallback": attr.stats.get("fallback")}
    print(json.dumps(summary))
    return summary


def _saved_config(store: Path) -> dict:
    record = read_json(store / "cli.json", "CLI configuration")
    flags = record.get("flags") if isinstance(record, dict) else None
    corpus = record.get("corpus") if isinstance(record, dict) else None
    if not isinstance(flags, dict) or set(flags) != set(CACHE_KEYS) or not isinstance(corpus, dict):
        raise StoreError(f"{store / 'cli.json'}: not a grass-attribute configuration (flags {list(CACHE_KEYS)} and corpus)")
    return record


def _load_store(store):
    """(store path, cache flags, documents in store row order), after checking docs.jsonl against the record."""
    store = Path(store)
    if not (store / "cli.json").exists():
        raise CLIError(f"{store} is not a grass-attribute store (run `grass-attribute cache --store {store}` first)")
    record = _saved_config(store)
    path = store / "docs.jsonl"
    data = path.read_bytes() if path.is_file() else b""
    if hashlib.sha256(data).hexdigest() != record["corpus"].get("sha256"):
        raise StoreError(f"{path} is missing or was modified after caching (its rows must match the cached gradients); "
                         "restore it or cache again into a new --store")
    docs = [doc for _, doc in llm.read_jsonl(path, "cached corpus")]
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
        raise SystemExit("give --prompt, --prompts FILE or --task")
    missing = [q for q in queries if not q.get("completion")]
    for q, text in zip(missing, llm.complete(model, tokenizer, [q["prompt"] for q in missing], args.generate)):
        q["completion"] = text
    return [{"id": q.get("id", str(i)), **q} for i, q in enumerate(queries)]


def cmd_attribute(args, loaded=None):
    store, config, docs = _load_store(args.store)
    model, tokenizer = loaded or llm.load_model(config["model"], config["gguf_file"], config["dtype"])
    attr = _attributor(model, config, store)
    _check_rows(attr, docs, store)  # an incomplete store is refused before the model generates anything
    queries = _queries(args, model, tokenizer)
    features = attr.query_features(llm.query_batches(tokenizer, queries, config["batch_size"], config["max_length"],
                                                     config["token_batch_size"]))
    top = attr.top_k(k=args.top_k, features=features)
    bottom = attr.top_k(k=args.top_k, largest=False, features=features)
    results = [Attribution(q, [(docs[j], float(s)) for j, s in zip(top[1][i], top[0][i])],
                           [(docs[j], float(s)) for j, s in zip(bottom[1][i], bottom[0][i])])
               for i, q in enumerate(queries)]
    meta = {"model": config["model"], "method": "if", "compressor": config["compressor"], "k": config["k"],
            "damping": config["damping"], "documents": len(docs)}
    paths = write_reports(args.out, results, meta)
    print(json.dumps({"reports": {k: str(v) for k, v in paths.items()},
                      "queries": [{"prompt": r.query["prompt"], "completion": r.query["completion"],
                                   "top": [d["id"] for d, _ in r.helpful]} for r in results]}))
    return results


def _check_rows(attr, docs, store) -> None:
    if attr.n_train != len(docs):
        raise StoreError(f"{store}: docs.jsonl lists {len(docs)} documents but the store holds {attr.n_train} rows")


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
    model, tokenizer = llm.load_model(config["model"], config["gguf_file"], config["dtype"])
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
    scores = attr.attribute(llm.query_batches(tokenizer, targets, config["batch_size"], config["max_length"],
                                              config["token_batch_size"]))
    mean = scores.mean(0)  # LESS: average cosine similarity to the target set
    n_keep = max(1, int(round(args.fraction * len(docs))))
    keep = mean.topk(n_keep).indices.tolist()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for j in keep:
            f.write(json.dumps({**docs[j], "score": float(mean[j])}) + "\n")
    print(json.dumps({"selected": n_keep, "of": len(docs), "out": str(out), "top": [docs[j]["id"] for j in keep[:5]]}))
    return keep


def cmd_verify(args):
    """Check every file of a store against its checksums; exit status 1 on any problem."""
    report = open_store(args.store).verify()
    print(json.dumps(report, indent=1))
    if not report["ok"]:
        raise SystemExit(1)
    return report


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
    cache.add_argument("--k", type=_positive_int, default=256, help="compressed dimension per layer")
    cache.add_argument("--max-length", type=_max_length, default=128)
    cache.add_argument("--batch-size", type=_positive_int, default=4, help="documents per batch (at most)")
    cache.add_argument("--token-batch-size", type=_positive_int, default=None,
                       help="padded tokens per batch (at most); documents are grouped by length, so no compute is "
                            "spent on padding beyond each batch's longest document")
    cache.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="dtype of the stored gradients (bfloat16 halves the store)")
    cache.add_argument("--dtype", default="float32", choices=sorted(llm.DTYPES))
    cache.add_argument("--damping", type=_nonnegative_float, default=1e-3)
    cache.add_argument("--seed", type=int, default=0)
    cache.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                       help="torch.compile the cache step (default; --no-compile runs it eagerly)")
    cache.set_defaults(func=cmd_cache)

    demo = sub.add_parser("demo", help="the embedded default: cache + attribute the default prompts")
    for action in cache._actions:
        if action.dest not in ("help", "store"):
            demo._add_action(action)
    demo.add_argument("--store", default="out/llm/store")
    demo.add_argument("--prompt", action="append", type=_nonempty, help="prompts (default: the paper's and three docs questions)")
    demo.add_argument("--prompts", default=None)
    demo.add_argument("--task", default=None)
    demo.add_argument("--include-path", default=None)
    demo.add_argument("--query-limit", type=_positive_int, default=None)
    demo.add_argument("--generate", type=_positive_int, default=24)
    demo.add_argument("--top-k", type=_positive_int, default=5)
    demo.add_argument("--out", default="out/llm")
    demo.set_defaults(func=cmd_demo)

    for name, helptext in (("attribute", "top-k training documents for prompts / completions"),
                           ("select", "LESS-style data selection against a target set")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--store", required=True)
        p.add_argument("--task", default=None, help="an lm-eval task as the query/target set")
        p.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
        p.add_argument("--query-limit", type=_positive_int, default=None)
        if name == "attribute":
            p.add_argument("--prompt", action="append", type=_nonempty, help="a prompt (repeatable); completed by the model")
            p.add_argument("--prompts", default=None, help="jsonl of {prompt[, completion]}")
            p.add_argument("--generate", type=_positive_int, default=24, help="new tokens of each completion")
            p.add_argument("--top-k", type=_positive_int, default=5)
            p.add_argument("--out", default="out/llm_report")
            p.set_defaults(func=cmd_attribute)
        else:
            p.add_argument("--target", default=None, help="jsonl of {prompt, completion} or {text}")
            p.add_argument("--fraction", type=_fraction, default=0.1)
            p.add_argument("--out", default="out/selected.jsonl")
            p.set_defaults(func=cmd_select)

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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
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
    actions = {a.dest: a for a in sub._actions if a.option_strings and a.dest != "help"}
    unknown = sorted(k for k in values if k not in actions)
    if unknown:
        raise CLIError(f"--config {path}: unknown keys {unknown} for `{command}`")
    flags: list[str] = []
    for key, value in values.items():
        if key in given:
            continue
        action, flag = actions[key], actions[key].option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
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
            flags += [flag, str(value)]
    return flags


def run(argv=None):
    """Parse and run one subcommand; returns its result (main() is the console entry point)."""
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
    return args.func(args)


def main(argv=None) -> int:
    """Console entry point: expected errors (bad input, a store that cannot serve the request) are
    printed as one line with exit status 2; anything else keeps its traceback."""
    try:
        run(argv)
    except (ValueError, FileNotFoundError, StoreError, FloatingPointError) as err:
        print(f"grass-attribute: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
