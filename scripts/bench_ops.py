#!/usr/bin/env python
"""Side-by-side op benchmarks; prints one JSON document (and writes it with --out).

    python scripts/bench_ops.py                 # CPU, the issue's shapes
    python scripts/bench_ops.py --quick         # small shapes, seconds
    python scripts/bench_ops.py --device cuda   # GPU (Triton kernels), see scripts/gpu_check.sh

SJLT: grass::sjlt vs the paper's naive index_add_ vs a dense Gaussian projection, with 0% and 90%
zero inputs. FactGraSS: the fused op vs the naive composition (index_select + bmm + index_add_) vs
LoGra's factorized Gaussian projection (k_in = k_out = sqrt(k)), with k_in' = k_out' = 2 sqrt(k).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys

import torch

import grass_ops
from grass_ops.benchmarking import emit_json_report, median_seconds
from grass_ops.compressors import LoGra
from grass_ops.ops.sjlt import scatter_backend


def timed(fn, device, repeats):
    """Median wall time in ms (synchronizing on GPU)."""
    return 1e3 * median_seconds(fn, repeats, device=device)


def naive_sjlt(x, idx, sign, k):
    """The paper's PyTorch baseline (B.4.1): one index_add_ of the signed, repeated input."""
    s = idx.shape[1]
    signed = (x.unsqueeze(-1) * sign.to(x.dtype)).reshape(x.shape[0], -1)
    out = torch.zeros(x.shape[0], k, dtype=x.dtype, device=x.device)
    return out.index_add_(1, idx.reshape(-1), signed) / math.sqrt(s)


def naive_factgrass(x_in, g_out, in_idx, out_idx, idx, sign, k):
    a = x_in.index_select(-1, in_idx)
    b = g_out.index_select(-1, out_idx)
    return naive_sjlt(torch.bmm(a.transpose(1, 2), b).flatten(1), idx, sign, k)


def random_data(shape, device, dtype, seed, zero_fraction=0.0):
    """Benchmark inputs drawn on ``device`` itself (a GPU draws billions of samples in milliseconds;
    the values only need to be random, not reproducible across devices)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if zero_fraction:
        x *= torch.rand(shape, generator=gen, device=device) >= zero_fraction
    return x.to(dtype)


def bench_sjlt(args, device, dtype):
    rows = []
    for batch in args.batch:
        for zero_fraction in (0.0, 0.9):
            x = random_data((batch, args.p), device, dtype, seed=0, zero_fraction=zero_fraction)
            for k in args.sjlt_k:
                idx, sign = (t.to(device) for t in grass_ops.sjlt_hash(args.p, k, 1, 0))
                row = {"p": args.p, "k": k, "batch": batch, "zero_fraction": zero_fraction, "dtype": str(dtype)}
                row["sjlt_ms"] = timed(lambda: grass_ops.sjlt(x, idx, sign, k), device, args.repeats)
                row["index_add_ms"] = timed(lambda: naive_sjlt(x, idx, sign, k), device, args.repeats)
                dense_bytes = k * args.p * x.element_size()
                if dense_bytes <= args.max_dense_gib * 2**30:
                    dense = random_data((k, args.p), device, dtype, seed=1) / math.sqrt(k)  # a Gaussian projection
                    row["dense_gaussian_ms"] = timed(lambda: x @ dense.T, device, max(1, args.repeats // 2))
                    del dense
                else:
                    row["dense_gaussian_ms"] = None
                    row["dense_gaussian_note"] = f"skipped: the [k, p] matrix needs {dense_bytes / 2**30:.1f} GiB > --max-dense-gib"
                row["speedup_vs_index_add"] = row["index_add_ms"] / row["sjlt_ms"]
                if device.type == "cuda":
                    moved = x.numel() * x.element_size() + x.shape[0] * k * x.element_size() + idx.numel() * 9
                    row["effective_bandwidth_gbs"] = moved / (row["sjlt_ms"] * 1e-3) / 1e9
                    if args.hbm_gbs:
                        row["percent_of_hbm"] = 100 * row["effective_bandwidth_gbs"] / args.hbm_gbs
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return rows


FACT_SHAPES = {
    "gpt2_mlp": dict(d_in=768, d_out=3072, batch=8, tokens=512),
    "llama3_8b": dict(d_in=4096, d_out=4096, batch=1, tokens=1024),
}


def factgrass_setup(d_in, d_out, batch, tokens, k, device, dtype, blowup=2, seed=0):
    x_in = random_data((batch, tokens, d_in), device, dtype, seed)
    g_out = random_data((batch, tokens, d_out), device, dtype, seed + 1)
    root = math.isqrt(k)
    k_in = k_out = blowup * root
    comp = grass_ops.FactGraSS(d_in, d_out, k, k_in, k_out, seed=seed).to(device)
    logra = LoGra(d_in, d_out, root, root, seed=seed).to(device)
    return x_in, g_out, comp, logra


def bench_factgrass(args, device, dtype):
    rows = []
    for name in args.shapes:
        shape = dict(FACT_SHAPES[name])
        if args.llama_tokens and name == "llama3_8b":
            shape["tokens"] = args.llama_tokens
        for k in args.fact_k:
            x_in, g_out, comp, logra = factgrass_setup(**shape, k=k, device=device, dtype=dtype)
            masks = (comp.in_mask.indices, comp.out_mask.indices, comp.projection.idx, comp.projection.sign, k)
            row = {"shape": name, **shape, "k": k, "k_in_prime": comp.k_in, "k_out_prime": comp.k_out, "dtype": str(dtype)}
            row["factgrass_ms"] = timed(lambda: comp.compress_factors(x_in, g_out), device, args.repeats)
            row["naive_ms"] = timed(lambda: naive_factgrass(x_in, g_out, *masks), device, args.repeats)
            row["logra_ms"] = timed(lambda: logra.compress_factors(x_in, g_out), device, args.repeats)
            row["speedup_vs_logra"] = row["logra_ms"] / row["factgrass_ms"]
            row["speedup_vs_naive"] = row["naive_ms"] / row["factgrass_ms"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--p", type=int, default=131072)
    parser.add_argument("--batch", type=int, nargs="+", default=[64], help="SJLT batch sizes")
    parser.add_argument("--sjlt-k", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--fact-k", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--shapes", nargs="+", default=list(FACT_SHAPES), choices=list(FACT_SHAPES))
    parser.add_argument("--llama-tokens", type=int, default=None, help="override T for the Llama shape (B*T)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-dense-gib", type=float, default=4.0, help="skip dense Gaussian matrices above this size (GiB)")
    parser.add_argument("--hbm-gbs", type=float, default=None,
                        help="device HBM bandwidth in GB/s for percent_of_hbm (default: 4800 on H200, 3350 on H100)")
    parser.add_argument("--only", choices=["sjlt", "factgrass"], default=None)
    parser.add_argument("--quick", action="store_true", help="small shapes for a smoke run")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.p, args.batch, args.sjlt_k, args.fact_k, args.repeats = 4096, [8], [64, 256], [64], 3
        FACT_SHAPES.update({n: dict(s, tokens=16, d_in=s["d_in"] // 8, d_out=s["d_out"] // 8) for n, s in FACT_SHAPES.items()})
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and args.hbm_gbs is None:
        name = torch.cuda.get_device_name(device)
        args.hbm_gbs = 4800.0 if "H200" in name else 3350.0 if "H100" in name else None
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_scatter_backend": scatter_backend(),
        "quick": args.quick,
    }
    if args.only in (None, "sjlt"):
        result["sjlt"] = bench_sjlt(args, device, dtype)
    if args.only in (None, "factgrass"):
        result["factgrass"] = bench_factgrass(args, device, dtype)
    emit_json_report(result, args.out)


if __name__ == "__main__":
    main()
