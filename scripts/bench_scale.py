#!/usr/bin/env python
"""Attribution at scale (JSON): a synthetic store of N documents x 4096 bfloat16 values written through the
real store API, 1,000 queries, and for each N:

* write: the store through Attributor.cache_gradients (shards of --shard-rows rows, checksums, completion record);
* exact: exact top-10 (Attributor.top_k, streamed, memory_budget 1 GiB) in a fresh process with the store's
  pages evicted from the page cache first (read from disk), wall time and peak RSS (VmHWM) of that process;
* index: the FAISS index (Attributor.build_index) built, then queried (top_k(index=True): candidates from
  the index re-ranked exactly against the stored rows), cold (pages evicted) and warm; recall@10 against exact;
* ranks: exact top-10 with 2 gloo ranks (torch.multiprocessing, one thread each), equality with 1 rank.

Then the projected time and storage of the paper's job (1B tokens, Llama-3.1-8B, 1 and 8 H200s) with our
defaults, every input marked measured or assumed.

The synthetic documents: x = a * H2 D2 H1 D1 (s * z), z ~ N(0, I_4096), s_j^2 proportional to 1/j (a power-law
spectrum, as gradient covariances have), D random signs, H the orthonormal Hadamard transform (the
mixing a sparse JL projection does), a ~ LogNormal(0, 0.25) per document (spread of gradient norms);
queries drawn the same way. --spectrum isotropic drops s (every direction alike: the hardest case for
any ANN index). The exact figures do not depend on the data, the ANN recall does.

    python scripts/bench_scale.py --sizes 100000 1000000 --out out/bench_scale.json   # ~1 h on 2 cores
    python scripts/bench_scale.py --sizes 20000 --queries 100 --steps write exact index ranks   # a quick run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from grass_ops.benchmarking import emit_json_report

HERE = Path(__file__).resolve()
COLUMNS = 4096


# ---- the synthetic store ------------------------------------------------------------------------------
def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


class Synthetic:
    """Reproducible gradient-like rows: row i depends only on (seed, stream, i // chunk)."""

    def __init__(self, columns: int = COLUMNS, spectrum: str = "power", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.columns, self.seed = columns, seed
        scale = torch.arange(1, columns + 1, dtype=torch.float32).pow(-0.5) if spectrum == "power" else torch.ones(columns)
        self.scale = scale / scale.norm()
        self.signs = [torch.randint(0, 2, (columns,), generator=gen).float() * 2 - 1 for _ in range(2)]
        a = 2 ** (int(math.log2(columns)) // 2)
        self.ha, self.hb = _hadamard(a), _hadamard(columns // a)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:  # H = H_a (x) H_b, applied as H_a X H_b
        return (self.ha @ x.reshape(-1, self.ha.shape[0], self.hb.shape[0]) @ self.hb).reshape(-1, self.columns)

    def rows(self, start: int, n: int, stream: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + stream) * 2**32 + start)
        z = torch.randn(n, self.columns, generator=gen) * (self.scale * self.signs[0])
        x = self._mix(self._mix(z) * self.signs[1])
        return x * torch.exp(0.25 * torch.randn(n, 1, generator=gen))


def _attributor(store: Path, memory_budget: int = 1 << 30):
    from attribution import Attributor

    torch.manual_seed(0)
    side = int(math.isqrt(COLUMNS))
    model = torch.nn.Linear(side, side, bias=False)  # identity compressor: exactly COLUMNS columns per document
    return Attributor(model, _loss, method="graddot", compressor="identity", k=COLUMNS, store=store, compile=False,
                      progress=False, storage_dtype="bfloat16", memory_budget=memory_budget)


def _loss(model, batch):
    return model(batch).square().sum(1)


def _queries(root: Path, n_queries: int, spectrum: str) -> Path:
    path = root / f"queries_{spectrum}_{n_queries}.npy"
    if not path.exists():
        np.save(path, Synthetic(spectrum=spectrum).rows(0, n_queries, stream=1).numpy())
    return path


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _evict(path: Path) -> None:
    """Drop the store's pages from the page cache (POSIX_FADV_DONTNEED): the next read comes from disk."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _peak_rss() -> dict:
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    hwm = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
    return {"vmhwm_mib": round(hwm[0] / 1024, 1) if hwm else None,
            "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# ---- steps (each measuring step runs in its own process) ------------------------------------------------
def step_write(store: Path, n: int, shard_rows: int, spectrum: str) -> dict:
    data = Synthetic(spectrum=spectrum)
    chunk = 4096
    start = time.perf_counter()

    def batches():
        for lo in range(0, n, chunk):
            rows = data.rows(lo, min(chunk, n - lo))
            yield from rows.split(shard_rows)

    _attributor(store).cache_gradients(batches())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "documents": n, "shard_rows": shard_rows, "shards": math.ceil(n / shard_rows),
            "bytes": _du(store), **_peak_rss()}


def step_exact(store: Path, queries: Path, out: Path, k: int) -> dict:
    q = torch.from_numpy(np.load(queries))
    attr = _attributor(store)
    _evict(store)
    start = time.perf_counter()
    values, indices = attr.top_k(features=attr.features_from_gradients(q), k=k)
    seconds = time.perf_counter() - start
    np.save(out / "exact_indices.npy", indices.numpy())
    np.save(out / "exact_values.npy", values.numpy())
    n = attr.n_train
    return {"seconds": seconds, "threads": torch.get_num_threads(), "memory_budget": attr.memory_budget,
            "rows_per_block": attr._row_budget(q.shape[0]), "gflops": 2 * q.shape[0] * n * COLUMNS / seconds / 1e9,
            "store_gib_per_s": n * COLUMNS * 2 / seconds / 2**30, **_peak_rss()}


def _recall(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / exact.shape[1] for a, b in zip(got, exact)]))


def step_index(store: Path, queries: Path, out: Path, k: int, factory: str, project: int, nprobe: int | None,
               candidates: int | None) -> dict:
    from attribution import index as index_module

    q = torch.from_numpy(np.load(queries))
    attr = _attributor(store)
    features = attr.features_from_gradients(q)
    _evict(store)
    summary = attr.build_index(factory, project=project or None, nprobe=nprobe)
    exact = np.load(out / "exact_indices.npy")
    result = {"build": summary, "queries": {}}
    records = attr._records()
    loaded = index_module.load(attr.store, records, [0], "ip")
    start = time.perf_counter()
    ids = loaded.search(q, candidates or max(10 * k, 100), nprobe)
    result["faiss_search_seconds"] = time.perf_counter() - start
    result["candidate_recall"] = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ids, exact)]))
    for label in ("cold", "warm"):
        if label == "cold":
            _evict(store)
        start = time.perf_counter()
        _, indices = attr.top_k(features=features, k=k, index=True, candidates=candidates, nprobe=nprobe)
        result["queries"][label] = {"seconds": time.perf_counter() - start, f"recall@{k}": _recall(indices.numpy(), exact)}
    result.update(_peak_rss())
    return result


def _rank_worker(rank: int, world: int, init: str, store: str, queries: str, out: str, k: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        q = torch.from_numpy(np.load(queries))
        attr = _attributor(Path(store))
        if rank == 0:
            _evict(Path(store))
        dist.barrier()
        start = time.perf_counter()
        values, indices = attr.top_k(features=attr.features_from_gradients(q), k=k)
        seconds = time.perf_counter() - start
        np.save(Path(out) / f"rank{rank}_indices.npy", indices.numpy())
        np.save(Path(out) / f"rank{rank}_values.npy", values.numpy())
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"seconds": seconds, **_peak_rss()}))
    finally:
        dist.destroy_process_group()


def step_ranks(store: Path, queries: Path, out: Path, k: int, world: int = 2) -> dict:
    import torch.multiprocessing as mp

    init = out / "rank_init"
    init.unlink(missing_ok=True)
    start = time.perf_counter()
    mp.spawn(_rank_worker, args=(world, str(init), str(store), str(queries), str(out), k), nprocs=world, join=True)
    wall = time.perf_counter() - start
    exact_i, exact_v = np.load(out / "exact_indices.npy"), np.load(out / "exact_values.npy")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    same = []
    for r in range(world):
        got_i, got_v = np.load(out / f"rank{r}_indices.npy"), np.load(out / f"rank{r}_values.npy")
        same.append({"indices_equal_to_1_rank": bool(np.array_equal(got_i, exact_i)),
                     "values_max_abs_diff": float(np.abs(got_v - exact_v).max()),
                     "equal_to_rank0": bool(np.array_equal(got_i, np.load(out / "rank0_indices.npy")))})
    return {"world": world, "threads_per_rank": 1, "top_k_seconds": max(r["seconds"] for r in ranks),
            "wall_seconds_with_startup": wall, "per_rank": ranks, "comparison": same}


# ---- the paper's job, projected ------------------------------------------------------------------------------
def projection(measured_exact: dict | None) -> dict:
    """Time and storage of caching 1B tokens for Llama-3.1-8B and scoring 1,000 queries, on 1 and 8 H200s."""
    layers, d, ff, kv = 32, 4096, 14336, 1024  # Llama-3.1-8B (its config)
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)]  # q k v o gate up down
    params_linear = layers * sum(a * b for a, b in shapes)
    lm_head = d * 128256
    tokens, seq = 10**9, 1024
    docs = tokens // seq
    fwd = 2 * (params_linear + lm_head) + 4 * layers * seq * d  # FLOPs per token: GEMMs + attention (QK^T, AV)
    bare = 2 * fwd  # forward + the activation-gradient half of the backward (no weight gradients are formed)
    assumed = {"tokens": tokens, "tokens_per_document": seq, "h200_bf16_dense_tflops": 989.0, "h200_fp32_tflops": 67.0,
               "model_flops_utilization_cache": 0.40, "compress_overhead": 1 / 0.85, "fp32_utilization": 0.7,
               "read_gb_per_s_per_node": 5.0}
    out = {"model": "Llama-3.1-8B", "linear_layers": layers * len(shapes), "documents": docs,
           "flops_per_token_cache_step": bare, "assumed": assumed,
           "measured": {"store_bytes_per_value": {"float32": 4, "bfloat16": 2},
                        "cpu_exact_top_k_gflops_this_machine": measured_exact and measured_exact.get("gflops")},
           "defaults": {}}
    for label, k, storage in (("cli (k=256, float32)", 256, 4), ("attributor (k=4096, float32)", 4096, 4),
                              ("attributor (k=4096, bfloat16)", 4096, 2)):
        columns = layers * len(shapes) * k
        store_bytes = docs * columns * storage
        fim_flops = 2 * docs * layers * len(shapes) * k * k
        per = {"columns_per_document": columns, "store_tb": store_bytes / 1e12,
               "fim_eigvecs_gb": layers * len(shapes) * k * k * 4 / 1e9}
        for gpus in (1, 8):
            cache_s = tokens * bare / (gpus * assumed["h200_bf16_dense_tflops"] * 1e12 * assumed["model_flops_utilization_cache"])
            cache_s *= assumed["compress_overhead"]
            fp32 = gpus * assumed["h200_fp32_tflops"] * 1e12 * assumed["fp32_utilization"]
            fim_s = fim_flops / fp32 + store_bytes / (1e9 * assumed["read_gb_per_s_per_node"] * math.ceil(gpus / 8))
            score_s = 2 * 1000 * docs * columns / fp32 + store_bytes / (1e9 * assumed["read_gb_per_s_per_node"] * math.ceil(gpus / 8))
            per[f"{gpus}xH200_hours"] = {"cache": cache_s / 3600, "fim": fim_s / 3600, "exact_top_k_1000_queries": score_s / 3600,
                                         "total": (cache_s + fim_s + score_s) / 3600}
        out["defaults"][label] = per
    return out


# ---- driver ------------------------------------------------------------------------------------------------
def _child(step: str, **kwargs) -> dict:
    """Run one measuring step in a fresh process (its own peak RSS), returning its JSON."""
    done = subprocess.run([sys.executable, str(HERE), "--child", step, "--child-args", json.dumps(kwargs)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"step {step} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


CHILD_STEPS = {"write": step_write, "exact": step_exact, "index": step_index, "ranks": step_ranks}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--shard-rows", type=int, default=64, help="documents per shard (a cache batch)")
    p.add_argument("--spectrum", choices=["power", "isotropic"], default="power")
    p.add_argument("--steps", nargs="+", default=["write", "exact", "index", "ranks"], choices=list(CHILD_STEPS))
    p.add_argument("--factory", default=None, help="FAISS factory (default: attribution.index.DEFAULT_FACTORY)")
    p.add_argument("--project", type=int, default=None, help="projection dimensions (default: the library's; 0: none)")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--candidates", type=int, default=None)
    p.add_argument("--root", default="/tmp/grass_bench_scale", help="where the stores go (deleted unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kwargs = json.loads(args.child_args)
        kwargs = {key: Path(v) if key in ("store", "queries", "out") else v for key, v in kwargs.items()}
        print(json.dumps(CHILD_STEPS[args.child](**kwargs)))
        return {}
    from attribution import index as index_module

    factory = args.factory or index_module.DEFAULT_FACTORY
    project = index_module.DEFAULT_PROJECT if args.project is None else args.project
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
              "date": time.strftime("%Y-%m-%d"), "columns": COLUMNS, "storage_dtype": "bfloat16", "k": args.k,
              "queries": args.queries, "spectrum": args.spectrum, "factory": factory, "project": project, "sizes": {}}
    queries = _queries(root, args.queries, args.spectrum)
    for n in args.sizes:
        store, out = root / f"store_{args.spectrum}_{n}", root / f"out_{args.spectrum}_{n}"
        out.mkdir(exist_ok=True)
        entry = report["sizes"][str(n)] = {}
        if "write" in args.steps:
            shutil.rmtree(store, ignore_errors=True)
            entry["write"] = _child("write", store=str(store), n=n, shard_rows=args.shard_rows, spectrum=args.spectrum)
        if "exact" in args.steps:
            entry["exact"] = _child("exact", store=str(store), queries=str(queries), out=str(out), k=args.k)
        if "index" in args.steps:
            entry["index"] = _child("index", store=str(store), queries=str(queries), out=str(out), k=args.k,
                                    factory=factory, project=project, nprobe=args.nprobe, candidates=args.candidates)
        if "ranks" in args.steps:
            entry["ranks_2"] = _child("ranks", store=str(store), queries=str(queries), out=str(out), k=args.k)
        print(json.dumps({str(n): entry}), file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
    largest = report["sizes"].get(str(max(args.sizes)), {})
    report["paper_job_projection"] = projection(largest.get("exact"))
    emit_json_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
