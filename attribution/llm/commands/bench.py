"""``grass-attribute bench``: throughput of the compress step and the cache stage (attribution.llm.bench)."""
from __future__ import annotations

import argparse

from grass_ops.benchmarking import emit_json_report

from ... import llm
from . import flags as f
from .common import check_out


def run(args):
    from .. import bench

    check_out(args)
    report = {}
    if args.job is not None:
        report["job"] = [bench.job(flags.split(), args.job_documents) for flags in args.job or [""]]
    if args.models:
        report.update(bench.run(models=args.models, ks=args.ks, batch_size=args.batch_size, seq_len=args.seq_len,
                                repeats=args.repeats, device=args.device, dtype=args.dtype, fingerprint=args.fingerprint,
                                on_progress=(lambda partial: emit_json_report({**report, **partial, "partial": True}, args.out,
                                                                              quiet=True)) if args.out else None))
    emit_json_report(report, args.out)
    return report


COMMAND = f.Command("bench", "throughput of the compress step and the cache stage", [
    f.Flag("--job", "measure the main job's cache stage in a fresh process (real tokens/s, peak RSS, store size) with the "
                    "default flags (--job) or extra `cache` flags (--job='--no-compile'); repeatable (default: not measured)",
           action="append", nargs="?", const="", metavar="FLAGS"),
    f.Flag("--job-documents", "--job: Python-docs paragraphs cached", default=96, type=f.positive_int),
    f.Flag("--models", "models of the per-model cache-step table (none: skip it)", default=["smollm2", "gpt2-random"],
           nargs="*"),
    f.Flag("--ks", "compressed dimensions per layer", default=[256, 1024, 4096], type=int, nargs="+"),
    f.Flag("--batch-size", "sequences per batch", default=2, type=int),
    f.Flag("--seq-len", "tokens per sequence", default=128, type=int),
    f.Flag("--repeats", "timed repeats per row", default=3, type=int),
    f.Flag("--device", "torch device", default="cpu"),
    f.Flag("--dtype", "dtype of the model's weights", default="float32", choices=sorted(llm.DTYPES)),
    f.Flag("--fingerprint", "also time fingerprinting the weights (sha256 on the host, lin64 on the device)", default=True,
           action=argparse.BooleanOptionalAction),
    f.Flag("--out", "JSON file of the results (default: printed)"),
], run)
