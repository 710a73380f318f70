#!/usr/bin/env python
"""The training overhead of GradientCacheCallback (issue 20, item 3): Trainer.train() of the embedded SmolLM2-135M
(float32, AdamW) over Python-docs paragraphs, without the callback and with it recording every --every-th step into a
store at its defaults (factgrass:blowup=4, k=256, every linear layer of the blocks), from the training step's own
backward (fused, the default) or recomputed in eval mode, each a fresh process, in turns (A B C A B C). The figure is
the train() wall time (the model load excluded) and the process's peak RSS. Prints JSON.

    python scripts/bench_trainer_callback.py          # 12 steps of 4 documents of <= 128 tokens: fused:1 recompute:1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from grass_ops.benchmarking import emit_json_report, run_measured  # noqa: E402


def child(args) -> None:
    """One training run in this process; prints {"train_seconds", "recorded_rows"}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from attribution.integrations import GradientCacheCallback

    torch.manual_seed(0)
    folder = Path(args.cache) / "smollm2"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    texts = [json.loads(line)["text"] for line in Path(args.corpus).read_text().splitlines()]
    data = [{"input_ids": tokenizer(t, truncation=True, max_length=args.max_length)["input_ids"]} for t in texts]

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    callbacks = []
    if args.config != "none":
        mode, every = args.config.split(":")
        callbacks.append(GradientCacheCallback(Path(args.work) / f"store_{time.time_ns()}", every=int(every),
                                               fused=mode == "fused"))
    training = TrainingArguments(output_dir=str(Path(args.work) / "out"), per_device_train_batch_size=args.batch,
                                 max_steps=args.steps, learning_rate=1e-5, report_to=[], use_cpu=True, seed=0,
                                 remove_unused_columns=False, logging_strategy="no", save_strategy="no",
                                 disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=data, data_collator=collate, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    rows = None
    if callbacks:
        from attribution.integrations import recorded_rows

        rows = len(recorded_rows(callbacks[0].store_path))
    print(json.dumps({"train_seconds": seconds, "recorded_rows": rows, "mode": callbacks[0].mode if callbacks else None}))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--configs", nargs="+", default=["fused:1", "recompute:1"],
                        help="MODE:EVERY with MODE fused or recompute (the run without the callback comes first)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "grass_bench_peer"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    from bench_peer import corpus, smollm2_folder

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    folder = smollm2_folder(cache)
    configs = ["none", *args.configs]
    runs: dict[str, list] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus.jsonl"
        tokens = corpus(data, folder, args.steps * args.batch, args.max_length, join=True)
        for _ in range(args.repeats):  # A B C A B C
            for config in configs:
                run = run_measured([sys.executable, __file__, "--child", "--config", config, "--corpus", str(data),
                                    "--work", tmp, "--cache", str(cache), "--steps", str(args.steps), "--batch",
                                    str(args.batch), "--max-length", str(args.max_length)],
                                   env={**os.environ, "PYTHONPATH": str(REPO)})
                if run["status"] != 0:
                    raise RuntimeError(f"the training run failed: {run['stderr_tail']}")
                result = json.loads(run["stdout"].strip().splitlines()[-1])
                runs[config].append({**result, "process_seconds": run["seconds"], "peak_rss_mb": run["peak_rss_bytes"] / 2**20})
    out = {"model": "SmolLM2-135M float32", "steps": args.steps, "batch": args.batch, "tokens": tokens,
           "compressor": "factgrass:blowup=4, k=256 (the callback's defaults)", "repeats": args.repeats}
    for config, rs in runs.items():
        out[config] = {"train_seconds": statistics.median(r["train_seconds"] for r in rs),
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                     "recorded_rows": rs[0]["recorded_rows"], "mode": rs[0]["mode"], "runs": rs}
    base = out["none"]
    for config in args.configs:
        entry = out[config]
        entry["overhead"] = entry["train_seconds"] / base["train_seconds"] - 1
        entry["rss_ratio"] = entry["peak_rss_mb"] / base["peak_rss_mb"]
    emit_json_report(out)
    return out


if __name__ == "__main__":
    main()
