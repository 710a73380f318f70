#!/usr/bin/env python
"""The cache stage on a LoRA adapter against the full model (issue 20, item 2): `grass-attribute cache` on the
embedded SmolLM2-135M with its defaults, once over every linear layer of the blocks and once with ``--adapter``
(a seeded random LoRA of rank --rank on all seven projections of every block: its lora_A / lora_B are the
default layers), whole processes in turns (A B A B), wall time and peak RSS of each. Prints JSON.

    python scripts/bench_lora.py                      # 96 Python-docs paragraphs at <= 128 tokens, rank 16
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
sys.path.insert(0, str(REPO / "scripts"))

from bench_peer import corpus, smollm2_folder  # noqa: E402

from grass_ops.benchmarking import emit_json_report, run_measured  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter_folder(cache: Path, model_folder: Path, rank: int) -> Path:
    """A seeded LoRA of ``rank`` on every projection, both factors random (a trained adapter's B is not zero)."""
    folder = cache / f"lora_r{rank}"
    if not (folder / "adapter_config.json").is_file():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_folder)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS, lora_dropout=0.0,
                            init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(folder)
    return folder


def cache_run(model_folder: Path, data: Path, documents: int, adapter: Path | None, work: Path) -> dict:
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    extra = ["--adapter", str(adapter)] if adapter is not None else []
    run = run_measured([sys.executable, "-m", "attribution.llm.cli", "cache", "--store", str(store), "--model",
                        str(model_folder), "--corpus", str(data), "--limit", str(documents), *extra],
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if run["status"] != 0:
        raise RuntimeError(f"grass-attribute cache failed: {run['stderr_tail']}")
    summary = json.loads(run["stdout"].strip().splitlines()[-1])
    manifest = json.loads((store / "manifest.json").read_text())
    return {"seconds": run["seconds"], "peak_rss_mb": run["peak_rss_bytes"] / 2**20, "layers": len(manifest["layers"]),
            "attributed_parameters": sum(d_in * d_out for d_in, d_out, _ in manifest["layers"].values()),
            "phases": summary.get("seconds")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "grass_bench_peer"),
                        help="where the re-saved SmolLM2 folder and the adapter are kept between runs")
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model_folder = smollm2_folder(cache)
    adapter = adapter_folder(cache, model_folder, args.rank)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "corpus.jsonl"
        tokens = corpus(data, model_folder, args.documents, args.max_length, join=False)
        runs = {"full": [], "lora": []}
        for _ in range(args.repeats):  # A B A B
            runs["full"].append(cache_run(model_folder, data, args.documents, None, work))
            runs["lora"].append(cache_run(model_folder, data, args.documents, adapter, work))
    out = {"documents": args.documents, "tokens": tokens, "rank": args.rank, "projections": PROJECTIONS}
    for name, rs in runs.items():
        out[name] = {"seconds": statistics.median(r["seconds"] for r in rs),
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                     "layers": rs[0]["layers"], "attributed_parameters": rs[0]["attributed_parameters"], "runs": rs}
    out["wall_ratio_lora_over_full"] = out["lora"]["seconds"] / out["full"]["seconds"]
    out["rss_ratio_lora_over_full"] = out["lora"]["peak_rss_mb"] / out["full"]["peak_rss_mb"]
    emit_json_report(out)
    return out


if __name__ == "__main__":
    main()
