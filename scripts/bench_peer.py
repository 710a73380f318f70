#!/usr/bin/env python
"""The cache stage beside EleutherAI's Bergson on one job, whole processes in turns (A B A B), and the
steady-state throughput of each from two corpus sizes. Prints JSON.

    bash ../shared/peers/bergson-venv.sh                             # Bergson in its own venv (once)
    python scripts/bench_peer.py --job main                          # SmolLM2-135M, 96 docs x 128 tokens
    python scripts/bench_peer.py --job main --precision bf16         # both in bfloat16 weights
    python scripts/bench_peer.py --job llama-1b --layers 4 8 16      # a random ~1B Llama, 32 docs x 512

Jobs (the same documents for both: each text cut to at most --max-length tokens of the model's
tokenizer before either tool sees it):
* main: the embedded SmolLM2-135M-Instruct (re-saved as a folder for Bergson), the first --documents
  Python-docs paragraphs at <= 128 tokens, every linear layer of the decoder blocks, 256 floats per
  layer (Bergson: projection 16 x 16 per module), batches of at most 4 documents.
* llama-1b: a Llama from a config with random weights (hidden 2048, intermediate 8192, 32 heads with 8
  KV heads; SmolLM2's tokenizer and its 49,152-token vocabulary, so that Bergson can read the folder),
  --layers decoder layers, 32 documents of 512 tokens (Python-docs paragraphs joined), batches of 4.

Ours runs `grass-attribute cache` with its defaults plus the job's shape (``--precision`` fp32 adds
``--autocast none``, bf16 adds ``--dtype bfloat16 --autocast none``; "default" leaves both at their
defaults); Bergson runs `bergson build` with ``--precision`` (fp32 for "default"). Wall time and peak
RSS are the child process's (os.wait4). Steady state: tokens of the larger corpus minus the smaller,
over the difference of the two wall times (load and fixed costs cancel). ``--compile on`` compiles our
cache step in both runs; its compile time (from our summary) is taken off each wall time first, so the
steady state is the compiled step's. ``--tools model`` adds the
reference floor: a process that runs only the model's forward and its backward to the input embeddings
over our batches, eagerly, at the same precision (what any tool's backward has to reach).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grass_ops.benchmarking import emit_json_report, run_measured  # noqa: E402

BERGSON = Path(os.environ.get("BERGSON_VENV", Path.home() / ".cache" / "bergson-venv")) / "bin" / "bergson"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=4096)


def smollm2_folder(cache: Path) -> Path:
    """The embedded SmolLM2 GGUF re-saved as a Hugging Face folder (once)."""
    folder = cache / "smollm2"
    if not (folder / "model.safetensors").is_file():
        from attribution import llm
        from attribution.llm.demo import save_folder

        model, tokenizer = llm.load_model(llm.DEFAULT_MODEL)
        save_folder(model, tokenizer, folder)
    return folder


def llama_folder(cache: Path, layers: int) -> Path:
    """A seeded random Llama of ``layers`` decoder layers (float32 safetensors) with SmolLM2's tokenizer."""
    folder = cache / f"llama1b_{layers}"
    if not (folder / "model.safetensors").is_file():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(cache))
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B, num_hidden_layers=layers, vocab_size=len(tokenizer),
                                             pad_token_id=tokenizer.pad_token_id))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def corpus(path: Path, model_folder: Path, documents: int, max_length: int, join: bool) -> int:
    """Write ``documents`` texts of at most ``max_length`` tokens (joined paragraphs when ``join``);
    returns their total tokens."""
    from transformers import AutoTokenizer

    from attribution import llm

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    paragraphs = [d["text"] for d in llm.python_docs_corpus(limit=None)]
    texts, total = [], 0
    i = 0
    while len(texts) < documents:
        if i >= len(paragraphs):
            raise SystemExit(f"the Python-docs corpus has too few paragraphs for {documents} documents")
        ids = tokenizer(paragraphs[i])["input_ids"]
        i += 1
        while join and len(ids) < max_length and i < len(paragraphs):
            ids += tokenizer("\n\n" + paragraphs[i])["input_ids"]
            i += 1
        ids = ids[:max_length]
        texts.append(tokenizer.decode(ids))
        total += len(tokenizer(texts[-1])["input_ids"])
    path.write_text("".join(json.dumps({"id": f"d{n}", "text": t}) + "\n" for n, t in enumerate(texts)))
    return total


def ours(folder: Path, data: Path, documents: int, max_length: int, precision: str, work: Path,
         compile: str = "auto") -> dict:
    flags = {"fp32": ["--autocast", "none"], "bf16": ["--dtype", "bfloat16", "--autocast", "none"], "default": []}[precision]
    flags += ["--compile", compile]
    store = work / "ours_store"
    shutil.rmtree(store, ignore_errors=True)
    run = run_measured([sys.executable, "-m", "attribution.llm.cli", "cache", "--store", str(store), "--model", str(folder),
                        "--corpus", str(data), "--limit", str(documents), "--max-length", str(max_length),
                        "--batch-size", "4", *flags], env={**os.environ, "PYTHONPATH": str(REPO)})
    if run["status"] != 0:
        raise RuntimeError(f"grass-attribute cache failed: {run['stderr_tail']}")
    summary = json.loads(run["stdout"].strip().splitlines()[-1])
    return {"seconds": run["seconds"], "peak_rss_mb": run["peak_rss_bytes"] / 2**20, "summary": summary}


def bergson(folder: Path, data: Path, max_length: int, precision: str, work: Path) -> dict:
    if not BERGSON.is_file():
        raise SystemExit(f"Bergson is not installed at {BERGSON}: run bash ../shared/peers/bergson-venv.sh")
    out = work / "bergson_index"
    shutil.rmtree(out, ignore_errors=True)
    run = run_measured([str(BERGSON), "build", str(out), "--model", str(folder), "--dataset", str(data),
                        "--prompt_column", "text", "--projection_dim", "16",
                        "--precision", "fp32" if precision == "default" else precision,
                        "--token_batch_size", str(4 * max_length), "--max_batch_size", "4"])
    if run["status"] != 0:
        raise RuntimeError(f"bergson build failed: {run['stderr_tail']}")
    return {"seconds": run["seconds"], "peak_rss_mb": run["peak_rss_bytes"] / 2**20}


def model_only(folder: Path, data: Path, max_length: int, precision: str) -> dict:
    """The reference floor: a process that loads the model and runs only its forward and input-gradient
    backward over our batches of the corpus (no hook, no compression, no store), eagerly."""
    run = run_measured([sys.executable, str(Path(__file__).resolve()), "--model-only", str(folder), str(data),
                        str(max_length), precision], env={**os.environ, "PYTHONPATH": str(REPO)})
    if run["status"] != 0:
        raise RuntimeError(f"the model-only run failed: {run['stderr_tail']}")
    return {"seconds": run["seconds"], "peak_rss_mb": run["peak_rss_bytes"] / 2**20,
            "loop_seconds": json.loads(run["stdout"].strip().splitlines()[-1])["loop_seconds"]}


def _model_only_child(folder: str, data: str, max_length: str, precision: str) -> None:
    """--model-only: forward + backward to the input embeddings' output (what every tool's backward must
    reach), the weights frozen; precision as ours takes it (default: float32 weights, bfloat16 autocast)."""
    import time

    import torch

    from attribution import llm

    model, tokenizer = llm.load_model(folder, dtype="bfloat16" if precision == "bf16" else "float32")  # as ours
    model.eval().requires_grad_(False)
    docs = [doc for _, doc in llm.read_jsonl(Path(data), "corpus")]
    batches, _ = llm.document_batches(tokenizer, docs, 4, int(max_length))
    embedded = []
    model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: embedded.append(out.detach().requires_grad_()) or embedded[-1])
    autocast = precision == "default" and llm.fast_bfloat16("cpu")
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = llm.sequence_loss(model, batch).sum()
        torch.autograd.grad(loss, embedded.pop())
    print(json.dumps({"loop_seconds": time.perf_counter() - start}))


def _steady_seconds(measured: dict) -> float:
    """A size's median wall time less our median compile time: one compile varies by seconds from run to run,
    which the difference of two sizes would otherwise count as work."""
    compiles = [r["summary"]["compile_seconds"] for r in measured["runs"] if "summary" in r]
    return measured["seconds"] - (statistics.median(compiles) if compiles else 0.0)


def compare(folder: Path, documents: int, max_length: int, precision: str, repeats: int, join: bool, work: Path,
            steady: bool = True, tools: tuple[str, ...] = ("ours", "bergson"), compile: str = "auto") -> dict:
    """A B A B on ``documents`` and (``steady``) on twice as many, for the steady state."""
    sizes = {}
    for n in (documents, 2 * documents) if steady else (documents,):
        data = work / f"corpus_{n}.jsonl"
        tokens = corpus(data, folder, n, max_length, join)
        runs = {tool: [] for tool in tools}
        for _ in range(repeats):
            for tool in tools:
                runs[tool].append(ours(folder, data, n, max_length, precision, work, compile) if tool == "ours"
                                  else model_only(folder, data, max_length, precision) if tool == "model"
                                  else bergson(folder, data, max_length, precision, work))
        sizes[n] = {"tokens": tokens, **{tool: {"seconds": statistics.median(r["seconds"] for r in rs),
                                                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                                                "runs": rs} for tool, rs in runs.items()}}
    small = sizes[documents]
    out = {"sizes": sizes}
    for tool in tools:
        out[f"{tool}_whole_process_tokens_per_s"] = small["tokens"] / small[tool]["seconds"]
        if steady:
            large = sizes[2 * documents]
            extra = _steady_seconds(large[tool]) - _steady_seconds(small[tool])
            out[f"{tool}_steady_tokens_per_s"] = (large["tokens"] - small["tokens"]) / extra if extra > 0 else None
    if steady and "ours" in tools and len({r["summary"]["compiled"] for size in sizes.values()
                                           for r in size["ours"]["runs"]}) > 1:  # --compile auto compiled one size only
        out["ours_steady_tokens_per_s"] = None
        out["ours_steady_note"] = "one corpus size ran compiled and the other eagerly: no steady state (use --compile on|off)"
    if {"ours", "model"} <= set(tools) and steady and out["ours_steady_tokens_per_s"] and out["model_steady_tokens_per_s"]:
        out["steady_ratio_ours_over_model"] = out["ours_steady_tokens_per_s"] / out["model_steady_tokens_per_s"]
    if {"ours", "bergson"} <= set(tools):
        out["wall_ratio_ours_over_bergson"] = small["ours"]["seconds"] / small["bergson"]["seconds"]
        out["rss_ratio_ours_over_bergson"] = small["ours"]["peak_rss_mb"] / small["bergson"]["peak_rss_mb"]
        if steady and out["ours_steady_tokens_per_s"] and out["bergson_steady_tokens_per_s"]:
            out["steady_ratio_ours_over_bergson"] = out["ours_steady_tokens_per_s"] / out["bergson_steady_tokens_per_s"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=["main", "llama-1b"], default="main")
    parser.add_argument("--precision", choices=["default", "fp32", "bf16"], default="default")
    parser.add_argument("--documents", type=int, default=None, help="default: 96 (main), 32 (llama-1b)")
    parser.add_argument("--layers", type=int, nargs="+", default=[16], help="llama-1b: decoder layers (one run each)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tool per corpus size, in turns")
    parser.add_argument("--steady", action=argparse.BooleanOptionalAction, default=True,
                        help="also run twice the documents, for the steady-state tokens/s")
    parser.add_argument("--tools", nargs="+", choices=["ours", "bergson", "model"], default=["ours", "bergson"],
                        help="model: the reference floor, the model's own forward and input-gradient backward only")
    parser.add_argument("--compile", choices=["auto", "on", "off", "regional"], default="auto",
                        help="ours: grass-attribute cache --compile (in every mode our compile time is left out of "
                             "the steady state)")
    parser.add_argument("--bergson-layers", type=int, nargs="*", default=None,
                        help="llama-1b: the layer counts Bergson also runs (default: all of --layers)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "grass_bench_peer"),
                        help="where the model folders are kept between runs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    report = {"job": args.job, "precision": args.precision, "compile": args.compile, "repeats": args.repeats,
              "cpu_count": os.cpu_count(),
              "bergson": str(BERGSON), "results": {}}
    with tempfile.TemporaryDirectory(prefix="grass_peer_") as tmp:
        work = Path(tmp)
        if args.job == "main":
            report["results"]["smollm2"] = compare(smollm2_folder(cache), args.documents or 96, 128, args.precision,
                                                   args.repeats, False, work, args.steady, tuple(args.tools),
                                                   args.compile)
        else:
            for layers in args.layers:
                tools = tuple(t for t in args.tools if t != "bergson" or args.bergson_layers is None or layers in args.bergson_layers)
                report["results"][f"layers_{layers}"] = compare(llama_folder(cache, layers), args.documents or 32, 512,
                                                                args.precision, args.repeats, True, work, args.steady, tools,
                                                                args.compile)
                emit_json_report({**report, "partial": True}, args.out, quiet=True)
    emit_json_report(report, args.out)
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--model-only"]:
        _model_only_child(*sys.argv[2:])
    else:
        main()
