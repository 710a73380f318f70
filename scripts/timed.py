"""Run a command and print, at the end, its wall time and the peak resident memory of its processes
(``resource.getrusage(RUSAGE_CHILDREN)``: the largest child, which is the Python job here).

    python scripts/timed.py LABEL -- COMMAND [ARGS...]     # exits with the command's status
"""
from __future__ import annotations

import resource
import subprocess
import sys
import time


def peak_rss_gib() -> float:
    """The largest peak RSS among the finished child processes, in GiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python scripts/timed.py LABEL -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    label, command = argv[0], argv[2:]
    start = time.perf_counter()
    status = subprocess.call(command)
    print(f"{label}: {time.perf_counter() - start:.0f} s wall, peak RSS {peak_rss_gib():.2f} GiB "
          f"(exit status {status})", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
