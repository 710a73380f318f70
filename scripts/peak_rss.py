"""Run a command, then print its peak resident memory (its largest process, children included, as
getrusage(RUSAGE_CHILDREN) reports it) and its wall time; exit with the command's status.

    python3 scripts/peak_rss.py python3 -m pytest -q tests/attribution/test_store.py
"""
import resource
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    start = time.perf_counter()
    status = subprocess.call(argv)
    seconds = time.perf_counter() - start
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit
    print(f"peak RSS {peak / 2**30:.2f} GiB (largest process), {seconds:.0f} s wall: {' '.join(argv)}", flush=True)
    return status if status >= 0 else 128 - status  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
