#!/usr/bin/env python
"""Memory per rank with and without --fsdp (issue 20, item 1): `grass-attribute cache` of the embedded SmolLM2-135M
under torchrun with --ranks gloo ranks on this CPU, once with every rank holding the whole model (data parallel) and
once sharded with FSDP2 (--fsdp), in turns (A B A B). Each worker's RSS is sampled every --interval seconds: the
peak per rank over the whole process (the load included: every rank loads the whole model before sharding it)
and over the cache phase alone (from the phase seconds rank 0 prints), with the wall time. Then, per rank, the
settled RSS (after glibc's malloc_trim) at each stage of an Attributor's life in one process: loaded, sharded,
built (the weights' fingerprint), after each of two compressed batches. Prints JSON.

    python scripts/bench_fsdp.py                         # 48 Python-docs paragraphs at <= 128 tokens, 2 ranks
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from grass_ops.benchmarking import emit_json_report  # noqa: E402

PRE_CACHE_PHASES = ("load_model", "tokenize", "masks", "attributor")


def sampled_run(cmd: list[str], env: dict, interval: float) -> dict:
    """Run ``cmd``; sample the RSS of each of its descendants (the ranks) every ``interval`` s."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    parent = psutil.Process(proc.pid)
    samples: list[tuple[float, dict[int, int]]] = []
    while proc.poll() is None:
        per = {}
        for child in parent.children(recursive=True):
            try:
                per[child.pid] = child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        samples.append((time.perf_counter() - start, per))
        time.sleep(interval)
    out, err = proc.communicate()
    return {"seconds": time.perf_counter() - start, "status": proc.returncode, "stdout": out, "stderr": err[-3000:],
            "samples": samples}


def summarize(run: dict) -> dict:
    summary = json.loads(run["stdout"].strip().splitlines()[-1])
    workers = [(t, per) for t, per in run["samples"] if len(per) > 1]  # torchrun's ranks are up
    begin = workers[0][0] if workers else 0.0
    cache_start = begin + sum(summary["seconds"].get(k, 0.0) for k in PRE_CACHE_PHASES)
    ranks = sorted({pid for _, per in run["samples"] for pid in per})

    def peak(after: float) -> float:
        return max((per.get(pid, 0) for t, per in run["samples"] if t >= after for pid in ranks), default=0) / 2**20

    return {"seconds": run["seconds"], "peak_rank_rss_mb": peak(0.0), "cache_phase_peak_rank_rss_mb": peak(cache_start),
            "phases": summary["seconds"], "documents": summary["documents"], "layers": summary["layers"]}


def staged_worker(mode: str, folder: str, store: str, max_length: int) -> None:
    """Under torchrun: one rank's settled RSS at each stage, printed as a JSON line."""
    import psutil
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from attribution import Attributor
    from attribution.llm import sequence_loss
    from attribution.sharding import shard
    from grass_ops.benchmarking import release_freed_memory

    dist.init_process_group("gloo")
    stages = {}

    def settled(stage: str) -> None:
        release_freed_memory()
        stages[stage] = psutil.Process().memory_info().rss / 2**20

    settled("start")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    settled("loaded")
    if mode == "fsdp":
        model = shard(model)
        settled("sharded")
    attr = Attributor(model, sequence_loss, compressor="factgrass:blowup=4", k=256, layers=["model.layers.*"],
                      compile=False, progress=False, store=store)
    settled("attributor")
    ids = torch.randint(0, model.config.vocab_size, (4, max_length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    for i in range(2):
        attr.compress_batch(batch)
        settled(f"batch {i + 1}")
    print(json.dumps({"rank": dist.get_rank(), "settled_rss_mb": stages}), flush=True)
    dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "grass_bench_peer"))
    parser.add_argument("--worker", choices=["whole", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return staged_worker(args.worker, str(Path(args.cache) / "smollm2"), args.store, args.max_length)
    from bench_peer import corpus, smollm2_folder

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    folder = smollm2_folder(cache)
    runs: dict[str, list] = {"whole": [], "fsdp": []}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus.jsonl"
        tokens = corpus(data, folder, args.documents, args.max_length, join=False)
        for _ in range(args.repeats):
            for name in runs:
                store = Path(tmp) / "store"
                shutil.rmtree(store, ignore_errors=True)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
                       "-m", "attribution.llm.cli", "cache", "--store", str(store), "--model", str(folder), "--corpus",
                       str(data), "--limit", str(args.documents), "--max-length", str(args.max_length), "--no-compile",
                       "--autocast", "none", *(["--fsdp"] if name == "fsdp" else [])]
                run = sampled_run(cmd, env, args.interval)
                if run["status"] != 0:
                    raise RuntimeError(f"the {name} run failed: {run['stderr']}")
                runs[name].append(summarize(run))
        settled = {}
        for name in runs:
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                   str(args.ranks), __file__, "--worker", name, "--cache", str(cache), "--store",
                                   str(Path(tmp) / f"staged_{name}"), "--max-length", str(args.max_length)],
                                  env=env, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"the staged {name} run failed: {done.stderr[-3000:]}")
            settled[name] = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    out = {"model": "SmolLM2-135M float32", "ranks": args.ranks, "documents": args.documents, "tokens": tokens,
           "threads_per_rank": 1, "repeats": args.repeats}
    for name, rs in runs.items():
        out[name] = {key: statistics.median(r[key] for r in rs)
                     for key in ("seconds", "peak_rank_rss_mb", "cache_phase_peak_rank_rss_mb")}
        out[name]["runs"] = rs
    out["fsdp_over_whole"] = {key: out["fsdp"][key] / out["whole"][key]
                              for key in ("seconds", "peak_rank_rss_mb", "cache_phase_peak_rank_rss_mb")}
    for name, ranks in settled.items():
        out[name]["settled_rss_mb"] = {r["rank"]: r["settled_rss_mb"] for r in ranks}
    emit_json_report(out)
    return out


if __name__ == "__main__":
    main()
