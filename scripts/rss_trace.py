#!/usr/bin/env python
"""Run a command and sample the resident memory of its process tree every --interval seconds: a TSV of
(seconds since start, RSS MiB) and, at the end, JSON with the wall time, the peak and the exit status. The
phase peaks of the demo in BENCHMARKS.md ("The whole job on a fresh output folder") come from such a trace,
split at the phase seconds that the demo records in report.json.

    python scripts/rss_trace.py --out trace.tsv -- python -m attribution.llm.cli demo --out out/fresh --store out/fresh/store
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def tree_rss(process) -> int:
    """RSS bytes of ``process`` and its descendants (those that exit meanwhile are skipped)."""
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the TSV trace: seconds, RSS MiB")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    if not args.interval > 0:
        parser.error(f"--interval must be positive, got {args.interval}")
    try:
        import psutil
    except ModuleNotFoundError:
        parser.error("rss_trace needs psutil (pip install psutil)")
    start = time.perf_counter()
    child = subprocess.Popen(command)
    process, peak = psutil.Process(child.pid), 0
    with open(args.out, "w") as trace:
        while child.poll() is None:
            try:
                rss = tree_rss(process)
            except psutil.NoSuchProcess:
                break
            peak = max(peak, rss)
            trace.write(f"{time.perf_counter() - start:.1f}\t{rss / 2**20:.0f}\n")
            trace.flush()
            time.sleep(args.interval)
    status = child.wait()
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak / 2**20, "status": status,
                      "trace": args.out}))
    return status


if __name__ == "__main__":
    sys.exit(main())
